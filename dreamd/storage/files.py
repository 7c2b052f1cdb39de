"""Atomic file writes: a temp file in the same directory, then os.replace.

Readers (Rainmeter, the TUI, a browser) never see a half-written image. On Windows
the replace fails while a reader holds the target open, so it is retried briefly.
Frame files are fsynced before their ledger row is committed (files before rows);
display outputs are not (they are rewritten several times a second).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

REPLACE_RETRIES = 25
REPLACE_DELAY = 0.004   # seconds, grows linearly: ~1.3 s in all before giving up


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def replace_retrying(src: Path, dst: Path) -> None:
    for attempt in range(REPLACE_RETRIES):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if attempt == REPLACE_RETRIES - 1:
                raise
            time.sleep(REPLACE_DELAY * (attempt + 1))


def write_atomic(path: Path, data: bytes, *, fsync: bool = False) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        replace_retrying(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def place_atomic(src: Path, dst: Path) -> None:
    """Put `src`'s content at `dst` atomically (the display's frame swap).

    A hard link when it can (no bytes copied: the frame files are never rewritten, so
    sharing their inode is safe, and retention deleting a frame leaves the link
    whole); a copy across file systems or where links are not supported.
    """
    tmp = _tmp_name(Path(dst))
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        replace_retrying(tmp, Path(dst))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")
