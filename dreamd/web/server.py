"""Start and stop the web viewer with the daemon: uvicorn serves the Starlette app in a
thread of its own (its own event loop), so the display writer, on its thread, never
waits for a page. The socket is bound here first, so a port in use is one clear
warning at start and the dream goes on without the viewer.

`<data dir>/web.json` says where the running viewer is (`dreamd status`, `dreamd open`);
`<data dir>/web-token` holds the token controls need when the viewer is exposed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamd.config import LOOPBACK_HOSTS, Config

log = logging.getLogger("dreamd.web")
WEB_FILE = "web.json"
TOKEN_FILE = "web-token"
START_TIMEOUT = 10.0    # seconds uvicorn may take to start serving
STOP_TIMEOUT = 5.0
MAX_CONNECTIONS = 64    # beyond this uvicorn answers 503 at once: a flood queues nowhere


@dataclass
class Viewer:
    url: str
    hub: Any
    server: Any
    thread: threading.Thread
    web_file: Path
    state: Any

    def announce(self, frame_id: int, chain_index: int, t: float, path: str | Path,
                 swapped_at: float) -> None:
        """The display writer's hook: never raises, never waits."""
        try:
            self.hub.announce(frame_id, chain_index, t, path, swapped_at)
        except Exception:       # the viewer must never take the display down
            pass

    def stop(self) -> None:
        loop = self.hub.loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self.hub.close)   # pages hear "bye"
            except RuntimeError:
                pass
        time.sleep(0.1)
        self.server.should_exit = True
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self.server.wake.set)   # not a second later
            except (RuntimeError, AttributeError):
                pass
        self.thread.join(STOP_TIMEOUT)
        for engine in (self.state.reader, self.state.writer):
            if engine is not None:
                engine.dispose()
        try:
            if json.loads(self.web_file.read_text()).get("pid") == os.getpid():
                self.web_file.unlink()
        except (OSError, ValueError):
            pass


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sys.platform != "win32":
        # a restarted daemon takes its port back at once, past the old one's TIME_WAIT
        # (on Windows SO_REUSEADDR would let two servers share the port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1" if host == "localhost" else host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def token(data_dir: Path) -> tuple[str, bool]:
    """The exposed viewer's control token: (token, just made). Made once, kept 0600."""
    path = data_dir / TOKEN_FILE
    try:
        value = path.read_text().strip()
        if value:
            return value, False
    except OSError:
        pass
    value = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value, True


def start(cfg: Config, *, quiet: bool = False) -> Viewer | None:
    """The viewer, serving; None when it is off or cannot listen (said in one warning)."""
    w = cfg.web
    if not w.enabled:
        return None
    try:
        sock = _bind(w.host, w.port)
    except OSError as exc:
        why = ("is in use (another dreamd, or another program)"
               if exc.errno == errno.EADDRINUSE else f"cannot be used: {exc.strerror or exc}")
        log.warning("web viewer off for this run: %s port %d %s; set web.port to a free "
                    "port (0 = any) or web.enabled = false; the dream goes on", w.host,
                    w.port, why)
        return None

    import uvicorn

    from dreamd.ledger import database
    from dreamd.web.app import build_app
    from dreamd.web.state import ViewerState
    from dreamd.web.hub import FrameHub

    exposed = w.host not in LOOPBACK_HOSTS
    secret = None
    if exposed:
        secret, made = token(cfg.data_dir)
        if made:    # said once, on the terminal only (never in the log file)
            print(f"dreamd: web viewer token (kept in {cfg.data_dir / TOKEN_FILE}): {secret}",
                  file=sys.stderr, flush=True)
    hub = FrameHub()
    state = ViewerState(cfg=cfg, hub=hub, reader=database.reader(cfg.db_path),
                        writer=database.writer(cfg.db_path, pool=False) if w.controls else None,
                        token=secret, exposed=exposed)
    # http="auto": httptools (a dependency; uvicorn's pure-Python h11 parser cost a
    # page at 15 fps about a per cent of a core), h11 where it is missing
    config = uvicorn.Config(build_app(state), lifespan="on", log_config=None,
                            log_level="warning", access_log=False, http="auto",
                            limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5,
                            timeout_graceful_shutdown=2)
    server = _server_class(uvicorn)(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="web",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        log.warning("web viewer off for this run: the server did not start (see the log)")
        return None
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/" if w.host in LOOPBACK_HOSTS or w.host == "0.0.0.0" \
        else f"http://{w.host}:{port}/"
    web_file = cfg.data_dir / WEB_FILE
    try:
        web_file.write_text(json.dumps({"url": url, "pid": os.getpid(), "host": w.host,
                                        "port": port, "exposed": exposed,
                                        # for bench/web.py: the server thread's CPU
                                        "thread_id": thread.native_id}) + "\n")
    except OSError as exc:
        log.warning("web viewer: cannot write %s (%s): `dreamd status` will not show the URL",
                    web_file, exc)
    if exposed:
        log.warning("web viewer EXPOSED on %s:%d (web.expose = true): anyone who can reach "
                    "it sees the dream; controls need the token in %s", w.host, port,
                    cfg.data_dir / TOKEN_FILE)
    if not quiet:
        log.info("web viewer: %s  (kiosk mode for wallpaper apps: %s?kiosk=1)", url, url)
    return Viewer(url=url, hub=hub, server=server, thread=thread, web_file=web_file,
                  state=state)


def _server_class(uvicorn):
    """uvicorn's Server, whose loop wakes once a second instead of ten times (it only
    looks for a stop and refreshes the Date header, once a second, there): each wake-up
    costs ~0.1 ms of CPU, for a viewer that runs for months. Viewer.stop wakes it."""
    import asyncio

    class Server(uvicorn.Server):
        wake: "asyncio.Event | None" = None

        async def main_loop(self) -> None:
            self.wake = asyncio.Event()
            counter = 0
            should_exit = await self.on_tick(counter)
            while not should_exit:
                counter = (counter + 10) % 864000   # on_tick counts tenths of a second
                try:
                    await asyncio.wait_for(self.wake.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
                should_exit = await self.on_tick(counter)

    return Server


def running_url(data_dir: Path, pid: int | None) -> str | None:
    """The URL of the viewer the live daemon `pid` serves, from web.json; else None."""
    if pid is None:
        return None
    try:
        info = json.loads((data_dir / WEB_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info.get("url") if isinstance(info, dict) and info.get("pid") == pid else None


def live_url(cfg: Config) -> str | None:
    """The viewer's URL when a daemon runs on this data dir (its pid file names a live
    process, and web.json is that process's); else None. No ledger, no SQLAlchemy."""
    import psutil

    try:
        pid = int(cfg.pid_path.read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return running_url(cfg.data_dir, pid) if pid and psutil.pid_exists(pid) else None
