"""Between the display writer and the open pages: the writer announces each frame it
swaps onto the screen; the hub reads and hashes that file once, keeps the last few
frames in memory under their content address (`/frames/<sha256>.png`), and tells every
page through a small queue of its own.

`announce` is called on the display thread: it only hands the event to the server's
event loop (`call_soon_threadsafe`) and never raises or waits, so however many pages
are open, or however slow they are, the display writer is not held up.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

log = logging.getLogger("dreamd.web")
KEEP_FRAMES = 16        # frames kept in memory (about a second at 15 fps): a late page
                        # asks for the newest one, never for an old one
QUEUE_SIZE = 8          # events waiting per page; a stalled page loses the oldest
MAX_SUBSCRIBERS = 32    # open event streams at once; more get 503


class FrameHub:
    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.frames: OrderedDict[str, bytes] = OrderedDict()
        self._current: dict[str, Any] | None = None       # the last frame event
        # the last frame announced while no page listened: read and hashed only when a
        # page (or /api/status) asks, so a viewer nobody looks at costs no file reads
        self._unread: tuple[int, int, float, Path, float] | None = None
        self._unread_lock = threading.Lock()   # the display's thread sets it, too
        self.subscribers: set[asyncio.Queue] = set()
        self.closing: asyncio.Event | None = None
        self.listened: asyncio.Event | None = None   # set while a page listens

    @property
    def current(self) -> dict[str, Any] | None:
        with self._unread_lock:
            unread, self._unread = self._unread, None
        if unread is not None:
            self._admit(*unread, publish=False)    # the one asking gets it as it is
        return self._current

    # ------------------------------------------------------------ any thread
    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.closing = asyncio.Event()
        self.listened = asyncio.Event()

    def announce(self, frame_id: int, chain_index: int, t: float, path: str | Path,
                 swapped_at: float) -> None:
        """The display writer put this frame on screen at `swapped_at` (epoch seconds).
        While no page listens the news is only kept, in this thread: waking the viewer's
        event loop for each frame nobody sees was most of its cost."""
        loop = self.loop
        if loop is None:
            return
        if not self.subscribers:
            with self._unread_lock:
                self._unread = (frame_id, chain_index, t, path, swapped_at)
            if not self.subscribers:     # a page that came meanwhile hears it below
                return
        try:
            loop.call_soon_threadsafe(self._arrive, frame_id, chain_index, t, path, swapped_at)
        except RuntimeError:        # the server's loop is closed: the viewer has stopped
            pass

    # ------------------------------------------------------------ the event loop
    def seed(self, frame_id: int, chain_index: int, t: float, path: str | Path,
             swapped_at: float) -> None:
        """The frame already on screen when the viewer started; a frame the display
        announced meanwhile is newer and wins."""
        if self._current is None and self._unread is None:
            self._admit(frame_id, chain_index, t, path, swapped_at)

    def _arrive(self, frame_id: int, chain_index: int, t: float, path: str | Path,
                swapped_at: float) -> None:
        with self._unread_lock:
            if self.subscribers:
                self._unread = None
            else:
                # news posted to the loop before the last page left can come after a
                # newer frame kept by announce(): the newer one stays
                if self._unread is None or self._unread[4] <= swapped_at:
                    self._unread = (frame_id, chain_index, t, path, swapped_at)
                return
        self._admit(frame_id, chain_index, t, path, swapped_at)

    def _admit(self, frame_id: int, chain_index: int, t: float, path: str | Path,
               swapped_at: float, *, publish: bool = True) -> None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:      # deleted meanwhile (retention): the next one will do
            log.debug("frame %d not announced: %s", frame_id, exc)
            return
        sha = hashlib.sha256(data).hexdigest()
        self.frames[sha] = data
        self.frames.move_to_end(sha)
        while len(self.frames) > KEEP_FRAMES:
            self.frames.popitem(last=False)
        self._current = {"id": frame_id, "url": f"/frames/{sha}.png", "chain": chain_index,
                        "t": round(t, 6), "swapped_at": round(swapped_at * 1000.0, 1)}
        if publish:
            self.publish("frame", self._current)

    def frame(self, sha: str) -> bytes | None:
        return self.frames.get(sha)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        for queue in self.subscribers:
            if queue.full():
                queue.get_nowait()          # a page that is behind loses the oldest event
            queue.put_nowait((kind, data))

    def subscribe(self) -> asyncio.Queue | None:
        if len(self.subscribers) >= MAX_SUBSCRIBERS:
            return None
        queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_SIZE)
        self.subscribers.add(queue)
        if self.listened is not None:
            self.listened.set()
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self.subscribers.discard(queue)
        if not self.subscribers and self.listened is not None:
            self.listened.clear()

    def close(self) -> None:
        """The daemon stops: say so to every page and end their streams."""
        self.publish("bye", {"reason": "the daemon is stopping"})
        if self.closing is not None:
            self.closing.set()
