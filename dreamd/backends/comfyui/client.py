"""One ComfyUI server over HTTP: the calls the keyframe backend makes, nothing else.

The backend (`backend.py`) drives this client; it never sees `requests` exceptions.
Shapes and status codes follow a real ComfyUI 0.3.64 (../shared/comfyui/api_transcript.md).

Exceptions, drawn the way httpx draws its own:

    TransientBackendError            (dreamd.errors) worth retrying later
    └── ServerUnreachableError       transport failed (refused, reset, timeout) or a 5xx,
                                     after this client's own bounded retries: bench the server
        └── NotComfyUIError          the port answers, but not as ComfyUI does (another app,
                                     a proxy's error page): bench it, say so in one line
    PermanentBackendError            (dreamd.errors) retrying cannot help
    ├── PromptRejectedError          400 from POST /prompt; names node id, class_type, input, reason
    └── UnsafeOutputError            what ComfyUI returned is not safe to use (a filename that
                                     escapes the data dir, bytes that are not the expected image)

Transport errors are retried here with capped exponential backoff and full jitter, since
nothing was decided yet. Status errors decide: a 5xx is the server failing (retried like
transport), a 4xx is ComfyUI saying no (never retried). POST /prompt is the one call that is
not idempotent: it is retried only when the connection was refused (nothing was sent); any
other failure goes up, and the backend looks the prompt_id up before it posts again.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import requests
from PIL import Image

from dreamd.errors import PermanentBackendError, TransientBackendError

log = logging.getLogger(__name__)

# A keyframe is at most a few megapixels; 64 MP leaves room for upscaled workflows and
# refuses decompression bombs long before Pillow's own limit (~179 MP) would.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
# A PNG of DEFAULT_MAX_PIXELS RGB pixels, stored uncompressed, is ~200 MB; cap the download.
DEFAULT_MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024
UPLOAD_CACHE_SIZE = 512


class ServerUnreachableError(TransientBackendError):
    """The ComfyUI server could not be reached or failed (5xx); check that it is running."""

    def __init__(self, message: str | None = None, *, sent: bool = False) -> None:
        super().__init__(message)
        # True when a non-idempotent request may have reached the server (POST /prompt timed
        # out after sending): the caller must look before sending it anywhere else.
        self.sent = sent


class NotComfyUIError(ServerUnreachableError):
    """Something answers at this URL, but it is not ComfyUI; check the port in [comfyui] urls."""


class PromptRejectedError(PermanentBackendError):
    """ComfyUI rejected the workflow; fix the node, input or value the message names."""

    def __init__(self, message: str, error: dict[str, Any] | None = None,
                 node_errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error = error or {}
        self.node_errors = node_errors or {}

    def failed_inputs(self) -> list[tuple[str, str, str]]:
        """(node id, input name, error type) for every input-level error."""
        out = []
        for node_id, node in self.node_errors.items():
            for err in node.get("errors", []):
                name = (err.get("extra_info") or {}).get("input_name", "")
                out.append((str(node_id), name, err.get("type", "")))
        return out


class UnsafeOutputError(PermanentBackendError):
    """ComfyUI returned an output that is not safe to use."""


@dataclass(frozen=True)
class QueueState:
    """GET /queue, reduced to what the backend decides on: prompt_id -> queue number."""

    running: dict[str, int] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)

    def number_of(self, prompt_id: str) -> int | None:
        return self.running.get(prompt_id, self.pending.get(prompt_id))


@dataclass(frozen=True)
class OutputRef:
    """One image in a history entry's outputs, already checked by `check_output_ref`."""

    filename: str
    subfolder: str
    type: str

    @property
    def relative_path(self) -> PurePosixPath:
        return PurePosixPath(self.subfolder, self.filename) if self.subfolder else PurePosixPath(self.filename)


def content_name(png: bytes) -> str:
    """The upload name of an image: its content hash, so the same bytes get the same name."""
    return f"dreamd_{hashlib.sha256(png).hexdigest()[:16]}.png"


def _safe_segment(part: str) -> bool:
    return (bool(part) and part not in (".", "..") and "\\" not in part and "/" not in part
            and "\x00" not in part and ":" not in part)


