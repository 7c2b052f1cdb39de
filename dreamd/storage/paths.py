"""Paths in the ledger are relative to the data dir, so a stopped data dir can be
moved or copied whole (`mv`, `cp -a`) and the copy names only its own files.

`stored()` turns a path the daemon wrote into what a row keeps; `resolve()` turns a
row's value back into a path on this machine. A file outside the data dir (a seed in
the checkout, a user's seeds_dir) is kept absolute: it is not the data dir's to move.
Ledgers written before migration 0005 held absolute paths; `resolve()` still reads
them, and the migration converts the ones under the data dir it runs in.
"""

from __future__ import annotations

import os
from pathlib import Path


def stored(data_dir: Path | str, path: Path | str) -> str:
    """The value a row keeps for `path`: relative (POSIX separators) under the data
    dir, absolute elsewhere."""
    p = Path(path)
    base = Path(data_dir)
    if p.is_absolute():
        try:
            return p.relative_to(base).as_posix()
        except ValueError:
            try:  # the data dir may be reached through a symlink or a relative path
                return p.resolve().relative_to(base.resolve()).as_posix()
            except (ValueError, OSError):
                return str(p)
    return p.as_posix()


def resolve(data_dir: Path | str, value: str | os.PathLike[str] | None) -> Path | None:
    """A row's path on this machine: relative values are under the data dir."""
    if value is None or value == "":
        return None
    p = Path(value)
    return p if p.is_absolute() else Path(data_dir) / p
