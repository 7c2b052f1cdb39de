"""The ComfyUI backend as `dreamd run` uses it: ComfyUIBackend built from [comfyui], plus a
health thread, the procedural fallback and the optional supervised ComfyUI process.

The health thread checks each server (/system_stats; a failing one is benched with doubling
backoff up to bench_seconds_max and checked again when its bench ends), validates the
workflows against a server's /object_info the first time it answers, and publishes what it
knows in `ctx.facts` and in the ledger (runtime_state.comfyui_health, read by `dreamd status`):

    comfyui_status    ok | starting | down | fallback | error     (status.json)
    backend_error     a permanent configuration failure (a workflow or checkpoint that NO
                      server can run): the backend stops, once, with that message, until the
                      daemon is restarted. One server that cannot run it is only set aside
                      (listed in `dreamd status` with the reason and the checkpoints it
                      has) and validated again every UNFIT_RECHECK seconds
    keyframe_progress the running prompt's step and node, from the websocket (status.json)
    backend_unusable  why no keyframe can be made right now (error, every server down, the
                      supervised ComfyUI still starting), or None: while set, the planner plans
                      nothing and the keyframe worker claims nothing, so waiting for a server
                      burns no attempts and piles up no rows

With fallback = "procedural" the embedded dreamer makes the keyframes while every server is
down; the row then says backend = 'procedural'.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from dreamd.backends import KeyframeRequest, KeyframeResult
from dreamd.backends.comfyui.backend import ComfyUIBackend
from dreamd.backends.comfyui.client import (ComfyUIClient, PromptRejectedError,
                                            ServerUnreachableError)
from dreamd.backends.comfyui.folders import Tidy, locate, sweep_once
from dreamd.backends.comfyui.supervisor import ComfyUISupervisor, stop_process_tree
from dreamd.backends.comfyui.workflow import WorkflowError
from dreamd.errors import ConfigError, PermanentBackendError, TransientBackendError

log = logging.getLogger("dreamd.comfyui")

TICK = 0.5                  # seconds between passes of the health thread
HEALTH_EVERY = 5.0          # seconds between checks of a server that answers
PERSIST_EVERY = 60.0        # the ledger copy is rewritten at least this often (last_ok moves)
PERMANENT_IN_A_ROW = 3      # keyframes failing for good in a row: the backend stops
UNFIT_RECHECK = 30.0        # seconds between validations of a server that was set aside
STATUSES = ("ok", "starting", "down", "fallback", "error")


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


class DaemonBackend:
    """KeyframeBackend for the daemon: `generate`, `free`, `close`, and the health thread."""

    name = "comfyui"

    def __init__(self, comfy: ComfyUIBackend, *, facts: dict[str, Any] | None = None,
                 engine: Any = None, fallback: Any = None,
                 supervisor: ComfyUISupervisor | None = None, pid_path: Path | None = None,
                 probe_timeouts: tuple[float, float] = (3.0, 5.0),
                 stopping: threading.Event | None = None, tidy: Tidy | None = None,
                 sweep: Callable[[], int] | None = None) -> None:
        self.comfy = comfy
        # a ComfyUI whose folders the daemon knows: each keyframe's files there go once
        # the ledger has it (folders.py), and what older versions left is swept once
        self.tidy, self._sweep = tidy, sweep
        self._tidy_lock = threading.Lock()
        self._generating = 0           # keyframes being made now (their uploads in use)
        self.facts = facts if facts is not None else {}
        self.engine = engine
        self.fallback = fallback
        self.supervisor = supervisor
        self.supervised = comfy.pool.urls[0] if supervisor is not None else None
        self.pid_path = pid_path
        self._stopping = stopping or threading.Event()
        self._probers = {u: ComfyUIClient(u, client_id=comfy.client_id,
                                          connect_timeout=probe_timeouts[0],
                                          read_timeout=probe_timeouts[1], tries=1,
                                          retry_read_timeouts=False)
                         for u in comfy.pool.urls}
        self._chain_index: int | None = None
        comfy.on_progress = self._on_progress
        self._lock = threading.RLock()
        self._validated: set[str] = set()
        self._checked_at: dict[str, float] = {}
        self._ever_up = False
        self._error: str | None = None
        self._permanent = 0
        self._status: str | None = None
        self._persisted: tuple[str, float] = ("", 0.0)
        self._pid_written: int | None = None
        self._fallback_noted = False
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- the KeyframeBackend surface ----------------------------------------------------------

    def generate(self, request: KeyframeRequest) -> KeyframeResult:
        if self._error:
            # The worker does not claim while the backend is stopped; a race lands here.
            raise TransientBackendError(f"the ComfyUI backend is stopped: {self._error}")
        if self.fallback is not None and self._all_down():
            return self._fall_back(request)
        self._chain_index = request.chain_index
        with self._tidy_lock:
            self._generating += 1
        try:
            result = self.comfy.generate(request)
        except (WorkflowError, PromptRejectedError) as exc:
            if self.comfy.pool.all_unfit():
                self._stop_backend(str(exc))
                raise
            self.publish()   # one server was set aside; the others take the retry
            raise TransientBackendError(f"{exc} (that server is set aside; the keyframe is "
                                        "retried on another)") from exc
        except PermanentBackendError as exc:
            with self._lock:
                self._permanent += 1
                if self._permanent >= PERMANENT_IN_A_ROW:
                    self._stop_backend(f"{self._permanent} keyframes in a row failed for good; "
                                       f"the last: {exc}")
            raise
        except TransientBackendError:
            if self._stopping.is_set():
                raise
            if self.fallback is not None and self._all_down():
                self.publish()
                return self._fall_back(request)
            self.publish()
            raise
        finally:
            with self._tidy_lock:
                self._generating -= 1
        with self._lock:
            self._permanent = 0
            self._ever_up = True
        self._fallback_noted = False
        if self.tidy is not None:
            with self._tidy_lock:
                self.tidy.add(result.info, request.chain_index)
        return result

    def tidy_folders(self) -> int:
        """Remove the server-side files of keyframes the ledger now has (health thread)."""
        if self.tidy is None:
            return 0
        with self._tidy_lock:
            return self.tidy.tidy(inputs=not self._generating)

    def free(self) -> dict[str, str | None]:
        """Unload models and free memory on every server that answers (the guard's call when
        a game starts); url -> None or that server's error. While keyframes are being made
        the next one loads the model again: pause first to keep the memory free."""
        if not self.facts.get("paused"):
            log.info("free while generating: the next keyframe loads the model again "
                     "(pause first to keep the memory free)")
        return self.comfy.free()

    def interrupt(self) -> str:
        """Stop the keyframe in flight (the guard, before it frees): see
        ComfyUIBackend.interrupt."""
        return self.comfy.interrupt()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.tidy_folders()         # the last keyframe's files, when it was completed
        except Exception:
            log.exception("removing keyframe files from ComfyUI's folders")
        if self.supervisor is not None:
            code = self.supervisor.stop()
            log.info("stopped the supervised ComfyUI (exit code %s)", code)
            if self.pid_path is not None:
                self.pid_path.unlink(missing_ok=True)
        for prober in self._probers.values():
            prober.close()
        self.comfy.close()

    # -- health -------------------------------------------------------------------------------

    def start(self) -> DaemonBackend:
        """One check now (so a misfit workflow is reported at start), then the thread."""
        self.check()
        self._thread = threading.Thread(target=self._run, name="comfyui-health", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        if self._sweep is not None:
            try:
                self._sweep()
            except Exception:
                log.exception("sweeping what earlier versions left in ComfyUI's folders")
        while not self._stopping.wait(TICK):
            try:
                self.check()
                self.tidy_folders()
            except Exception:  # the thread must outlive a surprise; the next pass retries
                log.exception("ComfyUI health check failed")

    def _starting(self) -> bool:
        return (self.supervisor is not None
                and self.supervisor.status().state in ("starting", "restarting"))

    def check(self) -> None:
        """One pass: check the servers that are due, validate new ones, publish."""
        pool, now = self.comfy.pool, time.monotonic()
        starting = self._starting()
        for url in pool.urls:
            if self._stopping.is_set():
                return
            patient = url == self.supervised and starting
            if pool.is_benched(url):
                self._validated.discard(url)  # a server that failed may come back changed
                if not patient:
                    continue
            elif url in self._validated and now - self._checked_at.get(url, 0) < HEALTH_EVERY:
                continue
            elif (pool.is_unfit(url) and url not in self._validated
                  and now - self._checked_at.get(url, -UNFIT_RECHECK) < UNFIT_RECHECK):
                continue      # set aside: validated again now and then, not every pass
            self._checked_at[url] = now
            try:
                self._probers[url].system_stats()
            except (ServerUnreachableError, PermanentBackendError) as exc:
                self._validated.discard(url)
                if patient:  # still starting: no warning, checked every pass, bench ignored
                    if not any(h.url == url and h.failures for h in pool.health()):
                        pool.mark_failed(url, f"starting: {exc}")
                else:
                    self.comfy.bench(url, exc)
                continue
            pool.mark_ok(url)
            if url not in self._validated and not self._error:
                try:
                    self.comfy.validate([url])   # sets it aside when it cannot run the workflow
                    if not pool.is_unfit(url):
                        self._validated.add(url)
                except PermanentBackendError as exc:   # no server can run it
                    self._stop_backend(str(exc))
                except TransientBackendError as exc:
                    log.warning("ComfyUI at %s answered but its /object_info did not: %s", url, exc)
        self._track_pid()
        self.publish()

    def _all_down(self) -> bool:
        pool = self.comfy.pool
        return all(pool.is_benched(u) or not h.healthy or h.unfit
                   for u, h in zip(pool.urls, pool.health()))

    def status(self) -> str:
        if self._error:
            return "error"
        if any(h.healthy and not h.unfit for h in self.comfy.pool.health()):
            return "ok"
        if self.fallback is not None:
            return "fallback"
        if self.supervisor is not None and not self._ever_up and self._starting():
            return "starting"
        return "down"

    def publish(self) -> None:
        """Facts for the workers and status.json; the ledger copy when something changed."""
        with self._lock:
            status = self.status()
            if status == "ok":
                self._ever_up = True
            self.facts["comfyui_status"] = status
            self.facts["backend_error"] = self._error
            self.facts["backend_unusable"] = (
                self._error if status == "error" else
                "waiting for the supervised ComfyUI to start" if status == "starting" else
                f"every ComfyUI server is down: {self.comfy.pool.describe_down()}"
                if status == "down" else None)
            if status != self._status:
                self._log_change(self._status, status)
                self._status = status
            self._persist(status)

    def _log_change(self, before: str | None, now: str) -> None:
        if now == "ok" and before is not None:
            up = [h.url for h in self.comfy.pool.health() if h.healthy and not h.unfit]
            log.info("ComfyUI is available again at %s", ", ".join(up))
        elif now in ("down", "fallback"):
            what = ("dreaming on the procedural fallback until one is back" if now == "fallback"
                    else "keyframes wait until one is back")
            log.warning("every ComfyUI server is down (%s); %s",
                        self.comfy.pool.describe_down(), what)
        elif now == "starting":
            log.info("waiting for the supervised ComfyUI at %s to answer", self.supervised)

    def health(self) -> dict[str, Any]:
        """What runtime_state.comfyui_health holds (JSON) and `dreamd status` shows."""
        sup = self.supervisor.status() if self.supervisor is not None else None
        return {
            "status": self.status(), "error": self._error,
            "fallback": "procedural" if self.fallback is not None else "none",
            "updated_at": _iso(time.time()),
            "servers": [{"url": h.url, "healthy": h.healthy, "failures": h.failures,
                         "last_error": h.last_error, "last_ok": _iso(h.last_ok),
                         "benched_until": _iso(h.benched_until),
                         "supervised": h.url == self.supervised,
                         "set_aside": h.unfit, "checkpoints": list(h.checkpoints)}
                        for h in self.comfy.pool.health()],
            "supervisor": None if sup is None else {
                "state": sup.state, "pid": sup.pid, "restarts_last_hour": sup.restarts,
                "last_exit": sup.last_exit, "last_error": sup.last_error},
        }

    def _persist(self, status: str) -> None:
        if self.engine is None:
            return
        record = self.health()
        # what matters for a reader; timestamps alone do not make a write
        key = json.dumps([status, record["error"], record["supervisor"],
                          [(s["url"], s["healthy"], s["failures"], s["last_error"],
                            s["set_aside"])
                           for s in record["servers"]]], sort_keys=True)
        if key == self._persisted[0] and time.monotonic() - self._persisted[1] < PERSIST_EVERY:
            return
        from dreamd.ledger import queries
        try:
            with self.engine.begin() as conn:
                queries.update_runtime(conn, comfyui_health=json.dumps(record))
            self._persisted = (key, time.monotonic())
        except Exception:  # a busy ledger: the next pass writes it
            log.exception("recording ComfyUI health in the ledger failed")

    def _stop_backend(self, message: str) -> None:
        with self._lock:
            if self._error:
                return
            self._error = message
        log.error("ComfyUI backend stopped: %s -- no more keyframes are planned; fix the "
                  "[comfyui] configuration or the server, then restart dreamd", message)
        self.publish()

    def _on_progress(self, value: dict[str, Any] | None) -> None:
        """The running prompt's progress for status.json: keyframe k, step i of n, node."""
        if value is None:
            self.facts["keyframe_progress"] = None
            return
        previous = self.facts.get("keyframe_progress") or {}
        step, steps = value.get("step"), value.get("steps")
        if step is None and previous.get("node") == value.get("node"):
            step, steps = previous.get("step"), previous.get("steps")
        self.facts["keyframe_progress"] = {
            "keyframe": self._chain_index, "step": step, "steps": steps,
            "node": value.get("node"), "node_type": value.get("node_type")}

    # -- fallback and supervision --------------------------------------------------------------

    def _fall_back(self, request: KeyframeRequest) -> KeyframeResult:
        if not self._fallback_noted:
            self._fallback_noted = True
            log.warning("keyframe %d on the procedural fallback: every ComfyUI server is down",
                        request.chain_index)
        result = self.fallback.generate(request)
        result.info.update(backend="procedural", fallback=True, server=None)
        return result

    def _track_pid(self) -> None:
        if self.supervisor is None or self.pid_path is None:
            return
        pid = self.supervisor.pid
        if pid is not None and pid != self._pid_written:
            self.pid_path.write_text(f"{pid}\n")
            self._pid_written = pid


