"""The ledger's plumbing in-process, on real SQLite files (issue 16): the connections
(WAL, busy timeout, BEGIN IMMEDIATE, read-only readers), the migrations' checks, the
read-side queries, the read model without SQLAlchemy, `dreamd sql`'s shell and
output, and the one-line explanation of an unusable ledger file. What the README
promises ("The ledger", "Troubleshooting"), checked exactly enough to tell a changed
line from the real one."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from dreamd.errors import LedgerError, LedgerUnusableError, UsageError
from dreamd.ledger import database, queries, read_model, unusable
from dreamd.ledger import sql as shell_sql
from dreamd.ledger.models import (DaemonRun, Frame, Interpolation, Keyframe, RuntimeState,
                                  utcnow)

NOW = datetime(2030, 6, 1, 12, 0, 0, 250000)


def other_writer_busy(path: Path) -> bool:
    """Whether another connection is refused the write lock at once."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
        return True
    finally:
        other.close()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ================================================================ database.py

def test_writer_connections_are_wal_normal_with_foreign_keys_and_busy_timeout(tmp_path):
    path = tmp_path / "a" / "b" / "dreamd.db"           # folders made as needed
    eng = database.writer(path)
    try:
        with eng.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1     # NORMAL
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    finally:
        eng.dispose()
    assert path.exists()
    eng = database.writer(path, foreign_keys=False)        # the folders exist now
    try:
        with eng.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 0
    finally:
        eng.dispose()


def test_a_writer_transaction_takes_the_write_lock_at_begin(db_path):
    eng = database.writer(db_path)
    try:
        assert not other_writer_busy(db_path)
        with eng.begin() as conn:
            conn.execute(text("SELECT 1")).scalar()    # a read only: still the lock
            assert other_writer_busy(db_path)
        assert not other_writer_busy(db_path)
    finally:
        eng.dispose()


def test_a_writer_waits_for_a_lock_instead_of_failing(db_path):
    """busy_timeout: a writer blocked by another process's short transaction waits."""
    holder = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    released = threading.Timer(0.3, lambda: holder.execute("ROLLBACK"))
    eng = database.writer(db_path)
    try:
        released.start()
        with eng.begin() as conn:
            conn.execute(insert(Keyframe.__table__).values(
                chain_index=0, backend="procedural", theme="t", prompt="p", seed=1,
                denoise=1.0, source="seed", width=8, height=8))
        with eng.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM keyframes")).scalar() == 1
    finally:
        released.join()
        holder.close()
        eng.dispose()


def test_pooled_engines_reuse_a_connection_and_share_it_across_threads(db_path):
    for make in (database.writer, database.reader):
        eng = make(db_path)
        try:
            with eng.connect() as conn:
                first = conn.connection.driver_connection
            got = []

            def use():
                with eng.connect() as c:
                    got.append((c.connection.driver_connection,
                                c.exec_driver_sql("SELECT count(*) FROM frames").scalar()))

            t = threading.Thread(target=use)
            t.start()
            t.join()
            assert got == [(first, 0)], make        # same connection, another thread
        finally:
            eng.dispose()
    for eng in (database.writer(db_path, pool=False), database.reader(db_path, pool=False)):
        try:
            assert isinstance(eng.pool, NullPool)
            with eng.connect() as conn:
                first = conn.connection.driver_connection
            with eng.connect() as conn:
                assert conn.connection.driver_connection is not first
        finally:
            eng.dispose()


def test_a_reader_cannot_write_and_keeps_the_defaults_it_does_not_need(db_path):
    eng = database.reader(db_path)
    try:
        with eng.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # untouched
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            with pytest.raises(OperationalError, match="readonly database"):
                conn.exec_driver_sql("DELETE FROM frames")
        with eng.begin() as conn:                   # a read transaction never locks writers
            conn.exec_driver_sql("SELECT count(*) FROM frames").scalar()
            assert not other_writer_busy(db_path)
    finally:
        eng.dispose()


def test_a_reader_from_a_relative_path_opens_that_file(db_path, monkeypatch):
    monkeypatch.chdir(db_path.parent.parent)
    eng = database.reader(Path(db_path.parent.name) / db_path.name)
    try:
        with eng.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1
    finally:
        eng.dispose()


def test_a_reader_of_a_missing_ledger_says_how_to_make_one(tmp_path):
    path = tmp_path / "none.db"
    with pytest.raises(LedgerError) as err:
        database.reader(path)
    assert str(err.value) == (f"{path}: no ledger here yet (start the daemon, or run "
                              f"`dreamd db upgrade`)")
    assert not path.exists()


def test_pragma_runs_outside_a_transaction(engine):
    assert database.pragma(engine, "PRAGMA journal_mode") == [("wal",)]
    busy, log, done = database.pragma(engine, "PRAGMA wal_checkpoint(TRUNCATE)")[0]
    assert busy == 0
    # the connection went back to the pool: a transaction can start on it
    with engine.begin() as conn:
        conn.exec_driver_sql("SELECT 1")


def test_alembic_config_points_at_the_packaged_migrations(tmp_path):
    cfg = database.alembic_config(tmp_path / "x.db")
    assert Path(cfg.get_main_option("script_location")) == database.migrations_dir()
    assert (database.migrations_dir() / "versions" / "0001_initial_ledger.py").exists()
    assert cfg.get_main_option("sqlalchemy.url") == f"sqlite+pysqlite:///{tmp_path / 'x.db'}"
    assert read_model.migrations_dir() == database.migrations_dir()


def test_revisions_run_from_base_to_head():
    revs = database.revisions()
    assert revs[0][:2] == ("0001", None)
    for (rev, _down, _msg), (_rev2, down2, _msg2) in zip(revs, revs[1:]):
        assert down2 == rev
    assert revs[-1][0] == database.head_revision() == read_model.head_revision()
    assert all(msg for _r, _d, msg in revs)
    assert len(revs) == len(list((database.migrations_dir() / "versions").glob("0*.py")))


def test_current_revision(tmp_path, db_path):
    assert database.current_revision(tmp_path / "none.db") is None
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    assert database.current_revision(empty) is None
    assert database.current_revision(db_path) == database.head_revision()
    conn = sqlite3.connect(db_path)
    conn.execute("DELETE FROM alembic_version")
    conn.commit()
    conn.close()
    assert database.current_revision(db_path) is None


