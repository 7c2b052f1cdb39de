"""Conditions of the machine the daemon cannot fix and must not count as failures: the
ledger busy (another process holds its write lock), no space left, permission denied,
a read-only file system, no memory left (a GPU a game has filled). Each is logged once
when it starts and once when it clears (never a traceback per tick), named in
status.json while it lasts, and work that hit one waits and retries without using up an
attempt. Out of memory is cleared by the backend that hit it, on its next success.

    classify(exc)      which condition an exception is, or None (a real failure)
    Conditions         the ones in force: report / clear / summary
    begin_retrying     a write transaction that waits out a busy ledger
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("dreamd")

LEDGER_BUSY = "ledger busy"
DISK_FULL = "disk full"
PERMISSION = "permission denied"
READ_ONLY = "read-only file system"
OUT_OF_MEMORY = "out of memory"

# What each means for the user, in the log line and in status.json's `problem`.
EXPLAIN = {
    LEDGER_BUSY: "another process holds the ledger's write lock (a sqlite3 session, a "
                 "backup?); playback goes on from frames already made, the ledger catches "
                 "up when it is free",
    DISK_FULL: "no space left on the device; generation waits (no attempt is used up) and "
               "resumes by itself when space is freed",
    PERMISSION: "permission denied writing to the data dir; generation waits (no attempt "
                "is used up) until it can write again",
    READ_ONLY: "the data dir is on a read-only file system; generation waits (no attempt "
               "is used up) until it can write again",
    OUT_OF_MEMORY: "the GPU (or RAM) has no room for the model now (a game, another "
                   "program?); the keyframe waits (no attempt is used up) and is tried "
                   "again, the model loaded anew",
}
_ERRNO = {errno.ENOSPC: DISK_FULL, errno.EACCES: PERMISSION, errno.EPERM: PERMISSION,
          errno.EROFS: READ_ONLY}
if hasattr(errno, "EDQUOT"):
    _ERRNO[errno.EDQUOT] = DISK_FULL
_SQLITE = (("database is locked", LEDGER_BUSY), ("database is busy", LEDGER_BUSY),
           ("database table is locked", LEDGER_BUSY), ("disk is full", DISK_FULL),
           ("readonly database", READ_ONLY))
_WRAPPED = (("no space left on device", DISK_FULL), ("os error 28", DISK_FULL),
            ("read-only file system", READ_ONLY), ("os error 30", READ_ONLY),
            ("os error 13", PERMISSION), ("out of memory", OUT_OF_MEMORY),
            ("can't allocate memory", OUT_OF_MEMORY))


def classify(exc: BaseException | None) -> str | None:
    """The condition `exc` (or what caused it) stands for; None for anything else."""
    seen = 0
    while exc is not None and seen < 8:
        seen += 1
        orig = getattr(exc, "orig", None)          # SQLAlchemy wraps the driver's error
        if isinstance(orig, BaseException) and orig is not exc:
            found = classify(orig)
            if found:
                return found
        if isinstance(exc, OSError) and exc.errno in _ERRNO:
            return _ERRNO[exc.errno]
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            return OUT_OF_MEMORY         # torch.cuda.OutOfMemoryError, without importing torch
        if isinstance(exc, sqlite3.Error):
            text = str(exc).lower()
            for needle, kind in _SQLITE:
                if needle in text:
                    return kind
        elif not isinstance(exc, OSError):
            # libraries that wrap the OS error in their own (safetensors, Rust's io)
            text = str(exc).lower()
            for needle, kind in _WRAPPED:
                if needle in text:
                    return kind
        exc = exc.__cause__ or exc.__context__
    return None


class Conditions:
    """The conditions in force, each logged once when it starts and once when it ends."""

    def __init__(self) -> None:
        self._active: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def report(self, kind: str, where: str, exc: BaseException | None = None) -> None:
        with self._lock:
            if kind in self._active:
                return
            self._active[kind] = (time.monotonic(), where)
        detail = f" ({_short(exc)})" if exc is not None else ""
        log.warning("%s: %s%s; %s", where, kind, detail, EXPLAIN.get(kind, ""))

    def clear(self, *kinds: str) -> None:
        for kind in kinds or tuple(self._active):
            with self._lock:
                since = self._active.pop(kind, None)
            if since is not None:
                log.warning("%s is over after %.0f s; carrying on", kind,
                            time.monotonic() - since[0])

    def active(self, kind: str | None = None) -> bool:
        return bool(self._active) if kind is None else kind in self._active

    def summary(self) -> str | None:
        """What status.json's `problem` says: the conditions in force, or None."""
        kinds = sorted(self._active)
        return "; ".join(f"{k}: {EXPLAIN.get(k, '')}" for k in kinds) or None


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if isinstance(orig, BaseException) else exc).splitlines()[0][:200]


