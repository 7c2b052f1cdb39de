"""Game detection by process name, through psutil (the same call on Windows, Linux and
macOS; no POSIX signals, no /proc parsing of our own).

A known name matches case-insensitively and with or without ".exe", so "EldenRing.exe"
on Windows, "eldenring.exe" under Proton and a native "cs2" all match their entry.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import psutil


def normalize(name: str) -> str:
    name = name.strip().lower()
    return name[:-4] if name.endswith(".exe") else name


FULL_LOOK_EVERY = 30.0    # seconds between looks that read every process's name again


class GameWatch:
    """Reads the process list and names the known games running.

    A look reads the names of the processes that are new since the last one only: the
    list of pids is cheap, a name is a file read per process on Linux, and reading all
    of them every two seconds was the guard's whole cost (~8 ms a look for 70
    processes here, a desktop has hundreds). A pid that died and was given to a new
    process between two looks keeps its old name until the next full look, at most
    FULL_LOOK_EVERY seconds later."""

    def __init__(self, known: Iterable[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.known = {normalize(n): n for n in known if n.strip()}
        self.clock = clock
        self._names: dict[int, str] = {}
        self._full_at = float("-inf")

    def running(self) -> list[str]:
        """Names (as the process calls itself) of the known games running now, sorted."""
        if not self.known:
            return []
        now = self.clock()
        before = self._names
        if now - self._full_at >= FULL_LOOK_EVERY:
            before, self._full_at = {}, now
        names: dict[int, str] = {}
        for pid in psutil.pids():
            name = before.get(pid)
            if name is None:
                name = _name(pid)
                if name is None:
                    continue
            names[pid] = name
        self._names = names
        found = {name for name in names.values() if normalize(name) in self.known}
        return sorted(found, key=str.lower)


def _name(pid: int) -> str | None:
    """The process's name, or None when it is gone or cannot be read."""
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return None
