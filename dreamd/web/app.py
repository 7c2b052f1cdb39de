"""The viewer's routes: the page and its assets, frames by content address, the status
and the frame announcements as server-sent events, the recent keyframes, and the
controls (which become `controls` rows like every other surface's).

Why Starlette + uvicorn + sse-starlette, and not aiohttp: the viewer is a handful of
routes around one long-lived stream per page. Starlette gives routing, responses and
host checks with no framework of its own to learn, uvicorn runs it in a thread of the
daemon with a bounded number of connections and a graceful stop, and sse-starlette
does the event-stream details (retry field, keep-alive pings, disconnect detection,
send timeout) that a hand-rolled stream gets wrong. aiohttp would bring its own server
and client in one package we do not otherwise need. Server-sent events rather than a
websocket: the page only listens (controls are plain POSTs), and `EventSource`
reconnects by itself after a daemon restart.

What can be fetched is closed by construction: the assets are three files read at
start into a dict, a frame is looked up by its sha256 among the last few in memory,
a keyframe by its sha256 in the ledger (and its file must be a regular file under
`<data dir>/keyframes`, no symlink, with that very hash). No request path ever
becomes a file path. Read-only routes use the read-only ledger engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import time
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import text
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dreamd.web.controls import ControlRefused, send
from dreamd.web.state import KNOB_RANGES, WEB_KNOBS, ViewerState

log = logging.getLogger("dreamd.web")
ASSETS = {"index.html": "text/html; charset=utf-8", "viewer.js": "text/javascript; charset=utf-8",
          "viewer.css": "text/css; charset=utf-8"}
SHA_PNG = re.compile(r"([0-9a-f]{64})\.png")
IMMUTABLE = "public, max-age=31536000, immutable"      # a content address never changes
HISTORY = 6             # recent keyframes the overlay shows
STATUS_POLL = 0.2       # seconds between looks at status.json's modification time
LEDGER_EVERY = 1.0      # seconds between ledger reads for the theme and the knobs
HEARTBEAT = 2.0         # a status event at least this often, so a page can tell a hung daemon
RETRY_MS = 1000         # EventSource's reconnection delay after the stream drops
# status keys that move at every frame: sent with the heartbeat, not as news
VOLATILE = frozenset({"frame_number", "last_update", "uptime_hours", "age_seconds",
                      "buffer_seconds", "generation_time"})
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; object-src 'none'",
}


def _asset_bytes() -> dict[str, bytes]:
    folder = resources.files("dreamd.web") / "static"
    return {name: (folder / name).read_bytes() for name in ASSETS}


def _headers(cache: str, **extra: str) -> dict[str, str]:
    return {**SECURITY_HEADERS, "Cache-Control": cache, **extra}


def not_found() -> Response:
    return Response("not found", status_code=404, headers=_headers("no-store"),
                    media_type="text/plain")


# ---------------------------------------------------------------- the ledger, read-only

def _ledger_facts(state: ViewerState, keyframe_index: int | None) -> dict[str, Any]:
    """The theme on screen, the knobs the page offers, as they are in effect (the read
    model's answer: a stored knob when it still validates, else the config's), and the
    dream's quality over the last hour."""
    from dreamd.ledger import read_model
    from dreamd.ledger.queries import dbapi

    with state.reader.connect() as conn:
        theme = None
        if keyframe_index is not None:
            theme = conn.execute(text(
                "SELECT theme FROM keyframes WHERE chain_index = :k AND state = 'completed' "
                "LIMIT 1"), {"k": keyframe_index}).scalar()
        in_effect = read_model.knobs(read_model.stored_knobs(dbapi(conn)),
                                     state.cfg)
        # the dream's quality, the last hour (read model: the same as `dreamd status --json`)
        quality = read_model.quality(
            dbapi(conn), floor=in_effect["quality.stagnation_floor"].value)
    return {"theme": theme, "knobs": {key: in_effect[key].value for key in WEB_KNOBS},
            "knob_ranges": KNOB_RANGES, "quality": quality}


def _history(state: ViewerState) -> list[dict[str, Any]]:
    with state.reader.connect() as conn:
        rows = conn.execute(text(
            "SELECT chain_index, theme, completed_at, sha256 FROM keyframes "
            "WHERE state = 'completed' AND pruned_at IS NULL AND sha256 IS NOT NULL "
            "AND path IS NOT NULL ORDER BY chain_index DESC LIMIT :n"), {"n": HISTORY}).all()
    return [{"keyframe": r.chain_index, "theme": r.theme, "completed_at": str(r.completed_at),
             "url": f"/keyframes/{r.sha256}.png"} for r in rows]