def test_upgrade_and_downgrade_step_by_revision(tmp_path):
    path = tmp_path / "dreamd.db"
    database.upgrade(path, "0002")
    assert database.current_revision(path) == "0002"
    database.upgrade(path)                       # head by default
    assert database.current_revision(path) == database.head_revision()
    database.downgrade(path, "0003")
    assert database.current_revision(path) == "0003"


def test_a_migration_over_broken_foreign_keys_is_refused(tmp_path):
    """The check after a migration names the file and (at most five of) the rows."""
    path = tmp_path / "dreamd.db"
    database.upgrade(path, "0004")
    conn = sqlite3.connect(path)
    for i in range(1, 8):       # frames of keyframes that do not exist
        conn.execute("INSERT INTO frames (id, chain_index, t, kind, keyframe_id, path, state,"
                     " created_at) VALUES (?, 0, ?, 'keyframe', 99, 'x.png', 'ready', "
                     "'2030-01-01 00:00:00')", (i, i / 10))
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError) as err:
        database.upgrade(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: migration left broken foreign keys: [")
    assert msg.count("'frames'") == 5
    assert database.current_revision(path) == "0004"     # rolled back, nothing half done


def test_migrations_keep_rows_that_reference_a_recreated_table(tmp_path):
    """Batch mode recreates tables: with foreign keys on, dropping the old copy of a
    referenced table would fail or cascade. Rows survive a down-and-up."""
    path = tmp_path / "dreamd.db"
    database.upgrade(path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("INSERT INTO keyframes (id, chain_index, backend, theme, prompt, "
                 "negative_prompt, seed, denoise, source, width, height, state, attempt, "
                 "max_attempts, scheduled_at, created_at) VALUES (1, 0, 'procedural', 't', "
                 "'p', '', 1, 1.0, 'seed', 8, 8, 'completed', 1, 3, '2030-01-01 00:00:00', "
                 "'2030-01-01 00:00:00')")
    conn.execute("INSERT INTO frames (id, chain_index, t, kind, keyframe_id, path, state, "
                 "created_at) VALUES (1, 0, 0.0, 'keyframe', 1, 'k.png', 'ready', "
                 "'2030-01-01 00:00:00')")
    conn.commit()
    conn.close()
    database.downgrade(path, "0004")
    database.upgrade(path)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT id, keyframe_id FROM frames").fetchall() == [(1, 1)]
        assert conn.execute("SELECT id FROM keyframes").fetchall() == [(1,)]
    finally:
        conn.close()


# ================================================================ unusable.py

def garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is no database, just some text a copy left behind\n" * 100)
    return path


def error_of(fn) -> BaseException:
    try:
        fn()
    except Exception as exc:    # noqa: BLE001 - the error a command would have met
        return exc
    raise AssertionError("no error")


def read_ledger(path: Path) -> None:
    eng = database.reader(path, pool=False)
    try:
        with eng.connect() as conn:
            conn.execute(select(Frame.__table__)).all()
    finally:
        eng.dispose()


def test_a_garbage_ledger_is_named_and_set_aside_never_overwritten(tmp_path):
    db = garbage(tmp_path / "data" / "dreamd.db")
    before = db.read_bytes()
    exc = error_of(lambda: read_ledger(db))        # SQLAlchemy wraps the driver's error
    problem = unusable.explain(exc, db)
    assert isinstance(problem, LedgerUnusableError)
    assert str(problem) == (
        f"{db}: not a SQLite database (garbage, or truncated at the start): move it aside "
        f"(`mv {db} {db}.broken`) and dreamd starts a new ledger, or put a backup back")
    assert db.read_bytes() == before
    # without a path the message still reads
    assert str(unusable.explain(exc, None)).startswith(
        "the ledger: not a SQLite database (garbage, or truncated at the start): move it "
        "aside (`mv the ledger the ledger.broken`)")


def test_a_garbage_ledger_from_the_sqlite3_module_and_through_a_cause(tmp_path):
    db = garbage(tmp_path / "dreamd.db")
    raw = error_of(lambda: read_model.revision(read_model.connect(db)))
    assert isinstance(raw, sqlite3.DatabaseError)
    assert "not a SQLite database" in str(unusable.explain(raw, db))
    try:
        try:
            raise raw
        except sqlite3.Error as e:
            raise RuntimeError("while reading the status") from e
    except RuntimeError as wrapped:
        assert "not a SQLite database" in str(unusable.explain(wrapped, db))
    try:
        try:
            raise raw
        except sqlite3.Error:
            raise KeyError("while reading the status")    # noqa: B904 - an implicit context
    except KeyError as wrapped:
        assert "not a SQLite database" in str(unusable.explain(wrapped, db))


def test_a_damaged_ledger_says_how_to_recover_it(db_path):
    err = sqlite3.DatabaseError("database disk image is malformed")
    assert str(unusable.explain(err, db_path)) == (
        f"{db_path}: the ledger is damaged (database disk image is malformed): save what "
        f"can be saved with `sqlite3 {db_path} .recover | sqlite3 {db_path}.recovered`, then "
        f"move it aside (`mv {db_path} {db_path}.broken`) and start again")
    other = sqlite3.DatabaseError("database corruption at line 1")
    assert "the ledger is damaged (database corruption at line 1)" in str(
        unusable.explain(other, None))
    assert str(unusable.explain(other, None)).startswith("the ledger: the ledger is damaged")


def test_a_really_damaged_ledger_file(tmp_path, ledger_template):
    db = tmp_path / "dreamd.db"
    shutil.copy(ledger_template, db)
    data = bytearray(db.read_bytes())
    page = 4096
    data[page:] = b"\xff" * (len(data) - page)       # every page after the header's
    db.write_bytes(bytes(data))
    problem = unusable.explain(error_of(lambda: read_ledger(db)), db)
    assert problem is not None and "damaged" in str(problem)


@contextlib.contextmanager
def as_nobody():
    """File permissions apply meanwhile: root reads and writes anywhere, so as root the
    process becomes `nobody` (the saved uid brings root back after)."""
    root = os.geteuid() == 0
    try:
        if root:
            os.setresgid(65534, 65534, 0)
            os.setresuid(65534, 65534, 0)
        yield
    finally:
        if root:
            os.setresuid(0, 0, 0)
            os.setresgid(0, 0, 0)


@contextlib.contextmanager
def read_only_folder():
    """A folder this process cannot write to."""
    top = Path(tempfile.mkdtemp(prefix="dreamd-ro-"))
    top.chmod(0o755)
    data = top / "data"
    data.mkdir()
    data.chmod(0o555)
    try:
        with as_nobody():
            yield data
    finally:
        data.chmod(0o755)
        shutil.rmtree(top)


def test_a_read_only_data_dir_says_so():
    with read_only_folder() as data:
        exc = error_of(lambda: read_model.connect(data / "dreamd.db").execute("SELECT 1"))
        problem = unusable.explain(exc, data / "dreamd.db")
        assert str(problem) == (
            f"{data / 'dreamd.db'}: cannot write there (unable to open database file; "
            f"{data} is read-only): make {data} writable, or use --data-dir DIR for another "
            f"data dir")
        assert not (data / "dreamd.db").exists()


def test_cannot_write_messages(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    db = data / "dreamd.db"
    ro = sqlite3.OperationalError("attempt to write a readonly database")
    assert str(unusable.explain(ro, db)) == (
        f"{db}: cannot write there (attempt to write a readonly database): make {data} "
        f"writable, or use --data-dir DIR for another data dir")
    for text_ in ("unable to open database file", "disk I/O error"):
        assert str(unusable.explain(sqlite3.OperationalError(text_), db)) == (
            f"{db}: cannot write there ({text_}): make {data} writable, or use --data-dir "
            f"DIR for another data dir")
    assert str(unusable.explain(ro, None)) == (
        "the data dir: cannot write there (attempt to write a readonly database): make the "
        "data dir writable, or use --data-dir DIR for another data dir")
    for code in (errno.EACCES, errno.EPERM, errno.EROFS):
        err = PermissionError(code, os.strerror(code), str(data / "frames"))
        assert str(unusable.explain(err, db)) == (
            f"{data / 'frames'}: cannot write there ({os.strerror(code)}): make {data} "
            f"writable, or use --data-dir DIR for another data dir")
    nameless = OSError(errno.EROFS, "Read-only file system")
    assert str(unusable.explain(nameless, None)) == (
        "the data dir: cannot write there (Read-only file system): make the data dir "
        "writable, or use --data-dir DIR for another data dir")
    bare = OSError(errno.EACCES, "")
    assert "cannot write there ([Errno 13] )" in str(unusable.explain(bare, db))
    # the data dir is the folder to make writable, wherever in it the file was
    err = PermissionError(errno.EACCES, "Permission denied", str(data / "frames" / "0.png"))
    assert str(unusable.explain(err, db)).endswith(
        f"make {data} writable, or use --data-dir DIR for another data dir")
    # a folder that is not there is not called read-only
    gone = tmp_path / "gone" / "dreamd.db"
    assert str(unusable.explain(ro, gone)) == (
        f"{gone}: cannot write there (attempt to write a readonly database): make "
        f"{gone.parent} writable, or use --data-dir DIR for another data dir")
    # a file named without a ledger: its folder is the one to make writable
    err = PermissionError(errno.EACCES, "Permission denied", str(data / "x" / "f.png"))
    assert str(unusable.explain(err, None)).endswith(
        f"make {data / 'x'} writable, or use --data-dir DIR for another data dir")


def test_a_read_only_folder_is_named():
    with read_only_folder() as data:
        ro = sqlite3.OperationalError("attempt to write a readonly database")
        assert str(unusable.explain(ro, data / "dreamd.db")) == (
            f"{data / 'dreamd.db'}: cannot write there (attempt to write a readonly database; "
            f"{data} is read-only): make {data} writable, or use --data-dir DIR for another "
            f"data dir")
        err = PermissionError(errno.EACCES, "Permission denied", str(data / "f.png"))
        assert str(unusable.explain(err, None)) == (
            f"{data / 'f.png'}: cannot write there (Permission denied; {data} is read-only): "
            f"make {data} writable, or use --data-dir DIR for another data dir")


def test_the_cause_behind_an_error_raised_while_handling_it(db_path):
    """`raise … from exc` in an except block: the cause is both the cause and the
    context; what it was raised while handling is looked at too."""
    try:
        try:
            try:
                raise PermissionError(errno.EACCES, "Permission denied", str(db_path))
            except OSError:
                raise sqlite3.OperationalError("no such table: x")  # noqa: B904
        except sqlite3.Error as d:
            raise RuntimeError("while starting") from d
    except RuntimeError as exc:
        problem = unusable.explain(exc, db_path)
    assert str(problem).startswith(f"{db_path}: cannot write there (Permission denied)")


def test_anything_else_keeps_its_traceback(db_path):
    assert unusable.explain(ValueError("a bug"), db_path) is None
    assert unusable.explain(sqlite3.OperationalError("no such table: x"), db_path) is None
    assert unusable.explain(FileNotFoundError(errno.ENOENT, "gone", "x"), db_path) is None
    assert unusable.explain(OSError(errno.ENOSPC, "full"), db_path) is None
    # a cycle of causes ends
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert unusable.explain(a, db_path) is None


# ================================================================ queries.py

def add_run(conn, *, pid: int, beat: datetime, stopped: datetime | None = None) -> int:
    """A run on this host, as the daemon records its own."""
    return conn.execute(insert(DaemonRun.__table__).values(
        pid=pid, host=socket.gethostname(), version="v", started_at=beat, heartbeat_at=beat,
        stopped_at=stopped)).inserted_primary_key[0]


def test_last_run_is_the_newest(engine):
    with engine.begin() as conn:
        assert queries.last_run(conn) is None
        for pid in (11, 22, 33):
            add_run(conn, pid=pid, beat=NOW)
        assert queries.last_run(conn).pid == 33


def test_a_run_is_alive_while_it_beats_and_its_pid_exists(engine):
    me = os.getpid()
    with engine.begin() as conn:
        add_run(conn, pid=me, beat=NOW)
        run = queries.last_run(conn)
    assert queries.run_alive(run, NOW + timedelta(seconds=29.999))
    assert not queries.run_alive(run, NOW + timedelta(seconds=30))      # stale heartbeat
    assert queries.run_alive(run, NOW - timedelta(seconds=5))
    assert not queries.run_alive(None, NOW)
    with engine.begin() as conn:
        add_run(conn, pid=me, beat=NOW, stopped=NOW)
        stopped = queries.last_run(conn)
        add_run(conn, pid=dead_pid(), beat=NOW)
        dead = queries.last_run(conn)
        fresh = add_run(conn, pid=me, beat=utcnow())
        now_run = conn.execute(select(DaemonRun.__table__).where(
            DaemonRun.__table__.c.id == fresh)).one()
    assert not queries.run_alive(stopped, NOW)
    assert not queries.run_alive(dead, NOW)
    assert queries.run_alive(now_run)                 # `now` defaults to the clock
    assert read_model.pid_alive(me) and not read_model.pid_alive(dead.pid)


def test_the_runtime_row_is_made_on_first_use_and_updated(engine):
    with engine.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM runtime_state")).scalar() == 0
        row = queries.runtime(conn)
        assert (row.id, row.paused, row.frames_shown, row.knobs) == (1, 0, 0, "{}")
        assert queries.runtime(conn).id == 1
        conn.execute(text("UPDATE runtime_state SET updated_at = '2000-01-01 00:00:00'"))
        before = datetime.utcnow() - timedelta(seconds=1)
        queries.update_runtime(conn, paused=1, pause_reason="game")
        row = queries.runtime(conn)
        assert (row.paused, row.pause_reason) == (1, "game")
        assert row.updated_at >= before
        assert conn.execute(text("SELECT count(*) FROM runtime_state")).scalar() == 1
    with engine.begin() as conn:                   # the first use may be an update too
        conn.execute(text("DELETE FROM runtime_state"))
        queries.update_runtime(conn, theme_index=4)
        assert queries.runtime(conn).theme_index == 4


def test_knobs_read_only_a_json_object():
    class R:
        def __init__(self, knobs):
            self.knobs = knobs
    assert queries.knobs(R('{"display.fps": 12}')) == {"display.fps": 12}
    assert queries.knobs(R(None)) == {}
    assert queries.knobs(R("")) == {}
    assert queries.knobs(R("{not json")) == {}
    assert queries.knobs(R("[1, 2]")) == {}


def add_keyframe(conn, chain: int, state: str = "completed") -> int:
    return conn.execute(insert(Keyframe.__table__).values(
        chain_index=chain, backend="procedural", theme="t", prompt="p", seed=chain,
        denoise=1.0, source="seed", width=8, height=8, state=state)).inserted_primary_key[0]


def add_frame(conn, chain: int, t: float, state: str = "ready") -> int:
    return conn.execute(insert(Frame.__table__).values(
        chain_index=chain, t=t, kind="keyframe" if t == 0 else "inbetween",
        path=f"f/{chain}-{t}.png", state=state)).inserted_primary_key[0]


def add_segment(conn, chain: int, state: str) -> None:
    a, b = add_keyframe(conn, chain), add_keyframe(conn, chain + 1)
    conn.execute(insert(Interpolation.__table__).values(
        chain_index=chain, from_keyframe_id=a, to_keyframe_id=b, n_frames=3, state=state))


def test_playback_order_counts_and_picks_the_next_ready_frame(engine):
    with engine.begin() as conn:
        assert queries.frames_ahead(conn, None, None) == 0
        assert read_model.next_frame(queries.dbapi(conn), None, None) is None
        ids = {(c, t): add_frame(conn, c, t) for c, t in
               ((0, 0.0), (0, 0.25), (0, 0.5), (1, 0.0), (1, 0.5), (2, 0.0))}
        add_frame(conn, 0, 0.75, state="evicted")
        assert queries.frames_ahead(conn, None, None) == 6          # before the first
        nxt = read_model.next_frame(queries.dbapi(conn), None, None)
        assert (nxt.id, nxt.chain_index, nxt.pos, nxt.path) == (ids[0, 0.0], 0, 0.0,
                                                               "f/0-0.0.png")
        assert queries.frames_ahead(conn, 0, 0.25) == 4             # same chain, later t
        assert read_model.next_frame(queries.dbapi(conn), 0, 0.25).id == ids[0, 0.5]
        assert queries.frames_ahead(conn, 0, 0.5) == 3              # the evicted one skipped
        assert read_model.next_frame(queries.dbapi(conn), 0, 0.5).id == ids[1, 0.0]
        assert queries.frames_ahead(conn, 1, 0.0) == 2
        assert read_model.next_frame(queries.dbapi(conn), 1, 0.5).id == ids[2, 0.0]
        assert queries.frames_ahead(conn, 2, 0.0) == 0
        assert read_model.next_frame(queries.dbapi(conn), 2, 0.0) is None
        # counted up to a mark only (a worker asking whether the buffer reaches it)
        assert [queries.frames_ahead(conn, None, None, at_most=n) for n in (0, 2, 6, 99)] \
            == [0, 2, 6, 6]
        assert read_model.frames_ahead_of_playhead(queries.dbapi(conn), at_most=4) == 4


def test_the_next_frame_waits_for_an_earlier_segment_still_being_made(engine):
    with engine.begin() as conn:
        first = add_frame(conn, 0, 0.0)
        add_frame(conn, 1, 0.0)
        later = add_frame(conn, 3, 0.0)
        add_segment(conn, 1, "executing")           # segment 1 -> 2 is being made
    with engine.begin() as conn:
        assert read_model.next_frame(queries.dbapi(conn), None, None).id == first
        assert read_model.next_frame(queries.dbapi(conn), 0, 0.0).chain_index == 1   # 1's keyframe may show
        # past keyframe 1, the in-betweens of 1 -> 2 have to come before chain 3
        assert read_model.next_frame(queries.dbapi(conn), 1, 0.0) is None
        assert queries.frames_ahead(conn, 1, 0.0) == 1
    for state, shows in (("available", False), ("retryable", False), ("completed", True),
                         ("discarded", True)):
        with engine.begin() as conn:
            conn.execute(text("UPDATE interpolations SET state = :s"), {"s": state})
            got = read_model.next_frame(queries.dbapi(conn), 1, 0.0)
            assert (got is not None and got.id == later) is shows, state
    with engine.begin() as conn:
        conn.execute(text("UPDATE interpolations SET state = 'executing', chain_index = 3"))
        assert read_model.next_frame(queries.dbapi(conn), 1, 0.0).id == later    # a later segment: no wait
        conn.execute(text("UPDATE interpolations SET chain_index = 0"))
        assert read_model.next_frame(queries.dbapi(conn), 1, 0.0).id == later    # an earlier one: passed
    with engine.begin() as conn:                # with no playhead, every segment counts
        conn.execute(text("DELETE FROM frames WHERE chain_index = 0"))
        conn.execute(text("UPDATE interpolations SET chain_index = 0"))
        assert read_model.next_frame(queries.dbapi(conn), None, None) is None
        conn.execute(text("UPDATE interpolations SET chain_index = 1"))
        assert read_model.next_frame(queries.dbapi(conn), None, None) is not None


# ================================================================ read_model.py

def test_read_model_connects_read_only_with_rows_by_name(db_path):
    conn = read_model.connect(db_path)
    try:
        assert conn.execute("SELECT 1 AS one").fetchone()["one"] == 1
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("DELETE FROM frames")
        assert read_model.revision(conn) == read_model.head_revision()
        assert read_model._has(conn, "frames") and not read_model._has(conn, "nothing")
    finally:
        conn.close()


def test_read_model_waits_for_a_locked_ledger_only_as_long_as_asked(db_path):
    conn = read_model.connect(db_path, timeout=0.0)
    try:
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 0
    finally:
        conn.close()
    conn = read_model.connect(db_path)
    try:
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    finally:
        conn.close()


def test_read_model_revision_of_an_empty_or_unversioned_file(tmp_path):
    path = tmp_path / "x.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE t (a)")
    raw.commit()
    conn = read_model.connect(path)
    assert read_model.revision(conn) is None
    raw.execute("CREATE TABLE alembic_version (version_num TEXT)")
    raw.commit()
    conn.close()
    conn = read_model.connect(path)
    assert read_model.revision(conn) is None
    raw.execute("INSERT INTO alembic_version VALUES ('0003')")
    raw.commit()
    assert read_model.revision(conn) == "0003"
    conn.close()
    raw.close()


def fake_migrations(tmp_path, monkeypatch, files: dict[str, str]) -> None:
    versions = tmp_path / "mig" / "versions"
    versions.mkdir(parents=True)
    for name, body in files.items():
        (versions / name).write_text(body, encoding="utf-8")
    monkeypatch.setattr(read_model, "migrations_dir", lambda: tmp_path / "mig")


def test_head_revision_reads_the_version_files(tmp_path, monkeypatch):
    fake_migrations(tmp_path, monkeypatch, {
        "a.py": 'revision = "a1"\ndown_revision = None\n',
        "b.py": "x = 1\nrevision = 'b2'\ndown_revision = 'a1'\n",
        "c.py": 'revision = "c3"\ndown_revision = "b2"\n',
        "notes.txt": 'revision = "zz"\n',
        "helper.py": "# no revision here\n",
    })
    assert read_model.head_revision() == "c3"


def test_head_revision_refuses_two_heads(tmp_path, monkeypatch):
    fake_migrations(tmp_path, monkeypatch, {
        "a.py": 'revision = "a1"\ndown_revision = None\n',
        "b.py": 'revision = "b2"\ndown_revision = "a1"\n',
        "c.py": 'revision = "c3"\ndown_revision = "a1"\n',
    })
    with pytest.raises(LedgerError) as err:
        read_model.head_revision()
    assert str(err.value) == (f"{tmp_path / 'mig'}: expected one head revision, found "
                              f"['b2', 'c3']")


def test_head_revision_of_a_lone_revision_without_down(tmp_path, monkeypatch):
    fake_migrations(tmp_path, monkeypatch, {"a.py": 'revision = "a1"\n'})
    assert read_model.head_revision() == "a1"


def test_read_model_json_object_and_the_one_liveness_rule():
    assert read_model.json_object('{"a": 1}') == {"a": 1}
    # b"\xff": a BLOB that is not UTF-8, as an outside sqlite3 session could store
    for raw in (None, "", "[1]", "{bad", 5, b"\xff{}"):
        assert read_model.json_object(raw) is None, raw
    assert read_model._dt(None) is None
    assert read_model._dt(NOW) is NOW
    assert read_model._dt("2030-06-01 12:00:00.250000") == NOW
    me, here = os.getpid(), "this-host"
    run = {"id": 7, "pid": me, "host": here, "heartbeat_at": "2030-06-01 12:00:00.250000",
           "stopped_at": None}

    def alive(r, now=NOW, host=here):
        return read_model.liveness(r, now, host)

    assert alive(run, NOW + timedelta(seconds=29.999)).alive
    got = alive(run, NOW + timedelta(seconds=30))
    assert (got.alive, got.state) == (False, "died")
    assert got.line == "no daemon running: the last one (run 7, pid %d on this-host) died; " \
                       "its heartbeat is 30 s old" % me
    got = alive({**run, "stopped_at": str(NOW), "exit_reason": "signal SIGTERM"},
                NOW + timedelta(minutes=5))
    assert (got.alive, got.state) == (False, "stopped") and "stopped 5 min ago (signal " \
        "SIGTERM)" in got.line
    assert alive({**run, "pid": dead_pid()}).state == "died"        # its pid is gone here
    # on another host the pid cannot be looked at: the heartbeat decides
    assert alive({**run, "pid": dead_pid(), "host": "elsewhere"}).alive
    assert not alive({**run, "heartbeat_at": None}).alive
    assert alive(None).state == "never" and not alive(None).alive
    assert read_model.liveness({**run, "heartbeat_at": utcnow()}, host=here).alive  # clock
    assert not read_model.liveness({**run, "heartbeat_at": utcnow() - timedelta(seconds=31)},
                                   host=here).alive
    assert read_model.pid_alive(me) and not read_model.pid_alive(dead_pid())


def test_times_are_utc_whatever_the_local_time_zone(monkeypatch):
    """The README: all times are UTC (naive, as SQLite stores and compares them)."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")            # UTC+5:30, no summer time
    time.tzset()
    try:
        assert datetime.now() - datetime.utcnow() > timedelta(hours=5)
        for now in (read_model.utcnow, utcnow):
            got = now()
            assert got.tzinfo is None
            assert abs(got - datetime.utcnow()) < timedelta(seconds=60), now
    finally:
        monkeypatch.undo()
        time.tzset()


def _status(db_path, cfg_text: str = ""):
    from dreamd import config

    conn = read_model.connect(db_path)
    try:
        return read_model.status(conn, config.parse(cfg_text))
    finally:
        conn.close()


FPS_12 = "[display]\nfps = 12.0\nbuffer_target_seconds = 30.0\n"


def test_status_of_a_fresh_ledger(db_path):
    got = _status(db_path, FPS_12).as_json()
    knobs = got.pop("knobs")
    gov = got.pop("governor")
    quality = got.pop("quality")
    assert got == {
        "counts": {t: {} for t in read_model.COUNTED_TABLES}, "last_run": None, "alive": False,
        "daemon": "no daemon has run on this data dir yet: start one with `dreamd run`",
        "paused": False, "pause_reason": None, "paused_by": None, "playhead": None,
        "in_progress": None,
        "buffer": {"frames": 0, "seconds": 0.0, "target_seconds": 30.0, "fps": 12.0},
        "comfyui": None}
    assert knobs["display.fps"] == {"value": 12.0, "source": "config", "problem": None}
    assert (gov["enabled"], gov["decisions"]) == (True, [])
    assert quality["last_hour"]["segments"] == 0 and quality["keyframe"] is None


def test_status_reports_what_dreamd_status_shows(engine, db_path):
    me = os.getpid()
    with engine.begin() as conn:
        for c in range(4):
            add_keyframe(conn, c)
        conn.execute(insert(Keyframe.__table__).values(
            chain_index=5, backend="procedural", theme="forest", prompt="p", seed=5,
            denoise=0.5, source="img2img", width=8, height=8, state="retryable", attempt=2,
            started_at=NOW))
        conn.execute(insert(Keyframe.__table__).values(
            chain_index=4, backend="procedural", theme="sea", prompt="p", seed=4,
            denoise=0.5, source="img2img", width=8, height=8, state="executing", attempt=1))
        add_keyframe(conn, 9, state="discarded")
        for c, t in ((0, 0.0), (0, 0.5), (1, 0.0), (1, 0.5), (2, 0.0), (3, 0.0)):
            add_frame(conn, c, t)
        add_frame(conn, 2, 0.5, state="evicted")
        add_run(conn, pid=dead_pid(), beat=NOW)
        add_run(conn, pid=me, beat=utcnow())
        conn.execute(insert(RuntimeState.__table__).values(
            id=1, playhead_frame_id=3, playhead_chain_index=1, playhead_t=0.0,
            frames_shown=40, underruns=2, paused=1, pause_reason="game",
            knobs=json.dumps({"display.fps": 7, "display.buffer_target_seconds": 9}),
            comfyui_health='{"servers": []}', storage='{"free": 1}'))
        conn.execute(text("INSERT INTO controls (command, args, state, created_at) VALUES "
                          "('pause', '{}', 'applied', '2030-01-01 00:00:00')"))
    found = _status(db_path, FPS_12)
    got = found.as_json()
    assert got["counts"] == {
        "keyframes": {"completed": 4, "discarded": 1, "executing": 1, "retryable": 1},
        "interpolations": {}, "frames": {"evicted": 1, "ready": 6}, "embeddings": {},
        "controls": {"applied": 1}}
    assert list(got["counts"]["keyframes"]) == ["completed", "discarded", "executing",
                                                "retryable"]
    assert got["last_run"]["pid"] == me and got["alive"] is True
    assert (got["paused"], got["pause_reason"], got["paused_by"]) == (True, "game", "user")
    assert got["playhead"] == {"frame_id": 3, "chain_index": 1, "t": 0.0, "frames_shown": 40,
                               "underruns": 2}
    # the keyframe in progress is the newest pending one
    assert got["in_progress"] == {"chain_index": 5, "state": "retryable", "theme": "forest",
                                  "attempt": 2, "started_at": "2030-06-01 12:00:00.250000"}
    # after (1, 0.0): (1, 0.5), (2, 0.0), (3, 0.0); the knobs beat the config
    assert got["buffer"] == {"frames": 3, "seconds": 0.43, "target_seconds": 9.0, "fps": 7.0}
    assert got["knobs"]["display.fps"] == {"value": 7.0, "source": read_model.STORED,
                                           "problem": None}
    assert got["comfyui"] == {"servers": []} and found.storage_recorded == {"free": 1}
    with engine.begin() as conn:
        conn.execute(text("UPDATE runtime_state SET playhead_chain_index = NULL, "
                          "playhead_t = NULL, knobs = 'nope', paused = 0"))
        conn.execute(text("UPDATE keyframes SET state = 'completed' WHERE chain_index = 5"))
    got = _status(db_path, "[display]\nfps = 3.0\n").as_json()
    assert got["buffer"] == {"frames": 6, "seconds": 2.0, "target_seconds": 30.0, "fps": 3.0}
    assert (got["paused"], got["paused_by"]) == (False, None)
    assert got["in_progress"]["chain_index"] == 4 and got["in_progress"]["state"] == \
        "executing"
    with engine.begin() as conn:
        conn.execute(text("UPDATE keyframes SET state = 'available' WHERE chain_index = 4"))
        # a stored knob that no longer validates: the config's, with why
        conn.execute(text("""UPDATE runtime_state SET knobs = '{"display.fps": 500}'"""))
    found = _status(db_path, "[display]\nfps = 3.0\n")
    assert found.in_progress["state"] == "available"
    assert found.knobs["display.fps"].value == 3.0 and found.knobs["display.fps"].source == \
        "config" and "display.fps" in found.knobs["display.fps"].problem


# ================================================================ sql.py (`dreamd sql`)

@pytest.fixture
def shell(db_path):
    sh = shell_sql.Shell(db_path)
    yield sh
    sh.close()


_OPEN: list = []


def request_close(sh) -> None:
    _OPEN.append(sh)


@pytest.fixture(autouse=True)
def _close_shells():
    yield
    while _OPEN:
        _OPEN.pop().close()


def rows_of(sh, q: str, **kw) -> tuple[list[str], list[tuple]]:
    columns, rows = sh.execute(q, **kw)
    return columns, list(rows)


REFUSED = [
    ("ATTACH 'x.db' AS x", "ATTACH (and VACUUM, which attaches a file)"),
    ("VACUUM", "ATTACH (and VACUUM, which attaches a file)"),
    ("DETACH x", "DETACH"),
    ("INSERT INTO controls (command) VALUES ('pause')", "INSERT"),
    ("UPDATE frames SET t = 1", "UPDATE"),
    ("DELETE FROM transitions", "DELETE"),
    ("ALTER TABLE frames ADD COLUMN z", "ALTER TABLE"),
    ("REINDEX", "REINDEX"),
    ("BEGIN IMMEDIATE", "BEGIN/COMMIT"),
    ("COMMIT", "BEGIN/COMMIT"),
    ("SAVEPOINT a", "SAVEPOINT"),
    ("CREATE TABLE x(a)", "CREATE"),
    ("CREATE TEMP TABLE x(a)", "CREATE"),
    ("CREATE TEMP VIEW v AS SELECT 1", "CREATE"),
    ("CREATE INDEX i ON frames(t)", "CREATE"),
    ("INSERT INTO sqlite_master VALUES (1, 2, 3, 4, 5)", "CREATE"),
    ("DROP TABLE transitions", "DROP"),
    ("DROP VIEW frame_history", "DROP"),
    ("CREATE TEMP TRIGGER tr AFTER INSERT ON frames BEGIN SELECT 1; END",
     "CREATE TEMP TRIGGER"),
    ("SELECT load_extension('x')", "the function load_extension()"),
    ("SELECT LOAD_EXTENSION('x')", "the function load_extension()"),
    ("SELECT fts3_tokenizer('x')", "the function fts3_tokenizer()"),
    ("PRAGMA user_version = 7", "PRAGMA user_version with a value"),
    ("PRAGMA journal_mode = DELETE", "PRAGMA journal_mode with a value"),
    ("PRAGMA writable_schema = 1", "PRAGMA writable_schema"),
    ("PRAGMA query_only = 0", "PRAGMA query_only"),
    ("PRAGMA Cache_Size", "PRAGMA cache_size"),
]


@pytest.mark.parametrize("q, what", REFUSED)
def test_sql_refuses_what_is_not_a_query_by_name(shell, db_path, q, what):
    before = db_path.read_bytes()
    with pytest.raises(UsageError) as err:
        rows_of(shell, q)
    assert str(err.value) == f"dreamd sql is read-only: {what} is not allowed"
    assert db_path.read_bytes() == before
    assert not (db_path.parent / "x.db").exists()


def test_sql_answers_queries_views_and_read_only_pragmas(shell):
    assert rows_of(shell, "SELECT 1 AS one, 'a' AS two") == (["one", "two"], [(1, "a")])
    assert rows_of(shell, "SELECT count(*) FROM frame_history") == (["count(*)"], [(0,)])
    assert rows_of(shell, "PRAGMA user_version") == (["user_version"], [(0,)])
    assert rows_of(shell, "PRAGMA USER_VERSION") == (["user_version"], [(0,)])
    assert rows_of(shell, "PRAGMA journal_mode") == (["journal_mode"], [("wal",)])
    assert rows_of(shell, "PRAGMA integrity_check") == (["integrity_check"], [("ok",)])
    assert rows_of(shell, "PRAGMA table_info(frames)")[1][1][:2] == (1, "chain_index")
    assert rows_of(shell, "SELECT name FROM pragma_table_info('frames') LIMIT 1")[1] == \
        [("id",)]
    assert rows_of(shell, "SELECT value FROM json_each('[1, 2]')")[1] == [(1,), (2,)]
    assert rows_of(shell, "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r "
                          "LIMIT 3) SELECT sum(x) FROM r")[1] == [(6,)]
    assert rows_of(shell, "SELECT upper('a')")[1] == [("A",)]
    assert rows_of(shell, "-- only a comment") == ([], [])


def test_sql_passes_sqlites_own_errors_through(shell):
    with pytest.raises(sqlite3.OperationalError, match="may not be modified"):
        rows_of(shell, "UPDATE sqlite_master SET sql = 'x'")
    with pytest.raises(sqlite3.OperationalError, match="syntax error"):
        rows_of(shell, "SELEC 1")
    with pytest.raises(sqlite3.OperationalError, match="syntax error"):
        rows_of(shell, "SELEC 1", timeout=1e-9)     # a wrong query is not a time bound
    with pytest.raises(sqlite3.OperationalError, match="no such table: nope"):
        rows_of(shell, "SELECT * FROM nope")


def test_sql_names_each_statements_own_refusal(shell):
    with pytest.raises(UsageError, match="DELETE is not allowed"):
        rows_of(shell, "DELETE FROM frames")
    with pytest.raises(UsageError, match="INSERT is not allowed"):
        rows_of(shell, "INSERT INTO frames (t) VALUES (1)")
    with pytest.raises(sqlite3.OperationalError, match="syntax error"):
        rows_of(shell, "SELEC 1")                        # not a stale refusal
    assert rows_of(shell, "SELECT 2")[1] == [(2,)]     # the shell goes on


def test_sql_connection_is_read_only_beyond_the_authorizer(db_path):
    shell = shell_sql.Shell(db_path)      # made here, not in a fixture: mutmut sees it
    request_close(shell)
    assert shell.conn.getlimit(sqlite3.SQLITE_LIMIT_ATTACHED) == 0
    assert shell.conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH) == 64 << 20
    with pytest.raises(sqlite3.DataError, match="too big"):
        rows_of(shell, f"SELECT zeroblob({(64 << 20) + 1})")
    shell.conn.set_authorizer(None)
    # were the authorizer to miss an ATTACH, the attach limit still refuses it, named
    with pytest.raises(UsageError) as err:
        rows_of(shell, f"ATTACH '{shell.path.parent / 'x.db'}' AS x")
    assert str(err.value) == "dreamd sql is read-only: ATTACH is not allowed"
    assert not (shell.path.parent / "x.db").exists()
    assert shell.conn.execute("PRAGMA query_only").fetchone() == (1,)
    with pytest.raises(sqlite3.OperationalError):
        shell.conn.execute("DELETE FROM frames")


def test_sql_on_a_relative_path_and_on_garbage(db_path, tmp_path, monkeypatch):
    monkeypatch.chdir(db_path.parent)
    sh = shell_sql.Shell(db_path.name)
    try:
        assert rows_of(sh, "SELECT count(*) FROM alembic_version")[1] == [(1,)]
    finally:
        sh.close()
    bad = garbage(tmp_path / "bad.db")
    with pytest.raises(sqlite3.DatabaseError, match="file is not a database"):
        shell_sql.Shell(bad)


RUNAWAY = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT count(*) FROM r"
COUNT_TO = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r LIMIT {n}) " \
           "SELECT x FROM r"


def test_sql_stops_a_statement_at_its_time_bound(db_path):
    shell = shell_sql.Shell(db_path)
    request_close(shell)
    with pytest.raises(shell_sql.TimeBoundError) as err:
        rows_of(shell, RUNAWAY, timeout=0.2)
    assert str(err.value) == ("dreamd sql: stopped after 0.2 s (--timeout SECONDS raises the "
                              "bound, 0 removes it)")
    assert isinstance(err.value, UsageError)
    # a long but finite statement finishes within a bound, and without one
    assert rows_of(shell, f"SELECT count(*) FROM ({COUNT_TO.format(n=200_000)})",
                   timeout=600)[1] == [(200_000,)]
    assert rows_of(shell, f"SELECT count(*) FROM ({COUNT_TO.format(n=200_000)})",
                   timeout=0)[1] == [(200_000,)]
    assert rows_of(shell, f"SELECT count(*) FROM ({COUNT_TO.format(n=200_000)})")[1] == \
        [(200_000,)]


def test_sql_stops_streaming_rows_at_the_time_bound(shell):
    columns, rows = shell.execute(COUNT_TO.format(n=10**12), timeout=0.3)
    assert next(rows) == (1,)
    with pytest.raises(shell_sql.TimeBoundError, match="stopped after 0.3 s"):
        for _ in rows:
            pass


def written(columns, rows, fmt, **kw) -> tuple[str, str]:
    out, notes = io.StringIO(), io.StringIO()
    n = shell_sql.write(columns, rows, fmt, out, notes=notes, **kw)
    return out.getvalue(), notes.getvalue(), n


def test_write_tsv_and_json_every_row_unless_bounded(capsys):
    rows = [(i, f"r{i}", None) for i in range(1, 1502)]
    out, notes, n = written(["a", "b", "c"], rows, "tsv")
    lines = out.splitlines()
    assert (n, len(lines), lines[0], lines[1], lines[-1], notes) == (
        1501, 1502, "a\tb\tc", "1\tr1\t", "1501\tr1501\t", "")
    out, notes, n = written(["a", "b", "c"], rows, "json")
    assert n == 1501 and json.loads(out)[-1] == {"a": 1501, "b": "r1501", "c": None}
    assert out.startswith('[\n  {"a": 1, "b": "r1", "c": null},\n  {"a": 2,')
    assert out.endswith('"c": null}\n]\n') and notes == ""
    out, notes, n = written(["a", "b", "c"], iter(rows), "tsv", max_rows=2)
    assert (out, n) == ("a\tb\tc\n1\tr1\t\n2\tr2\t\n", 2)
    assert notes == "dreamd sql: 1499 more rows not shown (--max-rows N shows more, 0 all " \
                    "of them)\n"
    out, notes, n = written(["a"], [(1,), (2,), (3,)], "json", max_rows=3)
    assert (json.loads(out), notes, n) == ([{"a": 1}, {"a": 2}, {"a": 3}], "", 3)
    out, notes, n = written(["a"], [(1,), (2,)], "json", max_rows=1)
    assert (out, n) == ('[\n  {"a": 1}\n]\n', 1)
    assert notes == "dreamd sql: 1 more rows not shown (--max-rows N shows more, 0 all of " \
                    "them)\n"
    out = io.StringIO()                  # no notes stream: the count is left unsaid
    assert shell_sql.write(["a"], [(1,), (2,)], "tsv", out, max_rows=1) == 1
    assert out.getvalue() == "a\n1\n"
    assert capsys.readouterr() == ("", "")


def test_write_json_of_nothing_and_of_blobs_and_times():
    assert written(["a"], [], "json")[:3] == ("[]\n", "", 0)
    assert written(["a"], [], "tsv")[:3] == ("a\n", "", 0)
    out, _, _ = written(["b", "t"], [(b"\x01\xff", NOW)], "json")
    assert json.loads(out) == [{"b": "01ff", "t": "2030-06-01 12:00:00.250000"}]


def test_write_table_shows_the_first_thousand_and_counts_the_rest():
    rows = [(i, None) for i in range(1, 1003)]
    out, notes, n = written(["n", "none"], rows, "table")
    assert n == 1000 and notes == ""
    assert " 1000 " in out and " 1001 " not in out
    assert out.endswith("… 2 more rows not shown (--max-rows N shows more, 0 all of them)\n")
    out, notes, n = written(["n", "none"], [(1, None), (2, "x"), (3, None)], "table",
                            max_rows=0)
    assert n == 3 and notes == ""
    assert out == " n ┃ none \n━━━╇━━━━━━\n 1 │      \n 2 │ x    \n 3 │      \n"
    out, notes, n = written(["n"], [], "table")
    assert n == 0 and out == " n \n━━━\n"
    out, notes, n = written(["n"], [(1,), (2,), (3,)], "table", max_rows=2)
    assert n == 2 and out.endswith("… 1 more rows not shown (--max-rows N shows more, 0 "
                                   "all of them)\n")


def test_write_counts_what_it_can_within_the_time_bound(shell):
    columns, rows = shell.execute(COUNT_TO.format(n=10**12), timeout=0.5)
    out, notes, n = written(columns, rows, "tsv", max_rows=3)
    assert (out, n) == ("x\n1\n2\n3\n", 3)
    assert notes.startswith("dreamd sql: at least ")
    more = int(notes.split()[4])
    assert more > 0
    assert notes == f"dreamd sql: at least {more} more rows not shown (--max-rows N shows " \
                    f"more, 0 all of them)\n"


def test_statements_split_on_complete_statements_only():
    assert list(shell_sql.statements(["SELECT 1; SELECT 2;"])) == ["SELECT 1;", "SELECT 2;"]
    assert list(shell_sql.statements(["SELECT ';' AS semi;\n", "SELECT\n", " 3;\n"])) == \
        ["SELECT ';' AS semi;", "SELECT\n 3;"]
    assert list(shell_sql.statements([";;", " ; SELECT 4", "\n"])) == ["SELECT 4"]
    assert list(shell_sql.statements(["  \n", "\n"])) == []
    assert list(shell_sql.statements(["X;"])) == ["X;"]       # a typo is run, and told
    assert list(shell_sql.statements(["SELECT 1;SELECT 2;"])) == ["SELECT 1;", "SELECT 2;"]
    assert list(shell_sql.statements([";SELECT 3;;"])) == ["SELECT 3;"]
    assert list(shell_sql.statements(["SELECT 5 -- no end"])) == ["SELECT 5 -- no end"]
    assert list(shell_sql.statements(io.StringIO("SELECT 1;\nSELECT 'a;\nb';\n"))) == \
        ["SELECT 1;", "SELECT 'a;\nb';"]
    assert list(shell_sql.statements(["CREATE TRIGGER t AFTER INSERT ON x BEGIN SELECT 1; "
                                      "END; SELECT 6;"])) == \
        ["CREATE TRIGGER t AFTER INSERT ON x BEGIN SELECT 1; END;", "SELECT 6;"]
