"""Connections to the ledger file: one write path, read-only readers, migrations.

Writers get WAL, busy_timeout, synchronous=NORMAL, foreign keys and a
`BEGIN IMMEDIATE` for every transaction (a deferred transaction that reads and
then writes fails with SQLITE_BUSY without waiting). Readers open the file with
`mode=ro` and cannot write. Migrations run through Alembic at daemon start.
"""

from __future__ import annotations

import sqlite3
from importlib import resources
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.pool import NullPool, QueuePool

from dreamd.errors import LedgerError

BUSY_TIMEOUT_MS = 5000
WAL_SIZE_LIMIT = 8 * 1024 * 1024   # bytes of WAL kept after a checkpoint (~2000 pages)


def _on_connect(foreign_keys: bool, read_only: bool):
    def connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        # Let SQLAlchemy's begin event emit BEGIN itself (the pysqlite driver's own
        # transaction handling would start a deferred transaction too late).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not read_only:
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
            # a WAL a reader made grow (dreamd/workers/janitor.py) shrinks back to this
            # at the first write after a complete checkpoint
            cur.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        cur.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
        cur.close()
    return connect


def _on_begin(statement: str):
    def begin(conn) -> None:
        conn.exec_driver_sql(statement)
    return begin


def writer(path: str | Path, *, foreign_keys: bool = True, pool: bool = True) -> Engine:
    """The engine for writes. Every transaction starts with BEGIN IMMEDIATE."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {} if pool else {"poolclass": NullPool}
    engine = create_engine(f"sqlite+pysqlite:///{path}",
                           connect_args={"check_same_thread": False,
                                         "timeout": BUSY_TIMEOUT_MS / 1000}, **kwargs)
    event.listen(engine, "connect", _on_connect(foreign_keys, read_only=False))
    event.listen(engine, "begin", _on_begin("BEGIN IMMEDIATE"))
    return engine


def reader(path: str | Path, *, pool: bool = True) -> Engine:
    """A read-only engine: `file:…?mode=ro`, so a reader cannot write even by mistake.

    Pooled by default: opening a SQLite connection (and reading its schema) costs more
    than the small queries the daemon's ticks make several times a second.
    """
    path = Path(path)
    if not path.exists():
        raise LedgerError(f"{path}: no ledger here yet (start the daemon, or run "
                          f"`dreamd db upgrade`)")
    uri = f"file:{path.resolve()}?mode=ro"
    engine = create_engine("sqlite+pysqlite://", poolclass=QueuePool if pool else NullPool,
                           creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False,
                                                           timeout=BUSY_TIMEOUT_MS / 1000))
    event.listen(engine, "connect", _on_connect(foreign_keys=True, read_only=True))
    event.listen(engine, "begin", _on_begin("BEGIN"))
    return engine


def pragma(engine: Engine, statement: str) -> list:
    """Run a PRAGMA outside any transaction (checkpoints, incremental vacuum): the raw
    connection is in autocommit mode, where BEGIN IMMEDIATE would get in the way."""
    raw = engine.raw_connection()
    try:
        return raw.driver_connection.execute(statement).fetchall()
    finally:
        raw.close()


# ---------------------------------------------------------------- migrations

def migrations_dir() -> Path:
    """Alembic's script location, shipped inside the package (dreamd.migrations ->
    the repo's top-level migrations/), so an installed dreamd migrates without a checkout."""
    return Path(str(resources.files("dreamd.migrations")))


def alembic_config(path: str | Path):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", f"sqlite+pysqlite:///{Path(path)}")
    return cfg


def _run(path: str | Path, fn) -> object:
    # Migrations run with foreign keys OFF: batch mode recreates tables, and with
    # them ON, dropping the old copy would cascade or fail. Checked afterwards.
    engine = writer(path, foreign_keys=False, pool=False)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(path)
            cfg.attributes["connection"] = conn
            result = fn(cfg)
            problems = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if problems:
                raise LedgerError(f"{path}: migration left broken foreign keys: {problems[:5]}")
        return result
    finally:
        engine.dispose()


def upgrade(path: str | Path, revision: str = "head") -> None:
    if revision == "head" and current_revision(path) == head_revision():
        return      # every daemon start asks: Alembic's import alone is 0.25 s of CPU
    from alembic import command
    _run(path, lambda cfg: command.upgrade(cfg, revision))


def downgrade(path: str | Path, revision: str) -> None:
    from alembic import command
    _run(path, lambda cfg: command.downgrade(cfg, revision))


def current_revision(path: str | Path) -> str | None:
    """The revision a ledger file is at, read without Alembic (fast, read-only)."""
    path = Path(path)
    if not path.exists():
        return None
    engine = reader(path)
    try:
        with engine.connect() as conn:
            has = conn.execute(text("SELECT 1 FROM sqlite_master WHERE type='table' "
                                    "AND name='alembic_version'")).first()
            if not has:
                return None
            row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
            return row[0] if row else None
    finally:
        engine.dispose()


def head_revision() -> str:
    """The newest migration (read from the version files, without Alembic)."""
    from dreamd.ledger.read_model import head_revision as head

    return head()


def revisions() -> list[tuple[str, str | None, str]]:
    """(revision, down_revision, message) from base to head."""
    from alembic.script import ScriptDirectory
    script = ScriptDirectory.from_config(alembic_config(":memory:"))
    revs = list(script.walk_revisions())
    revs.reverse()
    return [(r.revision, r.down_revision, r.doc) for r in revs]  # type: ignore[misc]
