"""The state machine: legal edges only, compare-and-set, leases, rescue, replayable history."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text

from dreamd.errors import IllegalTransitionError, StaleTransitionError
from dreamd.ledger import transitions as tr
from dreamd.ledger.models import Keyframe, Transition, utcnow
from tests import invariants
from dreamd.ledger.states import TRANSITIONS

KF = Keyframe.__table__


def keyframe_values(i: int, **extra):
    return {"chain_index": i, "backend": "procedural", "theme": "ethereal", "prompt": "p",
            "seed": i, "denoise": 0.3, "source": "img2img", "width": 512, "height": 256,
            **extra}


def make_keyframes(engine, n: int, **extra) -> list[int]:
    with engine.begin() as conn:
        return [tr.create(conn, "keyframe", keyframe_values(i, **extra), worker="test")
                for i in range(n)]


def snapshot(engine):
    with engine.connect() as conn:
        rows = conn.execute(select(KF).order_by(KF.c.id)).all()
        n_trans = conn.execute(select(func.count()).select_from(Transition.__table__)).scalar()
    return rows, n_trans


def test_pragmas(engine):
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1   # NORMAL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000


def test_reader_cannot_write(db_path, engine):
    from dreamd.ledger import database
    make_keyframes(engine, 1)
    reader = database.reader(db_path)
    with reader.connect() as conn:
        assert conn.execute(select(func.count()).select_from(KF)).scalar() == 1
        with pytest.raises(Exception, match="readonly"):
            conn.execute(text("DELETE FROM keyframes"))
    reader.dispose()


def test_happy_path_and_replay(engine):
    (kid,) = make_keyframes(engine, 1)
    with engine.begin() as conn:
        (row,) = tr.claim(conn, "keyframe", "w1", lease_seconds=30)
        assert row.id == kid and row.attempt == 1 and row.lease_owner == "w1"
    with engine.begin() as conn:
        tr.complete(conn, "keyframe", kid, "w1", values={"path": "k.png"})
    with engine.connect() as conn:
        row = conn.execute(select(KF).where(KF.c.id == kid)).one()
        assert (row.state, row.lease_owner, row.path) == ("completed", None, "k.png")
        hist = tr.history(conn, "keyframe", kid)
        assert [(h.from_state, h.to_state, h.event) for h in hist] == [
            (None, "available", "created"), ("available", "executing", "claimed"),
            ("executing", "completed", "completed")]
        assert tr.replay(hist) == row.state


# The lifecycle as the README's "States" tables write it, by hand, not read from the
# code: the contract the code's table must equal, edge for edge.
_JOBS = """
    (created)  -> available
    available  -> executing
    executing  -> completed
    executing  -> retryable
    retryable  -> available
    executing  -> discarded
    executing  -> available
    available  -> cancelled
    executing  -> cancelled
    retryable  -> cancelled
    retryable  -> discarded