def watch_ledger(engine: Any, conditions: Conditions) -> None:
    """A write transaction that got its lock means the ledger is not busy (any more)."""
    from sqlalchemy import event

    def begun(_conn: Any) -> None:
        if conditions._active:
            conditions.clear(LEDGER_BUSY)

    event.listen(engine, "begin", begun)      # after database.writer's BEGIN IMMEDIATE


@contextmanager
def begin_retrying(ctx: Any, what: str, *, give_up_after: float | None = None,
                   stopping_too: bool = False) -> Iterator[Any]:
    """`ctx.engine.begin()`, but a busy ledger is waited out: the lock is asked for again
    with backoff (the work it records is already done, on disk) until it is granted,
    the daemon stops (unless `stopping_too`: the stop's own record), or `give_up_after`
    seconds have passed. Once BEGIN IMMEDIATE is granted the write lock is ours, so
    only the beginning needs retrying."""
    started, delay = time.monotonic(), 0.05
    while True:
        conn = ctx.engine.connect()
        try:
            trans = conn.begin()
        except Exception as exc:
            conn.close()
            if classify(exc) != LEDGER_BUSY:
                raise
            waited = time.monotonic() - started
            if ((ctx.stopping.is_set() and not stopping_too)
                    or (give_up_after is not None and waited >= give_up_after)):
                raise
            conditions = getattr(ctx, "conditions", None)
            if conditions is not None:
                conditions.report(LEDGER_BUSY, what, exc)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
            continue
        break
    try:
        with trans:
            yield conn
    finally:
        conn.close()


# ---------------------------------------------------------------- jobs and conditions
POSTPONE_SECONDS = 5.0     # a job that hit a condition is tried again after this
FILE_CONDITIONS = (DISK_FULL, PERMISSION, READ_ONLY)


def postpone_for(ctx: Any, entity: str, row_id: int, owner: str, exc: BaseException) -> bool:
    """When `exc` is a condition of the machine, not of the job: report it (once), put
    the job back to wait without using up an attempt, and return True. A flapping disk
    must never discard a segment for good."""
    kind = classify(exc)
    if kind is None:
        return False
    from dreamd.errors import StaleTransitionError
    from dreamd.ledger import transitions

    what = f"{entity} {row_id}"
    ctx.conditions.report(kind, what, exc)
    error = f"{kind}: {_short(exc)}"
    try:
        with begin_retrying(ctx, what) as conn:
            transitions.postpone(conn, entity, row_id, owner, error,
                                 delay_seconds=POSTPONE_SECONDS)
    except StaleTransitionError:
        pass                                # its lease was lost: someone else has it
    except Exception as again:
        if classify(again) is None:
            raise
        # the ledger cannot be written either: owed, and written by the janitor when it
        # can (an expired lease would cost the job an attempt)
        ctx.owed_postpones[(entity, row_id)] = (owner, error)
    return True


def settle_postpones(ctx: Any) -> int:
    """Write the postpones the ledger could not take (see `postpone_for`); returns how
    many were written (one whose row is no longer ours is dropped, not counted). One
    still refused leaves the rest for the next call."""
    from dreamd.errors import StaleTransitionError
    from dreamd.ledger import transitions

    settled = 0
    for key, (owner, error) in list(ctx.owed_postpones.items()):
        entity, row_id = key
        try:
            with ctx.engine.begin() as conn:
                transitions.postpone(conn, entity, row_id, owner, error,
                                     delay_seconds=POSTPONE_SECONDS)
            settled += 1
        except StaleTransitionError:
            pass                            # no longer ours: nothing is owed
        except Exception as exc:
            if classify(exc) is None:
                raise
            break                           # the ledger still cannot be written
        ctx.owed_postpones.pop(key, None)
    return settled


def environment_recovered(ctx: Any) -> None:
    """A job wrote its files: whatever stopped file writes is over."""
    conditions = getattr(ctx, "conditions", None)
    if conditions is not None and conditions.active():
        conditions.clear(*FILE_CONDITIONS)


# ---------------------------------------------------------------- the stop's reserve
# A little space kept in the data dir from the start, given back at a stop on a full
# disk so the ledger can still record the stop and release the leases.
RESERVE_NAME = ".stop-reserve"
RESERVE_BYTES = 1 << 20


def make_reserve(data_dir: Any) -> None:
    path = Path(data_dir) / RESERVE_NAME
    try:
        if path.exists() and path.stat().st_size >= RESERVE_BYTES:
            return
        with open(path, "wb") as f:
            f.write(b"\0" * RESERVE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        try:
            path.unlink()
        except OSError:
            pass


def release_reserve(data_dir: Any) -> bool:
    """Give the reserve back to the disk; True when there was one."""
    try:
        (Path(data_dir) / RESERVE_NAME).unlink()
        return True
    except OSError:
        return False
