"""Every state change of the ledger, as verbs: create, transition, claim, heartbeat,
complete, fail, postpone, release, rescue, stage.

Each one is a compare-and-set that appends to `transitions` in the same
transaction; the caller owns the transaction (`with engine.begin() as conn:`,
which is BEGIN IMMEDIATE on the writer engine), so a worker can complete a job
and create the rows it produced atomically. Nothing here does HTTP or torch work:
claim, then work outside any transaction, then complete.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime, timedelta
from typing import Any, Sequence

from sqlalchemy import Connection, Row, bindparam, insert, select, update

from dreamd.errors import IllegalTransitionError, StaleTransitionError
from dreamd.ledger import queries, read_model
from dreamd.ledger.models import ENTITY_MODELS, Transition, utcnow
from dreamd.ledger.states import INITIAL, JOB_ENTITIES, JobState, is_legal

J = JobState

# Claim order per job kind: the earliest link of the chain first.
_CLAIM_ORDER = {"keyframe": ("chain_index", "id"), "interpolation": ("chain_index", "id"),
                "embedding": ("id",)}


def _table(entity: str):
    try:
        return ENTITY_MODELS[entity].__table__
    except KeyError:
        raise IllegalTransitionError(f"unknown entity {entity!r}: expected one of "
                                     f"{', '.join(ENTITY_MODELS)}") from None


def _detail(detail: Any) -> str | None:
    if detail is None or isinstance(detail, str):
        return detail
    return json.dumps(detail, default=str, sort_keys=True)


# Statements are built once and reused with bound parameters: building a Core
# statement costs more than SQLite takes to run it (bench/ledger.py measured 2x).
_LOG = insert(Transition.__table__)


def _log(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        conn.execute(_LOG, list(rows))


@functools.cache
def _cas(entity: str, keys: tuple[str, ...], with_owner: bool):
    table = _table(entity)
    cond = [table.c.id == bindparam("_id"), table.c.state == bindparam("_from")]
    if with_owner:
        cond.append(table.c.lease_owner == bindparam("_owner"))
    return (update(table).where(*cond)
            .values(state=bindparam("_to"), **{k: bindparam(f"_v_{k}") for k in keys}))


@functools.cache
def _claim(entity: str):
    table = _table(entity)
    pick = (select(table.c.id)
            .where(table.c.state == J.available, table.c.scheduled_at <= bindparam("_now"))
            .order_by(*(table.c[c] for c in _CLAIM_ORDER[entity]))
            .limit(bindparam("_limit")))
    return (update(table).where(table.c.id.in_(pick.scalar_subquery()))
            .values(state=J.executing, attempt=table.c.attempt + 1,
                    lease_owner=bindparam("_owner"), lease_expires_at=bindparam("_expires"),
                    started_at=bindparam("_now"), error=None)
            .returning(*table.c))


@functools.cache
def _stage(entity: str):
    table = _table(entity)
    return (update(table)
            .where(table.c.state == J.retryable, table.c.scheduled_at <= bindparam("_now"))
            .values(state=J.available).returning(table.c.id))


def _entry(entity: str, entity_id: int, from_state: str | None, to_state: str, at: datetime,
           worker: str | None, event: str | None, detail: Any) -> dict[str, Any]:
    return {"entity": entity, "entity_id": entity_id, "from_state": from_state,
            "to_state": str(to_state), "at": at, "worker": worker, "event": event,
            "detail": _detail(detail)}


def create(conn: Connection, entity: str, values: dict[str, Any], *, worker: str | None = None,
           detail: Any = None) -> int:
    """Insert a row in its initial state and record its creation. Returns its id."""
    table = _table(entity)
    state = values.get("state", INITIAL[entity])
    if not is_legal(entity, None, state):
        raise IllegalTransitionError(f"a {entity} cannot be created {state!r}: expected "
                                     f"{str(INITIAL[entity])!r}")
    now = values.get("created_at") or utcnow()
    row_id = conn.execute(insert(table).values(**{**values, "state": str(state)})
                          .returning(table.c.id)).scalar_one()
    _log(conn, [_entry(entity, row_id, None, state, now, worker, "created", detail)])
    return row_id


def transition(conn: Connection, entity: str, row_id: int, from_state: str, to_state: str, *,
               worker: str | None = None, owner: str | None = None, event: str | None = None,
               detail: Any = None, values: dict[str, Any] | None = None,
               now: datetime | None = None) -> None:
    """Move one row from `from_state` to `to_state`, or raise and change nothing.

    A compare-and-set: the row must be in `from_state` (and, with `owner`, leased to
    that owner) or StaleTransitionError is raised; the edge must be legal or
    IllegalTransitionError is raised before anything is written.
    """
    if not is_legal(entity, from_state, to_state):
        raise IllegalTransitionError(f"{entity} {row_id}: {from_state} -> {to_state} is not a "
                                     f"legal transition")
    table = _table(entity)
    now = now or utcnow()
    values = values or {}
    params = {"_id": row_id, "_from": str(from_state), "_to": str(to_state), "_owner": owner,
              **{f"_v_{k}": v for k, v in values.items()}}
    result = conn.execute(_cas(entity, tuple(sorted(values)), owner is not None), params)
    if result.rowcount != 1:
        actual = conn.execute(select(table.c.state).where(table.c.id == row_id)).scalar()
        who = f" leased to {owner}" if owner else ""
        raise StaleTransitionError(
            f"{entity} {row_id}: expected {from_state}{who}, found "
            f"{actual if actual is not None else 'no such row'}; {from_state} -> {to_state} "
            f"not applied")
    _log(conn, [_entry(entity, row_id, from_state, to_state, now, worker or owner,
                       event or str(to_state), detail)])


@functools.cache
def _states(entity: str):
    table = _table(entity)
    return select(table.c.id, table.c.state).where(
        table.c.id.in_(bindparam("_ids", expanding=True)))


def transition_each(conn: Connection, entity: str,
                    rows: Sequence[tuple[int, datetime, dict[str, Any]]], from_state: str,
                    to_state: str, *, worker: str | None = None) -> list[int]:
    """`transition` for many rows in one go: (id, when, values) each, every one with the
    same value keys; three statements in all, not two per row (the display records the
    frames it showed this way). A row no longer in `from_state` is left as it is, and
    its id returned. The caller's transaction (BEGIN IMMEDIATE) keeps the look and the
    change together."""
    if not is_legal(entity, from_state, to_state):
        raise IllegalTransitionError(f"{entity}: {from_state} -> {to_state} is not a "
                                     f"legal transition")
    if not rows:
        return []
    keys = tuple(sorted(rows[0][2]))
    if any(tuple(sorted(values)) != keys for _id, _at, values in rows):
        raise ValueError(f"transition_each: every row must set the same values ({keys})")
    found = dict(conn.execute(_states(entity), {"_ids": [r[0] for r in rows]}).all())
    go = [r for r in rows if found.get(r[0]) == str(from_state)]
    if go:
        conn.execute(_cas(entity, keys, False), [
            {"_id": i, "_from": str(from_state), "_to": str(to_state), "_owner": None,
             **{f"_v_{k}": v for k, v in values.items()}} for i, _at, values in go])
        _log(conn, [_entry(entity, i, from_state, to_state, at, worker, str(to_state), None)
                    for i, at, _values in go])
    return [r[0] for r in rows if found.get(r[0]) != str(from_state)]


def stage(conn: Connection, entity: str, *, now: datetime | None = None,
          worker: str | None = None) -> list[int]:
    """Retryable rows whose backoff has elapsed become available again."""
    now = now or utcnow()
    ids = conn.execute(_stage(entity), {"_now": now}).scalars().all()
    _log(conn, [_entry(entity, i, J.retryable, J.available, now, worker, "staged", None)
                for i in ids])
    return list(ids)


def claim(conn: Connection, entity: str, owner: str, *, lease_seconds: float, limit: int = 1,
          now: datetime | None = None) -> list[Row]:
    """Lease up to `limit` available rows to `owner`, in one UPDATE … RETURNING.

    The attempt is counted here, at claim time, so work that crashes the whole
    process still uses an attempt and a crash loop ends in `discarded`.
    """
    if entity not in JOB_ENTITIES:
        raise IllegalTransitionError(f"{entity} rows are not claimed")
    now = now or utcnow()
    stage(conn, entity, now=now, worker=owner)
    rows = conn.execute(_claim(entity), {"_now": now, "_limit": limit, "_owner": owner,
                                         "_expires": now + timedelta(seconds=lease_seconds)}
                        ).all()
    _log(conn, [_entry(entity, r.id, J.available, J.executing, now, owner, "claimed",
                       {"attempt": r.attempt}) for r in rows])
    return sorted(rows, key=lambda r: tuple(getattr(r, c) for c in _CLAIM_ORDER[entity]))


def has_due(conn: Connection, entity: str, *, now: datetime | None = None) -> bool:
    """Is anything claimable (or about to be staged)? The read model's question
    (read_model.has_due, which idle workers ask on their own kept connection), asked
    inside this transaction."""
    if entity not in JOB_ENTITIES:
        _table(entity)          # an unknown entity is named with the known ones
        raise IllegalTransitionError(f"{entity} rows are not claimed")
    return read_model.has_due(queries.dbapi(conn), entity, now)


def heartbeat(conn: Connection, entity: str, ids: Sequence[int], owner: str, *,
              lease_seconds: float, now: datetime | None = None) -> int:
    """Renew `owner`'s leases on `ids`; returns how many it still holds."""
    if not ids:
        return 0
    table = _table(entity)
    now = now or utcnow()
    return conn.execute(update(table)
                        .where(table.c.id.in_(list(ids)), table.c.state == J.executing,
                               table.c.lease_owner == owner)
                        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
                        ).rowcount


