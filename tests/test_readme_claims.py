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
from datetime import UTC, datetime, timedelta

import pytest

from tests import invariants
from tests.conftest import FAST_CONFIG, DaemonRunner, dreamd_cmd, wait_for
from tests.test_daemon import ledger_rows, status


def cli(daemon, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(dreamd_cmd("--config", str(daemon.config), *args), env=daemon.env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def daemon_clock(d) -> datetime | None:
    """The daemon's own clock, as it last wrote it into status.json (`last_update`)."""
    stamp = status(d).get("last_update")
    return datetime.fromisoformat(stamp) if stamp else None


def run_until(d, predicate, what: str, timeout: float = 120):
    """Start `dreamd run`, wait until `predicate()` holds, then stop it with SIGTERM (a
    clean stop, exit 0): a run as long as the machine needs, not a fixed duration."""
    proc = d.start()
    try:
        return wait_for(predicate, timeout=timeout, what=what)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, d.output()


def paused_for(d, since: datetime, seconds: float) -> None:
    """Wait until the daemon started after `since` has been up `seconds` of its own time
    since its first status (its clock, read from status.json, which the heartbeat
    rewrites while paused): the time a pause must hold, counted where a loaded machine
    cannot shorten it, and no fixed sleep of the test's."""
    def first_status():
        clock = daemon_clock(d)
        return status(d).get("daemon_status") == "running" and clock and clock >= since and clock
    first = wait_for(first_status, timeout=60, what="the daemon's first status")
    wait_for(lambda: daemon_clock(d) >= first + timedelta(seconds=seconds), timeout=120,
             what=f"{seconds:g} s of the paused daemon's own time")


def shown_and_made(d) -> tuple[int, int]:
    """Frames the ledger has recorded as shown, and keyframe rows (planned ones too)."""
    (shown,), = ledger_rows(d.data_dir, "SELECT frames_shown FROM runtime_state")
    (made,), = ledger_rows(d.data_dir, "SELECT count(*) FROM keyframes")
    return shown, made


@pytest.mark.slow
def test_controls_made_while_stopped_apply_at_the_next_start_and_survive_restarts(daemon):
    run_until(daemon, lambda: status(daemon).get("frame_number", 0) >= 1, "the first frame")
    (last_chain,), = ledger_rows(daemon.data_dir, "SELECT max(chain_index) FROM keyframes")

    # no daemon: the controls wait in the ledger, and the command says so
    out = cli(daemon, "theme", "cathedral").stdout
    assert "no daemon is running: it is applied when one starts" in out
    cli(daemon, "set", "display.fps=5")
    assert ledger_rows(daemon.data_dir, "SELECT command, state FROM controls ORDER BY id") == \
        [("theme", "available"), ("set", "available")]

    # README: the next keyframe planned is the theme asked for. How soon one is planned
    # depends on how full the buffer was left, so run until it is, not for a fixed time.
    first_new = run_until(daemon, lambda: ledger_rows(
        daemon.data_dir, "SELECT theme FROM keyframes WHERE chain_index > ? "
        "ORDER BY chain_index LIMIT 1", last_chain), "a new keyframe", timeout=90)
    assert ledger_rows(daemon.data_dir, "SELECT command, state FROM controls ORDER BY id") == \
        [("theme", "applied"), ("set", "applied")]
    assert first_new == [("cathedral",)], daemon.output()[-2000:]
    assert status(daemon)["fps"] == 5.0

    # a pause made while stopped holds from the first moment of the next run: for 3 s of
    # the daemon's own time, judged on the ledger over the whole run (nothing shown,
    # nothing planned), not on one look at status.json after a sleep
    cli(daemon, "pause", "--reason", "before the start")
    before = shown_and_made(daemon)
    shown = status(daemon)["frame_number"]
    since = datetime.now(UTC)
    proc = daemon.start()
    try:
        paused_for(daemon, since, 3)
        st = status(daemon)
        assert st["paused"] is True and st["pause_reason"] == "before the start", st
        assert st["status"] == "paused" and st["fps"] == 5.0
        assert st["frame_number"] == shown
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, daemon.output()
    assert shown_and_made(daemon) == before
    # ... and the next: pause and knobs are state in the ledger, not in a process
    since = datetime.now(UTC)
    proc = daemon.start()
    try:
        paused_for(daemon, since, 2)
        st = status(daemon)
        assert (st["paused"], st["pause_reason"], st["fps"]) == (True, "before the start", 5.0)
        assert st["frame_number"] == shown
        assert shown_and_made(daemon) == before
        cli(daemon, "resume")
        wait_for(lambda: status(daemon).get("frame_number", 0) > shown, timeout=60,
                 what="playback after resume")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, daemon.output()
    (knobs,), = ledger_rows(daemon.data_dir, "SELECT knobs FROM runtime_state")
    assert json.loads(knobs) == {"display.fps": 5.0}
    invariants.check(daemon.data_dir)


# status.json's age as a reader finds it, judged only where this test process was
# looking at least this often (a look later than this after the previous one: the test
# itself was held up, maybe the whole machine with it)
LOOK_EVERY = 0.05
HELD_UP = 0.25
COUNTED = 20.0      # seconds of looks that count, in all
# The heartbeat job runs every STATUS_EVERY (0.5 s) and writes when nothing has for
# 0.5 s: a tick skips only after a write less than 0.5 s before it, so at least every
# other tick writes, at least once a second (16-18 writes in 12 s were seen beside two
# CPU hogs). That claim is judged by the count of writes over the 20 s that count, which
# a late write or two do not upset. A single age is bounded only below the display's 5 s
# tick: beside the hogs the file was seen 2 s old at times (the heartbeat job waits
# for the CPU like every thread), so a bound of 1 s plus slack would fail on load alone.
OLDEST = 4.0


# serial: it judges the daemon's own clock against the wall (writes a second), so it
# runs alone, after the parallel part of `make test`, where no other test takes its CPU
@pytest.mark.slow
@pytest.mark.serial
def test_status_json_is_rewritten_at_least_once_a_second_even_below_one_fps(dreamd_env,
                                                                            tmp_path):
    """At 0.2 fps a display tick comes every 5 s; status.json must not wait for it (the
    README: at every frame and at least once a second).

    Judged as its readers judge it: at each look, the time of the look (taken before
    reading) minus the `last_update` the daemon wrote. A look that is itself late cannot
    make the file seem older than it was: it reads whatever the daemon wrote last (the
    old test took the gaps between the stamps it happened to see, so a test held up for
    2 s "saw" a 2 s gap the daemon never made). A look counts only when this process
    looked at least every HELD_UP seconds from the daemon's write to the look: a machine
    that stalled every process (a paused VM, a swap storm) stalls the daemon too, and
    that is not the daemon's fault; a daemon that skips writes while its neighbours run
    is. Looks go on until COUNTED seconds of them count (or the test fails at its
    deadline, so a machine always stalled cannot pass it either)."""
    config = (FAST_CONFIG.replace("fps = 10.0", "fps = 0.2")
              .replace("buffer_target_seconds = 3.0", "buffer_target_seconds = 30.0")
              .replace("min_buffer_seconds = 1.0", "min_buffer_seconds = 5.0"))
    d = DaemonRunner(dreamd_env, tmp_path, config)
    proc = d.start()
    ages: list[float] = []           # seconds, of the looks that count
    stamps: set[str] = set()
    try:
        wait_for(lambda: status(d).get("status") == "playing", timeout=180, what="playback")
        began = previous = held_up_until = datetime.now(UTC)
        counted, deadline = 0.0, time.monotonic() + 180
        while counted < COUNTED:
            assert time.monotonic() < deadline, \
                f"this test was held up too often to judge the daemon: {counted:.1f} s counted"
            time.sleep(LOOK_EVERY)
            looked = datetime.now(UTC)
            stamp = status(d).get("last_update")
            if (looked - previous).total_seconds() > HELD_UP:
                held_up_until = looked
            gap, previous = (looked - previous).total_seconds(), looked
            if not stamp:
                continue
            written = datetime.fromisoformat(stamp)
            if began <= written and held_up_until <= written:
                ages.append((looked - written).total_seconds())
                stamps.add(stamp)
                counted += gap
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, d.output()
    # at least once a second: as many writes seen as seconds counted (the looks, never
    # more than HELD_UP apart where they count, see every write but one the display's
    # tick replaced at once; missing it can only fail the test, never pass it)
    assert len(stamps) >= counted, (len(stamps), counted, sorted(stamps))
    assert max(ages) < OLDEST, (max(ages), sorted(ages)[-10:])


@pytest.mark.slow
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
