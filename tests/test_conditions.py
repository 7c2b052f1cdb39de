"""The conditions of the machine (dreamd/conditions.py) in-process: which errors are a
full disk, a busy or read-only ledger, a forbidden folder (and which are real failures);
each said once in the log when it starts and once when it ends, in words, and named in
status.json's `problem` while it lasts; a job that hit one waits without using up an
attempt, even when the ledger cannot record that at once; the stop's reserve."""

from __future__ import annotations

import errno
import logging
import sqlite3

import pytest
import sqlalchemy.exc
from sqlalchemy import text

from dreamd import conditions as cond
from dreamd.conditions import (DISK_FULL, EXPLAIN, LEDGER_BUSY, PERMISSION, READ_ONLY,
                               Conditions, classify)
from dreamd.errors import IllegalTransitionError
from dreamd.ledger import transitions as tr
from tests.conftest import worker_context


def os_error(code: int) -> OSError:
    return OSError(code, errno.errorcode[code])


@pytest.mark.parametrize("exc, kind", [
    (os_error(errno.ENOSPC), DISK_FULL),
    (os_error(errno.EDQUOT), DISK_FULL),
    (os_error(errno.EACCES), PERMISSION),
    (PermissionError(errno.EPERM, "Operation not permitted"), PERMISSION),
    (os_error(errno.EROFS), READ_ONLY),
    (os_error(errno.ENOENT), None),                       # a missing file is a failure
    (sqlite3.OperationalError("database is locked"), LEDGER_BUSY),
    (sqlite3.OperationalError("database is busy"), LEDGER_BUSY),
    (sqlite3.OperationalError("database table is locked: frames"), LEDGER_BUSY),
    (sqlite3.OperationalError("database or disk is full"), DISK_FULL),
    (sqlite3.OperationalError("attempt to write a readonly database"), READ_ONLY),
    (sqlite3.OperationalError("no such table: frames"), None),
    # libraries that wrap the OS error in their own text (safetensors, Rust's io)
    (RuntimeError("I/O error: No space left on device (os error 28)"), DISK_FULL),
    (RuntimeError("Error while serializing: os error 28"), DISK_FULL),
    (RuntimeError("Read-only file system (os error 30)"), READ_ONLY),
    (RuntimeError("Permission denied (os error 13)"), PERMISSION),
    (RuntimeError("Permission denied"), None),              # no code: not recognised
    (ValueError("bad value"), None),
    (None, None),
])
def test_classify_names_the_condition_or_none(exc, kind):
    assert classify(exc) == kind


def test_classify_reads_sqlalchemys_wrapped_driver_error_and_the_chain():
    # built, not raised: no __cause__, only SQLAlchemy's `orig` leads to the driver's error
    wrapped = sqlalchemy.exc.OperationalError("UPDATE frames …", {},
                                              sqlite3.OperationalError("database or disk is full"))
    assert wrapped.__cause__ is None and classify(wrapped) == DISK_FULL
    itself = sqlalchemy.exc.OperationalError("SELECT 1", {}, ValueError("x"))
    itself.orig = itself                                   # never followed into itself
    assert classify(itself) is None
    try:
        try:
            raise os_error(errno.ENOSPC)
        except OSError as inner:
            raise RuntimeError("could not save the frame") from inner
    except RuntimeError as outer:
        assert classify(outer) == DISK_FULL                 # the cause is what counts
    try:
        try:
            raise os_error(errno.EROFS)
        except OSError:
            raise KeyError("while handling it")           # the context, implicitly
    except KeyError as outer:
        assert classify(outer) == READ_ONLY


def chain(depth: int, root: BaseException) -> BaseException:
    exc = root
    for i in range(depth - 1):
        outer = RuntimeError(f"level {i}")
        outer.__cause__ = exc
        exc = outer
    return exc


def test_classify_looks_eight_causes_deep_and_a_cycle_cannot_hang_it():
    assert classify(chain(8, os_error(errno.ENOSPC))) == DISK_FULL
    assert classify(chain(9, os_error(errno.ENOSPC))) is None
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert classify(a) is None


# ---------------------------------------------------------------- said once, in words

def said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dreamd"]