"""
LIFECYCLE = {
    "keyframe": _JOBS, "interpolation": _JOBS, "embedding": _JOBS,
    "frame": """
    (created)  -> ready
    ready      -> shown
    shown      -> evicted
    ready      -> evicted
    """,
    "control": """
    (created)  -> available
    available  -> applied
    available  -> rejected
    """,
}
STATES = {
    "job": {"available", "executing", "completed", "retryable", "discarded", "cancelled"},
    "frame": {"ready", "shown", "evicted"},
    "control": {"available", "applied", "rejected"},
}


def edges(text_: str) -> set[tuple[str | None, str]]:
    out = set()
    for line in text_.strip().splitlines():
        a, b = (x.strip() for x in line.split("->"))
        out.add((None if a == "(created)" else a, b))
    return out


def test_the_code_table_is_the_readme_lifecycle_exactly():
    from dreamd.ledger.states import INITIAL, ControlState, FrameState, JobState

    assert set(TRANSITIONS) == set(LIFECYCLE)
    for entity, written in LIFECYCLE.items():
        code = {(a if a is None else str(a), str(b)) for a, b in TRANSITIONS[entity]}
        want = edges(written)
        assert code == want, (f"{entity}: extra edges {sorted(code - want, key=str)}, "
                              f"missing edges {sorted(want - code, key=str)}")
        (created,) = [b for a, b in want if a is None]
        assert INITIAL[entity] == created
    assert {s.value for s in JobState} == STATES["job"]
    assert {s.value for s in FrameState} == STATES["frame"]
    assert {s.value for s in ControlState} == STATES["control"]


@pytest.mark.parametrize("entity", sorted(LIFECYCLE))
def test_illegal_transitions_raise_and_change_nothing(engine, entity):
    legal = edges(LIFECYCLE[entity])
    states = STATES["job" if entity in ("keyframe", "interpolation", "embedding") else entity]
    (kid,) = make_keyframes(engine, 1)
    before = snapshot(engine)
    for a in states:
        for b in states:
            if (a, b) in legal:
                continue
            with pytest.raises(IllegalTransitionError):
                with engine.begin() as conn:
                    tr.transition(conn, entity, kid, a, b)
    assert snapshot(engine) == before


def test_stale_transition_raises_and_rolls_back(engine):
    (kid,) = make_keyframes(engine, 1)
    before = snapshot(engine)
    with pytest.raises(StaleTransitionError, match="expected executing.*found available"):
        with engine.begin() as conn:
            tr.transition(conn, "keyframe", kid, "executing", "completed")
    with pytest.raises(StaleTransitionError, match="no such row"):
        with engine.begin() as conn:
            tr.transition(conn, "keyframe", 999, "available", "cancelled")
    assert snapshot(engine) == before


def test_only_the_lease_holder_completes(engine):
    (kid,) = make_keyframes(engine, 1)
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w1", lease_seconds=30)
    with pytest.raises(StaleTransitionError, match="leased to w2"):
        with engine.begin() as conn:
            tr.complete(conn, "keyframe", kid, "w2")


def test_fail_retry_backoff_then_discard(engine):
    (kid,) = make_keyframes(engine, 1, max_attempts=2)
    now = utcnow()
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=30, now=now)
        assert tr.fail(conn, "keyframe", kid, "w", "boom", backoff_seconds=10, now=now) == \
            "retryable"
        # not claimable before its backoff elapses
        assert tr.claim(conn, "keyframe", "w", lease_seconds=30, now=now) == []
        (row,) = tr.claim(conn, "keyframe", "w", lease_seconds=30,
                          now=now + timedelta(seconds=11))
        assert row.attempt == 2
        assert tr.fail(conn, "keyframe", kid, "w", "boom again") == "discarded"
        events = [(h.from_state, h.to_state, h.event) for h in tr.history(conn, "keyframe", kid)]
    assert ("retryable", "available", "staged") in events
    assert events[-1] == ("executing", "discarded", "failed")


def test_permanent_failure_discards_at_once(engine):
    (kid,) = make_keyframes(engine, 1, max_attempts=5)
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=30)
        assert tr.fail(conn, "keyframe", kid, "w", "bad workflow", permanent=True) == "discarded"


def test_heartbeat_release_and_rescue(engine):
    ids = make_keyframes(engine, 3, max_attempts=1)
    now = utcnow()
    with engine.begin() as conn:
        rows = tr.claim(conn, "keyframe", "w", lease_seconds=5, limit=3, now=now)
        assert [r.id for r in rows] == ids
        # w keeps the first alive; gives the second back cleanly; the third dies
        assert tr.heartbeat(conn, "keyframe", [ids[0]], "w", lease_seconds=60,
                            now=now + timedelta(seconds=4)) == 1
        assert tr.heartbeat(conn, "keyframe", [ids[0]], "other", lease_seconds=60) == 0
    with engine.begin() as conn:
        result = tr.rescue(conn, "keyframe", now=now + timedelta(seconds=10))
    assert result == {"available": [], "discarded": [ids[1], ids[2]]}
    with engine.connect() as conn:
        states = dict(conn.execute(select(KF.c.id, KF.c.state)).all())
        assert states == {ids[0]: "executing", ids[1]: "discarded", ids[2]: "discarded"}
        last = tr.history(conn, "keyframe", ids[2])[-1]
        assert last.event == "abandoned"


def test_rescue_spares_rows_a_live_worker_still_holds(engine):
    """A busy ledger can keep a live worker from renewing its lease; the janitor of the
    same process must not take the row from under it when the ledger frees up."""
    ids = make_keyframes(engine, 2)
    now = utcnow()
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=5, limit=2, now=now)
    with engine.begin() as conn:
        result = tr.rescue(conn, "keyframe", now=now + timedelta(seconds=10), spare=[ids[0]])
    assert result == {"available": [ids[1]], "discarded": []}
    with engine.connect() as conn:
        assert conn.execute(select(KF.c.state).where(KF.c.id == ids[0])).scalar() == "executing"


def test_release_gives_back_the_attempt(engine):
    (kid,) = make_keyframes(engine, 1)
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=30)
        assert tr.release(conn, "keyframe", "w") == [kid]
        row = conn.execute(select(KF).where(KF.c.id == kid)).one()
    assert (row.state, row.attempt, row.lease_owner) == ("available", 0, None)


def replay_all(engine):
    """Every row of every entity: its history replays to its current state."""
    with engine.connect() as conn:
        invariants.replay_all(conn)


def test_eight_threads_claim_each_row_exactly_once(engine):
    make_keyframes(engine, 1000)
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def work(owner: str) -> None:
        mine = claimed.setdefault(owner, [])
        try:
            while True:
                with engine.begin() as conn:
                    rows = tr.claim(conn, "keyframe", owner, lease_seconds=30, limit=3)
                    for r in rows:
                        tr.complete(conn, "keyframe", r.id, owner)
                if not rows:
                    return
                mine.extend(r.id for r in rows)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    counts = Counter(i for ids in claimed.values() for i in ids)
    assert len(counts) == 1000 and set(counts.values()) == {1}
    assert sum(1 for ids in claimed.values() if ids) > 1       # the work really was shared
    replay_all(engine)


def test_two_processes_claim_each_row_exactly_once(engine, db_path, tmp_path):
    """Two processes claim from one ledger at once. Deterministic: each waits after its
    first claim until the other has made its own (a process that starts late would
    otherwise find the rows all claimed), then both claim one at a time, pausing after
    each, so their claims interleave on the write lock."""
    make_keyframes(engine, 1000)
    meet = tmp_path / "meet"
    meet.mkdir()
    outs = [tmp_path / f"p{i}.txt" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.ledger_worker", str(db_path),
                               f"p{i}", str(out), "--meet", str(meet), "2"])
             for i, out in enumerate(outs)]
    for p in procs:
        assert p.wait(timeout=300) == 0
    ids = [int(x) for out in outs for x in out.read_text().split()]
    assert len(ids) == 1000 and len(set(ids)) == 1000       # no row claimed twice
    assert all(out.read_text().strip() for out in outs)     # both processes got work
    with engine.connect() as conn:
        owners = conn.execute(text("SELECT worker FROM transitions WHERE event = 'claimed' "
                                   "ORDER BY id")).scalars().all()
    assert set(owners) == {"p0", "p1"}
    # each claimed under its own name, and the claims took turns at least once
    assert sum(a != b for a, b in zip(owners, owners[1:])) >= 1
    with engine.connect() as conn:
        states = dict(conn.execute(select(KF.c.state, func.count()).group_by(KF.c.state)).all())
    assert states == {"completed": 1000}
    replay_all(engine)


def test_sigkilled_holder_is_rescued_after_expiry(engine, db_path, tmp_path):
    """A worker SIGKILLed with 5 rows leased: the rows stay its own until the lease it
    took expires, then rescue takes them back. Judged at explicit times, read from the
    ledger (the claim and the lease's end), not the wall clock: a loaded machine may
    take longer than the 1 s lease between the kill and the first rescue."""
    make_keyframes(engine, 5, max_attempts=2)
    make_keyframes(engine, 0)
    with engine.begin() as conn:   # one row that will be on its last attempt
        conn.execute(KF.update().where(KF.c.chain_index == 4).values(attempt=1))
    out = tmp_path / "held.txt"
    proc = subprocess.Popen([sys.executable, "-m", "tests.ledger_worker", str(db_path), "victim",
                             str(out), "--hold", "5"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    held = [int(x) for x in out.read_text().split()]
    assert len(held) == 5
    with engine.connect() as conn:
        t = Transition.__table__
        (claimed_at,) = set(conn.execute(select(t.c.at).where(
            t.c.entity == "keyframe", t.c.event == "claimed", t.c.worker == "victim")).scalars())
        (expires,) = set(conn.execute(select(KF.c.lease_expires_at).where(
            KF.c.id.in_(held))).scalars())
    assert expires == claimed_at + timedelta(seconds=1)      # the worker's 1 s lease
    for not_yet in (claimed_at, expires):                    # until its last instant
        with engine.begin() as conn:
            assert tr.rescue(conn, "keyframe", now=not_yet) == \
                {"available": [], "discarded": []}, not_yet
    with engine.begin() as conn:
        result = tr.rescue(conn, "keyframe", now=expires + timedelta(microseconds=1))
    assert sorted(result["available"]) == held[:4] and result["discarded"] == [held[4]]
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(KF)).all()}
        assert all(rows[i].state == "available" and rows[i].lease_owner is None
                   for i in held[:4])
        assert rows[held[4]].state == "discarded"
        for i in held:
            assert tr.history(conn, "keyframe", i)[-1].event == "abandoned"
    replay_all(engine)


# ---------------------------------------------------------------- the no-gap invariant

def frames_at(engine, t0, *made: float) -> list[int]:
    """Frames at (0, 0), (0, 0.5), (1, 0), made `made[i]` seconds after t0."""
    places = [(0, 0.0), (0, 0.5), (1, 0.0)]
    with engine.begin() as conn:
        return [tr.create(conn, "frame", {
            "chain_index": c, "t": t, "kind": "keyframe" if t == 0 else "inbetween",
            "path": f"frames/{c}-{t}.png", "created_at": t0 + timedelta(seconds=s)})
            for (c, t), s in zip(places, made)]


def frame_to(engine, fid, a, b, at, detail=None):
    column = "shown_at" if b == "shown" else "evicted_at"
    with engine.begin() as conn:
        tr.transition(conn, "frame", fid, a, b, now=at, values={column: at}, detail=detail)


def no_gap(engine):
    with engine.connect() as conn:
        invariants.no_gap(conn)


@pytest.mark.parametrize("made, evicted, why, fails", [
    (0.0, 3.0, "behind the playhead", "gap"),          # ready all along, passed over
    (1.5, 3.0, "behind the playhead", None),           # made after the one before was shown
    (0.0, 3.0, "file missing at start", None),         # reconcile found its file gone
    (1.5, 1.8, "behind the playhead", "before the playhead passed it"),
    (0.0, 0.5, "retention", "retention deleted ready frames"),
    (0.0, None, None, "gap"),                          # still ready, passed over
    (1.5, None, None, None),                           # made too late, not yet evicted
])
def test_no_gap_judges_each_frame_the_playhead_passed(engine, made, evicted, why, fails):
    t0 = utcnow()
    a, f, b = frames_at(engine, t0, 0.0, made, 0.0)
    frame_to(engine, a, "ready", "shown", t0 + timedelta(seconds=1))
    frame_to(engine, b, "ready", "shown", t0 + timedelta(seconds=2))
    if evicted is not None:
        frame_to(engine, f, "ready", "evicted", t0 + timedelta(seconds=evicted), why)
    if fails is None:
        no_gap(engine)
    else:
        with pytest.raises(AssertionError, match=fails):
            no_gap(engine)


@pytest.mark.parametrize("prune", [False, True])
def test_no_gap_does_not_judge_what_was_pruned(engine, prune):
    """Retention prunes old rows whole, and old history: a frame whose eviction left
    the history, or older than a row pruned whole, is not judged."""
    t0 = utcnow()
    with engine.begin() as conn:
        a, f, x, b = (tr.create(conn, "frame", {
            "chain_index": c, "t": t, "kind": "keyframe" if t == 0 else "inbetween",
            "path": f"frames/{c}-{t}.png", "created_at": t0})
            for c, t in ((0, 0.0), (0, 0.5), (0, 0.75), (1, 0.0)))
    frame_to(engine, a, "ready", "shown", t0 + timedelta(seconds=1))
    frame_to(engine, x, "ready", "shown", t0 + timedelta(seconds=1.5))
    frame_to(engine, b, "ready", "shown", t0 + timedelta(seconds=2))
    frame_to(engine, x, "shown", "evicted", t0 + timedelta(seconds=4), "retention")
    frame_to(engine, f, "ready", "evicted", t0 + timedelta(seconds=5), "behind the playhead")
    if prune:
        with engine.begin() as conn:   # x pruned whole: f is older than the hole
            conn.execute(text("DELETE FROM frames WHERE id = :x"), {"x": x})
        no_gap(engine)
        return
    with pytest.raises(AssertionError, match="gap"):
        no_gap(engine)
    with engine.begin() as conn:       # f's eviction pruned from the history
        conn.execute(text("DELETE FROM transitions WHERE entity = 'frame' "
                          "AND entity_id = :f AND to_state = 'evicted'"), {"f": f})
    no_gap(engine)
