"""A worker's own read-only sqlite3 connection to the ledger, kept open between ticks:
an idle tick's few questions (dreamd/ledger/read_model.py) cost less than checking a
pooled SQLAlchemy connection out and its BEGIN (measured: bench/RESULTS.md, issue 24).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()        # close() may come from the stopping thread

    @contextmanager
    def reading(self, snapshot: bool = False) -> Iterator[sqlite3.Connection]:
        """The connection for the body's reads; with `snapshot`, in one read transaction,
        so several questions see one state of the ledger, as they did on a pooled
        connection's BEGIN."""
        with self._lock:
            if self._conn is None:
                self._conn = read_model.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                                check_same_thread=False)
            conn = self._conn
        try:
            if snapshot:
                conn.execute("BEGIN")
            yield conn
            if snapshot:
                conn.execute("COMMIT")
        except sqlite3.Error:
            self.close()
            raise
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