def test_a_condition_is_said_once_when_it_starts_and_once_when_it_ends(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="dreamd")
    now = [1000.0]
    monkeypatch.setattr(cond.time, "monotonic", lambda: now[0])
    c = Conditions()
    assert (c.active(), c.active(DISK_FULL), c.summary()) == (False, False, None)
    c.report(DISK_FULL, "keyframe 3", os_error(errno.ENOSPC))
    c.report(DISK_FULL, "frame 7", os_error(errno.ENOSPC))    # in force: not said again
    c.report(LEDGER_BUSY, "status.json")                     # no exception to show
    assert said(caplog) == [
        f"keyframe 3: disk full ([Errno 28] ENOSPC); {EXPLAIN[DISK_FULL]}",
        f"status.json: ledger busy; {EXPLAIN[LEDGER_BUSY]}"]
    assert c.active() and c.active(DISK_FULL) and not c.active(READ_ONLY)
    assert c.summary() == f"disk full: {EXPLAIN[DISK_FULL]}; ledger busy: {EXPLAIN[LEDGER_BUSY]}"
    caplog.clear()
    now[0] += 42.4
    c.clear(DISK_FULL, READ_ONLY)                            # READ_ONLY was not in force
    assert said(caplog) == ["disk full is over after 42 s; carrying on"]
    assert c.summary() == f"ledger busy: {EXPLAIN[LEDGER_BUSY]}"
    caplog.clear()
    c.report("mystery", "somewhere")                         # a kind with no explanation
    assert said(caplog) == ["somewhere: mystery; "]
    assert c.summary() == f"ledger busy: {EXPLAIN[LEDGER_BUSY]}; mystery: "
    c.clear()                                                # all of them
    assert not c.active() and c.summary() is None
    assert said(caplog)[1:] == ["ledger busy is over after 42 s; carrying on",
                                "mystery is over after 0 s; carrying on"]


def test_the_log_shows_the_drivers_first_line_cut_at_200_characters(caplog):
    caplog.set_level(logging.INFO, logger="dreamd")
    wrapped = sqlalchemy.exc.OperationalError("UPDATE …", {}, sqlite3.OperationalError(
        "database or disk is full\nsecond line"))
    Conditions().report(DISK_FULL, "ledger", wrapped)
    assert said(caplog) == [f"ledger: disk full (database or disk is full); {EXPLAIN[DISK_FULL]}"]
    caplog.clear()
    Conditions().report(READ_ONLY, "x", RuntimeError("r" * 300))
    assert said(caplog) == [f"x: read-only file system ({'r' * 200}); {EXPLAIN[READ_ONLY]}"]


def test_environment_recovered_clears_the_file_conditions_not_a_busy_ledger(db_path):
    for ctx in worker_context(db_path, ""):
        for kind in (DISK_FULL, PERMISSION, READ_ONLY, LEDGER_BUSY):
            ctx.conditions.report(kind, "test")
        cond.environment_recovered(ctx)
        assert ctx.conditions.summary() == f"ledger busy: {EXPLAIN[LEDGER_BUSY]}"


# ---------------------------------------------------------------- a job that hit one

@pytest.fixture
def ctx(db_path):
    yield from worker_context(db_path, "")


def claimed_keyframe(ctx, owner: str) -> int:
    with ctx.engine.begin() as conn:
        kid = tr.create(conn, "keyframe", {
            "chain_index": 3, "backend": "procedural", "theme": "t", "prompt": "p", "seed": 1,
            "denoise": 0.3, "source": "seed", "width": 8, "height": 8, "max_attempts": 3})
        (row,) = tr.claim(conn, "keyframe", owner, lease_seconds=60)
    assert row.id == kid
    return kid


def keyframe_row(ctx, kid: int):
    with ctx.reader.connect() as conn:
        return conn.execute(text("SELECT state, attempt, error, lease_owner FROM keyframes "
                                 "WHERE id = :i"), {"i": kid}).one()


