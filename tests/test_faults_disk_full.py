"""Issue 10, item 6: a full disk. The data dir lives on a small tmpfs filled up by a
ballast file: the daemon says so once (not a traceback per write), uses up no
attempts, keeps status.json honest, resumes by itself when space is freed, and a
SIGTERM while the disk is full exits 0."""

from __future__ import annotations

import errno
import json
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from tests import invariants
from tests.conftest import FAST_CONFIG, DaemonRunner, mount_tmpfs, wait_for


@pytest.fixture
def small_disk(tmp_path):
    yield from mount_tmpfs(tmp_path / "data", "40m")


def fill(disk: Path) -> Path:
    """Fill the file system to the last byte; returns the ballast file."""
    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return ballast


def status(disk: Path) -> dict:
    try:
        return json.loads((disk / "output" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def counts(daemon) -> dict:
    engine = daemon.db()
    try:
        with engine.connect() as conn:
            return {"discarded": conn.execute(text(
                        "SELECT (SELECT count(*) FROM keyframes WHERE state = 'discarded') + "
                        "(SELECT count(*) FROM interpolations WHERE state = 'discarded')")).scalar(),
                    "keyframes": conn.execute(text(
                        "SELECT count(*) FROM keyframes WHERE state = 'completed'")).scalar()}
    finally:
        engine.dispose()


@pytest.mark.slow
def test_a_full_disk_waits_resumes_by_itself_and_stops_cleanly(dreamd_env, tmp_path, small_disk):
    # the free-space floor (storage.min_free_gb) would pause generation before the disk
    # fills; turned off, the writes themselves meet ENOSPC
    daemon = DaemonRunner(dreamd_env, tmp_path, FAST_CONFIG + "[storage]\nmin_free_gb = 0\n"
                          "budget_gb = 0\n")
    log = small_disk / "logs" / "dreamd.log"
    proc = daemon.start()
    try:
        wait_for(lambda: status(small_disk).get("frame_number", 0) > 10, timeout=90,
                 what=f"playback:\n{daemon.output()[-2000:]}")
        ballast = fill(small_disk)
        lines_before = len(daemon.output().splitlines())
        wait_for(lambda: "disk full" in (status(small_disk).get("problem") or ""), timeout=60,
                 what="status.json to say the disk is full")
        time.sleep(8)                           # full for a while: many writes fail
        assert proc.poll() is None
        assert counts(daemon)["discarded"] == 0
        assert "disk full" in daemon.output()
        # one message, then quiet: not a traceback per failed write
        assert len(daemon.output().splitlines()) - lines_before < 100, daemon.output()[-3000:]
        made = counts(daemon)["keyframes"]
        ballast.unlink()                        # space again: it resumes by itself
        wait_for(lambda: counts(daemon)["keyframes"] > made + 2, timeout=90,
                 what=f"generation to resume:\n{daemon.output()[-2000:]}")
        wait_for(lambda: status(small_disk).get("problem") is None, timeout=30,
                 what="the problem to clear")
        fill(small_disk)                        # and full again, for the stop
        wait_for(lambda: "disk full" in (status(small_disk).get("problem") or ""), timeout=60,
                 what="the disk full again")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0, daemon.output()[-3000:]
    (small_disk / "ballast").unlink()
    assert counts(daemon)["discarded"] == 0
    output = daemon.output()
    assert "Traceback" not in output and "Logging error" not in output, output[-4000:]
    assert log.exists()
    engine = daemon.db()
    with engine.connect() as conn:
        run = conn.execute(text("SELECT * FROM daemon_runs ORDER BY id DESC")).first()
        executing = conn.execute(text("SELECT count(*) FROM keyframes WHERE state = "
                                      "'executing'")).scalar()
    engine.dispose()
    # the reserve kept at start let the ledger record the stop on the full disk
    assert run.exit_reason == "signal SIGTERM" and executing == 0
    # files a commit could not name are the next start's to reconcile, as after a crash
    result = daemon.run(4)
    assert result.returncode == 0, result.stdout[-3000:]
    assert counts(daemon)["discarded"] == 0
    invariants.check(small_disk)
    invariants.distinct_frame_files(small_disk)
