"""Issue 10, item 8: a closed stdout/stderr never changes how the daemon stops.

`dreamd run 2>&1 | tee log`, then Ctrl-C: the terminal sends SIGINT to the whole
process group, tee dies, and the daemon's next log line goes to a closed pipe. Rich
answers a broken pipe with SystemExit(1), which used to end the stop half way (exit
1, no stop recorded). The pipe is closed here before start-up finishes, while running,
and during the stop; every time the daemon must exit 0 and record the stop."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess

import pytest
from sqlalchemy import text

from tests import invariants
from tests.conftest import dreamd_cmd, wait_for

# A backstop only: each test signals its daemon long before this (its waits add up to
# about 210 s); should the test and its teardown both be lost, the daemon still ends.
DURATION = "600"


def frames_shown(data_dir) -> int:
    try:
        return json.loads((data_dir / "output" / "status.json").read_text()).get(
            "frame_number", 0)
    except (OSError, ValueError):
        return 0


def last_run(daemon):
    engine = daemon.db()
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT * FROM daemon_runs ORDER BY id DESC")).first()
    finally:
        engine.dispose()


@pytest.fixture
def sessions():
    """The processes a test starts, each in a session of its own: whatever happens to the
    test, each one's whole process group is killed when it ends. conftest's
    `_no_daemon_left_behind` knows only DaemonRunner's daemons, not these (one runs under
    bash, behind a pipe)."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        # Linux never reuses a pid while it is still a group's id: this reaches the
        # group's leftovers, or nothing
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def start_piped(daemon, sessions) -> subprocess.Popen:
    daemon.data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(dreamd_cmd("--config", str(daemon.config), "run",
                                       "--duration", DURATION),
                            env={**daemon.env, "COLUMNS": "120"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    sessions.append(proc)
    return proc


def stopped_cleanly(daemon, rc: int, signal_name: str) -> None:
    assert rc == 0, (daemon.data_dir / "logs" / "dreamd.log").read_text()[-3000:]
    run = last_run(daemon)
    assert run.stopped_at is not None and run.exit_reason == f"signal {signal_name}"
    invariants.check(daemon.data_dir)
    assert not (daemon.data_dir / "dreamd.pid").exists()


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before start-up finishes", "while running",
                                    "during the stop"])
def test_a_closed_pipe_never_changes_the_stop(daemon, sessions, moment):
    proc = start_piped(daemon, sessions)
    if moment == "before start-up finishes":
        proc.stdout.close()
    else:
        wait_for(lambda: frames_shown(daemon.data_dir) > 0, timeout=90, what="playback")
        proc.stdout.read1(4096)
    if moment == "while running":
        proc.stdout.close()
    if moment != "during the stop":
        # it goes on logging (keyframes, batches) into the closed pipe
        shown = frames_shown(daemon.data_dir)
        wait_for(lambda: frames_shown(daemon.data_dir) > shown + 10, timeout=60,
                 what="playback after the pipe closed")
        assert proc.poll() is None, "the daemon died when its pipe closed"
    proc.send_signal(signal.SIGINT)
    if moment == "during the stop":
        proc.stdout.close()                 # "stopping (signal SIGINT)" goes nowhere
    stopped_cleanly(daemon, proc.wait(timeout=60), "SIGINT")


@pytest.mark.slow
def test_ctrl_c_under_tee_stops_cleanly(daemon, sessions, tmp_path):
    """The real thing: `dreamd run 2>&1 | tee log` in its own process group, SIGINT to
    the group, as a terminal's Ctrl-C sends it."""
    log = tmp_path / "tee.log"
    cmd = " ".join(shlex.quote(a) for a in dreamd_cmd("--config", str(daemon.config), "run",
                                                      "--duration", DURATION))
    daemon.data_dir.mkdir(parents=True, exist_ok=True)
    shell = subprocess.Popen(["bash", "-c", f"{cmd} 2>&1 | tee {shlex.quote(str(log))} "
                              f">/dev/null; echo \"${{PIPESTATUS[0]}}\" > {tmp_path}/rc"],
                             env={**daemon.env, "COLUMNS": "120"}, start_new_session=True)
    sessions.append(shell)
    wait_for(lambda: frames_shown(daemon.data_dir) > 5, timeout=90, what="playback")
    os.killpg(shell.pid, signal.SIGINT)
    shell.wait(timeout=60)
    wait_for(lambda: (tmp_path / "rc").exists() and (tmp_path / "rc").read_text().strip(),
             timeout=30, what="the daemon's exit status")
    stopped_cleanly(daemon, int((tmp_path / "rc").read_text()), "SIGINT")
