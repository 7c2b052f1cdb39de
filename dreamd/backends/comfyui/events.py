"""Push, not poll: what ComfyUI says over its websocket (`/ws?clientId=…`) about our prompts.

The backend waits on these events instead of asking /history every poll interval; /history
stays the source of truth (an event only says "look now") and the fallback whenever the
socket is unavailable, silent or drops. Frames as a real ComfyUI 0.3.64 sends them
(../shared/comfyui/api_transcript.md, sections 33, 43, 46, 47, 51, 52):

    status                 on connect (with `sid`), then on every queue change
    execution_start        prompt_id
    executing              node = the node now running; node = null: the prompt is done
                           (sent after its history entry is written)
    progress               value, max, node: sampler steps
    executed / execution_success / execution_error / execution_interrupted
    progress_state, execution_cached, binary preview frames: ignored

One socket per server, kept open across keyframes: ComfyUI keeps one socket per clientId,
and a closed socket's clean-up removes the id, so a socket per keyframe could lose the next
one's messages. Uses the `websocket-client` library.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import websocket

log = logging.getLogger(__name__)

RECONNECT_AFTER = 30.0    # seconds between tries at a socket that failed (polling meanwhile)
DONE, ENDED = "done", "ended"   # what `wait` saw: the prompt finished / a terminal message


class EventsLostError(Exception):
    """The socket failed or closed; the caller falls back to polling /history."""


@dataclass(frozen=True)
class Progress:
    """A `progress` frame (step `step` of `steps` at node `node`), or an `executing` one."""

    prompt_id: str
    node: str | None
    step: int | None = None
    steps: int | None = None


class ServerEvents:
    """The websocket of one server. `ready()` connects when needed (and says whether push
    works now); `wait(prompt_id, timeout)` reads frames until one ends that prompt."""

    def __init__(self, base_url: str, client_id: str, *, connect_timeout: float = 3.0,
                 first_frame_timeout: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        scheme, rest = base_url.rstrip("/").split("://", 1)
        self.url = f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={quote(client_id)}"
        self.connect_timeout, self.first_frame_timeout = connect_timeout, first_frame_timeout
        self._clock = clock
        self._ws: websocket.WebSocket | None = None
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self.last_error: str | None = None

    def ready(self) -> bool:
        """True when a socket is open (connected now if it was not, at most once every
        RECONNECT_AFTER seconds after a failure). A server that accepts the socket but sends
        no `status` frame within first_frame_timeout counts as unavailable."""
        with self._lock:
            if self._ws is not None:
                return True
            if self._clock() < self._retry_at:
                return False
            try:
                ws = websocket.create_connection(self.url, timeout=self.connect_timeout,
                                                 enable_multithread=True)
            except (OSError, websocket.WebSocketException) as exc:
                return self._failed(f"cannot open {self.url}: {_short(exc)}")
            try:
                ws.settimeout(self.first_frame_timeout)
                first = _decode(ws.recv())
            except (OSError, websocket.WebSocketException) as exc:
                ws.close()
                return self._failed(f"{self.url} sent nothing after connecting: {_short(exc)}")
            if first is None or first.get("type") != "status":
                ws.close()
                return self._failed(f"{self.url} did not greet like ComfyUI (first frame "
                                    f"{str(first)[:80]})")
            self._ws, self.last_error = ws, None
            log.debug("following prompts over %s", self.url)
            return True

    def wait(self, prompt_id: str, timeout: float,
             on_progress: Callable[[Progress], None] | None = None) -> str | None:
        """Read frames for up to `timeout` seconds. Returns DONE (`executing` node null for
        this prompt), ENDED (execution_success/error/interrupted: look at /history now), or
        None when the time ran out. Raises EventsLostError when the socket is gone."""
        ws = self._ws
        if ws is None:
            raise EventsLostError("no socket")
        end = self._clock() + timeout
        while True:
            left = end - self._clock()
            if left <= 0:
                return None
            try:
                ws.settimeout(max(0.001, left))
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                return None
            except (OSError, websocket.WebSocketException) as exc:
                self.drop(f"{self.url} dropped: {_short(exc)}")
                raise EventsLostError(self.last_error) from exc
            if raw == "" or raw is None:   # websocket-client's answer to a close frame
                self.drop(f"{self.url} was closed by the server")
                raise EventsLostError(self.last_error)
            frame = _decode(raw)
            if frame is None:
                continue                   # a binary preview frame
            data = frame.get("data") or {}
            if not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
                continue                   # status frames, other clients' prompts
            kind = frame.get("type")
            if kind == "executing":
                node = data.get("node")
                if node is None:
                    return DONE
                if on_progress is not None:
                    on_progress(Progress(prompt_id, str(node)))
            elif kind == "progress" and on_progress is not None:
                on_progress(Progress(prompt_id, _str(data.get("node")), _int(data.get("value")),
                                     _int(data.get("max"))))
            elif kind in ("execution_success", "execution_error", "execution_interrupted"):
                return ENDED

    def drop(self, reason: str) -> None:
        """Close the socket. The next `ready()` reconnects at once (the server may have
        restarted); only a failed connect waits RECONNECT_AFTER."""
        with self._lock:
            ws, self._ws = self._ws, None
            if reason != self.last_error:
                log.info("%s", reason)
            self.last_error, self._retry_at = reason, 0.0
        if ws is not None:
            try:
                ws.close(timeout=0.2)
            except Exception:  # closing a broken socket may fail in many ways; it is gone
                pass

    def close(self) -> None:
        with self._lock:
            ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.close(timeout=0.2)
            except Exception:
                pass

    def _failed(self, reason: str) -> bool:
        if reason != self.last_error:
            log.info("%s; following prompts by polling /history", reason)
        self.last_error = reason
        self._retry_at = self._clock() + RECONNECT_AFTER
        return False


def _decode(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, str):
        return None
    try:
        frame = json.loads(raw)
    except ValueError:
        return None
    return frame if isinstance(frame, dict) else None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:100]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return None if value is None else str(value)