def _keyframe_bytes(state: ViewerState, sha: str) -> bytes | None:
    """A keyframe image by its sha256: only a regular file under <data dir>/keyframes,
    reached without a symlink, whose bytes have that hash."""
    with state.reader.connect() as conn:
        value = conn.execute(text(
            "SELECT path FROM keyframes WHERE sha256 = :sha AND state = 'completed' "
            "AND pruned_at IS NULL AND path IS NOT NULL LIMIT 1"), {"sha": sha}).scalar()
    if not value:
        return None
    root = state.cfg.keyframes_dir.resolve()
    given = Path(value)
    path = Path(os.path.normpath(given if given.is_absolute()
                                 else state.cfg.data_dir.resolve() / given))
    try:
        if not path.is_relative_to(root) or path.is_symlink() or not path.is_file():
            return None
        if path.resolve(strict=True) != path:
            return None                 # a symlinked folder on the way
        data = path.read_bytes()
    except (OSError, RuntimeError):
        return None
    return data if hashlib.sha256(data).hexdigest() == sha else None


# ---------------------------------------------------------------- status

def _read_status(state: ViewerState) -> bool:
    """Re-read status.json when it changed; True when the payload may have changed."""
    path = state.cfg.output_dir / "status.json"
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return False
    if mtime == state._status_mtime:
        return False
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):       # torn by a disk-full in-place rewrite: next look
        return False
    state._status_mtime = mtime
    state.status = status if isinstance(status, dict) else None
    return True


def payload(state: ViewerState) -> dict[str, Any]:
    status = dict(state.status or {})
    age = None
    if status.get("last_update"):
        try:
            age = round(time.time() - datetime.fromisoformat(status["last_update"]).timestamp(), 2)
        except (TypeError, ValueError):
            age = None
    return {**status, **state._extra, "age_seconds": age,
            "web": {"controls": state.writer is not None, "exposed": state.exposed}}


async def refresh(state: ViewerState) -> bool:
    """Re-read status.json when it changed, and with it the ledger's facts (the theme on
    screen, the knobs) at most every LEDGER_EVERY or when the keyframe changed. True when
    the payload may have changed. The watcher and `/api/status` both come through here,
    so whichever sees a change first reads the ledger for it."""
    changed = _read_status(state)
    now = time.monotonic()
    k = (state.status or {}).get("keyframe_index")
    # not read yet (just started, or the watcher's first read is still under way): now
    if (changed or not state._extra) and (now - state._ledger_at >= LEDGER_EVERY
                                          or k != state._ledger_key):
        try:
            state._extra = await anyio.to_thread.run_sync(_ledger_facts, state, k)
        except Exception as exc:    # busy or being replaced: keep the last answer
            log.debug("viewer: ledger read failed: %s", exc)
        state._ledger_at, state._ledger_key = now, k
    return changed


def _telling(status: dict[str, Any]) -> str:
    """The part of a status a page must hear at once; the counters that move at every
    frame (VOLATILE) wait for the heartbeat."""
    return json.dumps({k: v for k, v in status.items() if k not in VOLATILE},
                      sort_keys=True, default=str)


async def watch_status(state: ViewerState) -> None:
    """Publish the status to every page when it changes in a way a page shows at once
    (state, pause, keyframe, theme, knobs, a problem…), and at least every HEARTBEAT
    seconds with the counters. status.json is rewritten at every frame: publishing each
    rewrite sent every page five events a second to say the frame number moved. While
    no page listens it sleeps until one does (a viewer nobody looks at costs the daemon
    nothing: no read, no wake-up); a page that connects gets a fresh status from
    `/api/events` itself."""
    last_sent, last_told = 0.0, None
    while True:
        if not state.hub.subscribers and state.hub.listened is not None:
            await state.hub.listened.wait()
        if state.hub.subscribers:
            changed = await refresh(state)
            now = time.monotonic()
            told = _telling(payload(state)) if changed else last_told
            if told != last_told or now - last_sent >= HEARTBEAT:
                state.hub.publish("status", payload(state))
                last_sent, last_told = now, told
        await asyncio.sleep(STATUS_POLL)


# ---------------------------------------------------------------- routes

def _playhead(state: ViewerState) -> tuple[int, int, float] | None:
    with state.reader.connect() as conn:
        row = conn.execute(text(
            "SELECT playhead_frame_id, playhead_chain_index, playhead_t FROM runtime_state "
            "WHERE id = 1")).first()
    return tuple(row) if row and row[0] is not None else None


