"""Stopping the daemon: a closed terminal's SIGHUP is a clean, recorded stop; `dreamd
stop` asks through the ledger and waits, and says plainly when no daemon runs or when
the one running does not answer. Real daemons, real signals, a real ledger."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
from datetime import datetime, timedelta, timezone

import pytest

from dreamd.cli.stop import EXIT_NO_ANSWER, EXIT_NOT_RUNNING, EXIT_STOPPED
from dreamd.ledger import controls as ledger_controls
from dreamd.workers import controls
from tests.conftest import dreamd_cmd, wait_for, worker_context
from tests.test_daemon import STOP_DEADLINE, holds_pid_file, wait_in


def dreamd(env, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(dreamd_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=timeout)


def ledger(data_dir, sql: str, *params) -> list[tuple]:
    conn = sqlite3.connect(data_dir / "dreamd.db", timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def live_run(daemon, proc) -> bool:
    """The daemon has taken its pid file and recorded its run (what `dreamd stop` and
    `dreamd status` see as a running daemon)."""
    if not holds_pid_file(daemon, proc):
        return False
    try:
        return bool(ledger(daemon.data_dir, "SELECT 1 FROM daemon_runs WHERE pid = ? AND "
                           "stopped_at IS NULL", proc.pid))
    except sqlite3.OperationalError:
        return False


def start(daemon):
    proc = daemon.start()
    wait_in(daemon, lambda: live_run(daemon, proc), "the daemon's run recorded")
    return proc


def last_run(data_dir) -> tuple:
    return ledger(data_dir, "SELECT pid, stopped_at, exit_reason FROM daemon_runs "
                  "ORDER BY id DESC LIMIT 1")[0]


def status(env) -> dict:
    out = dreamd(env, "status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# ---------------------------------------------------------------- SIGHUP

@pytest.mark.slow
def test_a_closed_terminal_s_sighup_is_a_clean_recorded_stop(daemon, dreamd_env):
    """A closed terminal sends SIGHUP: the daemon stops as on SIGTERM (exit 0, leases
    released, the stop in daemon_runs), so the next look at the data dir says stopped,
    not died."""
    # a daemon started with SIGHUP ignored (this test run under nohup) keeps it ignored
    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        proc = start(daemon)
    finally:
        signal.signal(signal.SIGHUP, before)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=STOP_DEADLINE) == 0, daemon.output()[-3000:]
    pid, stopped_at, reason = last_run(daemon.data_dir)
    assert pid == proc.pid and stopped_at is not None and reason == "signal SIGHUP"
    assert ledger(daemon.data_dir, "SELECT count(*) FROM keyframes WHERE state = "
                  "'executing'") == [(0,)]
    found = status(dreamd_env)
    assert found["alive"] is False and "died" not in found["daemon"]
    assert "signal SIGHUP" in found["daemon"]
    assert not (daemon.data_dir / "dreamd.pid").exists()


# ---------------------------------------------------------------- dreamd stop, for real

@pytest.mark.slow
def test_dreamd_stop_stops_a_running_daemon_and_waits_for_it(daemon, dreamd_env):
    proc = start(daemon)
    out = dreamd(dreamd_env, "stop")
    assert out.returncode == EXIT_STOPPED, out.stdout + out.stderr + daemon.output()[-3000:]
    assert f"pid {proc.pid}" in out.stdout and "stopped:" in out.stdout
    # `dreamd stop` returned once the stop was recorded; the process exits right after
    assert proc.wait(timeout=STOP_DEADLINE) == 0, daemon.output()[-3000:]
    pid, stopped_at, reason = last_run(daemon.data_dir)
    assert stopped_at is not None and reason == "stopped by `dreamd stop`"
    assert ledger(daemon.data_dir, "SELECT command, state FROM controls "
                  "WHERE command = 'stop'") == [("stop", "applied")]
    again = dreamd(dreamd_env, "stop")
    assert again.returncode == EXIT_NOT_RUNNING and "no daemon running" in again.stdout


@pytest.mark.slow
def test_dreamd_stop_right_after_the_start_stops_it(daemon, dreamd_env):
    """Asked as soon as the daemon holds its pid file, before (or just after) it records
    its run: `dreamd stop` waits for the run and stops it."""
    proc = daemon.start()
    wait_in(daemon, lambda: holds_pid_file(daemon, proc), "the daemon's pid file")
    out = dreamd(dreamd_env, "stop")
    assert out.returncode == EXIT_STOPPED, out.stdout + out.stderr + daemon.output()[-3000:]
    assert proc.wait(timeout=STOP_DEADLINE) == 0, daemon.output()[-3000:]
    assert last_run(daemon.data_dir)[2] == "stopped by `dreamd stop`"


def _stop_frozen(daemon, proc) -> None:
    """SIGSTOP the daemon at a moment it holds no write lock on the ledger (a freeze
    inside a write is the other case `dreamd stop` names; this test wants the control
    written and left unread)."""
    def frozen_and_unlocked() -> bool:
        os.kill(proc.pid, signal.SIGSTOP)
        conn = sqlite3.connect(daemon.data_dir / "dreamd.db", timeout=0.5,
                               isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            os.kill(proc.pid, signal.SIGCONT)
            return False
        finally:
            conn.close()
    wait_for(frozen_and_unlocked, timeout=60, interval=0.3, what="a freeze outside a write")


@pytest.mark.slow
def test_dreamd_stop_names_the_pid_of_a_daemon_that_does_not_answer(daemon, dreamd_env):
    """A frozen daemon (SIGSTOP) never reads the control: `dreamd stop` gives up after
    --timeout with exit 4, the pid and how to end it; the stop stays asked, so the
    daemon, once thawed, stops cleanly on its own."""
    proc = start(daemon)
    _stop_frozen(daemon, proc)
    try:
        out = dreamd(dreamd_env, "stop", "--timeout", "2")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert out.returncode == EXIT_NO_ANSWER, out.stdout + out.stderr
    assert f"pid {proc.pid}" in out.stdout and "did not stop within 2 s" in out.stdout
    assert f"kill {proc.pid}" in out.stdout and "stays asked" in out.stdout
    assert proc.wait(timeout=STOP_DEADLINE) == 0, daemon.output()[-3000:]
    assert last_run(daemon.data_dir)[2] == "stopped by `dreamd stop`"


# ---------------------------------------------------------------- dreamd stop, no daemon

def _run_row(db_path, *, pid: int, stopped: bool, beat_age: float = 0.0) -> int:
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    beat = (now - timedelta(seconds=beat_age)).isoformat(sep=" ")
    conn = sqlite3.connect(db_path)
    try:
        with conn:
            cur = conn.execute(
                "INSERT INTO daemon_runs (pid, host, version, started_at, heartbeat_at, "
                "stopped_at, exit_reason) VALUES (?, ?, 'test', ?, ?, ?, ?)",
                (pid, socket.gethostname(), beat, beat, beat if stopped else None,
                 "signal SIGTERM" if stopped else None))
            return cur.lastrowid
    finally:
        conn.close()


def test_dreamd_stop_without_a_ledger_says_no_daemon_runs(dreamd_env, monkeypatch, capsys,
                                                         tmp_path):
    monkeypatch.setenv("DREAMD_DATA_DIR", dreamd_env["DREAMD_DATA_DIR"])
    monkeypatch.chdir(tmp_path)
    rc, out = stop_here(capsys)
    assert rc == EXIT_NOT_RUNNING
    assert out.strip().startswith("no daemon running: no ledger at")


@pytest.fixture
def data(dreamd_env, ledger_template, monkeypatch):
    """A data dir with a migrated ledger, for `dreamd stop` run in-process (main())."""
    from pathlib import Path

    data = Path(dreamd_env["DREAMD_DATA_DIR"])
    data.mkdir()
    shutil.copy(ledger_template, data / "dreamd.db")
    monkeypatch.setenv("DREAMD_DATA_DIR", str(data))
    monkeypatch.chdir(data)          # no ./dreamd.toml of the checkout's
    return data


def stop_here(capsys, *args: str) -> tuple[int, str]:
    from dreamd.cli import main
    rc = main(["stop", *args])
    return rc, capsys.readouterr().out


@pytest.fixture
def other_process():
    """A live process that is not this one (pids dreamd must name, or wait for)."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("stopped,beat_age,said", [
    (True, 0.0, "stopped"),          # the last run recorded its stop
    (False, 600.0, "died"),          # it never did and its heartbeat is old
])
def test_dreamd_stop_when_no_daemon_runs_asks_nothing(data, capsys, stopped, beat_age, said):
    """No live run: exit 3 with the status's own line, and no control written (a stop
    waiting in the ledger must not end the next daemon)."""
    _run_row(data / "dreamd.db", pid=999_999, stopped=stopped, beat_age=beat_age)
    rc, out = stop_here(capsys)
    assert rc == EXIT_NOT_RUNNING, out
    assert out.startswith("no daemon running") and said in out
    assert ledger(data, "SELECT count(*) FROM controls") == [(0,)]