def check_output_ref(item: Any) -> OutputRef:
    """Refuse an output name that could escape a directory: `..`, absolute paths, separators
    in the filename, backslashes or drive letters anywhere. A subfolder may nest with `/`
    (a `filename_prefix` of `a/b/kf` gives `a/b`), each segment a plain name."""
    if not isinstance(item, dict):
        raise UnsafeOutputError(f"ComfyUI returned an output that is not an object: {item!r}")
    filename, subfolder, kind = item.get("filename"), item.get("subfolder", ""), item.get("type", "output")
    if not isinstance(filename, str) or not _safe_segment(filename):
        raise UnsafeOutputError(f"ComfyUI returned an unsafe output filename {filename!r}; "
                                "refusing it (a file name must not contain '/', '\\', ':' or be '..')")
    if not isinstance(subfolder, str) or (subfolder and not all(
            _safe_segment(p) for p in subfolder.split("/"))):
        raise UnsafeOutputError(f"ComfyUI returned an unsafe output subfolder {subfolder!r} for "
                                f"{filename!r}; refusing it (no '..', absolute path or '\\')")
    if kind not in ("output", "temp"):
        raise UnsafeOutputError(f"ComfyUI returned output {filename!r} of type {kind!r}; "
                                "expected 'output' or 'temp'")
    return OutputRef(filename, subfolder, kind)


def local_path(data_dir: Path, ref: OutputRef) -> Path:
    """Where a downloaded output is kept under `data_dir`; checked again after resolving."""
    root = data_dir.resolve()
    path = (root / ref.relative_path).resolve()
    if not path.is_relative_to(root):
        raise UnsafeOutputError(f"output {str(ref.relative_path)!r} would land outside {root}")
    return path


