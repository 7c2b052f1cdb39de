"""A ComfyUI 0.3.64 stand-in for tests and benchmarks: a real HTTP server on 127.0.0.1 that
answers the way ../shared/comfyui/api_transcript.md shows (same routes, `/api` prefix too,
JSON shapes, status codes and validation errors), runs prompts one at a time by writing a
real PNG (deterministic from the seed) after a configurable delay, keeps queue and history,
records every request, and injects the faults the backend must survive. It runs a prompt
as ComfyUI's executor does: the nodes in ComfyUI's order, a node whose cache key (class,
inputs, IS_CHANGED) is unchanged since the last prompt cached and not run again, a failing
node ending the run where it fails. It speaks the websocket (`/ws?clientId=…`, through
wsproto) as sections 33-52 show: a `status` frame with the sid on connect and on every queue
change; per prompt execution_start, execution_cached, then per node progress_state and
executing, progress per sampler step, executed for an output; execution_success (or
execution_error / execution_interrupted), status, and `executing` with node null after the
history entry is written; SaveImageWebsocket's image as a binary frame. Like ComfyUI it
keeps one socket per clientId. tests/test_comfyui_double.py replays the whole transcript
against it.

Beside it: `SilentServer` (accepts TCP, never answers) and `NotComfyUIServer` (an HTTP
server that answers HTML 404s), for the faults that are not a ComfyUI at all.

    python -m tests.comfyui_double --port 8188 [--delay 0.5] [--exit-after 2] [--ignore-sigterm]
"""

from __future__ import annotations

import argparse
import os
import copy
import hashlib
import io
import json
import random
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "comfyui"
FALLBACK = HERE / "data" / "comfyui"
# mutmut's copy of the tests (mutants/tests/) is one folder deeper than the checkout's
MUTANTS_SHARED = HERE.parents[2] / "shared" / "comfyui"


def shared_file(name: str) -> Path:
    for base in (SHARED, FALLBACK, MUTANTS_SHARED):
        if (base / name).is_file():
            return base / name
    raise FileNotFoundError(f"{name} is in neither {SHARED} nor {FALLBACK}")


SAMPLERS = ("KSampler", "KSamplerAdvanced")
# Frames ComfyUI sends about a prompt even when it came without a client id (to every socket).
SENT_WITHOUT_CLIENT = frozenset({"progress", "progress_state", "execution_interrupted"})
# Stack traces shaped like ComfyUI 0.3.64's (transcript sections 21 and 45): the frames a
# client sees, with the server's paths elided as the transcript elides them.
TRACEBACK_VALIDATE = (
    '  File "…/ComfyUI/execution.py", line 808, in validate_inputs\n'
    '    r = await validate_inputs(prompt_id, prompt, o_id, validated)\n',
    '  File "…/ComfyUI/execution.py", line 788, in validate_inputs\n'
    "    o_class_type = prompt[o_id]['class_type']\n")
TRACEBACK_EXECUTE = (
    '  File "…/ComfyUI/execution.py", line 496, in execute\n'
    "    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(…)\n",
    '  File "…/ComfyUI/execution.py", line 315, in get_output_data\n'
    "    return_values = await _async_map_node_over_list(…)\n",
    '  File "…/ComfyUI/execution.py", line 289, in _async_map_node_over_list\n'
    "    await process_inputs(input_dict, i)\n",
    '  File "…/ComfyUI/execution.py", line 277, in process_inputs\n    result = f(**inputs)\n')
TRACEBACK_LOAD_IMAGE = TRACEBACK_EXECUTE + (
    '  File "…/ComfyUI/nodes.py", line 1647, in load_image\n'
    "    img = node_helpers.pillow(Image.open, image_path)\n",
    '  File "…/ComfyUI/node_helpers.py", line 31, in pillow\n    x = fn(arg)\n',
    '  File "…/comfy-venv/lib/python3.11/site-packages/PIL/Image.py", line 3730, in open\n'
    "    raise UnidentifiedImageError(msg)\n")


def _ms() -> int:
    return int(time.time() * 1000)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


@dataclass
class Recorded:
    method: str
    path: str                      # without the /api prefix
    query: dict[str, list[str]]
    body: Any                      # parsed JSON, multipart field names, or None


@dataclass
class Item:
    number: int
    prompt_id: str
    prompt: dict[str, Any]
    extra: dict[str, Any]
    outputs: list[str]
    started_ms: int | None = None

    def as_list(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra, self.outputs]


@dataclass
class _Run:
    """One prompt being executed: what ComfyUI's PromptExecutor keeps while it runs."""

    item: Item
    generation: int
    signatures: dict[str, str] = field(default_factory=dict)    # node -> cache key
    busy: str | None = None       # the node that takes the delay: the sampler, else the output
    delay: float = 0.0
    messages: list[Any] = field(default_factory=list)           # the history's status messages
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)   # the ProgressRegistry
    executed: list[str] = field(default_factory=list)           # run here, not cached


@dataclass
class Faults:
    """What goes wrong next; tests set these, the double consumes them."""

    fail: list[tuple[str | None, str | None, int]] = field(default_factory=list)  # (method, path, status)
    forget_after_accept: int = 0            # accept the next N prompts, then "restart"
    execution_errors: list[dict[str, Any]] = field(default_factory=list)  # next runs fail like this
    view_garbage: bool = False              # /view answers bytes that are not an image
    output_override: dict[str, str] | None = None   # filename/subfolder written into history
    output_size: tuple[int, int] | None = None      # produce this size instead of the right one
    ws_drop_after: int | None = None        # close the clientId socket after N more prompt frames
    ws_silent: bool = False                 # accept websocket upgrades, then never send a frame
    ws_refuse: bool = False                 # /ws answers 404 (a proxy without websockets)


@dataclass
class _Socket:
    """One websocket: the connection, wsproto's state and a lock for writes."""

    sid: str
    sock: socket.socket
    conn: Any
    silent: bool
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, event: Any) -> bool:
        with self.lock:
            try:
                self.sock.sendall(self.conn.send(event))
                return True
            except Exception:  # the peer is gone; its reader cleans up
                return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], handler: type, double: ComfyUIDouble) -> None:
        self.double = double
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        # Kept-alive connections would otherwise go on answering after stop().
        with self.sockets_lock:
            for sock in list(self.open_sockets):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self.open_sockets.clear()


