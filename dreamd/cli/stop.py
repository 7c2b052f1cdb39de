"""`dreamd stop`: ask the running daemon to stop the way every surface asks for anything,
a `stop` control in the ledger (dreamd/ledger/controls.py), so a daemon started by the
Rainmeter skin, at login or on another host sharing the data dir is reached too; then
wait for it to record its stop. sqlite3 and SQLAlchemy only: no torch.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable

from dreamd.ledger import read_model

EXIT_STOPPED = 0
EXIT_FAILED = 1          # the control was rejected, or the daemon died without its stop
EXIT_NOT_RUNNING = 3     # nothing to stop (LSB's "program is not running")
EXIT_NO_ANSWER = 4       # asked, but no stop recorded within --timeout
DEFAULT_TIMEOUT = 60.0   # above the daemon's own worst case for a clean stop (about 30 s)
POLL = 0.2


def _read(db_path: Path, sql: str, params: tuple = ()) -> dict | None:
    conn = read_model.connect(db_path)
    try:
        cur = conn.execute(sql, params)
        row = cur.fetchone()
        return dict(zip([d[0] for d in cur.description], tuple(row))) if row else None
    finally:
        conn.close()


def _last_run(db_path: Path) -> dict | None:
    return _read(db_path, "SELECT * FROM daemon_runs ORDER BY id DESC LIMIT 1")


def _pid_file_owner(pid_path: Path) -> int | None:
    """The live process named by the pid file on this host, if any (a daemon still
    starting: its pid file comes before its run row)."""
    try:
        pid = int(pid_path.read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid and pid != os.getpid() and read_model.pid_alive(pid) else None


def _live_run(cfg, timeout: float, say: Callable[[str], None]) -> dict | None:
    """The run to stop: the last one when alive; else, when a live process holds the
    pid file (a daemon starting, its ledger migrating), its run once recorded."""
    run = _last_run(cfg.db_path)
    if read_model.liveness(run).alive:
        return run
    starting = _pid_file_owner(cfg.pid_path)
    if starting is None:
        return None
    say(f"daemon pid {starting} is starting; waiting for it to record its run")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and read_model.pid_alive(starting):
        run = _last_run(cfg.db_path)
        if run and run["pid"] == starting and run["host"] == socket.gethostname() \
                and read_model.liveness(run).alive:
            return run
        time.sleep(POLL)
    return None


def _kill_hint(run: dict) -> str:
    pid, host = run["pid"], run["host"]
    here = host == socket.gethostname()
    where = "" if here else f" on {host} (that machine)"
    if os.name == "nt":
        how = f"`taskkill /PID {pid}` (add /F if it stays)"
    else:
        how = (f"`kill {pid}` (a clean stop too, if it can still act), then `kill -9 {pid}` "
               f"if it stays (a process stopped with SIGSTOP needs `kill -CONT {pid}`)")
    return f"to end it now{where}: {how}"


def stop(cfg, timeout: float = DEFAULT_TIMEOUT,
         say: Callable[[str], None] = print) -> int:
    from sqlalchemy.exc import OperationalError

    from dreamd.ledger import database
    from dreamd.ledger.controls import request

    if not cfg.db_path.exists() or database.current_revision(cfg.db_path) is None:
        say(f"no daemon running: no ledger at {cfg.db_path} yet")
        return EXIT_NOT_RUNNING
    run = _live_run(cfg, timeout, say)
    if run is None:
        starting = _pid_file_owner(cfg.pid_path)
        if starting is not None:
            say(f"pid {starting} holds {cfg.pid_path} but recorded no run within "
                f"{timeout:g} s: it may be stuck starting (see "
                f"{cfg.logs_dir / 'dreamd.log'}); "
                f"{_kill_hint({'pid': starting, 'host': socket.gethostname()})}")
            return EXIT_NO_ANSWER
        say(read_model.liveness(_last_run(cfg.db_path)).line)
        return EXIT_NOT_RUNNING
    label = f"daemon run {run['id']} (pid {run['pid']} on {run['host']})"
    engine = database.writer(cfg.db_path, pool=False)
    try:
        with engine.begin() as conn:
            cid = request(conn, "stop", {"run": run["id"]})
    except OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise
        # a daemon frozen inside a write (SIGSTOP, a hung disk) holds the ledger's lock:
        # it cannot hear a control either
        say(f"{label}: the ledger stays locked, so it cannot be asked to stop (a daemon "
            f"frozen mid-write holds the lock); {_kill_hint(run)}")
        return EXIT_NO_ANSWER
    finally:
        engine.dispose()
    say(f"asked {label} to stop (control {cid}); waiting up to {timeout:g} s")
    deadline = time.monotonic() + timeout
    here = run["host"] == socket.gethostname()
    while True:
        now = _read(cfg.db_path, "SELECT stopped_at, exit_reason FROM daemon_runs WHERE id = ?",
                    (run["id"],)) or {}
        if now.get("stopped_at") is not None:
            say(f"stopped: {label}, {now.get('exit_reason') or 'stopped'}")
            return EXIT_STOPPED
        control = _read(cfg.db_path, "SELECT state, error FROM controls WHERE id = ?", (cid,))
        if control and control["state"] == "rejected":
            say(f"{label} rejected the stop: {control['error']}")
            return EXIT_FAILED
        if here and not read_model.pid_alive(run["pid"]):
            say(f"{label} exited without recording its stop (the next start reports it as "
                f"died); see {cfg.logs_dir / 'dreamd.log'}")
            return EXIT_FAILED
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL)
    said = "has not read it" if control and control["state"] == "available" else \
        "read it but has not finished stopping"
    say(f"{label} did not stop within {timeout:g} s: it {said}; it may be busy or hung "
        f"(see {cfg.logs_dir / 'dreamd.log'}). The stop stays asked: it stops when it "
        f"reads it; {_kill_hint(run)}; or wait longer with `dreamd stop --timeout SECONDS`")
    return EXIT_NO_ANSWER