def decode_image(data: bytes, expected_size: tuple[int, int] | None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes from /view -> an RGB image, or UnsafeOutputError. The size is read from the
    header and checked before any pixel is decompressed, so a bomb is refused cheaply."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise UnsafeOutputError(f"ComfyUI returned a {width}x{height} image, over the "
                                        f"{max_pixels}-pixel limit; refusing to decode it")
            if expected_size is not None and (width, height) != tuple(expected_size):
                raise UnsafeOutputError(
                    f"ComfyUI returned a {width}x{height} image, expected "
                    f"{expected_size[0]}x{expected_size[1]}; does the workflow resize or crop? "
                    "(sizes must be multiples of 8)")
            img.load()
    except UnsafeOutputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnsafeOutputError(f"ComfyUI returned a decompression bomb: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # what Pillow raises on garbage
        head = data[:16]
        raise UnsafeOutputError(f"ComfyUI returned {len(data)} bytes that are not an image "
                                f"(starting {head!r}): {exc}") from exc
    return img.convert("RGB")


def describe_rejection(body: Any) -> str:
    """A 400 from POST /prompt -> one line per failing input: node, class, input, reason."""
    if not isinstance(body, dict):
        return f"ComfyUI rejected the workflow: {str(body)[:300]}"
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    head = f"ComfyUI rejected the workflow ({error.get('type', 'error')}): {error.get('message', '')}"
    if error.get("details"):
        head += f" ({error['details']})"
    lines = []
    for node_id, node in (body.get("node_errors") or {}).items():
        for err in node.get("errors", []):
            extra = err.get("extra_info") or {}
            reason = err.get("message", "")
            if err.get("details"):
                reason += f": {err['details']}"
            lines.append(f"node {node_id} ({node.get('class_type', '?')}) input "
                         f"{extra.get('input_name', '?')!r}: {reason}")
    return head + ("; " + "; ".join(lines) if lines else "")


class ComfyUIClient:
    """Calls to one server. Every call has a timeout; transient failures retry, bounded."""

    def __init__(self, base_url: str, *, client_id: str, connect_timeout: float = 3.0,
                 read_timeout: float = 30.0, tries: int = 4, backoff_base: float = 0.25,
                 backoff_cap: float = 4.0, sleep: Callable[[float], None] = time.sleep,
                 jitter: Callable[[], float] = random.random,
                 max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
                 retry_read_timeouts: bool = True) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self.timeout = (connect_timeout, read_timeout)
        self.tries = max(1, tries)
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self._sleep, self._jitter = sleep, jitter
        self.max_pixels, self.max_download_bytes = max_pixels, max_download_bytes
        # False for look-ups and health checks: a GET that answers in milliseconds and did
        # not within its deadline means a hung server; asking again only doubles the wait.
        self.retry_read_timeouts = retry_read_timeouts
        self._session = requests.Session()
        # sha name -> LoadImage reference ("subfolder/name"); what this process already uploaded.
        self._uploaded: OrderedDict[str, str] = OrderedDict()
        self._slots: dict[str, tuple[str, str]] = {}   # "subfolder/name" -> (sha256, ref)

    # -- transport ---------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        return self._jitter() * min(self.backoff_cap, self.backoff_base * 2 ** attempt)

    def _request(self, method: str, path: str, *, idempotent: bool = True,
                 **kwargs: Any) -> requests.Response:
        url = self.base_url + path
        last = ""
        for attempt in range(self.tries):
            try:
                resp = self._session.request(method, url, timeout=self.timeout, **kwargs)
            except requests.ConnectionError as exc:
                last = describe_transport(exc)
                # A refused or unconnectable socket never carried the request.
                if not idempotent and not _never_sent(exc):
                    raise ServerUnreachableError(f"{method} {url} failed after sending: {last}",
                                                 sent=True) from exc
            except requests.Timeout as exc:  # read timeouts (connect ones are ConnectionErrors)
                last = f"timed out (no answer within {self.timeout[1]:g}s)"
                if not idempotent:
                    raise ServerUnreachableError(f"{method} {url}: {last}", sent=True) from exc
                if not self.retry_read_timeouts:
                    raise ServerUnreachableError(f"{method} {url}: {last}") from exc
            except requests.RequestException as exc:  # chunked encoding, content decoding
                last = describe_transport(exc)
                if not idempotent:
                    raise ServerUnreachableError(f"{method} {url} failed: {last}", sent=True) from exc
            else:
                if resp.status_code < 500:
                    return resp
                last = f"HTTP {resp.status_code}: {snippet(resp.text)}"
                resp.close()
                if not idempotent:
                    raise ServerUnreachableError(f"{method} {url} answered {last}", sent=True)
            if attempt + 1 < self.tries:
                self._sleep(self._backoff(attempt))
        if self.tries == 1:
            raise ServerUnreachableError(f"{method} {url}: {last}")
        raise ServerUnreachableError(f"{method} {url} failed {self.tries} times; last: {last}")

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._request(method, path, **kwargs)
        if resp.status_code != 200:
            raise PermanentBackendError(f"{method} {self.base_url}{path} answered HTTP "
                                        f"{resp.status_code}: {snippet(resp.text)}")
        try:
            return resp.json()
        except ValueError as exc:
            # A proxy's error page or a half-started server; worth another try later.
            raise ServerUnreachableError(f"{method} {self.base_url}{path} did not answer JSON: "
                                         f"{snippet(resp.text)!r}") from exc

    # -- the API -----------------------------------------------------------------------------

    def system_stats(self) -> dict[str, Any]:
        """The health check. An answer that is not ComfyUI's (a 404 page, another JSON
        API) is NotComfyUIError, described in one line, never the page itself."""
        resp = self._request("GET", "/system_stats")
        try:
            body = resp.json() if resp.status_code == 200 else None
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("system"), dict):
            ctype = resp.headers.get("Content-Type", "no content type").split(";")[0]
            raise NotComfyUIError(f"{self.base_url} is not a ComfyUI server (GET /system_stats "
                                  f"answered HTTP {resp.status_code}, {ctype})")
        return body

    def object_info(self) -> dict[str, Any]:
        return self._json("GET", "/object_info")

    def upload_image(self, png: bytes, *, subfolder: str = "dreamd") -> str:
        """Upload once per content: returns the LoadImage value ("subfolder/name"). A second
        call with the same bytes is answered from memory; after a restart ComfyUI itself
        keeps one file for the same name and bytes (transcript section 10)."""
        name = content_name(png)
        if name in self._uploaded:
            self._uploaded.move_to_end(name)
            return self._uploaded[name]
        body = self._json("POST", "/upload/image", files={"image": (name, png, "image/png")},
                          data={"subfolder": subfolder, "type": "input", "overwrite": "false"})
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise PermanentBackendError(f"POST {self.base_url}/upload/image answered {str(body)[:200]}")
        ref = f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else body["name"]
        self._uploaded[name] = ref
        while len(self._uploaded) > UPLOAD_CACHE_SIZE:
            self._uploaded.popitem(last=False)
        return ref

    def upload_as(self, png: bytes, name: str, *, subfolder: str = "dreamd") -> str:
        """Upload under a fixed name, replacing the file there (overwrite=true, transcript
        section 12): the daemon's inputs take a bounded set of names, so ComfyUI's input
        dir holds a few files, not one per keyframe. The same bytes under the same name
        are not sent twice. Returns the LoadImage value ("subfolder/name")."""
        digest = hashlib.sha256(png).hexdigest()
        key = f"{subfolder}/{name}"
        if self._slots.get(key, (None,))[0] == digest:
            return self._slots[key][1]
        body = self._json("POST", "/upload/image", files={"image": (name, png, "image/png")},
                          data={"subfolder": subfolder, "type": "input", "overwrite": "true"})
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise PermanentBackendError(f"POST {self.base_url}/upload/image answered {str(body)[:200]}")
        ref = f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else body["name"]
        self._slots[key] = (digest, ref)
        return ref

    def forget_upload(self, png: bytes) -> None:
        """The server lost the file (its input dir was cleaned): upload it again next time."""
        self._uploaded.pop(content_name(png), None)
        digest = hashlib.sha256(png).hexdigest()
        for key in [k for k, (d, _) in self._slots.items() if d == digest]:
            del self._slots[key]

    def queue_prompt(self, workflow: dict[str, Any], prompt_id: str) -> int:
        """POST /prompt with our prompt_id (transcript section 34); returns its queue number."""
        resp = self._request("POST", "/prompt", idempotent=False,
                             json={"prompt": workflow, "client_id": self.client_id,
                                   "prompt_id": prompt_id})
        if resp.status_code == 400:
            try:
                body = resp.json()
            except ValueError:
                body = resp.text
            raise PromptRejectedError(describe_rejection(body),
                                      body.get("error") if isinstance(body, dict) else None,
                                      body.get("node_errors") if isinstance(body, dict) else None)
        if resp.status_code != 200:
            raise PermanentBackendError(f"POST {self.base_url}/prompt answered HTTP "
                                        f"{resp.status_code}: {resp.text[:200]}")
        try:
            body = resp.json()
        except ValueError as exc:
            raise ServerUnreachableError(f"POST {self.base_url}/prompt did not answer JSON: "
                                         f"{resp.text[:120]!r}", sent=True) from exc
        if body.get("prompt_id") != prompt_id:
            # Before client-chosen ids existed ComfyUI ignored the field and made its own;
            # take that stray prompt off the queue rather than let it run for nobody.
            try:
                self.delete_queued([str(body.get("prompt_id"))])
            except (TransientBackendError, PermanentBackendError):
                pass
            raise PermanentBackendError(
                f"ComfyUI at {self.base_url} queued prompt {body.get('prompt_id')!r} instead of "
                f"{prompt_id!r}; it is too old to take a client prompt_id (update ComfyUI)")
        return int(body.get("number", -1))

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of one prompt, or None while it runs, waits or was forgotten."""
        body = self._json("GET", f"/history/{prompt_id}")
        if not isinstance(body, dict):
            raise ServerUnreachableError(f"GET {self.base_url}/history answered {str(body)[:120]}")
        return body.get(prompt_id)

    def queue(self) -> QueueState:
        body = self._json("GET", "/queue")

        def ids(items: list[Any]) -> dict[str, int]:
            return {str(item[1]): int(item[0]) for item in items if len(item) > 1}
        return QueueState(ids(body.get("queue_running", [])), ids(body.get("queue_pending", [])))

    def delete_queued(self, prompt_ids: list[str]) -> None:
        self._ok("POST", "/queue", json={"delete": prompt_ids})

    def interrupt(self, prompt_id: str) -> None:
        """Targeted: ComfyUI stops the running prompt only if it is this one (section 39)."""
        self._ok("POST", "/interrupt", json={"prompt_id": prompt_id})

    def free(self, *, unload_models: bool = True, free_memory: bool = True) -> None:
        self._ok("POST", "/free", json={"unload_models": unload_models, "free_memory": free_memory})

    def _ok(self, method: str, path: str, **kwargs: Any) -> None:
        resp = self._request(method, path, **kwargs)
        if resp.status_code != 200:
            raise PermanentBackendError(f"{method} {self.base_url}{path} answered HTTP "
                                        f"{resp.status_code}: {resp.text[:200]}")

    def view(self, ref: OutputRef) -> bytes:
        """The bytes of one output, at most max_download_bytes."""
        params = {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type}
        resp = self._request("GET", "/view", params=params, stream=True)
        with resp:
            if resp.status_code == 404:
                raise PermanentBackendError(
                    f"ComfyUI at {self.base_url} has no output {str(ref.relative_path)!r} "
                    "(was its output dir cleaned?)")
            if resp.status_code != 200:
                raise PermanentBackendError(f"GET {self.base_url}/view answered HTTP {resp.status_code}")
            chunks, size = [], 0
            try:
                for chunk in resp.iter_content(1 << 16):
                    size += len(chunk)
                    if size > self.max_download_bytes:
                        raise UnsafeOutputError(f"output {str(ref.relative_path)!r} is larger than "
                                                f"{self.max_download_bytes} bytes; refusing it")
                    chunks.append(chunk)
            except requests.RequestException as exc:
                raise ServerUnreachableError(f"GET {self.base_url}/view broke off: {exc}") from exc
        return b"".join(chunks)

    def fetch_image(self, ref: OutputRef, expected_size: tuple[int, int] | None) -> tuple[Image.Image, bytes]:
        data = self.view(ref)
        return decode_image(data, expected_size, self.max_pixels), data

    def close(self) -> None:
        self._session.close()


def snippet(text: str, limit: int = 120) -> str:
    """A response body in one short line: an HTML error page must not fill the log."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit] + "…"