FOLDERS = ("input", "output", "temp")


class Folders(MutableMapping):
    """The server's folders on disk, as ComfyUI keeps them under its base directory:
    <root>/input (uploads), <root>/output (SaveImage), <root>/temp (PreviewImage), keyed
    (type, subfolder, name) -> bytes; a subfolder nests with "/". Real files, so what
    the daemon deletes from a ComfyUI folder it knows is gone here too."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for kind in FOLDERS:
            (root / kind).mkdir(parents=True, exist_ok=True)

    def path(self, key: tuple[str, str, str]) -> Path:
        kind, subfolder, name = key
        return self.root.joinpath(kind, *[p for p in subfolder.split("/") if p], name)

    def __getitem__(self, key: tuple[str, str, str]) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None

    def __setitem__(self, key: tuple[str, str, str], data: bytes) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def __delitem__(self, key: tuple[str, str, str]) -> None:
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            raise KeyError(key) from None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and len(key) == 3 and self.path(key).is_file()  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[str, str, str]]:
        for kind in FOLDERS:
            base = self.root / kind
            for path in sorted(base.rglob("*")):
                if path.is_file():
                    sub = path.parent.relative_to(base).as_posix()
                    yield kind, "" if sub == "." else sub, path.name

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def names(self, kind: str, subfolder: str = "") -> list[str]:
        folder = self.path((kind, subfolder, "x")).parent
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


class Inputs(MutableMapping):
    """The input folder alone, keyed (subfolder, name): what LoadImage can load."""

    def __init__(self, folders: Folders) -> None:
        self.folders = folders

    def __getitem__(self, key: tuple[str, str]) -> bytes:
        return self.folders[("input", *key)]

    def __setitem__(self, key: tuple[str, str], data: bytes) -> None:
        self.folders[("input", *key)] = data

    def __delitem__(self, key: tuple[str, str]) -> None:
        del self.folders[("input", *key)]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and ("input", *key) in self.folders

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return ((sub, name) for kind, sub, name in self.folders if kind == "input")

    def __len__(self) -> int:
        return sum(1 for _ in self)


def save_counter(folder: Path, stem: str) -> int:
    """ComfyUI's folder_paths.get_save_image_path: one more than the highest counter of
    the files named `<stem>_<counter>_…` in the folder (1 when there are none), so a
    counter goes on from the files already there, and starts over when they are gone."""
    best = 0
    if folder.is_dir():
        for name in os.listdir(folder):
            head = name[:len(stem) + 1]
            try:
                digits = int(name[len(stem) + 1:].split("_")[0])
            except ValueError:
                digits = 0
            if os.path.normcase(head[:-1]) == os.path.normcase(stem) and head[-1:] == "_":
                best = max(best, digits)
    return best + 1


class ComfyUIDouble:
    """Start with `start()` (or as a context manager); `url` is where it listens. Its
    folders (input/, output/, temp/) are real, under `root` (a temporary directory when
    none is given); models/ is there too, for a config's comfyui.models_dir."""

    def __init__(self, port: int = 0, *, delay: float = 0.0,
                 checkpoints: list[str] | None = None, root: Path | str | None = None) -> None:
        self.delay = delay
        self.delay_max: float | None = None   # set: each prompt takes uniform(delay, delay_max)
        self.object_info = json.loads(shared_file("object_info.json").read_text())
        self.system_stats_body = json.loads(shared_file("system_stats.json").read_text())
        if checkpoints is not None:
            self.object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] = list(checkpoints)
        self.faults = Faults()
        self.requests: list[Recorded] = []
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="comfyui-double-")
            root = self._tmp.name
        self.root = Path(root)
        (self.root / "models").mkdir(parents=True, exist_ok=True)
        self.files = Folders(self.root)         # (type, subfolder, name) -> bytes, on disk
        self.inputs = Inputs(self.files)        # (subfolder, name) -> bytes: input/ alone
        self._clear_temp()                      # as ComfyUI does when it starts
        self._preview_prefix: dict[str, str] = {}   # PreviewImage node -> its random prefix
        self.pending: list[Item] = []
        self.running: Item | None = None
        self.history: dict[str, dict[str, Any]] = {}
        self.finished_at: dict[str, float] = {}   # prompt_id -> time.monotonic() it finished
        self.started_at: dict[str, float] = {}    # prompt_id -> time.monotonic() it began running
        self.freed = 0
        self._number = 0
        self._generation = 0      # bumped by forget(): a run in flight is dropped
        self._interrupt = False
        self.sockets: dict[str, _Socket] = {}     # sid -> socket, as ComfyUI's server.sockets
        self.frames: list[tuple[str, str, dict[str, Any]]] = []   # (sid, type, data) sent
        # Called with (type, data) after each frame about a prompt is sent (status frames
        # aside), in the executor's thread and outside its lock: a test can act at an exact
        # point of a run (post another prompt after `executing` of node 2), as the
        # transcript's recording did, and the frames keep that order.
        self.on_frame: Callable[[str, dict[str, Any]], None] | None = None
        self._cache: dict[str, dict[str, Any]] = {}   # cache key -> {"ui": ...}: ComfyUI's caches
        self._cond = threading.Condition()
        self._stopped = False
        self._server = _Server(("127.0.0.1", port), _Handler, self)
        self.port = self._server.server_address[1]
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- life --------------------------------------------------------------------------------

    def start(self) -> ComfyUIDouble:
        # A short poll interval: stop() waits for serve_forever to notice, up to one interval.
        serve = lambda: self._server.serve_forever(poll_interval=0.02)  # noqa: E731
        for target, name in ((serve, "double-http"), (self._execute, "double-exec")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Close the port: from now on connections are refused."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._server.drop_connections()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> ComfyUIDouble:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if not self._stopped:
            self.stop()

    # -- faults and inspection ---------------------------------------------------------------

    def fail_next(self, count: int = 1, *, status: int = 500, method: str | None = None,
                  path: str | None = None) -> None:
        """The next `count` matching requests answer `status` (path: a prefix, without /api)."""
        with self._cond:
            self.faults.fail.extend([(method, path, status)] * count)

    def forget(self) -> None:
        """A simulated restart: queue, running prompt and history are gone, and temp/ is
        emptied as ComfyUI empties it when it starts (input/ and output/ stay)."""
        with self._cond:
            self.pending.clear()
            self.running = None
            self.history.clear()
            self._cache.clear()
            self._clear_temp()
            self._preview_prefix.clear()
            self._generation += 1
            self._cond.notify_all()

    def _clear_temp(self) -> None:
        """ComfyUI's cleanup_temp() at start: the whole temp directory goes."""
        import shutil
        shutil.rmtree(self.root / "temp", ignore_errors=True)
        (self.root / "temp").mkdir(parents=True, exist_ok=True)

    def posts_for(self, prompt_id: str) -> int:
        return sum(1 for r in self.requests if r.method == "POST" and r.path == "/prompt"
                   and isinstance(r.body, dict) and r.body.get("prompt_id") == prompt_id)

    def count(self, method: str, path: str) -> int:
        return sum(1 for r in self.requests if r.method == method and r.path == path)

    def wait_running(self, prompt_id: str, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while not (self.running and self.running.prompt_id == prompt_id):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # -- the executor ------------------------------------------------------------------------

    def _execute(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self.pending:
                    self._cond.wait()
                if self._stopped:
                    return
                item = self.pending.pop(0)
                self.running, self._interrupt, generation = item, False, self._generation
                self.started_at[item.prompt_id] = time.monotonic()
                item.started_ms = _ms()
                self._cond.notify_all()
                self._status()     # under the lock, as ComfyUI's queue.get() does: in order
            entry = self._run(_Run(item, generation))
            if entry is None:      # stopped, or forgotten (a simulated restart) mid-run
                continue
            with self._cond:
                if generation != self._generation:
                    continue
                self.history[item.prompt_id] = entry
                self.finished_at[item.prompt_id] = time.monotonic()
                self.running = None
                self._cond.notify_all()
                self._status()
            self._tell(item, "executing", {"node": None, "prompt_id": item.prompt_id})

    def _run(self, run: _Run) -> dict[str, Any] | None:
        """One prompt, node by node, as ComfyUI's PromptExecutor: the history entry, or None
        when the double stopped or forgot the prompt meanwhile."""
        item, prompt, pid = run.item, run.item.prompt, run.item.prompt_id
        run.signatures = _signatures(prompt, self._is_changed)
        with self._cond:   # the cache keeps what this prompt can use (caches.clean_unused)
            keep = set(run.signatures.values())
            self._cache = {s: v for s, v in self._cache.items() if s in keep}
            cached = [n for n in prompt if run.signatures[n] in self._cache]
        self._message(run, "execution_start", {"prompt_id": pid}, item.started_ms)
        self._message(run, "execution_cached", {"nodes": cached, "prompt_id": pid})
        order = _execution_order(prompt, item.outputs, set(cached), self._is_output)
        run.busy = next((n for n in order if prompt[n]["class_type"] in SAMPLERS),
                        next((n for n in order if n not in cached and self._is_output(prompt, n)), None))
        run.delay = random.uniform(self.delay, self.delay_max) if self.delay_max else self.delay
        try:
            for node in order:
                self._node(run, node, node in cached)
        except _Gone:
            return None
        except _Interrupted as exc:
            self._message(run, "execution_interrupted", {
                "prompt_id": pid, "node_id": exc.node_id, "node_type": prompt[exc.node_id]["class_type"],
                "executed": list(run.executed)})
        except _Injected as exc:
            node = run.busy or order[-1]
            self._message(run, "execution_error", dict({
                "prompt_id": pid, "node_id": node, "node_type": prompt[node]["class_type"],
                "executed": list(run.executed), "exception_message": "", "exception_type": "",
                "traceback": list(TRACEBACK_EXECUTE), "current_inputs": {},
                "current_outputs": list(prompt)}, **exc.data))
        except _NodeFailed as exc:
            self._message(run, "execution_error", {
                "prompt_id": pid, "node_id": exc.node_id, "node_type": prompt[exc.node_id]["class_type"],
                "executed": list(run.executed), "exception_message": f"{exc.message}\n",
                "exception_type": exc.kind, "traceback": list(exc.traceback),
                "current_inputs": exc.inputs, "current_outputs": list(prompt)})
        else:
            self._message(run, "execution_success", {"prompt_id": pid})
        with self._cond:   # history outputs: the UI results in the cache, cached or new
            ui = {n: self._cache[s]["ui"] for n, s in run.signatures.items()
                  if s in self._cache and self._cache[s]["ui"] is not None}
        ok = run.messages[-1][0] == "execution_success"
        return {"prompt": item.as_list(), "outputs": ui,
                "status": {"status_str": "success" if ok else "error", "completed": ok,
                           "messages": run.messages},
                "meta": {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
                         for n in ui}}

    def _node(self, run: _Run, node: str, cached: bool) -> None:
        """One node of ComfyUI's execute(): a cached output node only announces its cached
        result; any other says `executing`, runs, says `executed` if it has a UI result."""
        pid, cls = run.item.prompt_id, run.item.prompt[node]["class_type"]
        if cached:
            with self._cond:
                ui = self._cache[run.signatures[node]]["ui"]
            self._tell(run.item, "executed", {"node": node, "display_node": node, "output": ui,
                                              "prompt_id": pid})
            self._progress(run, node, "finished")
            return
        self._progress(run, node, "running", 0.0, 1.0)
        self._tell(run.item, "executing", {"node": node, "display_node": node, "prompt_id": pid})
        self._check(run, node)   # ComfyUI's before_node_execution: an interrupt lands here
        ui = self._work(run, node, cls)
        if ui is not None:
            self._tell(run.item, "executed", {"node": node, "display_node": node, "output": ui,
                                              "prompt_id": pid})
        self._progress(run, node, "finished")
        run.executed.append(node)
        with self._cond:
            self._cache[run.signatures[node]] = {"ui": ui}

    def _work(self, run: _Run, node: str, cls: str) -> dict[str, Any] | None:
        """What the node does here; returns its UI result (SaveImage's images) or None."""
        prompt = run.item.prompt
        if cls == "LoadImage":
            self._load(node, prompt[node]["inputs"]["image"])
        if node == run.busy:
            self._take_time(run, node, cls)
        if cls == "SaveImageWebsocket":
            # Its ProgressBar(1).update_absolute(0, 1, ("PNG", image, None)): a progress frame
            # and the image as a binary frame (event 1 = PREVIEW_IMAGE, format 2 = PNG).
            self._step(run, node, 0, 1)
            buf = io.BytesIO()
            self._render(node, prompt).save(buf, "PNG", compress_level=1)
            self._tell_bytes(run.item, struct.pack(">II", 1, 2) + buf.getvalue())
            return None
        if self._is_output(prompt, node):
            return {"images": self._save(node, prompt)}
        return None

    def _take_time(self, run: _Run, node: str, cls: str) -> None:
        """The busy node spends the prompt's delay (a sampler one progress frame per step),
        then fails if the test injected an error for this run."""
        steps = max(1, int(run.item.prompt[node]["inputs"].get("steps", 1))) if cls in SAMPLERS else 0
        start = time.monotonic()
        for step in range(1, max(steps, 1) + 1):
            self._sleep_until(run, node, start + run.delay * step / max(steps, 1))
            if steps:
                self._step(run, node, step, steps)
        with self._cond:
            error = self.faults.execution_errors.pop(0) if self.faults.execution_errors else None
        if error is not None:
            raise _Injected(error)

    def _load(self, node: str, image: Any) -> None:
        """LoadImage: the uploaded file must be an image (transcript 44-46)."""
        sub, _, name = str(image).rpartition("/")
        with self._cond:
            data = self.inputs.get((sub, name))
        try:
            Image.open(io.BytesIO(data or b"")).verify()
        except Exception as exc:
            raise _NodeFailed(node, "PIL.UnidentifiedImageError",
                              f"cannot identify image file '…/ComfyUI/input/{image}'",
                              TRACEBACK_LOAD_IMAGE, {"image": [image]}) from exc

    def _step(self, run: _Run, node: str, value: int, steps: int) -> None:
        """ComfyUI's progress hook: the progress registry, then the `progress` frame."""
        self._progress(run, node, "running", value, steps)
        self._tell(run.item, "progress", {"value": value, "max": steps,
                                          "prompt_id": run.item.prompt_id, "node": node})

    def _progress(self, run: _Run, node: str, state: str, value: float | None = None,
                  maximum: float | None = None) -> None:
        """ComfyUI's ProgressRegistry: one entry per node started (pending ones are not
        sent), each change sent whole as `progress_state`; finishing sets value to max."""
        entry = run.progress.setdefault(node, {"value": 0, "max": 1, "state": "pending"})
        entry["state"] = state
        if maximum is not None:
            entry["value"], entry["max"] = value, maximum
        if state == "finished":
            entry["value"] = entry["max"]
        pid = run.item.prompt_id
        self._tell(run.item, "progress_state", {"prompt_id": pid, "nodes": {
            n: {"value": e["value"], "max": e["max"], "state": e["state"], "node_id": n, "prompt_id": pid,
                "display_node_id": n, "parent_node_id": None, "real_node_id": n}
            for n, e in run.progress.items() if e["state"] != "pending"}})

    def _sleep_until(self, run: _Run, node: str, end: float) -> None:
        with self._cond:
            while not (self._stopped or self._interrupt or run.generation != self._generation):
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        self._check(run, node)

    def _check(self, run: _Run, node: str) -> None:
        with self._cond:
            if self._stopped or run.generation != self._generation:
                raise _Gone()
            if self._interrupt:
                raise _Interrupted(node)

    def _message(self, run: _Run, kind: str, data: dict[str, Any], stamp: int | None = None) -> None:
        """ComfyUI's add_message: stamped, kept for the history entry, sent."""
        data = {**data, "timestamp": stamp or _ms()}
        run.messages.append([kind, data])
        self._tell(run.item, kind, data)

    def _is_changed(self, node: dict[str, Any]) -> Any:
        """The part of a node's cache key that is not its inputs (its IS_CHANGED)."""
        if node["class_type"] == "LoadImage":   # the file's hash: new bytes, new run
            sub, _, name = str(node["inputs"].get("image")).rpartition("/")
            with self._cond:
                data = self.inputs.get((sub, name), b"")
            return hashlib.sha256(data).hexdigest()
        if node["class_type"] == "SaveImageWebsocket":   # time.time(): never cached
            return uuid.uuid4().hex
        return None

    def _is_output(self, prompt: dict[str, Any], node: str) -> bool:
        return bool(self.object_info.get(prompt[node]["class_type"], {}).get("output_node"))

    def _upstream(self, prompt: dict[str, Any], start: str) -> list[str]:
        seen, order, todo = {start}, [], [start]
        while todo:
            node = todo.pop(0)
            for value in prompt[node]["inputs"].values():
                if _is_link(value) and value[0] not in seen:
                    seen.add(value[0])
                    order.append(value[0])
                    todo.append(value[0])
        return order

    def _render(self, out: str, prompt: dict[str, Any]) -> Image.Image:
        """'Run' the graph behind one output node: an image of the latent's size, from the seed."""
        seed, denoise, base, size = 0, 1.0, None, (512, 512)
        for node_id in self._upstream(prompt, out):
            node = prompt[node_id]
            cls, ins = node["class_type"], node["inputs"]
            if cls in SAMPLERS:
                seed = int(ins.get("seed", ins.get("noise_seed", 0)))
                denoise = float(ins.get("denoise", 1.0))
            if cls == "EmptyLatentImage":
                size = (int(ins["width"]) // 8 * 8, int(ins["height"]) // 8 * 8)
                break
            if cls == "LoadImage":
                sub, _, name = str(ins["image"]).rpartition("/")
                with self._cond:
                    data = self.inputs.get((sub, name))
                base = Image.open(io.BytesIO(data or b"")).convert("RGB")
                size = (base.width // 8 * 8, base.height // 8 * 8)
                base = base.crop((0, 0, *size))
                break
        size = self.faults.output_size or size
        rng = random.Random(seed)
        colours = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
        mask = Image.linear_gradient("L").rotate(rng.choice((0, 90, 180, 270))).resize(size)
        img = Image.composite(Image.new("RGB", size, colours[0]), Image.new("RGB", size, colours[1]), mask)
        if base is not None and base.size == size:
            img = Image.blend(base, img, max(0.0, min(1.0, denoise)))
        return img

    def _save(self, out: str, prompt: dict[str, Any]) -> list[dict[str, str]]:
        """SaveImage / PreviewImage, as ComfyUI's save_images: the rendered PNG named
        <prefix>_<counter>_.png with the counter after the highest already in the folder.
        SaveImage writes to output/ under its filename_prefix; PreviewImage to temp/ under
        "ComfyUI_temp_" and five random letters, drawn once per node instance."""
        buf = io.BytesIO()
        self._render(out, prompt).save(buf, "PNG")
        if prompt[out]["class_type"] == "SaveImage":
            kind, prefix = "output", str(prompt[out]["inputs"].get("filename_prefix", "ComfyUI"))
        else:
            kind = "temp"
            prefix = self._preview_prefix.setdefault(out, "ComfyUI_temp_" + "".join(
                random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5)))
        subfolder, _, stem = prefix.rpartition("/")
        with self._cond:
            counter = save_counter(self.files.path((kind, subfolder, stem)).parent, stem)
            filename = f"{stem}_{counter:05d}_.png"
            self.files[(kind, subfolder, filename)] = buf.getvalue()
        ref = {"filename": filename, "subfolder": subfolder, "type": kind}
        if self.faults.output_override:
            ref.update(self.faults.output_override)
        return [ref]

    # -- the websocket -----------------------------------------------------------------------

    def _tell(self, item: Item, kind: str, data: dict[str, Any]) -> None:
        """A frame about a prompt goes to its client's socket. A prompt without a client id:
        ComfyUI sends progress, progress_state and execution_interrupted to every socket
        (their sid is the absent client id) and the rest to none."""
        cid = item.extra.get("client_id")
        if cid is not None or kind in SENT_WITHOUT_CLIENT:
            self.send(cid, kind, data)
            if self.on_frame is not None:
                self.on_frame(kind, data)

    def _tell_bytes(self, item: Item, payload: bytes) -> None:
        from wsproto.events import BytesMessage
        self._deliver(item.extra.get("client_id"), BytesMessage(data=payload), None)

    def send(self, sid: str | None, kind: str, data: dict[str, Any]) -> None:
        """One JSON frame to the socket of `sid` (None: to every socket), like server.send_sync."""
        from wsproto.events import TextMessage
        self._deliver(sid, TextMessage(data=json.dumps({"type": kind, "data": data})), (kind, data))

    def _deliver(self, sid: str | None, event: Any, frame: tuple[str, dict[str, Any]] | None) -> None:
        with self._cond:
            targets = list(self.sockets.values()) if sid is None else (
                [self.sockets[sid]] if sid in self.sockets else [])
            drop = None
            if sid is not None and targets and self.faults.ws_drop_after is not None:
                self.faults.ws_drop_after -= 1
                if self.faults.ws_drop_after < 0:
                    self.faults.ws_drop_after, drop = None, targets[0]
        if drop is not None:   # mid-prompt: the connection breaks, no close frame
            try:
                drop.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        for ws in targets:
            if not ws.silent:
                if frame is not None:
                    with self._cond:
                        self.frames.append((ws.sid, *frame))
                ws.send(event)

    def _status(self) -> None:
        """The queue's size to every socket. Called with the lock held where the queue
        changes, as ComfyUI's queue_updated() is, so the frames keep the changes' order."""
        with self._cond:
            left = len(self.pending) + (1 if self.running else 0)
            self.send(None, "status", {"status": {"exec_info": {"queue_remaining": left}}})

    def websocket(self, h: _Handler, query: dict[str, list[str]]) -> None:
        """GET /ws: upgrade, then read frames until the peer goes; ComfyUI's websocket_handler."""
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping,
                                    Request, TextMessage)
        if self.faults.ws_refuse:
            return h.reply(404, b"404: Not Found", "text/plain; charset=utf-8")
        h.close_connection = True
        conn = WSConnection(ConnectionType.SERVER)
        head = h.requestline + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.headers.items()) + "\r\n"
        conn.receive_data(head.encode("latin-1"))
        if not any(isinstance(e, Request) for e in conn.events()):
            return h.reply(400, b"not a websocket upgrade", "text/plain")
        h.wfile.flush()
        h.connection.sendall(conn.send(AcceptConnection()))
        sid = query.get("clientId", [""])[0] or uuid.uuid4().hex
        ws = _Socket(sid, h.connection, conn, silent=self.faults.ws_silent)
        with self._cond:
            self.sockets.pop(sid, None)      # reusing a session: the old socket is dropped
            self.sockets[sid] = ws
            left = len(self.pending) + (1 if self.running else 0)
        if not ws.silent:
            ws.send(TextMessage(data=json.dumps({"type": "status", "data": {
                "status": {"exec_info": {"queue_remaining": left}}, "sid": sid}})))
        try:
            while True:
                try:
                    data = h.rfile.read1(65536)
                except OSError:
                    break
                if not data:
                    break
                conn.receive_data(data)
                closed = False
                for event in conn.events():
                    if isinstance(event, TextMessage):
                        try:
                            msg = json.loads(event.data)
                        except ValueError:
                            continue
                        if isinstance(msg, dict) and msg.get("type") == "feature_flags" and not ws.silent:
                            ws.send(TextMessage(data=json.dumps({"type": "feature_flags", "data": {
                                "supports_preview_metadata": True, "max_upload_size": 104857600}})))
                    elif isinstance(event, Ping):
                        ws.send(event.response())
                    elif isinstance(event, CloseConnection):
                        ws.send(event.response())
                        closed = True
                    elif isinstance(event, BytesMessage):
                        pass
                if closed:
                    break
        finally:
            with self._cond:
                self.sockets.pop(sid, None)      # as ComfyUI does, whichever socket holds the sid

    # -- validation, as ComfyUI's execution.validate_prompt answers --------------------------

    def validate(self, prompt: Any) -> tuple[dict[str, Any] | None, list[str], dict[str, Any]]:
        """(error body or None, output node ids that will run, node_errors). As ComfyUI, a
        prompt with one valid output runs it, and its answer carries the others' errors."""
        def invalid(kind: str, message: str, details: str = "") -> dict[str, Any]:
            return {"error": {"type": kind, "message": message, "details": details, "extra_info": {}},
                    "node_errors": {}}
        if not isinstance(prompt, dict):
            return invalid("invalid_prompt", "Cannot execute because the prompt is not an object."), [], {}
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                return invalid("invalid_prompt", "Cannot execute because a node is missing the "
                               "class_type property.", f"Node ID '#{node_id}'"), [], {}
            if node["class_type"] not in self.object_info:
                return invalid("invalid_prompt", f"Cannot execute because node {node['class_type']} "
                               "does not exist.", f"Node ID '#{node_id}'"), [], {}
        outputs = [n for n in prompt if self._is_output(prompt, n)]
        if not outputs:
            return invalid("prompt_no_outputs", "Prompt has no outputs"), [], {}
        node_errors: dict[str, Any] = {}
        good = []
        validated: dict[str, tuple[bool, list[Any]]] = {}   # shared by the outputs, as ComfyUI's
        for out in outputs:
            try:
                ok = self._validate_node(prompt, out, validated)
            except _MissingLink as exc:   # the output's own link: validate_prompt catches it
                validated[out] = (False, [{
                    "type": "exception_during_validation", "message": "Exception when validating node",
                    "details": str(exc), "extra_info": {"exception_type": "KeyError",
                                                        "traceback": list(TRACEBACK_VALIDATE)}}])
                ok = False
            if ok:
                good.append(out)
                continue
            for node_id, (valid, reasons) in validated.items():
                if not valid and reasons:
                    node_errors.setdefault(node_id, {"errors": reasons, "dependent_outputs": [],
                                                     "class_type": prompt[node_id]["class_type"]}
                                           )["dependent_outputs"].append(out)
        if not good:
            body = invalid("prompt_outputs_failed_validation", "Prompt outputs failed validation")
            body["node_errors"] = node_errors
            return body, [], node_errors
        return None, good, node_errors

    def _validate_node(self, prompt: dict[str, Any], node_id: str,
                       validated: dict[str, tuple[bool, list[Any]]]) -> bool:
        """ComfyUI's validate_inputs. A link to a missing node raises (_MissingLink); the node
        downstream catches it and files it on the linked node, under its own input's name."""
        if node_id in validated:
            return validated[node_id][0]
        validated[node_id] = (True, [])     # a cycle stops here
        node = prompt[node_id]
        cls = node["class_type"]
        spec = self.object_info[cls]["input"]
        confs = {**spec.get("required", {}), **spec.get("optional", {})}
        inputs = node.get("inputs", {})
        errors, ok = [], True
        for name in confs:
            conf = confs[name]
            if name not in inputs:
                if name in spec.get("required", {}):
                    errors.append({"type": "required_input_missing", "message": "Required input is missing",
                                   "details": name, "extra_info": {"input_name": name}})
                continue
            value = inputs[name]
            if _is_link(value):
                target = value[0]
                if target not in prompt:
                    raise _MissingLink(target)
                produced = self.object_info[prompt[target]["class_type"]]["output"]
                got = produced[value[1]] if value[1] < len(produced) else None
                if got != conf[0]:
                    errors.append({"type": "return_type_mismatch",
                                   "message": "Return type mismatch between linked nodes",
                                   "details": f"{name}, received_type({got}) mismatch input_type({conf[0]})",
                                   "extra_info": {"input_name": name, "input_config": conf,
                                                  "received_type": got, "linked_node": value}})
                    continue
                try:
                    if not self._validate_node(prompt, target, validated):
                        ok = False
                except _MissingLink as exc:
                    validated[target] = (False, [{
                        "type": "exception_during_inner_validation",
                        "message": "Exception when validating inner node", "details": str(exc),
                        "extra_info": {"input_name": name, "input_config": conf,
                                       "exception_message": str(exc), "exception_type": "KeyError",
                                       "traceback": list(TRACEBACK_VALIDATE), "linked_node": value}}])
                    ok = False
                continue
            error = self._check_literal(cls, name, value, conf)
            if error:
                errors.append(error)
        validated[node_id] = (ok and not errors, errors)
        return ok and not errors

    def _check_literal(self, cls: str, name: str, value: Any, conf: list[Any]) -> dict[str, Any] | None:
        kind = conf[0]
        limits = conf[1] if len(conf) > 1 and isinstance(conf[1], dict) else {}
        if cls == "LoadImage" and name == "image":  # LoadImage.VALIDATE_INPUTS
            sub, _, file = str(value).rpartition("/")
            if (sub, file) not in self.inputs and value != "example.png":
                return {"type": "custom_validation_failed", "message": "Custom validation failed for node",
                        "details": f"image - Invalid image file: {value}", "extra_info": {"input_name": name}}
            return None
        if isinstance(kind, list):
            if value not in kind:
                long = len(kind) > 20
                listing = f"(list of length {len(kind)})" if long else str(kind)
                return {"type": "value_not_in_list", "message": "Value not in list",
                        "details": f"{name}: '{value}' not in {listing}",
                        "extra_info": {"input_name": name, "input_config": None if long else conf,
                                       "received_value": value}}
            return None
        if kind in ("INT", "FLOAT"):
            try:
                number = int(value) if kind == "INT" else float(value)
            except (TypeError, ValueError) as exc:
                return {"type": "invalid_input_type",
                        "message": f"Failed to convert an input value to a {kind} value",
                        "details": f"{name}, {value}, {exc}",
                        "extra_info": {"input_name": name, "input_config": conf, "received_value": value,
                                       "exception_message": str(exc)}}
            if "min" in limits and number < limits["min"]:
                return {"type": "value_smaller_than_min",
                        "message": f"Value {number} smaller than min of {limits['min']}", "details": name,
                        "extra_info": {"input_name": name, "input_config": conf, "received_value": number}}
            if "max" in limits and number > limits["max"]:
                return {"type": "value_bigger_than_max",
                        "message": f"Value {number} bigger than max of {limits['max']}", "details": name,
                        "extra_info": {"input_name": name, "input_config": conf, "received_value": number}}
        return None

    # -- routes ------------------------------------------------------------------------------

    def handle(self, h: _Handler, method: str) -> None:
        parts = urlsplit(h.path)
        path = parts.path[4:] if parts.path.startswith("/api/") else parts.path
        query = parse_qs(parts.query)
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        ctype = h.headers.get("Content-Type", "")
        body: Any = None
        form: dict[str, tuple[str | None, bytes]] = {}
        if ctype.startswith("multipart/form-data"):
            msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
            for part in msg.iter_parts():
                form[part.get_param("name", header="content-disposition")] = (
                    part.get_filename(), part.get_payload(decode=True) or b"")
            body = sorted(form)
        elif raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        with self._cond:
            self.requests.append(Recorded(method, path, query, body))
            for i, (m, p, status) in enumerate(self.faults.fail):
                if (m is None or m == method) and (p is None or path.startswith(p)):
                    del self.faults.fail[i]
                    return h.reply(status, b"500 Internal Server Error: injected", "text/plain")
        if method == "GET" and path.rstrip("/") == "/ws":
            return self.websocket(h, query)
        route = getattr(self, f"_{method.lower()}_{path.strip('/').split('/')[0]}", None)
        if route is None:
            return h.reply(404, b"404: Not Found", "text/plain; charset=utf-8")
        return route(h, path, query, body, form)

    def _json(self, h: _Handler, data: Any, status: int = 200) -> None:
        h.reply(status, json.dumps(data).encode(), "application/json; charset=utf-8")

    def _get_system_stats(self, h: _Handler, *_: Any) -> None:
        self._json(h, self.system_stats_body)

    def _get_object_info(self, h: _Handler, path: str, *_: Any) -> None:
        with self._cond:
            info = copy.deepcopy(self.object_info)
            top = sorted(name for sub, name in self.inputs if not sub)
        info["LoadImage"]["input"]["required"]["image"][0] = ["example.png", *top]
        name = path.strip("/").split("/", 1)[1] if path.count("/") > 1 else None
        self._json(h, info if name is None else ({name: info[name]} if name in info else {}))

    def _get_features(self, h: _Handler, *_: Any) -> None:
        self._json(h, {"supports_preview_metadata": True, "max_upload_size": 104857600})

    def _get_models(self, h: _Handler, path: str, *_: Any) -> None:
        if path.rstrip("/") == "/models/checkpoints":
            return self._json(h, self.object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0])
        return self._json(h, [])

    def _get_prompt(self, h: _Handler, *_: Any) -> None:
        with self._cond:
            left = len(self.pending) + (1 if self.running else 0)
        self._json(h, {"exec_info": {"queue_remaining": left}})

    def _post_prompt(self, h: _Handler, path: str, query: Any, body: Any, form: Any) -> None:
        with self._cond:   # every POST takes a number, valid or not (ComfyUI's server.number)
            number = self._number
            self._number += 1
        if not isinstance(body, dict) or "prompt" not in body:
            return self._json(h, {"error": {"type": "no_prompt", "message": "No prompt provided",
                                            "details": "No prompt provided", "extra_info": {}},
                                  "node_errors": {}}, 400)
        with self._cond:
            error, outputs, node_errors = self.validate(body["prompt"])
            if error:
                return self._json(h, error, 400)
            pid = str(body.get("prompt_id") or uuid.uuid4())
            extra = {"client_id": body["client_id"]} if "client_id" in body else {}
            self.pending.append(Item(number, pid, body["prompt"], extra, outputs))
            self._cond.notify_all()
            self._status()     # before the answer and under the lock, as ComfyUI's queue.put()
            if self.faults.forget_after_accept > 0:
                self.faults.forget_after_accept -= 1
                self.forget()
        self._json(h, {"prompt_id": pid, "number": number, "node_errors": node_errors})

    def _get_queue(self, h: _Handler, *_: Any) -> None:
        with self._cond:
            data = {"queue_running": [self.running.as_list()] if self.running else [],
                    "queue_pending": [i.as_list() for i in self.pending]}
            self._json(h, copy.deepcopy(data))

    def _post_queue(self, h: _Handler, path: str, query: Any, body: Any, form: Any) -> None:
        """ComfyUI's wipe_queue / delete_queue_item, with their status frames: one per change,
        and two when the last pending prompt goes (it is wiped, then the change is told)."""
        with self._cond:
            if isinstance(body, dict) and body.get("clear"):
                self.pending.clear()
                self._status()
            for pid in body.get("delete", []) if isinstance(body, dict) else []:
                index = next((i for i, item in enumerate(self.pending) if item.prompt_id == pid), None)
                if index is None:
                    continue
                if len(self.pending) == 1:
                    self.pending.clear()
                    self._status()
                else:
                    del self.pending[index]
                self._status()
        h.reply(200, b"", None)

    def _get_history(self, h: _Handler, path: str, query: Any, *_: Any) -> None:
        with self._cond:
            pid = path.strip("/").split("/", 1)[1] if path.count("/") > 1 else None
            if pid is not None:
                data = {pid: self.history[pid]} if pid in self.history else {}
            else:
                items = list(self.history.items())
                if "max_items" in query:
                    items = items[-int(query["max_items"][0]):]
                data = dict(items)
            self._json(h, copy.deepcopy(data))

    def _post_interrupt(self, h: _Handler, path: str, query: Any, body: Any, form: Any) -> None:
        with self._cond:
            target = body.get("prompt_id") if isinstance(body, dict) else None
            if self.running and (target is None or target == self.running.prompt_id):
                self._interrupt = True
                self._cond.notify_all()
        h.reply(200, b"", None)

    def _post_free(self, h: _Handler, *_: Any) -> None:
        with self._cond:
            self.freed += 1
        h.reply(200, b"", None)

    def _post_upload(self, h: _Handler, path: str, query: Any, body: Any, form: Any) -> None:
        if path.rstrip("/") != "/upload/image" or "image" not in form or not form["image"][0]:
            return h.reply(400, b"", None)
        name = form["image"][0]
        data = form["image"][1]
        subfolder = form.get("subfolder", (None, b""))[1].decode()
        overwrite = form.get("overwrite", (None, b""))[1].decode().lower() in ("true", "1")
        if ".." in subfolder.split("/") or subfolder.startswith("/") or "/" in name or name in ("", "..", "."):
            return h.reply(400, b"", None)
        with self._cond:
            if not overwrite:
                stem, dot, ext = name.rpartition(".")
                candidate, i = name, 1
                while (subfolder, candidate) in self.inputs and self.inputs[(subfolder, candidate)] != data:
                    candidate = f"{stem} ({i}){dot}{ext}"
                    i += 1
                name = candidate
            self.inputs[(subfolder, name)] = data
        self._json(h, {"name": name, "subfolder": subfolder, "type": "input"})

    def _get_view(self, h: _Handler, path: str, query: Any, *_: Any) -> None:
        def arg(key: str, default: str = "") -> str:
            return query.get(key, [default])[0]
        filename, subfolder, kind = arg("filename"), arg("subfolder"), arg("type", "output")
        if ".." in filename or ".." in subfolder or filename.startswith("/") or subfolder.startswith("/"):
            return h.reply(403, b"", None)
        with self._cond:
            data = self.files.get((kind, subfolder, filename))
            garbage = self.faults.view_garbage
        if data is None:
            return h.reply(404, b"", None)
        if garbage:
            data = b"<html>this is not an image</html>"
        h.reply(200, data, "image/png", {"Content-Disposition": f'filename="{filename}"'})


def _execution_order(prompt: dict[str, Any], outputs: list[str], cached: set[str],
                     is_output: Callable[[dict[str, Any], str], bool]) -> list[str]:
    """ComfyUI's ExecutionList: the outputs and every node they need that is not cached,
    each after its inputs; of the nodes ready, an output first, then one that feeds an
    output, then one two steps from an output, else the first ready (ux_friendly_pick_node)."""
    pending: dict[str, None] = {}
    blocking: dict[str, dict[str, None]] = {}
    for out in outputs:
        stack = [out]
        while stack:       # add_node: a stack, so the pending order is ComfyUI's
            node = stack.pop()
            if node in pending:
                continue
            pending[node] = None
            blocking.setdefault(node, {})
            for value in prompt[node]["inputs"].values():
                if _is_link(value) and value[0] not in cached:
                    stack.append(value[0])
                    blocking.setdefault(value[0], {})[node] = None
    waits = {n: sum(n in blocking[m] for m in pending) for n in pending}

    def feeds_output(node: str, depth: int) -> bool:
        return any(is_output(prompt, b) if depth == 1 else feeds_output(b, depth - 1)
                   for b in blocking[node])
    order: list[str] = []
    while pending:
        ready = [n for n in pending if waits[n] == 0]
        if not ready:      # a cycle (ComfyUI fails the prompt): its nodes do not run here
            break
        node = next((n for n in ready if is_output(prompt, n)), None) or next(
            (n for n in ready if feeds_output(n, 1)), None) or next(
            (n for n in ready if feeds_output(n, 2)), ready[0])
        order.append(node)
        del pending[node]
        for blocked in blocking[node]:
            waits[blocked] -= 1
    return order


def _signatures(prompt: dict[str, Any], is_changed: Callable[[dict[str, Any]], Any]) -> dict[str, str]:
    """Each node's cache key, as ComfyUI's CacheKeySetInputSignature: its class, its
    IS_CHANGED value and its inputs, a link standing for the linked node's key and slot.
    Equal keys across prompts mean the node's earlier output is reused."""
    keys: dict[str, str] = {}

    def key(node: str) -> str:
        if node not in keys:
            keys[node] = ""    # a cycle ends here
            ins = prompt[node]["inputs"]
            inputs = {name: ["link", key(v[0]), v[1]] if _is_link(v) and v[0] in prompt else v
                      for name, v in sorted(ins.items())}
            keys[node] = json.dumps([prompt[node]["class_type"], is_changed(prompt[node]), inputs],
                                    sort_keys=True, default=str)
        return keys[node]
    for node in prompt:
        key(node)
    return keys


class SilentServer:
    """Accepts TCP connections (the kernel's backlog and an accept loop) and never answers."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, name="silent-accept", daemon=True).start()

    def _accept(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self._held.append(conn)   # held open, never read, never answered

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for conn in self._held:
            conn.close()
        self._sock.close()


class NotComfyUIServer:
    """Some other web app on the port: every path answers an HTML 404 page."""

    PAGE = (b"<!DOCTYPE html>\n<html>\n<head><title>404 Not Found</title></head>\n<body>\n"
            b"<h1>Not Found</h1>\n<p>The requested URL was not found on this server.</p>\n"
            b"<hr>\n<address>Apache/2.4.57 (Debian)</address>\n</body>\n</html>\n")

    def __init__(self) -> None:
        page = self.PAGE

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(404)
                self.send_header("Content-Type", "text/html; charset=iso-8859-1")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
            do_POST = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def __enter__(self) -> NotComfyUIServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Injected(Exception):
    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data.get("exception_message", ""))
        self.data = data


class _NodeFailed(Exception):
    def __init__(self, node_id: str, kind: str, message: str, traceback: tuple[str, ...],
                 inputs: dict[str, list[Any]]) -> None:
        super().__init__(message)
        self.node_id, self.kind, self.message = node_id, kind, message
        self.traceback, self.inputs = traceback, inputs


class _Interrupted(Exception):
    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id


class _Gone(Exception):
    """The double stopped, or forgot the prompt (a simulated restart), while it ran."""


class _MissingLink(KeyError):
    """A link to a node id the prompt lacks: ComfyUI's validation meets it as a KeyError."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One write per response, sent at once: headers and body in separate unbuffered writes
    # meet the client's delayed ACK and cost ~40 ms a request.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet in tests
        pass

    def reply(self, status: int, data: bytes, ctype: str | None,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.double.handle(self, "GET")

    def do_POST(self) -> None:
        self.server.double.handle(self, "POST")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A ComfyUI stand-in on 127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per prompt")
    parser.add_argument("--delay-max", type=float, default=None,
                        help="each prompt takes a random time between --delay and this")
    parser.add_argument("--checkpoint", action="append", help="checkpoint names it lists")
    parser.add_argument("--exit-after", type=float, default=None, help="crash (exit 3) after this many seconds")
    parser.add_argument("--ignore-sigterm", action="store_true", help="only SIGKILL stops it")
    args = parser.parse_args(argv)
    double = ComfyUIDouble(args.port, delay=args.delay, checkpoints=args.checkpoint)
    double.delay_max = args.delay_max
    # The handlers only note the signal and the main thread polls for it: a handler runs
    # between two bytecodes of the main thread, and an Event.set() there can wait for ever
    # on the lock that thread's own Event.wait() holds (the daemon's bug, fixed the same way).
    signalled: list[int] = []
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda signum, _frame: signalled.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: signalled.append(signum))
    double.start()    # after the handlers: a SIGTERM sent once it answers is always caught
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    print(f"comfyui double listening on {double.url} (CUDA_VISIBLE_DEVICES={cuda})", flush=True)
    crash_at = None if args.exit_after is None else time.monotonic() + args.exit_after
    while not signalled:
        if crash_at is not None and time.monotonic() >= crash_at:
            print("comfyui double: crashing on purpose", flush=True)
            sys.stdout.flush()
            os._exit(3)
        time.sleep(0.05)
    double.stop()
    print("comfyui double: stopped cleanly", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
