"""The daemon's side of the ledger's questions, in SQLAlchemy Core: the runtime-state
row (read, and written by the daemon alone), the last run. Questions every surface asks
too (playback order, liveness) are the read model's (dreamd/ledger/read_model.py),
asked here on the same transaction. No torch.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, insert, select, update

from dreamd.ledger import read_model
from dreamd.ledger.models import DaemonRun, RuntimeState, utcnow


def dbapi(conn: Connection):
    """The sqlite3 connection under a SQLAlchemy one, inside its transaction: what the
    read model's questions take (dreamd/ledger/read_model.py), so the daemon asks them
    in the very words every surface does."""
    return conn.connection.driver_connection


def last_run(conn: Connection) -> Row | None:
    t = DaemonRun.__table__
    return conn.execute(select(t).order_by(t.c.id.desc()).limit(1)).first()


def run_alive(run: Row | None, now: datetime | None = None) -> bool:
    """The read model's liveness rule (dreamd/ledger/read_model.py) for a row read here."""
    return read_model.liveness(dict(run._mapping) if run is not None else None, now).alive


def runtime(conn: Connection) -> Row:
    """The runtime-state row (created on first use by a writer)."""
    t = RuntimeState.__table__
    row = conn.execute(select(t).where(t.c.id == 1)).first()
    if row is None:
        conn.execute(insert(t).values(id=1))
        row = conn.execute(select(t).where(t.c.id == 1)).one()
    return row


def update_runtime(conn: Connection, **values: Any) -> None:
    runtime(conn)
    t = RuntimeState.__table__
    conn.execute(update(t).where(t.c.id == 1).values(updated_at=utcnow(), **values))


def knobs(row: Row) -> dict[str, Any]:
    """The knobs `dreamd set` stored, as the runtime row holds them (unchecked)."""
    return read_model.json_object(row.knobs) or {}


# ---------------------------------------------------------------- playback order
# The read model's words (dreamd/ledger/read_model.py), asked inside the caller's
# transaction. (The polling workers ask them on kept connections of their own:
# dreamd/workers/look.py.)

def frames_ahead(conn: Connection, chain: int | None, t: float | None,
                 at_most: int | None = None) -> int:
    """Ready frames after the playhead (chain, t), in playback order (up to `at_most`)."""
    return read_model.frames_ahead(dbapi(conn), chain, t, at_most)
