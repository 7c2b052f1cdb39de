"""The ComfyUI keyframe backend: the keyframe worker calls `generate`, this module turns it
into upload -> POST /prompt -> wait -> GET /view on one of the configured servers.

Waiting is pushed, not polled: the server's websocket (`events.py`) says when the prompt is
done, and /history, the source of truth, is read then (and every queue_check_interval as a
safety net). Without a socket (refused, silent, dropped) /history is polled every
poll_interval. Look-ups (history, queue) have a short deadline of their own
(`lookup_timeout`) and are not retried on a timeout, so a server that accepts connections
and never answers is benched within seconds and the keyframe moves on.

One server that cannot run the workflow (a checkpoint, node, sampler it lacks, or a
rejection of the workflow) is set aside and the keyframe tried on the next; only when every
server is set aside is the misfit a PermanentBackendError.

Crash safety: the worker commits `request.prompt_id` to the ledger before calling, and
`generate` looks that id up (history, then queue) on every reachable server before it posts
anything, asking `server_hint` (info["server"] of an earlier attempt) and the server this
process last sent it to first. A caller that records the server (`on_server`, called before
every POST, and nothing is posted when it fails) and has none on record for the prompt has
never sent it anywhere: then the look-up is skipped (three requests less per keyframe). Only when no server has finished or queued it is it posted,
always under that same prompt_id. A server that forgets it while we wait (it restarted) gets
it once more; forgetting it twice is a TransientBackendError, never a third post.

How a failed run is classified (history status `error`):
  * `execution_interrupted` -> TransientBackendError (our deadline, a user, a restart);
  * `execution_error` whose exception type or message looks like a resource problem (out of
    memory, CUDA/cuDNN/cuBLAS errors, MemoryError, allocation failures, interruption,
    timeouts or connection errors inside a node) -> TransientBackendError;
  * any other `execution_error` -> PermanentBackendError: a node failed on its input, and the
    same input will fail again (PIL.UnidentifiedImageError, ValueError, KeyError, ...).
A transient failure found on re-attach is run again (same prompt_id, same server); the stale
history entry is told apart from the new run by its queue number.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from dreamd.backends import KeyframeRequest, KeyframeResult
from dreamd.backends.comfyui.client import (DEFAULT_MAX_PIXELS, ComfyUIClient, OutputRef,
                                            PromptRejectedError, ServerUnreachableError,
                                            check_output_ref, local_path)
from dreamd.backends.comfyui.events import EventsLostError, Progress, ServerEvents
from dreamd.backends.comfyui.servers import ServerHealth, ServerPool
from dreamd.backends.comfyui.workflow import (InputPath, Workflow, WorkflowError, check_against,
                                              checkpoints_in, fill, load_workflow, output_node,
                                              require, resolve_mapping)
from dreamd.errors import KeyframeInterruptedError, PermanentBackendError, TransientBackendError

log = logging.getLogger(__name__)

PLACEMENTS_KEPT = 1024  # retries come soon after a failure; older ones ask every server
INTERRUPT_WAIT = 10.0   # seconds interrupt() waits for a prompt being posted to be cancelled
# Inputs are uploaded under INPUT_SLOTS names, by chain index, overwriting: ComfyUI's input
# dir keeps that many files for a whole run. Keyframes are made one after another (k+1 is
# img2img of k), so with two slots a prompt still queued keeps its own input.
INPUT_SLOTS = 2
STOP_CHECK = 0.25       # seconds: how soon a wait on the socket notices that dreamd stops

TRANSIENT_EXECUTION = re.compile(
    r"out ?of ?memory|outofmemory|\boom\b|cuda|cudnn|cublas|hip error|memoryerror|"
    r"unable to allocate|allocation|interrupt|timeout|timed out|connectionerror", re.IGNORECASE)


@dataclass(frozen=True)
class Template:
    """A loaded workflow and where the daemon's values go in it."""

    workflow: Workflow
    mapping: dict[str, InputPath]
    source: str

    @classmethod
    def load(cls, name_or_path: str | Path, overrides: dict[str, str] | None,
             required: tuple[str, ...]) -> Template:
        workflow, path = load_workflow(name_or_path)
        mapping = resolve_mapping(workflow, overrides)
        require(mapping, required, str(path))
        return cls(workflow, mapping, str(path))