def complete(conn: Connection, entity: str, row_id: int, owner: str, *,
             values: dict[str, Any] | None = None, detail: Any = None,
             now: datetime | None = None) -> None:
    """executing -> completed, only by the lease holder."""
    now = now or utcnow()
    transition(conn, entity, row_id, J.executing, J.completed, owner=owner, now=now,
               detail=detail, event="completed",
               values={"completed_at": now, "lease_owner": None, "lease_expires_at": None,
                       "error": None, **(values or {})})


def fail(conn: Connection, entity: str, row_id: int, owner: str, error: str, *,
         permanent: bool = False, backoff_seconds: float | None = None,
         now: datetime | None = None) -> str:
    """executing -> retryable (with backoff) or discarded. Returns the new state."""
    table = _table(entity)
    now = now or utcnow()
    row = conn.execute(select(table.c.attempt, table.c.max_attempts)
                       .where(table.c.id == row_id)).one_or_none()
    used_up = row is None or row.attempt >= row.max_attempts
    to = J.discarded if permanent or used_up else J.retryable
    if backoff_seconds is None:
        backoff_seconds = retry_backoff(row.attempt if row else 1)
    values: dict[str, Any] = {"error": error[:4000], "lease_owner": None,
                              "lease_expires_at": None}
    if to == J.retryable:
        values["scheduled_at"] = now + timedelta(seconds=backoff_seconds)
    else:
        values["completed_at"] = now
    reason = "permanent" if permanent else ("attempts used up" if used_up else "will retry")
    transition(conn, entity, row_id, J.executing, to, owner=owner, now=now, values=values,
               event="failed", detail={"error": error[:500], "why": reason})
    return str(to)


