"""A worker's kept read-only connection (dreamd/workers/look.py) on a real ledger: one
connection kept and each statement a fresh read, several in one snapshot on request,
dropped after an sqlite3 error and opened again; and the read model's idle questions
asked on it (read_model.has_due, stamp, last_keyframe), in the ledger's own terms."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from dreamd.ledger import read_model
from dreamd.ledger import transitions as tr
from dreamd.ledger.models import utcnow
from dreamd.workers.context import drain
from tests.test_ledger import make_keyframes


@pytest.fixture
def ctx(contexts):
    return contexts()


def count(conn) -> int:
    return conn.execute("SELECT count(*) FROM keyframes").fetchone()[0]


def test_stamp_is_the_text_the_ledger_stores_for_a_time(engine, db_path):
    times = [datetime(2026, 1, 2, 3, 4, 5), datetime(2026, 1, 2, 3, 4, 5, 7), utcnow()]
    ids = [make_keyframes(engine, 1, scheduled_at=at)[0] for at in times]
    raw = read_model.connect(db_path)
    stored = [raw.execute("SELECT scheduled_at FROM keyframes WHERE id = ?", (i,)).fetchone()[0]
              for i in ids]
    raw.close()
    assert stored == [read_model.stamp(at) for at in times]
    assert stored[0] == "2026-01-02 03:04:05.000000"      # microseconds even when none


def test_has_due_on_a_look_agrees_with_the_claim_to_the_microsecond(ctx):
    at = utcnow().replace(microsecond=500) + timedelta(seconds=30)
    (kid,) = make_keyframes(ctx.engine, 1, scheduled_at=at)
    early = at - timedelta(microseconds=1)
    with ctx.look("keyframe").reading() as conn:
        assert not read_model.has_due(conn, "keyframe", early)
        assert read_model.has_due(conn, "keyframe", at)
        assert not read_model.has_due(conn, "interpolation", at)
    with ctx.engine.begin() as conn:        # the same question inside a transaction
        assert not tr.has_due(conn, "keyframe", now=early)
        assert tr.has_due(conn, "keyframe", now=at)
        assert tr.claim(conn, "keyframe", "w", lease_seconds=30, now=early) == []
        tr.claim(conn, "keyframe", "w", lease_seconds=30, now=at)
        tr.fail(conn, "keyframe", kid, "w", "boom", backoff_seconds=5, now=at)
    with ctx.look("keyframe").reading() as conn:
        assert not read_model.has_due(conn, "keyframe", at + timedelta(seconds=4))
        assert read_model.has_due(conn, "keyframe", at + timedelta(seconds=5))   # retryable


def test_has_due_names_the_entities_it_knows(ctx):
    with ctx.look("keyframe").reading() as conn, \
            pytest.raises(ValueError, match="'frame' rows are not claimed: expected one of "
                                            "keyframe, interpolation, embedding"):
        read_model.has_due(conn, "frame")


def test_a_look_keeps_one_connection_and_each_read_sees_the_latest_commit(ctx):
    look = ctx.look("planner")
    assert ctx.look("planner") is look and ctx.look("governor") is not look
    with look.reading() as first:
        assert count(first) == 0
    make_keyframes(ctx.engine, 2)
    with look.reading() as again:
        assert again is first and not again.in_transaction    # no snapshot kept
        assert count(again) == 2


def test_a_snapshot_sees_one_state_of_the_ledger_until_its_end(ctx):
    look = ctx.look("governor")
    with look.reading(snapshot=True) as conn:
        assert count(conn) == 0
        make_keyframes(ctx.engine, 1)        # committed by the writer meanwhile
        assert count(conn) == 0
    assert not conn.in_transaction
    with look.reading() as conn:
        assert count(conn) == 1


def test_another_error_in_a_snapshot_ends_it_and_keeps_the_connection(ctx):
    look = ctx.look("embedding")
    with pytest.raises(KeyError), look.reading(snapshot=True) as conn:
        count(conn)
        raise KeyError("a worker's own bug")
    assert not conn.in_transaction
    with look.reading() as again:
        assert again is conn


def test_an_sqlite_error_drops_the_connection_and_the_next_read_opens_another(ctx):
    make_keyframes(ctx.engine, 1)
    look = ctx.look("keyframe")
    with pytest.raises(sqlite3.OperationalError, match="readonly"), look.reading() as conn:
        conn.execute("DELETE FROM keyframes")                # mode=ro: it cannot write
    with pytest.raises(sqlite3.ProgrammingError):
        conn.execute("SELECT 1")                             # closed, not leaked
    with look.reading(snapshot=True) as fresh:
        assert fresh is not conn and count(fresh) == 1


def test_an_idle_worker_rides_out_a_connection_broken_under_it(ctx):
    """The display's rule (writer.look) for every idle worker: the tick that meets the
    error raises it (the scheduler reports it), the next one reads on a new connection."""
    worked = []

    def work(row, owner):
        worked.append(row.id)
        return 1

    assert drain(ctx, "keyframe", work) == 0
    with ctx.look("keyframe").reading() as conn:
        conn.close()                                         # broken behind its back
    with pytest.raises(sqlite3.ProgrammingError):
        drain(ctx, "keyframe", work)
    (kid,) = make_keyframes(ctx.engine, 1)
    assert drain(ctx, "keyframe", work) == 1 and worked == [kid]


def test_close_looks_closes_every_workers_connection(ctx):
    conns = []
    for worker in ("planner", "embedding"):
        with ctx.look(worker).reading() as conn:
            conns.append(conn)
    ctx.close_looks()
    for conn in conns:
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")
    with ctx.look("planner").reading() as conn:             # a later read opens anew
        assert conn not in conns and count(conn) == 0


def test_last_keyframe_is_the_newest_completed_link_whatever_came_after(ctx):
    make_keyframes(ctx.engine, 4)
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE keyframes SET state = 'completed' WHERE chain_index <= 1"))
        conn.execute(text("UPDATE keyframes SET state = 'discarded' WHERE chain_index = 2"))
    with ctx.look("planner").reading() as conn:
        last = read_model.last_keyframe(conn)
        assert (last["chain_index"], last["state"]) == (1, "completed")
        assert read_model.in_progress(conn)["chain_index"] == 3


def test_the_buffer_of_a_ledger_without_its_runtime_table_counts_every_ready_frame(tmp_path):
    """frames_ahead_of_playhead asks for the playhead outright (no sqlite_master look-up
    first): a ledger older than the runtime table has no playhead, any other error is
    raised."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE frames (id INTEGER PRIMARY KEY, state TEXT, "
                     "chain_index INTEGER, t REAL)")
        conn.executemany("INSERT INTO frames (state, chain_index, t) VALUES (?, ?, ?)",
                         [("ready", 0, 0.0), ("ready", 0, 0.5), ("shown", 1, 0.0)])
    conn = read_model.connect(path)
    assert read_model.frames_ahead_of_playhead(conn) == 2
    assert read_model.frames_ahead_of_playhead(conn, at_most=1) == 1
    conn.close()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE runtime_state (id INTEGER PRIMARY KEY)")   # no playhead
    conn = read_model.connect(path)
    with pytest.raises(sqlite3.OperationalError, match="no such column"):
        read_model.frames_ahead_of_playhead(conn)
    conn.close()