@dataclass(frozen=True)
class Outcome:
    """What a history entry says: finished well, or failed and whether a retry can help."""

    ok: bool
    transient: bool = False
    message: str = ""


def classify(entry: dict[str, Any]) -> Outcome:
    status = entry.get("status") or {}
    for kind, data in status.get("messages") or []:
        if kind == "execution_interrupted":
            return Outcome(False, True, f"interrupted at node {data.get('node_id')} "
                                        f"({data.get('node_type')})")
        if kind == "execution_error":
            etype, emsg = data.get("exception_type", "?"), str(data.get("exception_message", "")).strip()
            text = (f"node {data.get('node_id')} ({data.get('node_type')}) failed: {etype}: {emsg}")
            return Outcome(False, bool(TRANSIENT_EXECUTION.search(f"{etype} {emsg}")), text)
    if status.get("status_str") == "success" or (not status and entry.get("outputs")):
        return Outcome(True)
    return Outcome(False, True, f"ended with status {status.get('status_str')!r} and no error message")


@dataclass
class _Job:
    """One generate() call's working state."""

    request: KeyframeRequest
    template: Template
    png: bytes | None
    prompt_id: str
    values: dict[str, Any]
    posts: int = 0                    # POST /prompt made by this call
    resubmissions: int = 0            # after the server forgot the prompt
    reattached: str = ""              # "", "queued" or "finished": what re-attach found
    stale_number: int | None = None   # queue number of an earlier failed run under this id
    reuploaded: bool = False
    upload: str | None = None
    entry: dict[str, Any] | None = None
    told: str | None = None           # the server last reported through request.on_server
    pushed: bool = False              # followed over the websocket to the end
    url: str | None = None            # the server that has it, once posted or found
    interrupted: bool = False         # interrupt() was called: a pause wants the GPU
    cancelled: bool = False           # /interrupt and the queue delete are being sent
    cancel_sent: bool = False         # ... and were (whichever thread sent them)


@dataclass
class _Server:
    client: ComfyUIClient             # uploads, POST /prompt, /object_info, /view
    lookup: ComfyUIClient             # history and queue look-ups: short deadline, no retry on timeout
    events: ServerEvents | None       # None: push is off, /history is polled
    object_info: dict[str, Any] | None = None