def find_orphan(pid_path: Path, argv: list[str]):
    """The ComfyUI (a psutil.Process) a previous daemon of this data dir started and left
    running, by the pid file and the same command line; None when there is none."""
    try:
        pid = int(pid_path.read_text().strip())
        import psutil
        proc = psutil.Process(pid)
        if proc.cmdline() == argv and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except Exception:   # no file, garbage, gone, not ours to inspect
        pass
    return None


def stop_orphan(pid_path: Path, argv: list[str], timeout: float = 10.0) -> None:
    """A ComfyUI this data dir's daemon started before it was killed still runs (where no
    parent-death signal tied it to the daemon): stop it and its whole process tree, so
    exactly one supervised ComfyUI exists. Its queue is lost, which costs one resubmission;
    the ledger's prompt_id keeps it from running twice."""
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return

    def ours(proc) -> bool:   # the pid may have been reused by something else
        if proc.cmdline() != argv:
            return False
        log.warning("stopping the ComfyUI (pid %d) a previous dreamd started and left "
                    "behind", pid)
        return True
    stop_process_tree(pid, timeout, expect=ours)
    pid_path.unlink(missing_ok=True)


def _answers(url: str) -> bool:
    client = ComfyUIClient(url, client_id="dreamd-probe", connect_timeout=1.0, read_timeout=3.0,
                           tries=1)
    try:
        client.system_stats()
        return True
    except (TransientBackendError, PermanentBackendError):
        return False
    finally:
        client.close()