def test_postpone_for_puts_the_job_back_without_an_attempt_and_says_why(ctx, caplog):
    caplog.set_level(logging.INFO, logger="dreamd")
    kid = claimed_keyframe(ctx, "me")
    assert cond.postpone_for(ctx, "keyframe", kid, "me", ValueError("a bug")) is False
    assert keyframe_row(ctx, kid) == ("executing", 1, None, "me")      # not a condition
    assert cond.postpone_for(ctx, "keyframe", kid, "me", os_error(errno.ENOSPC)) is True
    assert keyframe_row(ctx, kid) == ("retryable", 0, "disk full: [Errno 28] ENOSPC", None)
    assert said(caplog) == [f"keyframe {kid}: disk full ([Errno 28] ENOSPC); "
                            f"{EXPLAIN[DISK_FULL]}"]
    assert ctx.owed_postpones == {}


def test_postpone_for_a_job_whose_lease_was_lost_leaves_it_to_its_holder(ctx):
    kid = claimed_keyframe(ctx, "other")
    assert cond.postpone_for(ctx, "keyframe", kid, "me", os_error(errno.EROFS)) is True
    assert keyframe_row(ctx, kid) == ("executing", 1, None, "other")
    assert ctx.owed_postpones == {}


def test_owed_postpones_are_settled_by_their_owner_only_and_counted(ctx):
    mine, lost = claimed_keyframe(ctx, "me"), claimed_keyframe(ctx, "other")
    ctx.owed_postpones[("keyframe", mine)] = ("me", "disk full: x")
    ctx.owed_postpones[("keyframe", lost)] = ("me", "disk full: y")   # claimed by another
    assert cond.settle_postpones(ctx) == 1
    assert ctx.owed_postpones == {}
    assert keyframe_row(ctx, mine) == ("retryable", 0, "disk full: x", None)
    assert keyframe_row(ctx, lost) == ("executing", 1, None, "other")
    assert cond.settle_postpones(ctx) == 0


def test_an_owed_postpone_that_fails_for_another_reason_is_raised(ctx):
    ctx.owed_postpones[("nonsense", 1)] = ("me", "disk full: x")
    with pytest.raises(IllegalTransitionError):
        cond.settle_postpones(ctx)
    assert ctx.owed_postpones == {("nonsense", 1): ("me", "disk full: x")}


def test_a_ledger_still_full_keeps_every_owed_postpone(db_path, tmp_path):
    import shutil

    from tests.conftest import mount_tmpfs
    from tests.test_faults_disk_full import fill

    for disk in mount_tmpfs(tmp_path / "disk", "16m"):
        shutil.copy(db_path, disk / "dreamd.db")
        for ctx in worker_context(disk / "dreamd.db", ""):
            a, b = claimed_keyframe(ctx, "me"), claimed_keyframe(ctx, "me")
            ctx.owed_postpones.update({("keyframe", a): ("me", "disk full: a"),
                                       ("keyframe", b): ("me", "disk full: b")})
            ballast = fill(disk)
            assert cond.settle_postpones(ctx) == 0          # refused: tried again later
            assert len(ctx.owed_postpones) == 2
            ballast.unlink()
            assert cond.settle_postpones(ctx) == 2
            assert keyframe_row(ctx, a)[:2] == keyframe_row(ctx, b)[:2] == ("retryable", 0)


# ---------------------------------------------------------------- the stop's reserve

def test_the_reserve_is_a_mebibyte_made_once_and_given_back_at_a_stop(tmp_path):
    path = tmp_path / cond.RESERVE_NAME
    cond.make_reserve(tmp_path)
    assert path.stat().st_size == cond.RESERVE_BYTES == 1 << 20
    before = path.stat().st_mtime_ns
    cond.make_reserve(tmp_path)                                # already there: untouched
    assert path.stat().st_mtime_ns == before
    path.write_bytes(b"short")                                 # a partial one is redone
    cond.make_reserve(tmp_path)
    assert path.stat().st_size == cond.RESERVE_BYTES
    assert cond.release_reserve(tmp_path) is True and not path.exists()
    assert cond.release_reserve(tmp_path) is False


def test_no_room_for_the_reserve_leaves_no_partial_file(tmp_path):
    from tests.conftest import mount_tmpfs

    for disk in mount_tmpfs(tmp_path / "disk", "512k"):        # smaller than the reserve
        cond.make_reserve(disk)
        assert list(disk.iterdir()) == []