def describe_transport(exc: BaseException) -> str:
    """A transport failure in a few words ("connection refused", "connection reset"), not
    urllib3's nested repr of the pool, the url and the socket object."""
    seen: list[BaseException] = [exc]
    for cause in seen:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, ConnectionResetError):
            return "connection reset"
        if isinstance(cause, (requests.ConnectTimeout, TimeoutError)) or \
                type(cause).__name__ == "ConnectTimeoutError":
            return "connect timed out"
        if type(cause).__name__ == "RemoteDisconnected":
            return "closed the connection without answering"
        if type(cause).__name__ in ("NameResolutionError", "gaierror"):
            return "host name not found"
        for nxt in (getattr(cause, "reason", None), cause.__cause__, cause.__context__,
                    *[a for a in cause.args if isinstance(a, BaseException)]):
            if isinstance(nxt, BaseException) and nxt not in seen and len(seen) < 16:
                seen.append(nxt)
    return f"{type(exc).__name__}: {snippet(str(exc).splitlines()[0] if str(exc) else '')}"


def _never_sent(exc: requests.ConnectionError) -> bool:
    """True when the connection was never made (refused, unreachable, connect timeout)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    # requests wraps urllib3's MaxRetryError, whose `reason` is the NewConnectionError.
    seen: list[BaseException] = [exc]
    for cause in seen:
        if isinstance(cause, ConnectionRefusedError) or type(cause).__name__ == "NewConnectionError":
            return True
        for nxt in (getattr(cause, "reason", None), cause.__cause__, cause.__context__,
                    *[a for a in cause.args if isinstance(a, BaseException)]):
            if isinstance(nxt, BaseException) and nxt not in seen and len(seen) < 16:
                seen.append(nxt)
    return False