def test_dreamd_stop_gives_up_after_its_timeout_on_a_live_run_that_reads_nothing(
        data, capsys, other_process):
    """A run that looks alive (fresh heartbeat, its pid exists) but whose controls worker
    never reads: exit 4 after --timeout, naming the pid to end."""
    run = _run_row(data / "dreamd.db", pid=other_process, stopped=False)
    rc, out = stop_here(capsys, "--timeout", "0.5")
    assert rc == EXIT_NO_ANSWER, out
    assert f"daemon run {run} (pid {other_process} on {socket.gethostname()})" in out
    assert "has not read it" in out and f"kill {other_process}" in out
    assert ledger(data, "SELECT command, args, state FROM controls") == [
        ("stop", json.dumps({"run": run}), "available")]


def test_dreamd_stop_waits_for_a_starting_daemon_and_names_one_stuck_starting(
        data, capsys, other_process):
    """The pid file comes before the run row (the ledger migrates in between): a live
    process holding it is a daemon starting. One that records no run within --timeout
    is named, exit 4, not called absent."""
    _run_row(data / "dreamd.db", pid=999_999, stopped=True)
    (data / "dreamd.pid").write_text(f"{other_process}\n")
    rc, out = stop_here(capsys, "--timeout", "0.5")
    assert rc == EXIT_NO_ANSWER, out
    assert f"daemon pid {other_process} is starting" in out
    assert f"pid {other_process} holds {data / 'dreamd.pid'} but recorded no run" in out
    assert f"kill {other_process}" in out