def postpone(conn: Connection, entity: str, row_id: int, owner: str, error: str, *,
             delay_seconds: float, now: datetime | None = None,
             why: str = "environment") -> None:
    """executing -> retryable, with the attempt given back: the job did not fail, the
    machine could not take it (disk full, read-only, permission denied: why
    "environment"; a pause interrupted it: why "paused"). Event `postponed`; it is tried
    again after `delay_seconds`, with no attempt used up."""
    table = _table(entity)
    now = now or utcnow()
    transition(conn, entity, row_id, J.executing, J.retryable, owner=owner, now=now,
               event="postponed", detail={"error": error[:500], "why": why},
               values={"error": error[:4000], "lease_owner": None, "lease_expires_at": None,
                       "scheduled_at": now + timedelta(seconds=delay_seconds)})
    conn.execute(update(table).where(table.c.id == row_id, table.c.attempt > 0)
                 .values(attempt=table.c.attempt - 1))


def retry_backoff(attempt: int, base: float = 2.0, cap: float = 300.0) -> float:
    """Exponential backoff in seconds for the attempt that just failed."""
    return min(cap, base * (2 ** max(0, attempt - 1)))


def release(conn: Connection, entity: str, owner: str, *, now: datetime | None = None,
            detail: Any = None) -> list[int]:
    """Give back every lease `owner` holds (a clean shutdown): executing -> available.

    A released row gets its attempt back: it did not fail, its worker stopped.
    """
    table = _table(entity)
    now = now or utcnow()
    ids = conn.execute(update(table)
                       .where(table.c.state == J.executing, table.c.lease_owner == owner)
                       .values(state=J.available, lease_owner=None, lease_expires_at=None,
                               attempt=table.c.attempt - 1, scheduled_at=now)
                       .returning(table.c.id)).scalars().all()
    _log(conn, [_entry(entity, i, J.executing, J.available, now, owner, "released", detail)
                for i in ids])
    return list(ids)


