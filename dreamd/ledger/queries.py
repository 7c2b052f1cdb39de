"""Read-side questions about the ledger, as nouns: last run, runtime state, playback
order. Used by the daemon's workers and the control commands. Plain SQLAlchemy Core, no
torch. (`dreamd status` and the dashboard read with sqlite3 alone: dreamd/ledger/glance.py.)
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, and_, bindparam, func, insert, or_, select, update

from dreamd.ledger.models import DaemonRun, Frame, Interpolation, RuntimeState, utcnow

# A heartbeat older than this means the daemon is gone even if its pid was reused.
HEARTBEAT_STALE = timedelta(seconds=30)


def last_run(conn: Connection) -> Row | None:
    t = DaemonRun.__table__
    return conn.execute(select(t).order_by(t.c.id.desc()).limit(1)).first()


def pid_alive(pid: int) -> bool:
    # psutil (dreamd/platform.py): on Windows os.kill(pid, 0) ends the process it asks about
    from dreamd.platform import pid_alive as alive
    return alive(pid)


def run_alive(run: Row | None, now: datetime | None = None) -> bool:
    """A run is alive when it has not stopped, its heartbeat is fresh and its pid exists."""
    if run is None or run.stopped_at is not None:
        return False
    now = now or utcnow()
    return now - run.heartbeat_at < HEARTBEAT_STALE and pid_alive(run.pid)


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
    try:
        value = json.loads(row.knobs or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------- playback order
# Built once with bound parameters: the display asks these at every frame. A playhead
# of (-1, -1) means "before the first frame" (chain indexes start at 0).
_FR, _IP = Frame.__table__, Interpolation.__table__
_AFTER = or_(_FR.c.chain_index > bindparam("c"),
             and_(_FR.c.chain_index == bindparam("c"), _FR.c.t > bindparam("t")))
# `t` is labelled `pos`: Row.t is SQLAlchemy's own tuple accessor
_NEXT = (select(_FR.c.id, _FR.c.chain_index, _FR.c.t.label("pos"), _FR.c.path)
         .where(_FR.c.state == "ready", _AFTER).order_by(_FR.c.chain_index, _FR.c.t).limit(1))
_AHEAD = select(func.count()).select_from(_FR).where(_FR.c.state == "ready", _AFTER)
_MAKING = (select(func.count()).select_from(_IP)
           .where(_IP.c.state.in_(("available", "executing", "retryable")),
                  _IP.c.chain_index >= bindparam("c"), _IP.c.chain_index < bindparam("until")))


def _playhead(chain: int | None, t: float | None) -> dict[str, Any]:
    return {"c": -1, "t": -1.0} if chain is None else {"c": chain, "t": t}


def frames_ahead(conn: Connection, chain: int | None, t: float | None) -> int:
    """Ready frames after the playhead (chain, t), in playback order."""
    return conn.execute(_AHEAD, _playhead(chain, t)).scalar_one()


def next_frame(conn: Connection, chain: int | None, t: float | None) -> Row | None:
    """The next ready frame after the playhead, unless an earlier segment is still being
    made (its frames would have to come first): playback never goes out of order.
    With no playhead yet every earlier segment counts: playback starts at the first."""
    row = conn.execute(_NEXT, _playhead(chain, t)).first()
    since = -1 if chain is None else chain
    if row is None or row.chain_index <= since:
        return row
    making = conn.execute(_MAKING, {"c": since, "until": row.chain_index}).scalar()
    return None if making else row