def build_backend(cfg, ctx=None) -> DaemonBackend:
    """The daemon's ComfyUI backend from the config; `ctx` (a WorkerContext) gives it the
    facts to publish, the ledger to record health in and the stop flag."""
    c = cfg.comfyui
    # The daemon's own stop flag: a SIGTERM reaches a keyframe's wait at once, so the stop
    # does not sit out the grace and the prompt is re-attached at the next start.
    stopping = getattr(ctx, "stopping", None) or threading.Event()

    def sleep(seconds: float) -> None:
        # Backoff and polling end when the daemon stops; the lease is released by then.
        if stopping.wait(seconds):
            raise TransientBackendError("dreamd is stopping")

    try:
        comfy = ComfyUIBackend(
            c.urls, workflow=c.workflow, txt2img_workflow=c.txt2img_workflow,
            mapping=c.mapping or None, txt2img_mapping=c.txt2img_mapping or None,
            checkpoint=c.checkpoint or None, upload_subfolder=c.upload_subfolder,
            connect_timeout=c.connect_timeout_seconds, read_timeout=c.read_timeout_seconds,
            tries=c.tries, poll_interval=c.poll_interval_seconds,
            deadline=c.deadline_seconds, bench_cap=c.bench_seconds_max, sleep=sleep,
            lookup_timeout=c.lookup_timeout_seconds, push=c.push, stopping=stopping,
            input_tag=input_tag(cfg))
    except WorkflowError as exc:  # a file or mapping that cannot work with any server
        raise ConfigError(f"[comfyui]: {exc}") from None
    fallback = None
    if c.fallback == "procedural":
        from dreamd.backends.procedural import ProceduralBackend
        fallback = ProceduralBackend()

    supervisor, pid_path = None, cfg.data_dir / "comfyui.pid"
    if c.start_argv or c.start_command:
        supervisor = ComfyUISupervisor(
            c.start_argv or c.start_command, cwd=c.start_cwd or None, env=c.start_env, gpu_index=cfg.system.gpu,
            log_path=c.log_file or cfg.logs_dir / "comfyui.log", health_url=comfy.pool.urls[0],
            max_restarts_per_hour=c.max_restarts_per_hour)
        orphan, url = find_orphan(pid_path, supervisor.argv), comfy.pool.urls[0]
        if orphan is not None and _answers(url):
            # a previous dreamd's ComfyUI, healthy: keep it (its prompt finishes, no cold
            # start) rather than kill it mid-prompt and compute that keyframe twice
            supervisor.adopt(orphan)
        else:
            if orphan is not None:
                stop_orphan(pid_path, supervisor.argv)
            if _answers(url):
                log.warning("a ComfyUI already answers at %s, so start_command is not run "
                            "(dreamd neither restarts nor stops that one)", url)
                supervisor = None
            else:
                supervisor.start(wait=False)
        if supervisor is not None:
            # stopped by close(), even when the daemon fails before its own shutdown runs
            atexit.register(supervisor.stop)

    tidy, sweep = None, None
    found = locate(cfg)
    if found is not None:
        log.info("ComfyUI's folders, from %s: %s, %s, %s (a keyframe's files there are "
                 "removed once it is in the ledger)", found.source, found.input, found.output,
                 found.temp)
        sweep = lambda: sweep_once(found, c.upload_subfolder, cfg.data_dir)  # noqa: E731
        if ctx is not None:
            tidy = Tidy(found, comfy.pool.urls, _keyframe_state(ctx))
    backend = DaemonBackend(
        comfy, facts=ctx.facts if ctx is not None else None,
        engine=ctx.engine if ctx is not None else None, fallback=fallback,
        supervisor=supervisor, pid_path=pid_path if supervisor is not None else None,
        probe_timeouts=(c.connect_timeout_seconds,
                        min(c.lookup_timeout_seconds, c.read_timeout_seconds)),
        stopping=stopping, tidy=tidy, sweep=sweep)
    return backend.start()


def input_tag(cfg) -> str:
    """The name stem of this data dir's uploads: daemons on other machines or data dirs
    that share a server keep their own slots."""
    import hashlib
    import socket
    where = f"{socket.gethostname()}:{Path(cfg.data_dir).resolve()}"
    return f"dreamd_{hashlib.sha256(where.encode()).hexdigest()[:8]}"


def _keyframe_state(ctx):
    """(chain index, prompt_id) -> the state of that keyframe in the ledger (None: no such
    row); found through the chain index's index."""
    from sqlalchemy import select

    from dreamd.ledger.models import Keyframe
    t = Keyframe.__table__

    def state_of(chain_index: int, prompt_id: str) -> str | None:
        with ctx.reader.connect() as conn:
            return conn.execute(select(t.c.state).where(
                t.c.chain_index == chain_index, t.c.prompt_id == prompt_id)).scalar()
    return state_of
