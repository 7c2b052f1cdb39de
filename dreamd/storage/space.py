"""How much the data dir holds, by part, and how much room the disk has left.

Read by the janitor (the budget and the free-space floor) and by `dreamd status`, so it
stays light: os.scandir over a tree the budget keeps small, no torch, no ledger.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

GB = 1024 ** 3
MB = 1024 ** 2
# The folders the daemon owns under the data dir, each a part of the size report;
# everything else (logs, output, seeds, orphaned-*) is reported under its own name.
OWNED = ("frames", "keyframes", "thumbs", "latents", "injections", "palette")
LEDGER_FILES = ("dreamd.db", "dreamd.db-wal", "dreamd.db-shm")
ORPHANED_PREFIX = "orphaned-"


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes, files) under path; entries that vanish while counting are skipped."""
    total = files = 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(Path(e.path))
                        elif e.is_file(follow_symlinks=False):
                            total += e.stat(follow_symlinks=False).st_size
                            files += 1
                    except OSError:
                        continue
        except OSError:
            continue
    return total, files


@dataclass
class Usage:
    """The data dir's size by part (bytes), the disk's free space, and the budget."""

    parts: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    free: int | None = None
    budget: int = 0                 # bytes; 0 = none
    floor: int = 0                  # bytes; 0 = none

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def orphaned(self) -> int:
        """Bytes in folders reconcile moved aside: the user's to look at and delete."""
        return sum(v for k, v in self.parts.items() if k.startswith(ORPHANED_PREFIX))

    @property
    def managed(self) -> int:
        """What the budget governs: everything but what was moved aside."""
        return self.total - self.orphaned

    def over_budget(self) -> int:
        return max(0, self.managed - self.budget) if self.budget else 0

    def as_dict(self) -> dict:
        return {"total": self.total, "parts": dict(sorted(self.parts.items())),
                "files": dict(sorted(self.files.items())), "free": self.free,
                "budget": self.budget, "floor": self.floor}


def wal_bytes(db_path: Path) -> int:
    """The size of the ledger's write-ahead log (0 when there is none)."""
    try:
        return os.stat(f"{db_path}-wal").st_size
    except OSError:
        return 0


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def resume_mark(floor: int) -> int:
    """The free space at which generation, paused under the floor, resumes: a little
    above the floor (10 %, at least 1 MB), so it does not flap at the boundary."""
    return floor + max(floor // 10, MB)


def measure(data_dir: Path, *, budget_gb: float = 0.0, floor_gb: float = 0.0) -> Usage:
    usage = Usage(budget=int(budget_gb * GB), floor=int(floor_gb * GB))
    usage.free = free_bytes(data_dir)
    try:
        entries = list(os.scandir(data_dir))
    except OSError:
        return usage
    for e in entries:
        try:
            if e.is_dir(follow_symlinks=False):
                size, n = tree_size(Path(e.path))
                name = e.name
            elif e.is_file(follow_symlinks=False):
                size, n = e.stat(follow_symlinks=False).st_size, 1
                name = "ledger" if e.name in LEDGER_FILES else "other"
            else:
                continue
        except OSError:
            continue
        usage.parts[name] = usage.parts.get(name, 0) + size
        usage.files[name] = usage.files.get(name, 0) + n
    return usage


def human(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GB", GB), ("MB", MB), ("kB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