class ComfyUIBackend:
    """KeyframeBackend over one or more ComfyUI servers. Validate once with `validate()`."""

    name = "comfyui"

    def __init__(self, urls: str | Sequence[str] = ("http://127.0.0.1:8188",), *,
                 workflow: str | Path = "sd15_img2img",
                 txt2img_workflow: str | Path = "sd15_txt2img",
                 mapping: dict[str, str] | None = None,
                 txt2img_mapping: dict[str, str] | None = None,
                 checkpoint: str | None = None,
                 data_dir: str | Path | None = None,
                 upload_subfolder: str = "dreamd", input_tag: str = "dreamd",
                 connect_timeout: float = 3.0, read_timeout: float = 30.0, tries: int = 4,
                 poll_interval: float = 0.25, queue_check_interval: float = 1.0,
                 deadline: float = 300.0, bench_base: float = 2.0, bench_cap: float = 300.0,
                 recent_bench_cap: float = 10.0, lookup_timeout: float = 5.0,
                 push: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS, client_id: str | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 stopping: threading.Event | None = None) -> None:
        urls = [urls] if isinstance(urls, str) else list(urls)
        self.pool = ServerPool(urls, bench_base=bench_base, bench_cap=bench_cap,
                               recent_cap=recent_bench_cap, clock=clock)
        self.img2img = Template.load(workflow, mapping, ("image", "prompt", "seed"))
        self.txt2img = Template.load(txt2img_workflow, txt2img_mapping,
                                     ("prompt", "seed", "width", "height"))
        self.checkpoint = checkpoint or None
        for t in (self.img2img, self.txt2img):
            if self.checkpoint and "checkpoint" not in t.mapping:
                raise WorkflowError(f"workflow {t.source}: a checkpoint is configured but no "
                                    "ckpt_name slot was found; map 'checkpoint' explicitly")
        self.data_dir = Path(data_dir) if data_dir else None
        self.upload_subfolder = upload_subfolder
        # names this process's inputs: daemons on other data dirs sharing a server must not
        # overwrite each other's slots
        self.input_tag = input_tag
        self.poll_interval, self.queue_check_interval = poll_interval, queue_check_interval
        self.deadline = deadline
        self._sleep, self._clock = sleep, clock
        # Set when the daemon stops: a wait on the socket ends within STOP_CHECK seconds.
        self.stopping = stopping or threading.Event()
        # Called with {"prompt_id", "node", "node_type", "step", "steps"} while a prompt
        # runs and with None when it ends (the daemon shows it in status.json).
        self.on_progress: Callable[[dict[str, Any] | None], None] | None = None
        self.client_id = client_id or f"dreamd-{uuid.uuid4().hex[:8]}"
        lookup_timeout = min(lookup_timeout, read_timeout)
        self._servers = {u: _Server(
            ComfyUIClient(u, client_id=self.client_id, connect_timeout=connect_timeout,
                          read_timeout=read_timeout, tries=tries, sleep=sleep,
                          max_pixels=max_pixels),
            ComfyUIClient(u, client_id=self.client_id, connect_timeout=connect_timeout,
                          read_timeout=lookup_timeout, tries=tries, sleep=sleep,
                          retry_read_timeouts=False),
            ServerEvents(u, self.client_id, connect_timeout=connect_timeout,
                         first_frame_timeout=min(2.0, lookup_timeout), clock=clock)
            if push else None)
            for u in self.pool.urls}
        # prompt_id -> server it was last posted to by this process (a retry asks it first).
        self._placements: OrderedDict[str, str] = OrderedDict()
        # generate() calls in progress (prompt_id -> job), for interrupt() from another thread
        self._in_flight: dict[str, _Job] = {}
        self._flight_lock = threading.Lock()

    # -- surface -----------------------------------------------------------------------------

    def validate(self, urls: Sequence[str] | None = None) -> list[ServerHealth]:
        """Check both workflows against every reachable server's /object_info (node types,
        checkpoint, sampler, scheduler), or only against `urls`. A server that cannot run
        them is set aside (with the reason and the checkpoints it has), one that can is put
        back; raises PermanentBackendError only when every server is set aside.
        Unreachable servers are benched and left for later."""
        last: PermanentBackendError | None = None
        for url in self.pool.urls if urls is None else urls:
            try:
                self._servers[url].object_info = None    # read it fresh: models come and go
                info = self._object_info(url)
            except ServerUnreachableError as exc:
                self._failed(url, exc)
                continue
            except PermanentBackendError as exc:   # /object_info answered, but not JSON of nodes
                self.set_aside(url, exc)
                last = exc
                continue
            try:
                for t in (self.img2img, self.txt2img):
                    filled = fill(t.workflow, t.mapping, {"checkpoint": self.checkpoint})
                    check_against(filled, info, source=t.source, server=url)
            except WorkflowError as exc:
                self.set_aside(url, exc, checkpoints_in(info))
                last = exc
                continue
            if self.pool.fit(url):
                log.info("ComfyUI at %s can run the workflow now; it takes keyframes again", url)
        if last is not None and self.pool.all_unfit():
            raise last
        return self.health()

    def set_aside(self, url: str, error: Exception, checkpoints: Sequence[str] | None = None) -> None:
        """`url` cannot run the workflow: no keyframe goes there until it validates again."""
        if checkpoints is None:
            info = self._servers[url].object_info
            checkpoints = checkpoints_in(info) if info else []
        if self.pool.set_aside(url, str(error), checkpoints):
            others = [u for u in self.pool.urls if not self.pool.is_unfit(u)]
            log.error("ComfyUI at %s is set aside: %s%s", url, error,
                      f" (keyframes go to {', '.join(others)})" if others else "")

    def generate(self, request: KeyframeRequest, *, server_hint: str | None = None) -> KeyframeResult:
        """Make one keyframe. `server_hint` (default: request.server_hint) is info["server"] of
        an earlier attempt at the same prompt_id, asked first on re-attach (every reachable
        server is asked anyway)."""
        server_hint = server_hint or request.server_hint
        started = self._clock()
        job = self._job(request)
        self._check_stop()
        with self._flight_lock:
            self._in_flight[job.prompt_id] = job
        try:
            url = self._reattach(job, server_hint)
            if url is None:
                url = self._submit_somewhere(job)
            job.url = url
            try:
                self._check_interrupted(job)
                entry = job.entry or self._wait(url, job)
                return self._result(url, job, entry, started)
            except ServerUnreachableError as exc:
                self._failed(url, exc)
                raise TransientBackendError(f"lost ComfyUI at {url} while waiting for prompt "
                                            f"{job.prompt_id} (it is re-attached on retry): "
                                            f"{exc}") from exc
        except TransientBackendError as exc:
            if job.interrupted and not isinstance(exc, KeyframeInterruptedError):
                # ComfyUI said "interrupted" before our own check did: the same pause
                raise KeyframeInterruptedError(f"prompt {job.prompt_id} was interrupted for "
                                               f"a pause ({exc})") from exc
            raise
        finally:
            with self._flight_lock:
                self._in_flight.pop(job.prompt_id, None)
            self._progress(None)

    def interrupt(self) -> str:
        """Stop every prompt this backend is waiting for, now (the guard frees the GPU for
        a game): POST /interrupt (targeted at the prompt) and take it off the queue when it
        has not started; the waiting generate() raises KeyframeInterruptedError within
        STOP_CHECK seconds. Returns which prompts were stopped, "" when none was."""
        with self._flight_lock:
            jobs = list(self._in_flight.values())
        for job in jobs:
            job.interrupted = True
            self._cancel(job)
        # a prompt being posted right now is cancelled by its own generate() once the POST
        # returns (within STOP_CHECK): wait for that, so /interrupt goes before the /free
        # that follows this call (milliseconds; the bound is for a POST that hangs)
        deadline = time.monotonic() + INTERRUPT_WAIT
        while time.monotonic() < deadline and any(
                not j.cancel_sent and j.prompt_id in self._in_flight for j in jobs):
            time.sleep(0.01)
        return ", ".join(f"prompt {j.prompt_id} on {j.url or 'no server yet'}" for j in jobs)

    def _cancel(self, job: _Job) -> None:
        with self._flight_lock:
            if job.cancelled or job.url is None:
                return          # not posted yet: generate() cancels it once it is
            job.cancelled = True
        client = self._servers[job.url].lookup
        try:
            client.interrupt(job.prompt_id)
            client.delete_queued([job.prompt_id])
        except (ServerUnreachableError, PermanentBackendError) as exc:
            log.warning("interrupting prompt %s on %s failed: %s", job.prompt_id, job.url, exc)
        finally:
            # interrupt() returns (and the guard's /free follows) only after this, when the
            # waiting generate() sent them itself: /free must not overtake them
            job.cancel_sent = True

    def _check_interrupted(self, job: _Job) -> None:
        if job.interrupted:
            self._cancel(job)       # posted after interrupt() looked: stop it now
            raise KeyframeInterruptedError(f"prompt {job.prompt_id} was interrupted for a "
                                           "pause")

    def free(self) -> dict[str, str | None]:
        """POST /free (unload models, free memory) on every server not benched: the guard's
        call when a game starts. Returns url -> None, or the error for that server."""
        out: dict[str, str | None] = {}
        for url in self.pool.urls:
            if self.pool.is_benched(url):
                out[url] = f"benched: {self.pool.last_error(url)}"
                continue
            try:
                self._servers[url].client.free()
                out[url] = None
            except (ServerUnreachableError, PermanentBackendError) as exc:
                out[url] = str(exc)
        return out

    def probe(self, urls: Sequence[str] | None = None) -> list[ServerHealth]:
        """GET /system_stats on every server (benched ones too: they may be back), or on
        `urls` only."""
        for url in self.pool.urls if urls is None else urls:
            try:
                self._servers[url].client.system_stats()
                self.pool.mark_ok(url)
            except ServerUnreachableError as exc:
                self._failed(url, exc)
        return self.health()

    def health(self) -> list[ServerHealth]:
        return self.pool.health()

    def bench(self, url: str, error: Exception) -> None:
        """A health check outside `generate` found `url` failing: bench it like a failed call
        (a warning the first time; a server that stays down is re-checked quietly)."""
        failing = any(h.url == url and h.failures for h in self.pool.health())
        seconds = self.pool.mark_failed(url, str(error))
        self._servers[url].object_info = None
        (log.debug if failing else log.warning)("ComfyUI at %s benched for %.0fs: %s", url,
                                                seconds, error)

    def close(self) -> None:
        for server in self._servers.values():
            server.client.close()
            server.lookup.close()
            if server.events is not None:
                server.events.close()

    # -- steps -------------------------------------------------------------------------------

    def _job(self, request: KeyframeRequest) -> _Job:
        if request.width % 8 or request.height % 8:
            raise PermanentBackendError(f"keyframe size {request.width}x{request.height} is not a "
                                        "multiple of 8; SD latents would crop it")
        template = self.img2img if request.image is not None else self.txt2img
        png = None
        if request.image is not None and request.image_png is not None:
            png = request.image_png       # the input file as it is: no encode
        elif request.image is not None:
            img = request.image.convert("RGB")
            if img.size != (request.width, request.height):
                img = img.resize((request.width, request.height), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            img.save(buf, "PNG", compress_level=1)  # speed over size: it crosses localhost or a LAN
            png = buf.getvalue()
        values = {"prompt": request.prompt, "negative_prompt": request.negative_prompt,
                  "seed": request.seed, "steps": request.steps, "cfg": request.cfg,
                  "sampler": request.sampler, "scheduler": request.scheduler,
                  "denoise": request.denoise, "width": request.width, "height": request.height,
                  "checkpoint": self.checkpoint}
        return _Job(request, template, png, request.prompt_id or str(uuid.uuid4()), values)

    def _lookup_order(self, prompt_id: str, hint: str | None) -> list[str]:
        first = [u.rstrip("/") for u in (hint, self._placements.get(prompt_id)) if u]
        order = [u for u in first if u in self._servers] + self.pool.urls
        return [u for u in dict.fromkeys(order) if not self.pool.is_benched(u)]

    def _reattach(self, job: _Job, hint: str | None) -> str | None:
        """Find the prompt on a server; act on what is found. None = nobody has it."""
        pid = job.prompt_id
        if hint is None and job.request.on_server is not None and pid not in self._placements:
            # The caller records the server before every POST (and nothing is posted when
            # it cannot): no server on record means no server was ever sent this prompt.
            return None
        for url in self._lookup_order(pid, hint):
            client = self._servers[url].lookup
            try:
                entry, number = client.history(pid), None
                if entry is None:
                    number = client.queue().number_of(pid)
                    if number is None:  # it may have finished between the two reads
                        entry = client.history(pid)
            except ServerUnreachableError as exc:
                self._failed(url, exc)
                continue
            self.pool.mark_ok(url)
            if number is not None or entry is not None:
                self._tell(job, url)
            if number is not None:
                log.info("prompt %s is queued on %s: waiting for it, not posting again", pid, url)
                job.reattached = "queued"
                return url
            if entry is not None:
                outcome = classify(entry)
                if outcome.ok:
                    log.info("prompt %s already finished on %s: fetching it", pid, url)
                    job.reattached, job.entry = "finished", entry
                    return url
                if not outcome.transient:
                    raise PermanentBackendError(f"ComfyUI at {url}: prompt {pid} {outcome.message}")
                if self.pool.is_unfit(url):   # cannot run it now: another server gets it
                    log.info("prompt %s failed on %s (%s), which is set aside: posting it "
                             "elsewhere", pid, url, outcome.message)
                    return None
                log.info("prompt %s failed on %s (%s): running it again", pid, url, outcome.message)
                job.reattached, job.stale_number = "finished", _number(entry)
                self._post_or_bench(url, job)
                return url
        return None

    def _submit_somewhere(self, job: _Job) -> str:
        for url in self.pool.candidates():
            self._check_stop()
            try:
                self._post(url, job)
                return url
            except ServerUnreachableError as exc:
                self._failed(url, exc)
                if exc.sent:  # it may be queued there; the retry's re-attach will see
                    raise
            except (WorkflowError, PromptRejectedError) as exc:
                # This server cannot run it (a model it lacks, an old node pack); another may.
                self.set_aside(url, exc)
                if self.pool.all_unfit():
                    raise
        raise TransientBackendError(f"every ComfyUI server is down: {self.pool.describe_down()}")

    def _post_or_bench(self, url: str, job: _Job) -> None:
        try:
            self._post(url, job)
        except ServerUnreachableError as exc:
            self._failed(url, exc)
            raise
        except (WorkflowError, PromptRejectedError) as exc:
            self.set_aside(url, exc)
            raise

    def _post(self, url: str, job: _Job) -> None:
        client = self._servers[url].client
        filled = self._prepare(url, job)
        events = self._servers[url].events
        if events is not None:
            events.ready()    # open before the POST, so no frame of this prompt is missed
        self._tell(job, url)  # before posting: a crash mid-POST leaves the right hint
        try:
            number = client.queue_prompt(filled, job.prompt_id)
        except PromptRejectedError as exc:
            if not self._input_lost(exc, job) or job.reuploaded:
                raise
            # The server's input dir lost our upload (cleaned, or another machine): send it again.
            log.warning("ComfyUI at %s lost input %s; uploading it again", url, job.upload)
            assert job.png is not None
            client.forget_upload(job.png)
            job.reuploaded = True
            number = client.queue_prompt(self._prepare(url, job), job.prompt_id)
        job.posts += 1
        job.url = url
        self._placements[job.prompt_id] = url
        self._placements.move_to_end(job.prompt_id)
        while len(self._placements) > PLACEMENTS_KEPT:
            self._placements.popitem(last=False)
        self.pool.mark_ok(url)
        log.info("posted prompt %s to %s as number %s", job.prompt_id, url, number)

    def _tell(self, job: _Job, url: str) -> None:
        """Report the prompt's server to the caller (the keyframe worker records it in the
        ledger) before the POST; when that fails the prompt is not posted (transient)."""
        callback = job.request.on_server
        if callback is None or job.told == url:
            return
        try:
            callback(url)
            job.told = url
        except Exception as exc:
            # Not posted unrecorded: a retry without a server on record skips the look-up.
            raise TransientBackendError(f"recording that prompt {job.prompt_id} goes to {url} "
                                        f"failed, so it was not posted: {exc}") from exc

    def _input_lost(self, exc: PromptRejectedError, job: _Job) -> bool:
        slot = job.template.mapping.get("image")
        return job.png is not None and slot is not None and any(
            node == slot.node and name == slot.input and kind == "custom_validation_failed"
            for node, name, kind in exc.failed_inputs())

    def _prepare(self, url: str, job: _Job) -> Workflow:
        """Upload the input (once per content), fill the template, check it against the server."""
        info = self._object_info(url)
        values = dict(job.values)
        if job.png is not None:
            slot = job.request.chain_index % INPUT_SLOTS
            job.upload = values["image"] = self._servers[url].client.upload_as(
                job.png, f"{self.input_tag}_input_{slot}.png", subfolder=self.upload_subfolder)
        filled = fill(job.template.workflow, job.template.mapping, values)
        check_against(filled, info, source=job.template.source, server=url)
        return filled

    def _object_info(self, url: str) -> dict[str, Any]:
        server = self._servers[url]
        if server.object_info is None:
            server.object_info = server.client.object_info()
        return server.object_info

    def _fresh(self, entry: dict[str, Any] | None, job: _Job) -> dict[str, Any] | None:
        if entry is not None and job.stale_number is not None and _number(entry) == job.stale_number:
            return None  # the earlier failed run; ours is still queued
        return entry

    def _wait(self, url: str, job: _Job) -> dict[str, Any]:
        """Until the prompt's history entry is there: pushed (the socket says when to look)
        or, without a socket, polled. Either way /history decides."""
        server, pid = self._servers[url], job.prompt_id
        events = server.events if server.events is not None and server.events.ready() else None
        now = self._clock()
        deadline_at = now + self.deadline
        # Just posted over a live socket: nothing to look at before the socket speaks.
        next_look = now + self.queue_check_interval if events is not None and job.posts else now
        next_queue_check = now + self.queue_check_interval
        node_types = {n: v.get("class_type") for n, v in job.template.workflow.items()}

        def progress(p: Progress) -> None:
            self._progress({"prompt_id": pid, "node": p.node, "node_type": node_types.get(p.node),
                            "step": p.step, "steps": p.steps})
        while True:
            self._check_stop()
            self._check_interrupted(job)
            now = self._clock()
            if now >= deadline_at:      # first: looks slower than the interval never starve it
                return self._give_up(url, job)
            if now >= next_look:
                entry = self._fresh(server.lookup.history(pid), job)
                if entry is not None:
                    return entry
                next_look = now + (self.queue_check_interval if events is not None
                                   else self.poll_interval)
                if now >= next_queue_check:
                    next_queue_check = now + self.queue_check_interval
                    if server.lookup.queue().number_of(pid) is None:
                        entry = self._fresh(server.lookup.history(pid), job)
                        if entry is not None:
                            return entry
                        self._forgotten(url, job)
                continue
            left = min(next_look, deadline_at) - now
            if events is None:
                self._sleep(max(0.0, min(left, STOP_CHECK)))
                continue
            try:
                said = events.wait(pid, min(left, STOP_CHECK), progress)
            except EventsLostError as exc:
                # Reconnect once (a restarted server); frames may have been missed in
                # between, so /history is read at once either way.
                events = server.events if server.events.ready() else None
                log.info("prompt %s: the websocket of %s dropped (%s); %s", pid, url, exc,
                         "reconnected" if events is not None else "polling /history")
                next_look = self._clock()
                continue
            if said is not None:     # ended: the history entry is there (or about to be)
                job.pushed = True
                next_look = self._clock()

    def _check_stop(self) -> None:
        if self.stopping.is_set():
            raise TransientBackendError("dreamd is stopping (the prompt is re-attached at the "
                                        "next start)")

    def _progress(self, value: dict[str, Any] | None) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(value)
            except Exception:  # a status to show, never a reason to fail the keyframe
                log.exception("publishing the progress of a prompt failed")

    def _forgotten(self, url: str, job: _Job) -> None:
        """Neither queued nor in history: the server restarted. Post it once more, unless
        interrupt() took it off the queue (then the look saw our own deletion)."""
        self._check_interrupted(job)
        if job.resubmissions >= 1:
            raise TransientBackendError(f"ComfyUI at {url} forgot prompt {job.prompt_id} again after "
                                        "it was resubmitted; is it restarting in a loop?")
        job.resubmissions += 1
        log.warning("ComfyUI at %s forgot prompt %s (restarted?); submitting it again", url, job.prompt_id)
        self._servers[url].object_info = None  # a restarted server may have other models
        self._post_or_bench(url, job)

    def _give_up(self, url: str, job: _Job) -> dict[str, Any]:
        client, pid = self._servers[url].lookup, job.prompt_id
        queue = client.queue()
        if pid in queue.running:
            client.interrupt(pid)
            action = "interrupted it"
        elif pid in queue.pending:
            client.delete_queued([pid])
            action = "took it off the queue"
        else:
            action = "it was neither running nor queued"
        entry = self._fresh(client.history(pid), job)
        if entry is not None and classify(entry).ok:  # it finished while we looked
            return entry
        raise TransientBackendError(f"ComfyUI at {url} did not finish prompt {pid} within "
                                    f"{self.deadline:g}s; {action}")

    def _result(self, url: str, job: _Job, entry: dict[str, Any], started: float) -> KeyframeResult:
        outcome = classify(entry)
        if not outcome.ok:
            cls = TransientBackendError if outcome.transient else PermanentBackendError
            raise cls(f"ComfyUI at {url}: prompt {job.prompt_id} {outcome.message}")
        ref = self._output_ref(url, job, entry)
        request = job.request
        image, data = self._servers[url].client.fetch_image(ref, (request.width, request.height))
        saved = self._save(ref, data)
        return KeyframeResult(image, info={
            "prompt_id": job.prompt_id, "server": url, "outputs": entry.get("outputs", {}),
            "output": str(ref.relative_path), "saved": str(saved) if saved else None,
            # what the keyframe left in the server's folders, and their bytes' hashes: a
            # ComfyUI whose folders the daemon knows has them removed once the keyframe is
            # in the ledger (dreamd/backends/comfyui/folders.py), and only when they match
            "output_type": ref.type, "output_sha256": hashlib.sha256(data).hexdigest(),
            "upload_sha256": hashlib.sha256(job.png).hexdigest() if job.png else None,
            "workflow": job.template.source, "upload": job.upload, "posts": job.posts,
            "resubmissions": job.resubmissions, "reattached": job.reattached,
            "pushed": job.pushed,
            "elapsed_s": round(self._clock() - started, 3)})

    def _output_ref(self, url: str, job: _Job, entry: dict[str, Any]) -> OutputRef:
        outputs = entry.get("outputs") or {}
        preferred = output_node(job.template.workflow, job.template.mapping)
        nodes = ([preferred] if preferred in outputs else []) + sorted(outputs)
        for node in nodes:
            images = (outputs.get(node) or {}).get("images") or []
            if images:
                return check_output_ref(images[0])
        raise PermanentBackendError(f"ComfyUI at {url}: prompt {job.prompt_id} finished without an "
                                    "image output; the workflow must end in PreviewImage or SaveImage")

    def _save(self, ref: OutputRef, data: bytes) -> Path | None:
        """Keep the raw output under data_dir, written to a temporary name and renamed."""
        if self.data_dir is None:
            return None
        path = local_path(self.data_dir, ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def _failed(self, url: str, exc: Exception) -> None:
        seconds = self.pool.mark_failed(url, str(exc))
        self._servers[url].object_info = None
        log.warning("ComfyUI at %s benched for %.0fs: %s", url, seconds, exc)


def _number(entry: dict[str, Any]) -> int | None:
    prompt = entry.get("prompt")
    return prompt[0] if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) else None
