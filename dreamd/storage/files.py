"""Atomic file writes: a temp file in the same directory, then os.replace.

Readers (Rainmeter, the TUI, a browser) never see a half-written image. On Windows
the replace fails while a reader holds the target open, so it is retried briefly.
Frame files are fsynced before their ledger row is committed (files before rows);
display outputs are not (they are rewritten several times a second).
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from pathlib import Path

REPLACE_RETRIES = 25
REPLACE_DELAY = 0.004   # seconds, grows linearly: ~1.3 s in all before giving up


def _process_token() -> str:
    return f"{os.getpid()}.{os.urandom(6).hex()}"


_TOKEN = _process_token()        # this process's, made again in a forked child
_COUNT = itertools.count()       # thread-safe in CPython
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: globals().update(_TOKEN=_process_token()))


def _tmp_name(path: str) -> str:
    # unique per call, never reused: a name left behind by a crash (or an older
    # daemon with the same pid) is never this call's temp file: the pid and a random
    # token drawn once per process, and a counter. Plain strings, and no system call:
    # the display makes three of these with every frame, and Path objects or a
    # getrandom per name cost more than the link and the rename they are for.
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.{_TOKEN}.{next(_COUNT)}.tmp")


def replace_retrying(src: Path | str, dst: Path | str) -> None:
    for attempt in range(REPLACE_RETRIES):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if attempt == REPLACE_RETRIES - 1:
                raise
            time.sleep(REPLACE_DELAY * (attempt + 1))


def write_atomic(path: Path | str, data: bytes, *, fsync: bool = False) -> None:
    path = os.fspath(path)
    tmp = _tmp_name(path)
    try:
        # os.open and os.write, not open(): a buffered file object cost more CPU than the
        # write itself (status.json is written up to ten times a second)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        replace_retrying(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def place_atomic(src: Path | str, dst: Path | str, *, check_same: bool = True) -> None:
    """Put `src`'s content at `dst` atomically (the display's frame swap).

    A hard link when it can (no bytes copied: the frame files are never rewritten, so
    sharing their inode is safe, and retention deleting a frame leaves the link
    whole); a copy across file systems or where links are not supported.

    Never writes into an existing file: the temp name is new for every call, a copy
    goes to a file opened with O_EXCL, and when `dst` is already `src` (the same frame
    shown again) nothing is swapped (`check_same`: two stats, which a caller that knows
    its files are distinct skips). POSIX rename of two links to one inode is a no-op
    that leaves the temp link behind, so with `check_same` the temp name is removed
    in every case (a leftover of a wrong `check_same=False` is swept at the next start).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if check_same:          # (the display knows its frames are distinct files)
        try:
            if os.path.samefile(src, dst):
                return
        except OSError:
            pass                               # dst does not exist yet: place it
    tmp = _tmp_name(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            _copy_exclusive(src, tmp)
        replace_retrying(tmp, dst)
    except BaseException:
        _unlink(tmp)
        raise
    if check_same:
        # after a real rename this name is gone; after a no-op rename (same inode) it
        # is a second link to a frame, which must not outlive this call. (A caller
        # whose files are distinct has no no-op rename: one system call saved.)
        _unlink(tmp)


def _copy_exclusive(src: Path | str, tmp: str) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out)


def sweep_temps(directory: Path) -> int:
    """Delete temp names left in `directory` by an interrupted swap or write (a crash
    between link and rename, or an older dreamd); returns how many went."""
    n = 0
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return 0
    for p in entries:
        if is_temp(p):
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
    return n


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")
