"""README claims that had no test (issue 16): controls written while no daemon runs are
applied by the next one at its start; a pause and the knobs survive a restart; `theme
NAME` makes the next keyframe that theme; status.json is rewritten at least once a
second even below 1 fps; `current_mode` is `keyframes` when N = 0. Each against a real
`dreamd run` subprocess on a real ledger."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from datetime import datetime

import pytest

from tests import invariants
from tests.conftest import FAST_CONFIG, DaemonRunner, dreamd_cmd, wait_for
from tests.test_daemon import ledger_rows, status


def cli(daemon, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(dreamd_cmd("--config", str(daemon.config), *args), env=daemon.env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def test_controls_made_while_stopped_apply_at_the_next_start_and_survive_restarts(daemon):
    assert daemon.run(3).returncode == 0, daemon.output()
    (last_chain,), = ledger_rows(daemon.data_dir, "SELECT max(chain_index) FROM keyframes")

    # no daemon: the controls wait in the ledger, and the command says so
    out = cli(daemon, "theme", "cathedral").stdout
    assert "no daemon is running: it is applied when one starts" in out
    cli(daemon, "set", "display.fps=5")
    assert ledger_rows(daemon.data_dir, "SELECT command, state FROM controls ORDER BY id") == \
        [("theme", "available"), ("set", "available")]

    # README: the next keyframe planned is the theme asked for. How soon one is planned
    # depends on how full the buffer was left, so run until it is, not for a fixed time.
    proc = daemon.start()
    try:
        first_new = wait_for(lambda: ledger_rows(
            daemon.data_dir, "SELECT theme FROM keyframes WHERE chain_index > ? "
            "ORDER BY chain_index LIMIT 1", last_chain), timeout=90, what="a new keyframe")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, daemon.output()
    assert ledger_rows(daemon.data_dir, "SELECT command, state FROM controls ORDER BY id") == \
        [("theme", "applied"), ("set", "applied")]
    assert first_new == [("cathedral",)], daemon.output()[-2000:]
    assert status(daemon)["fps"] == 5.0

    # a pause made while stopped holds from the first moment of the next run ...
    cli(daemon, "pause", "--reason", "before the start")
    (made,), = ledger_rows(daemon.data_dir, "SELECT count(*) FROM keyframes")
    shown = status(daemon)["frame_number"]
    proc = daemon.start()
    try:
        wait_for(lambda: status(daemon).get("daemon_status") == "running", timeout=60,
                 what="the daemon's first status")
        st = status(daemon)
        assert st["paused"] is True and st["pause_reason"] == "before the start", st
        assert st["status"] == "paused" and st["fps"] == 5.0
        time.sleep(3)
        assert status(daemon)["frame_number"] == shown
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, daemon.output()
    # ... and the next: pause and knobs are state in the ledger, not in a process
    proc = daemon.start()
    try:
        wait_for(lambda: status(daemon).get("daemon_status") == "running", timeout=60,
                 what="the daemon's first status")
        time.sleep(2)
        st = status(daemon)
        assert (st["paused"], st["pause_reason"], st["fps"]) == (True, "before the start", 5.0)
        assert st["frame_number"] == shown
        assert ledger_rows(daemon.data_dir, "SELECT count(*) FROM keyframes") == [(made,)]
        cli(daemon, "resume")
        wait_for(lambda: status(daemon).get("frame_number", 0) > shown, timeout=60,
                 what="playback after resume")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, daemon.output()
    (knobs,), = ledger_rows(daemon.data_dir, "SELECT knobs FROM runtime_state")
    assert json.loads(knobs) == {"display.fps": 5.0}
    invariants.check(daemon.data_dir)


@pytest.mark.slow
def test_status_json_is_rewritten_at_least_once_a_second_even_below_one_fps(dreamd_env,
                                                                            tmp_path):
    """At 0.2 fps a display tick comes every 5 s; status.json must not wait for it (the
    README: at every frame and at least once a second). Gaps are judged with a wide
    margin (2.5 s) for a loaded machine; without the heartbeat they are 5 s."""
    config = (FAST_CONFIG.replace("fps = 10.0", "fps = 0.2")
              .replace("buffer_target_seconds = 3.0", "buffer_target_seconds = 30.0")
              .replace("min_buffer_seconds = 1.0", "min_buffer_seconds = 5.0"))
    d = DaemonRunner(dreamd_env, tmp_path, config)
    proc = d.start()
    stamps: list[str] = []
    try:
        wait_for(lambda: status(d).get("status") == "playing", timeout=120, what="playback")
        started = time.monotonic()
        while time.monotonic() - started < 12:
            stamp = status(d).get("last_update")
            if stamp and (not stamps or stamp != stamps[-1]):
                stamps.append(stamp)
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, d.output()
    times = [datetime.fromisoformat(s) for s in stamps]
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    assert len(gaps) >= 6 and max(gaps) < 2.5, gaps


def test_current_mode_is_keyframes_when_n_is_zero(dreamd_env, tmp_path):
    """README (status.json): `current_mode` is `keyframes` when N = 0; every frame is
    then a keyframe at t = 0 and playback goes keyframe to keyframe."""
    d = DaemonRunner(dreamd_env, tmp_path,
                     FAST_CONFIG.replace("interpolation_frames = 4", "interpolation_frames = 0"))
    # until two frames are shown, not for a fixed time (a loaded CI box showed one in 5 s)
    proc = d.start()
    try:
        wait_for(lambda: status(d).get("frame_number", 0) >= 2, timeout=90,
                 what="two frames shown")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, d.output()
    st = status(d)
    assert st["current_mode"] == "keyframes" and st["frame_number"] >= 2
    frames = ledger_rows(d.data_dir, "SELECT DISTINCT t, kind FROM frames")
    assert frames == [(0.0, "keyframe")]
    invariants.check(d.data_dir)