async def seed_current(state: ViewerState) -> None:
    """The frame on screen before this viewer started (the daemon restarted paused, or
    between two frames): a page opened now shows it rather than black until the next
    frame, which while paused never comes."""
    path = state.cfg.output_dir / "current_frame.png"
    try:
        playhead = await anyio.to_thread.run_sync(_playhead, state)
        swapped_at = path.stat().st_mtime
    except Exception as exc:    # no frame shown yet, or the ledger is busy: nothing to seed
        log.debug("viewer: no frame on screen to start with: %s", exc)
        return
    frame_id, chain, t = playhead or (0, 0, 0.0)
    state.hub.seed(frame_id, chain, t, path, swapped_at)


def build_app(state: ViewerState) -> Starlette:
    # the page's default fit mode, from web.fit (a closed list of words: safe in HTML)
    assets = _asset_bytes()
    assets["index.html"] = assets["index.html"].replace(
        b"<body>", f'<body data-fit="{state.cfg.web.fit}">'.encode(), 1)
    etags = {name: '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
             for name, data in assets.items()}

    def asset(name: str, request: Request) -> Response:
        if request.headers.get("if-none-match") == etags[name]:
            return Response(status_code=304, headers=_headers("no-cache", ETag=etags[name]))
        return Response(assets[name], media_type=ASSETS[name],
                        headers=_headers("no-cache", ETag=etags[name]))

    async def index(request: Request) -> Response:
        return asset("index.html", request)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        return asset(name, request) if name in ASSETS and name != "index.html" else not_found()

    async def frame(request: Request) -> Response:
        m = SHA_PNG.fullmatch(request.path_params["name"])
        data = state.hub.frame(m.group(1)) if m else None
        if data is None:
            return not_found()
        return Response(data, media_type="image/png", headers=_headers(IMMUTABLE))

    async def keyframe(request: Request) -> Response:
        m = SHA_PNG.fullmatch(request.path_params["name"])
        data = await anyio.to_thread.run_sync(_keyframe_bytes, state, m.group(1)) if m else None
        if data is None:
            return not_found()
        return Response(data, media_type="image/png", headers=_headers(IMMUTABLE))

    async def status(request: Request) -> Response:
        await refresh(state)
        return JSONResponse({"status": payload(state), "frame": state.hub.current},
                            headers=_headers("no-store"))

    async def history(request: Request) -> Response:
        try:
            rows = await anyio.to_thread.run_sync(_history, state)
        except Exception as exc:
            return JSONResponse({"error": f"the ledger cannot be read now: {exc}"},
                                status_code=503, headers=_headers("no-store"))
        return JSONResponse({"keyframes": rows}, headers=_headers("no-store"))

    async def events(request: Request) -> Response:
        queue = state.hub.subscribe()
        if queue is None:
            return JSONResponse({"error": "too many open event streams"}, status_code=503,
                                headers=_headers("no-store"))

        await refresh(state)        # the watcher reads nothing while no page listens

        async def stream():
            try:
                yield ServerSentEvent(data=json.dumps(payload(state)), event="status",
                                      retry=RETRY_MS)
                if state.hub.current:
                    yield ServerSentEvent(data=json.dumps(state.hub.current), event="frame")
                while True:
                    kind, data = await queue.get()
                    yield ServerSentEvent(data=json.dumps(data), event=kind)
                    if kind == "bye":
                        return
            finally:
                state.hub.unsubscribe(queue)

        return EventSourceResponse(stream(), ping=15, send_timeout=10,
                                   headers=_headers("no-store"))

    async def control(request: Request) -> Response:
        try:
            cid = await send(state, request)
        except ControlRefused as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status,
                                headers=_headers("no-store"))
        return JSONResponse({"control": cid}, headers=_headers("no-store"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.hub.bind(asyncio.get_running_loop())
        await seed_current(state)
        task = asyncio.create_task(watch_status(state))
        try:
            yield
        finally:
            task.cancel()

    middleware = []
    if not state.exposed:
        # loopback only: a page on another site cannot reach the viewer through a DNS
        # name rebound to 127.0.0.1 (its Host header names that site)
        middleware.append(Middleware(TrustedHostMiddleware,
                                     allowed_hosts=["127.0.0.1", "localhost"]))
    return Starlette(routes=[
        Route("/", index),
        Route("/assets/{name}", static),
        Route("/frames/{name}", frame),
        Route("/keyframes/{name}", keyframe),
        Route("/api/status", status),
        Route("/api/history", history),
        Route("/api/events", events),
        Route("/api/control", control, methods=["POST"]),
        Route("/favicon.ico", lambda request: Response(status_code=204,
                                                       headers=_headers("max-age=86400"))),
    ], middleware=middleware, lifespan=lifespan)
