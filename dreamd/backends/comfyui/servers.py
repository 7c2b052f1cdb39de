"""Which ComfyUI server gets the next keyframe: health bookkeeping for a list of URLs.

The backend asks for candidates (servers not benched, in configured order), reports each
call's outcome, and shows `health()` in the status. A server that fails is benched for an
exponentially growing time; when the bench ends it gets one more chance. A server that was
good within the last `recent_window` seconds is benched at most `recent_cap` seconds, so a
short outage (a restart) is noticed within seconds, not after the doubling reached minutes.

A server that answers but cannot run the workflow (a checkpoint or node it lacks) is *set
aside*: no keyframe goes to it until a later validation finds it fit, while the others carry
on. Only when every server is set aside is the backend stopped (the daemon decides that).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dreamd.errors import TransientBackendError


@dataclass(frozen=True)
class ServerHealth:
    url: str
    healthy: bool                  # answered last time and is not benched (may be set aside)
    benched_until: float | None    # wall-clock (epoch seconds) when it may be tried again
    last_error: str | None
    last_ok: float | None          # wall-clock of the last successful call
    failures: int                  # consecutive failures
    unfit: str | None = None       # why it is set aside (cannot run the workflow), or None
    checkpoints: tuple[str, ...] = ()   # what it has, when it was set aside for a checkpoint


@dataclass
class _State:
    failures: int = 0
    benched_until: float = 0.0     # monotonic
    last_error: str | None = None
    last_ok: float | None = None   # wall clock
    last_ok_mono: float | None = None
    unfit: str | None = None
    checkpoints: tuple[str, ...] = ()


class ServerPool:
    """Health of every configured server. Not a connection pool: clients live in the backend."""

    def __init__(self, urls: Sequence[str], *, bench_base: float = 2.0, bench_cap: float = 300.0,
                 recent_cap: float = 10.0, recent_window: float = 600.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        urls = [u.rstrip("/") for u in urls]
        if not urls:
            raise ValueError("ServerPool needs at least one URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"duplicate ComfyUI URLs in {urls}")
        self.urls = urls
        self.bench_base, self.bench_cap = bench_base, bench_cap
        self.recent_cap, self.recent_window = min(recent_cap, bench_cap), recent_window
        self._clock, self._wall = clock, wall
        self._state = {u: _State() for u in urls}
        # The keyframe worker reports outcomes while the guard or the status reads them.
        self._lock = threading.Lock()

    def is_benched(self, url: str) -> bool:
        return self._state[url].benched_until > self._clock()

    def is_unfit(self, url: str) -> bool:
        return self._state[url].unfit is not None

    def usable(self, url: str) -> bool:
        return not self.is_benched(url) and not self.is_unfit(url)

    def all_unfit(self) -> bool:
        return all(self._state[u].unfit is not None for u in self.urls)

    def candidates(self) -> list[str]:
        """Servers worth a try now, in configured order; raises when every one is benched
        or set aside."""
        ready = [u for u in self.urls if self.usable(u)]
        if not ready:
            raise TransientBackendError(f"every ComfyUI server is down: {self.describe_down()}")
        return ready

    def set_aside(self, url: str, reason: str, checkpoints: Sequence[str] = ()) -> bool:
        """The server cannot run the workflow; returns True when this is news."""
        with self._lock:
            s = self._state[url]
            news = s.unfit != reason
            s.unfit, s.checkpoints = reason, tuple(checkpoints)
            return news

    def fit(self, url: str) -> bool:
        """A validation found the server fit again; returns True when it had been set aside."""
        with self._lock:
            s = self._state[url]
            was = s.unfit is not None
            s.unfit, s.checkpoints = None, ()
            return was

    def unfit_reason(self, url: str) -> str | None:
        return self._state[url].unfit

    def describe_down(self) -> str:
        now = self._clock()
        parts = []
        for u in self.urls:
            s = self._state[u]
            wait = f", benched {s.benched_until - now:.0f}s more" if s.benched_until > now else ""
            if s.unfit is not None:
                parts.append(f"{u} (set aside: {s.unfit})")
            else:
                parts.append(f"{u} ({s.last_error or 'no answer'}{wait})")
        return "; ".join(parts)

    def last_error(self, url: str) -> str | None:
        return self._state[url].last_error

    def mark_ok(self, url: str) -> None:
        with self._lock:
            s = self._state[url]
            s.failures, s.benched_until, s.last_ok = 0, 0.0, self._wall()
            s.last_ok_mono = self._clock()

    def mark_failed(self, url: str, error: str) -> float:
        """Bench the server; returns for how many seconds."""
        with self._lock:
            s = self._state[url]
            s.failures += 1
            s.last_error = error
            seconds = min(self.bench_cap, self.bench_base * 2 ** (s.failures - 1))
            if s.last_ok_mono is not None and self._clock() - s.last_ok_mono < self.recent_window:
                seconds = min(seconds, self.recent_cap)  # good lately: back soon, most likely
            s.benched_until = self._clock() + seconds
            return seconds

    def health(self) -> list[ServerHealth]:
        now, wall = self._clock(), self._wall()
        out = []
        for u in self.urls:
            with self._lock:
                s = _State(**vars(self._state[u]))
            benched = s.benched_until > now
            out.append(ServerHealth(
                url=u, healthy=not benched and s.failures == 0,
                benched_until=wall + (s.benched_until - now) if benched else None,
                last_error=s.last_error, last_ok=s.last_ok, failures=s.failures,
                unfit=s.unfit, checkpoints=s.checkpoints))
        return out