def test_dreamd_stop_returns_once_the_run_records_its_stop(data, capsys, other_process):
    """The whole exchange, the daemon's side in a thread: the controls worker applies the
    stop for its run, and the run records its stop (what the daemon's wait does);
    `dreamd stop` sees it and exits 0."""
    db = data / "dreamd.db"
    run = _run_row(db, pid=other_process, stopped=False)
    gen = worker_context(db, "")
    ctx = next(gen)
    ctx.run_id = run
    done = threading.Event()

    def daemon_side():
        while not done.is_set():
            controls.tick(ctx)
            if ctx.facts.get("stop_requested"):
                with sqlite3.connect(db) as conn:
                    conn.execute("UPDATE daemon_runs SET stopped_at = heartbeat_at, "
                                 "exit_reason = ? WHERE id = ?", (ctx.facts["stop_requested"],
                                                                  run))
                return
            done.wait(0.05)

    worker = threading.Thread(target=daemon_side)
    worker.start()
    try:
        rc, out = stop_here(capsys, "--timeout", "120")
    finally:
        done.set()
        worker.join()
        gen.close()
    assert rc == EXIT_STOPPED, out
    assert out.splitlines()[-1] == (f"stopped: daemon run {run} (pid {other_process} on "
                                    f"{socket.gethostname()}), stopped by `dreamd stop`")


# ---------------------------------------------------------------- the control itself

@pytest.fixture
def ctx(db_path):
    yield from worker_context(db_path, "")


def test_a_stop_control_stops_the_run_it_names_and_no_other(ctx):
    with ctx.engine.begin() as conn:
        other = ledger_controls.request(conn, "stop", {"run": ctx.run_id + 7})
        mine = ledger_controls.request(conn, "stop", {"run": ctx.run_id})
    controls.tick(ctx)
    states = dict(ledger(ctx.cfg.data_dir, "SELECT id, state || ':' || coalesce(error, '') "
                         "FROM controls"))
    assert states[other] == (f"rejected:meant for daemon run {ctx.run_id + 7}, which is "
                             f"gone; this is run {ctx.run_id}")
    assert states[mine] == "applied:"
    assert ctx.facts["stop_requested"] == "stopped by `dreamd stop`"


def test_the_daemon_s_wait_ends_on_an_applied_stop(ctx):
    from dreamd.daemon import Daemon

    d = Daemon(ctx.cfg)
    d.ctx = ctx
    assert d.wait_for_stop(0.3) is False            # nothing asked: the duration ends it
    ctx.facts["stop_requested"] = "stopped by `dreamd stop`"
    assert d.wait_for_stop(None) is True and d.stop_reason == "stopped by `dreamd stop`"


def test_dreamd_stop_does_not_import_torch(dreamd_env):
    import sys

    from tests.test_cli_imports import PROBE

    subprocess.run(dreamd_cmd("db", "upgrade"), env=dreamd_env, check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-c", PROBE, "stop"], env=dreamd_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_NOT_RUNNING, proc.stderr
    imported = json.loads(proc.stdout.rsplit("IMPORTED=", 1)[1])
    assert "torch" not in imported and "numpy" not in imported, imported
