"""`dreamd run` as a real subprocess: a dream appears, the pid file guards the data
dir, signals stop it cleanly, controls act on it, disk use stays bounded."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import pytest
from PIL import Image
from sqlalchemy import text

from dreamd.display.status import KEYS
from tests import invariants
from tests.conftest import FAST_CONFIG, DaemonRunner, dreamd_cmd, wait_for

# How long a stop may take before the test calls it hung. The daemon's own worst case
# (dreamd/daemon.py, _stop): GRACE_SECONDS (5) for work in flight, display.flush (2),
# recording the stop on a busy ledger for up to STOP_RECORD_SECONDS (10) twice on a full
# disk, then the viewer, the backend, the codecs and a WAL checkpoint: about 30 s on an
# idle machine, and a loaded one stretches every step. Well above it:
STOP_DEADLINE = 120
# How long a test waits for the dream to reach a state (a start costs 10-15 s here)
RUN_DEADLINE = 120


def status(daemon) -> dict:
    path = daemon.data_dir / "output" / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def stop(daemon, proc, sig=signal.SIGTERM) -> None:
    """Signal the daemon and wait for its clean exit."""
    if proc.poll() is None:
        proc.send_signal(sig)
    assert proc.wait(timeout=STOP_DEADLINE) == 0, daemon.output()[-3000:]


def wait_in(daemon, done, what: str, timeout: float = RUN_DEADLINE):
    """wait_for, and on a time-out the daemon's output as it is then."""
    try:
        return wait_for(done, timeout=timeout, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{daemon.output()[-3000:]}") from None


def holds_pid_file(daemon, proc) -> bool:
    """The daemon has taken its pid file, so its stop signals are handled (a SIGTERM
    before that kills it, rc -15). A dead daemon's pid file may still be there."""
    try:
        return (daemon.data_dir / "dreamd.pid").read_text().strip() == str(proc.pid)
    except OSError:
        return False


def run_until(daemon, done, what: str, *args: str) -> None:
    """Run the daemon until `done()` holds, then stop it with SIGTERM: a test judges what a
    run made, never what a fixed time made (a loaded machine makes less in it)."""
    proc = daemon.start(*args)
    try:
        wait_in(daemon, lambda: holds_pid_file(daemon, proc), "the daemon's pid file")
        wait_in(daemon, done, what)
    finally:
        stop(daemon, proc)


def count(daemon, sql: str, *params) -> int:
    """A count from the ledger of a running daemon; 0 while it has none yet."""
    try:
        return ledger_rows(daemon.data_dir, sql, *params)[0][0]
    except sqlite3.OperationalError:
        return 0


def completed(daemon, table: str) -> int:
    return count(daemon, f"SELECT count(*) FROM {table} WHERE state = 'completed'")


def frames_where(daemon, condition: str) -> int:
    return count(daemon, f"SELECT count(*) FROM frames WHERE {condition}")


def test_a_run_makes_a_dream_and_stops_cleanly(daemon):
    # until two keyframes are made and two frames shown (the current and the previous)
    run_until(daemon, lambda: completed(daemon, "keyframes") >= 2
              and status(daemon).get("frame_number", 0) >= 2, "two keyframes, two frames")
    out = daemon.data_dir / "output"
    st = json.loads((out / "status.json").read_text())
    assert list(st) == list(KEYS)
    assert st["status"] == "stopped" and st["daemon_status"] == "stopped"
    assert st["frame_number"] > 0 and st["backend"] == "procedural" and st["codec"] == "pixel"
    with Image.open(out / "current_frame.png") as im:
        assert im.size == (128, 64)
    assert (out / "previous_frame.png").exists()
    assert not (daemon.data_dir / "dreamd.pid").exists()
    assert (daemon.data_dir / "logs" / "dreamd.log").read_text().count("keyframe") > 1
    facts = invariants.check(daemon.data_dir)
    assert facts["keyframes"] >= 2
    engine = daemon.db()
    with engine.connect() as conn:
        run = conn.execute(text("SELECT * FROM daemon_runs")).one()
        assert run.stopped_at is not None and run.exit_reason == "signal SIGTERM"
    engine.dispose()


def test_pid_file_refuses_a_second_daemon_and_sigterm_stops_the_first(daemon):
    first = daemon.start()
    try:
        wait_for(lambda: status(daemon).get("status") == "playing", timeout=RUN_DEADLINE,
                 what="playback")
        second = subprocess.run(dreamd_cmd("--config", str(daemon.config), "run",
                                           "--duration", "2"),
                                env=daemon.env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert f"another dreamd (pid {first.pid}) is already running" in second.stderr
    finally:
        stop(daemon, first)
    engine = daemon.db()
    with engine.connect() as conn:
        run = conn.execute(text("SELECT * FROM daemon_runs ORDER BY id DESC")).first()
        assert run.exit_reason == "signal SIGTERM"
        assert conn.execute(text("SELECT count(*) FROM keyframes WHERE state='executing'")
                            ).scalar() == 0
    engine.dispose()
    assert status(daemon)["status"] == "stopped"
    invariants.check(daemon.data_dir)


def test_sigint_stops_cleanly_too(daemon):
    proc = daemon.start()
    wait_for(lambda: status(daemon).get("frame_number", 0) > 0, timeout=RUN_DEADLINE,
             what="a frame")
    stop(daemon, proc, signal.SIGINT)
    invariants.check(daemon.data_dir)


def test_a_stale_pid_file_is_taken_over(daemon):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    daemon.data_dir.mkdir(parents=True, exist_ok=True)
    (daemon.data_dir / "dreamd.pid").write_text(f"{dead.pid}\n")
    result = daemon.run(2)
    assert result.returncode == 0, result.stdout
    assert "taking over a stale pid file" in result.stdout
    # a run given a duration ends by it, cleanly
    assert not (daemon.data_dir / "dreamd.pid").exists()
    assert status(daemon)["status"] == "stopped"
    (reason,), = ledger_rows(daemon.data_dir, "SELECT exit_reason FROM daemon_runs")
    assert reason == "duration 2 s elapsed"


def test_controls_act_on_a_running_daemon(daemon):
    proc = daemon.start()
    try:
        wait_for(lambda: status(daemon).get("status") == "playing", timeout=RUN_DEADLINE,
                 what="playback")
        cli = ["--config", str(daemon.config)]
        subprocess.run(dreamd_cmd(*cli, "pause", "--reason", "a game"), env=daemon.env,
                       check=True, capture_output=True, timeout=60)
        wait_for(lambda: status(daemon).get("paused") is True, timeout=60, what="pause")
        st = status(daemon)
        assert st["status"] == "paused" and st["pause_reason"] == "a game"
        shown = st["frame_number"]
        subprocess.run(dreamd_cmd(*cli, "set", "display.fps=5"), env=daemon.env, check=True,
                       capture_output=True, timeout=60)
        subprocess.run(dreamd_cmd(*cli, "resume"), env=daemon.env, check=True,
                       capture_output=True, timeout=60)
        wait_for(lambda: status(daemon).get("paused") is False and
                 status(daemon).get("fps") == 5.0, timeout=60, what="resume at 5 fps")
        wait_for(lambda: status(daemon).get("frame_number", 0) > shown, timeout=60,
                 what="playback after resume")
        bad = subprocess.run(dreamd_cmd(*cli, "set", "display.fps=500"), env=daemon.env,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "display.fps = 500" in bad.stderr
    finally:
        stop(daemon, proc)
    engine = daemon.db()
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT command, state FROM controls ORDER BY id")).all()
        knobs = conn.execute(text("SELECT knobs FROM runtime_state")).scalar()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("pause", "applied"), ("set", "applied"),
                                        ("resume", "applied")]
    assert json.loads(knobs) == {"display.fps": 5.0}


# Each frame retention evicted, and how many frames after it in playback order had been
# shown by the moment it was evicted
EVICTED_BEHIND = """SELECT f.id, (SELECT count(*) FROM frames g WHERE g.shown_at <= tr.at
    AND (g.chain_index > f.chain_index OR (g.chain_index = f.chain_index AND g.t > f.t)))
  FROM frames f JOIN transitions tr ON tr.entity = 'frame' AND tr.entity_id = f.id
  AND tr.to_state = 'evicted' AND tr.detail = 'retention'"""
# Shown frames retention may evict: not cache members, not the one on screen
EVICTABLE = """SELECT count(*) FROM frames f LEFT JOIN runtime_state r ON r.id = 1
  WHERE f.state = 'shown' AND f.id IS NOT r.playhead_frame_id
  AND f.id NOT IN (SELECT frame_id FROM embeddings WHERE in_cache = 1)"""


@pytest.mark.slow
def test_retention_keeps_disk_bounded(daemon, tmp_path):
    keep = 10
    daemon.config.write_text(FAST_CONFIG.replace(
        "[display]", f"[display]\nmax_output_frames = {keep}"))
    proc = daemon.start()
    cli = ["--config", str(daemon.config)]
    try:
        # retention at work while the dream plays
        wait_in(daemon, lambda: frames_where(daemon, "shown_at IS NOT NULL") > 20
                and frames_where(daemon, "state = 'evicted'") > 0, "frames shown and evicted")
        # paused, nothing more is shown: the janitor's next pass (every 5 s) leaves on disk
        # the last `keep` shown frames, beside cache members and the one on screen
        subprocess.run(dreamd_cmd(*cli, "pause"), env=daemon.env, check=True,
                       capture_output=True, timeout=60)
        wait_for(lambda: status(daemon).get("paused") is True, timeout=60, what="the pause")
        wait_in(daemon, lambda: count(daemon, EVICTABLE) <= keep,
                f"a retention pass down to {keep} shown frames", timeout=60)
    finally:
        stop(daemon, proc)
    facts = invariants.check(daemon.data_dir)
    engine = daemon.db()
    with engine.connect() as conn:
        shown_inbetween = conn.execute(text(
            "SELECT count(*) FROM frames WHERE state='shown' AND kind='inbetween'")).scalar()
        evicted = conn.execute(text("SELECT path FROM frames WHERE state='evicted'")
                               ).scalars().all()
        ready = conn.execute(text("SELECT count(*) FROM frames WHERE state='ready'")).scalar()
        shown_keyframes = conn.execute(text(
            "SELECT count(*) FROM frames WHERE state='shown' AND kind='keyframe'")).scalar()
        behind = conn.execute(text(EVICTED_BEHIND)).all()
    engine.dispose()
    assert len(facts["shown"]) > 20
    assert evicted and not any(os.path.exists(p) for p in evicted)
    # while the dream played, retention never took a frame before `keep` more were shown
    assert behind and min(n for _, n in behind) >= keep, behind
    on_disk = len(list((daemon.data_dir / "frames").glob("*.png")))
    assert on_disk == shown_inbetween + shown_keyframes + ready


def test_sigterm_during_startup_is_a_clean_stop(daemon):
    proc = daemon.start()
    wait_for((daemon.data_dir / "dreamd.pid").exists, timeout=RUN_DEADLINE, interval=0.005,
             what="the pid file")
    stop(daemon, proc)
    assert not (daemon.data_dir / "dreamd.pid").exists()


# ---------------------------------------------------------------- the README's claims

def ledger_rows(data_dir, sql: str, *params):
    con = sqlite3.connect(f"file:{data_dir / 'dreamd.db'}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


# one statement, so one snapshot: frames ready after the playhead, frames the pending
# batches will make, keyframes planned and not yet made
BUFFER = """SELECT
  (SELECT count(*) FROM frames f LEFT JOIN runtime_state r ON r.id = 1
   WHERE f.state = 'ready' AND (r.playhead_chain_index IS NULL
     OR f.chain_index > r.playhead_chain_index
     OR (f.chain_index = r.playhead_chain_index AND f.t > r.playhead_t))),
  (SELECT coalesce(sum(n_frames + 1), 0) FROM interpolations
   WHERE state IN ('available', 'executing', 'retryable')),
  (SELECT count(*) FROM keyframes WHERE state IN ('available', 'executing', 'retryable'))"""


KEYFRAMES_SAMPLED = 8


@pytest.mark.slow
def test_the_planner_stays_within_the_buffer_target_one_keyframe_in_flight(daemon):
    """README: the planner keeps the chain ahead of the playhead by
    `display.buffer_target_seconds`, one keyframe in flight at a time. It plans when
    the frames ready and coming fall under the target; the keyframe it plans brings
    N + 1 more: never more than one keyframe's worth beyond the target."""
    n, target = 4, 3.0 * 10             # FAST_CONFIG: N = 4; 3 s at 10 fps
    samples = []

    def sampled_enough() -> bool:
        try:
            samples.append(ledger_rows(daemon.data_dir, BUFFER)[0])
        except sqlite3.OperationalError:
            pass                        # no ledger (or no tables) yet
        # a chain made several keyframes past the target's fill, looked at all along
        return len(samples) > 20 and completed(daemon, "keyframes") >= KEYFRAMES_SAMPLED

    run_until(daemon, sampled_enough, f"{KEYFRAMES_SAMPLED} keyframes")
    samples.append(ledger_rows(daemon.data_dir, BUFFER)[0])
    for ahead, coming, planned in samples:
        assert planned <= 1, f"{planned} keyframes in flight"
        assert ahead + coming + planned * (n + 1) <= target + 2 * (n + 1), \
            f"{ahead} frames ahead, {coming} coming, {planned} keyframe planned"
    assert ledger_rows(daemon.data_dir, "SELECT count(*) FROM keyframes "
                       "WHERE state = 'completed'")[0][0] >= 3
    invariants.check(daemon.data_dir)


def test_a_segment_is_frames_at_i_over_n_plus_one_from_zero(dreamd_env, tmp_path):
    """README: a batch writes frames t = 0, 1/(N+1), ..., N/(N+1); the one at t = 0 is
    the keyframe (as decoded), the rest in-betweens. N = 3 here: quarters."""
    d = DaemonRunner(dreamd_env, tmp_path,
                     FAST_CONFIG.replace("interpolation_frames = 4", "interpolation_frames = 3"))
    run_until(d, lambda: completed(d, "interpolations") >= 2, "two batches")
    batches = ledger_rows(d.data_dir, "SELECT id, chain_index, from_keyframe_id, n_frames "
                          "FROM interpolations WHERE state = 'completed'")
    assert len(batches) >= 2
    for bid, chain, start, n in batches:
        assert n == 3
        frames = ledger_rows(d.data_dir, "SELECT chain_index, t, kind, keyframe_id FROM frames "
                             "WHERE interpolation_id = ? ORDER BY t", bid)
        assert frames == [(chain, 0.0, "keyframe", start), (chain, 0.25, "inbetween", None),
                          (chain, 0.5, "inbetween", None), (chain, 0.75, "inbetween", None)]


@pytest.mark.slow
def test_a_stop_releases_the_leases_it_holds(daemon):
    """README: a stop lets in-flight work finish for up to 5 s, then releases what is
    still leased (event `released`, the attempt given back); nothing stays executing,
    and the next start makes what was released."""
    daemon.data_dir.mkdir(parents=True, exist_ok=True)
    (daemon.data_dir / "arm-keyframe-written").touch()
    held = daemon.data_dir / "held-at-keyframe-written"
    proc = daemon.start(extra_env={"DREAMD_HOLD_AT": "keyframe-written"})
    try:
        wait_for(held.exists, timeout=RUN_DEADLINE,
                 what=f"a keyframe held:\n{daemon.output()[-2000:]}")
        executing = ledger_rows(daemon.data_dir, "SELECT id, attempt FROM keyframes "
                                "WHERE state = 'executing'")
        assert len(executing) == 1
        (kid, attempt), = executing
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_DEADLINE) == 0, daemon.output()
    finally:
        held.unlink(missing_ok=True)
    for table in ("keyframes", "interpolations", "embeddings"):
        assert ledger_rows(daemon.data_dir,
                           f"SELECT id FROM {table} WHERE state = 'executing'") == [], table
    last = ledger_rows(daemon.data_dir, "SELECT from_state, to_state, event FROM transitions "
                       "WHERE entity = 'keyframe' AND entity_id = ? ORDER BY id DESC LIMIT 1",
                       kid)
    assert last == [("executing", "available", "released")]
    assert ledger_rows(daemon.data_dir, "SELECT attempt, lease_owner FROM keyframes "
                       "WHERE id = ?", kid) == [(attempt - 1, None)]
    (stopped,), = ledger_rows(daemon.data_dir, "SELECT stopped_at FROM daemon_runs")
    assert stopped is not None
    assert f"released keyframe [{kid}]" in daemon.output()
    # the next start makes it, with no rescue needed
    run_until(daemon, lambda: ledger_rows(daemon.data_dir, "SELECT state FROM keyframes "
                                          "WHERE id = ?", kid) == [("completed",)],
              f"keyframe {kid} made")
    assert "abandoned by a dead worker" not in daemon.output()
    invariants.check(daemon.data_dir)


def test_a_stop_signal_that_lands_while_the_main_thread_holds_the_stop_events_lock():
    """A signal handler runs between two bytecodes of the main thread. When that thread is
    inside `stop_event.wait()` it may hold the event's lock (a plain Lock) at that moment:
    a handler that called `Event.set()` waited for it for ever, and the daemon ignored
    every later signal (seen once in CI, a SIGINT just after the first frame)."""
    import threading

    from dreamd import config
    from dreamd.daemon import Daemon

    d = Daemon(config.parse(""))
    returned = threading.Event()

    def main_thread_inside_the_wait():
        with d.stop_event._cond:            # as Event.wait() holds it, between bytecodes
            d.on_signal(signal.SIGTERM, None)
        returned.set()

    threading.Thread(target=main_thread_inside_the_wait, daemon=True).start()
    assert returned.wait(60), "the handler waits for a lock its own thread holds"
    assert d.wait_for_stop(None) is True          # the run sees it at once
    assert d.stop_reason == "signal SIGTERM" and d.stop_event.is_set()


def test_the_run_waits_out_its_duration_when_no_signal_comes():
    from dreamd import config
    from dreamd.daemon import Daemon

    d = Daemon(config.parse(""))
    assert d.wait_for_stop(0.3) is False and not d.stop_event.is_set()
    d.signalled = "signal SIGINT"
    assert d.wait_for_stop(60) is True and d.stop_reason == "signal SIGINT"
