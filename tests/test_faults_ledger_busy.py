"""Issue 10, item 5: another process holds the ledger's write lock (a user's sqlite3
session, a backup tool). Playback goes on from frames already made, status.json says
the ledger is busy, the ledger is caught up afterwards, and a job that finished its
work while the lock was held is committed as soon as it is free, not left to its lease.
The lock is a real second SQLite connection in BEGIN EXCLUSIVE."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from dreamd.display.writer import BUSY_AFTER, RECORD_EVERY, RECORD_RETRY
from tests import invariants
from tests.conftest import FAST_CONFIG, WriteLock, wait_for
from tests.test_display import add_segment, ctx, shown, status  # noqa: F401 (fixture)


def test_playback_goes_on_while_another_process_holds_the_write_lock(ctx, db_path,
                                                                    monkeypatch):
    from dreamd.display import writer
    from dreamd.display.writer import DisplayWriter

    # these ticks come back to back, not a frame apart: the output files with each one
    monkeypatch.setattr(writer, "STATUS_GAP", 0.0)

    add_segment(ctx, 0, 4)
    add_segment(ctx, 1, 4)
    w = DisplayWriter(ctx)
    w.tick()
    w.tick()
    assert w.record() and shown(ctx) == [(0, 0.0), (0, 0.2)]
    current = ctx.cfg.output_dir / "current_frame.png"
    seen = []
    with WriteLock(db_path):
        for _ in range(5):
            w.tick()                                  # never raises, never waits long
            seen.append(current.read_bytes())
        time.sleep(RECORD_EVERY)
        w.tick()                                      # a batch is due: its record fails
        seen.append(current.read_bytes())
        w._status_maybe(ctx.knob("display.fps"), force=True)
        # a lock held briefly (the daemon's own writers do) is not called busy
        assert status(ctx)["problem"] is None
        time.sleep(BUSY_AFTER + RECORD_RETRY)
        w.tick()
        seen.append(current.read_bytes())
        w._status_maybe(ctx.knob("display.fps"), force=True)
        st = status(ctx)
        assert st["status"] == "playing" and "ledger busy" in (st["problem"] or "")
        assert st["frame_number"] == 9
        assert st["stale_after_seconds"] >= 10          # readers judge liveness by it
        assert shown(ctx) == [(0, 0.0), (0, 0.2)]     # the ledger could not know yet
    assert len(set(seen)) == 7                        # seven new frames on screen
    time.sleep(RECORD_RETRY + 0.1)
    w.tick()                                          # the ledger is free: caught up
    assert len(shown(ctx)) == 9                       # (this tick's frame: next batch)
    assert w.record()
    order = shown(ctx)
    assert order == sorted(order) and len(order) == 10
    rt = ctx.runtime()
    assert (rt.playhead_chain_index, rt.playhead_t, rt.frames_shown) == (w.chain, w.t, 10)
    for _ in range(3):
        w.tick()
    w._status_maybe(ctx.knob("display.fps"), force=True)
    assert status(ctx)["problem"] is None


def test_an_underrun_on_a_busy_ledger_is_counted_later(ctx, db_path):
    from dreamd.display.writer import DisplayWriter

    add_segment(ctx, 0, 3)
    w = DisplayWriter(ctx)
    for _ in range(4):
        w.tick()
    assert w.record() and len(shown(ctx)) == 4
    with WriteLock(db_path):
        w.tick()                                      # underrun, recorded later
        assert status(ctx)["status"] == "underrun"
    time.sleep(RECORD_RETRY + 0.1)
    w.tick()
    assert ctx.runtime().underruns == 1 and w.pending_underruns == 0


def read_status(data_dir: Path) -> dict:
    try:
        return json.loads((data_dir / "output" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.slow
def test_a_daemon_rides_out_a_20_second_lock(daemon):
    # leases of 60 s: a commit left to its lease would sit `executing` long after
    daemon.config.write_text(FAST_CONFIG.replace("lease_seconds = 10.0", "lease_seconds = 60.0")
                             .replace("buffer_target_seconds = 3.0",
                                      "buffer_target_seconds = 8.0"))
    data = daemon.data_dir
    proc = daemon.start(extra_env={"DREAMD_HOLD_AT": "keyframe-written"})
    try:
        wait_for(lambda: read_status(data).get("frame_number", 0) > 10, timeout=90,
                 what=f"playback:\n{daemon.output()[-2000:]}")
        (data / "arm-keyframe-written").write_text("")
        held = data / "held-at-keyframe-written"
        wait_for(held.exists, timeout=60, what="a keyframe on disk, its row not completed")
        engine = daemon.db()
        with engine.connect() as conn:
            row = conn.execute(text("SELECT id, lease_owner FROM keyframes "
                                    "WHERE state = 'executing'")).one()
        engine.dispose()
        samples = []
        with WriteLock(data / "dreamd.db"):
            held.unlink()                 # the worker commits now: the ledger is busy
            started = time.monotonic()
            while time.monotonic() - started < 20:
                samples.append(read_status(data))
                time.sleep(0.25)
            assert proc.poll() is None
        released = time.monotonic()
        numbers = [s.get("frame_number", 0) for s in samples]
        assert numbers[-1] > numbers[0], "playback froze while the ledger was busy"
        assert any("ledger busy" in (s.get("problem") or "") for s in samples)

        def committed():
            eng = daemon.db()
            try:
                with eng.connect() as conn:
                    return conn.execute(text("SELECT state FROM keyframes WHERE id = :i"),
                                        {"i": row.id}).scalar() == "completed"
            finally:
                eng.dispose()
        # retried as soon as the lock went, not when the 60 s lease ran out
        wait_for(committed, timeout=20, what="the held keyframe's commit")
        assert time.monotonic() - released < 20
        wait_for(lambda: read_status(data).get("problem") is None
                 and read_status(data).get("status") == "playing", timeout=30,
                 what="the problem to clear")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0, daemon.output()[-3000:]
    engine = daemon.db()
    with engine.connect() as conn:
        events = [e for (e,) in conn.execute(text(
            "SELECT event FROM transitions WHERE entity = 'keyframe' AND entity_id = :i "
            "ORDER BY id"), {"i": row.id})]
        run = conn.execute(text("SELECT * FROM daemon_runs ORDER BY id DESC")).first()
    engine.dispose()
    assert events == ["created", "claimed", "completed"]
    assert run.exit_reason == "signal SIGTERM"
    facts = invariants.check(data)
    invariants.distinct_frame_files(data)
    assert facts["playhead"] == facts["shown"][-1]
    output = daemon.output() + (data / "logs" / "dreamd.log").read_text()
    assert "Traceback" not in output, output[-4000:]
    log = (data / "logs" / "dreamd.log").read_text()
    assert log.count("ledger busy (") == 1, log[-4000:]
