"""A worker's own read-only sqlite3 connection to the ledger, kept open between ticks:
an idle tick's few questions (dreamd/ledger/read_model.py) cost less than checking a
pooled SQLAlchemy connection out and its BEGIN (measured: bench/RESULTS.md, issue 24).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from dreamd.ledger import read_model
from dreamd.ledger.database import BUSY_TIMEOUT_MS


class Look:
    """One worker's read-only connection (`file:…?mode=ro`, autocommit: no snapshot is
    held between ticks, so the WAL can be checkpointed). Opened at the first read,
    dropped after an sqlite3 error (the next read opens it again: the file may have been
    replaced, or the error may have left the connection unusable), closed with the
    daemon. A worker's ticks never overlap (APScheduler's max_instances=1) but may run
    on different threads, hence check_same_thread=False."""

    def __init__(self, path: str | Path, timeout: float = BUSY_TIMEOUT_MS / 1000) -> None:
        self.path = Path(path)
        self.timeout = timeout               # seconds a read waits out a lock (rare in WAL)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()        # close() may come from the stopping thread

    def reading(self, snapshot: bool = False) -> _Reading:
        """`with look.reading() as conn:` the connection for the body's reads; with
        `snapshot`, in one read transaction, so several questions see one state of the
        ledger, as they did on a pooled connection's BEGIN."""
        return _Reading(self, snapshot)

    def connection(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            with self._lock:
                if self._conn is None:
                    self._conn = read_model.connect(self.path, timeout=self.timeout,
                                                    check_same_thread=False)
                conn = self._conn
        return conn

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class _Reading:
    """Look.reading's context: a class, not @contextmanager, whose generator machinery
    cost an idle tick as much as its question (measured)."""

    __slots__ = ("conn", "look", "snapshot")

    def __init__(self, look: Look, snapshot: bool) -> None:
        self.look, self.snapshot = look, snapshot

    def __enter__(self) -> sqlite3.Connection:
        self.conn = conn = self.look.connection()
        if self.snapshot:
            try:
                conn.execute("BEGIN")
            except sqlite3.Error:
                self.look.close()
                raise
        return conn

    def __exit__(self, kind, exc, tb) -> bool:
        conn = self.conn
        try:
            if kind is None:
                if self.snapshot:
                    conn.execute("COMMIT")
            elif issubclass(kind, sqlite3.Error):
                self.look.close()
            elif conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            self.look.close()
            if kind is None:
                raise
        return False
