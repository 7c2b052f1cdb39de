"""`dreamd run` as a real subprocess: a dream appears, the pid file guards the data
dir, signals stop it cleanly, controls act on it, disk use stays bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from PIL import Image
from sqlalchemy import text

from dreamd.display.status import KEYS
from tests import invariants
from tests.conftest import FAST_CONFIG, dreamd_cmd, wait_for


def status(daemon) -> dict:
    path = daemon.data_dir / "output" / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def test_a_run_makes_a_dream_and_stops_cleanly(daemon):
    result = daemon.run(8)
    assert result.returncode == 0, result.stdout
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
        assert run.stopped_at is not None and run.exit_reason.startswith("duration")
    engine.dispose()


def test_pid_file_refuses_a_second_daemon_and_sigterm_stops_the_first(daemon):
    first = daemon.start()
    try:
        wait_for(lambda: status(daemon).get("status") == "playing", timeout=60,
                 what="playback")
        second = subprocess.run(dreamd_cmd("--config", str(daemon.config), "run",
                                           "--duration", "2"),
                                env=daemon.env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert f"another dreamd (pid {first.pid}) is already running" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=15) == 0
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
    wait_for(lambda: status(daemon).get("frame_number", 0) > 0, timeout=60, what="a frame")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0
    invariants.check(daemon.data_dir)


def test_a_stale_pid_file_is_taken_over(daemon):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    daemon.data_dir.mkdir(parents=True, exist_ok=True)
    (daemon.data_dir / "dreamd.pid").write_text(f"{dead.pid}\n")
    result = daemon.run(2)
    assert result.returncode == 0, result.stdout
    assert "taking over a stale pid file" in result.stdout


def test_controls_act_on_a_running_daemon(daemon):
    proc = daemon.start()
    try:
        wait_for(lambda: status(daemon).get("status") == "playing", timeout=60, what="playback")
        cli = ["--config", str(daemon.config)]
        subprocess.run(dreamd_cmd(*cli, "pause", "--reason", "a game"), env=daemon.env,
                       check=True, capture_output=True)
        wait_for(lambda: status(daemon).get("paused") is True, timeout=10, what="pause")
        st = status(daemon)
        assert st["status"] == "paused" and st["pause_reason"] == "a game"
        shown = st["frame_number"]
        subprocess.run(dreamd_cmd(*cli, "set", "display.fps=5"), env=daemon.env, check=True,
                       capture_output=True)
        subprocess.run(dreamd_cmd(*cli, "resume"), env=daemon.env, check=True,
                       capture_output=True)
        wait_for(lambda: status(daemon).get("paused") is False and
                 status(daemon).get("fps") == 5.0, timeout=10, what="resume at 5 fps")
        wait_for(lambda: status(daemon).get("frame_number", 0) > shown, timeout=20,
                 what="playback after resume")
        bad = subprocess.run(dreamd_cmd(*cli, "set", "display.fps=500"), env=daemon.env,
                             capture_output=True, text=True)
        assert bad.returncode == 2 and "display.fps = 500" in bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    engine = daemon.db()
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT command, state FROM controls ORDER BY id")).all()
        knobs = conn.execute(text("SELECT knobs FROM runtime_state")).scalar()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("pause", "applied"), ("set", "applied"),
                                        ("resume", "applied")]
    assert json.loads(knobs) == {"display.fps": 5.0}


def test_retention_keeps_disk_bounded(daemon, tmp_path):
    daemon.config.write_text(FAST_CONFIG.replace("[display]", "[display]\nmax_output_frames = 10"))
    assert daemon.run(12).returncode == 0
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
    engine.dispose()
    assert len(facts["shown"]) > 20
    assert evicted and not any(os.path.exists(p) for p in evicted)
    # the janitor runs every 5 s: at most 10 kept + what 10 fps shows in 5 s
    assert shown_inbetween <= 10 + 50
    on_disk = len(list((daemon.data_dir / "frames").glob("*.png")))
    assert on_disk == shown_inbetween + shown_keyframes + ready


def test_sigterm_during_startup_is_a_clean_stop(daemon):
    proc = daemon.start()
    wait_for((daemon.data_dir / "dreamd.pid").exists, timeout=60, interval=0.005,
             what="the pid file")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, daemon.output()
    assert not (daemon.data_dir / "dreamd.pid").exists()