def rescue(conn: Connection, entity: str, *, now: datetime | None = None,
           worker: str | None = "janitor", every_lease: bool = False,
           spare: Sequence[int] = ()) -> dict[str, list[int]]:
    """Expired leases: back to available, or discarded when attempts are used up.

    Both are recorded with the event `abandoned` (their worker died or hung). With
    `every_lease`, unexpired leases too: for a daemon that knows no other is alive.
    `spare`: rows a live worker of this process still works on (its lease could not be
    renewed while the ledger was busy; the work is not abandoned).
    """
    table = _table(entity)
    now = now or utcnow()
    expired = table.c.state == J.executing
    if not every_lease:
        expired = expired & (table.c.lease_expires_at < now)
    if spare:
        expired = expired & table.c.id.not_in(list(spare))
    back = conn.execute(update(table)
                        .where(expired, table.c.attempt < table.c.max_attempts)
                        .values(state=J.available, lease_owner=None, lease_expires_at=None,
                                scheduled_at=now, error="abandoned: lease expired")
                        .returning(table.c.id, table.c.attempt)).all()
    dead = conn.execute(update(table)
                        .where(expired, table.c.attempt >= table.c.max_attempts)
                        .values(state=J.discarded, lease_owner=None, lease_expires_at=None,
                                completed_at=now,
                                error="abandoned: lease expired, attempts used up")
                        .returning(table.c.id, table.c.attempt)).all()
    _log(conn, [_entry(entity, r.id, J.executing, J.available, now, worker, "abandoned",
                       {"attempt": r.attempt}) for r in back]
         + [_entry(entity, r.id, J.executing, J.discarded, now, worker, "abandoned",
                   {"attempt": r.attempt}) for r in dead])
    return {"available": [r.id for r in back], "discarded": [r.id for r in dead]}


def history(conn: Connection, entity: str, row_id: int) -> list[Row]:
    """The row's transitions, oldest first."""
    t = Transition.__table__
    return conn.execute(select(t).where(t.c.entity == entity, t.c.entity_id == row_id)
                        .order_by(t.c.id)).all()


def replay(entries: Sequence[Row]) -> str | None:
    """Fold a row's history into the state it must be in; raise if the history is broken."""
    state: str | None = None
    for e in entries:
        if e.from_state != state:
            raise StaleTransitionError(f"{e.entity} {e.entity_id}: history entry {e.id} goes "
                                       f"{e.from_state} -> {e.to_state} but the row was {state}")
        if not is_legal(e.entity, e.from_state, e.to_state):
            raise IllegalTransitionError(f"{e.entity} {e.entity_id}: history entry {e.id} "
                                         f"{e.from_state} -> {e.to_state} is illegal")
        state = e.to_state
    return state
