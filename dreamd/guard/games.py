"""Game detection by process name, through psutil (the same call on Windows, Linux and
macOS; no POSIX signals, no /proc parsing of our own).

A known name matches case-insensitively and with or without ".exe", so "EldenRing.exe"
on Windows, "eldenring.exe" under Proton and a native "cs2" all match their entry.
"""

from __future__ import annotations

from typing import Iterable

import psutil


def normalize(name: str) -> str:
    name = name.strip().lower()
    return name[:-4] if name.endswith(".exe") else name


class GameWatch:
    """Reads the process list and names the known games running."""

    def __init__(self, known: Iterable[str]) -> None:
        self.known = {normalize(n): n for n in known if n.strip()}

    def running(self) -> list[str]:
        """Names (as the process calls itself) of the known games running now, sorted."""
        if not self.known:
            return []
        found: set[str] = set()
        # process_iter keeps its Process objects between calls and reads only the name:
        # on Windows one snapshot of the process list, on Linux /proc/<pid>/stat each
        for proc in psutil.process_iter(["name"]):
            name = proc.info.get("name")
            if name and normalize(name) in self.known:
                found.add(name)
        return sorted(found, key=str.lower)
