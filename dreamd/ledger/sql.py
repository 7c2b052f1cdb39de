"""`dreamd sql`: queries on the ledger that cannot change anything, by construction, and
cannot run away with the machine.

Read-only is not string matching. The file is opened `mode=ro` with `query_only`; no
other database may be attached (SQLITE_LIMIT_ATTACHED = 0); and SQLite's authorizer,
asked about every step of every statement as it is compiled, admits only what a query
needs (reading tables and views, functions, recursive CTEs, read-only PRAGMAs) and
denies the rest: ATTACH (and so VACUUM, which attaches), writes, CREATE/DROP/ALTER,
transactions. A progress handler stops a statement at its time bound; rows are streamed,
and the table format shows at most `max_rows` of them and counts the rest.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from dreamd.errors import UsageError

TIMEOUT_SECONDS = 30.0          # per statement; --timeout raises it (0 = none)
TABLE_ROWS = 1000               # rows the table format shows; --max-rows raises it
MAX_VALUE_BYTES = 64 << 20      # SQLITE_LIMIT_LENGTH: one string or blob (a runaway concat)
_PROGRESS_STEPS = 20_000        # VM instructions between two looks at the clock
_BATCH = 512                    # rows fetched at a time while streaming

A = sqlite3
_ALLOWED = {A.SQLITE_SELECT, A.SQLITE_READ, A.SQLITE_RECURSIVE}
_DENIED_FUNCTIONS = {"load_extension", "fts3_tokenizer"}
# PRAGMAs that only read: some take a table or index name, the others no argument (with
# one, most of them write: `PRAGMA user_version = 3`).
_PRAGMAS_WITH_NAME = {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo",
                      "foreign_key_list", "foreign_key_check", "integrity_check",
                      "quick_check", "table_list"}
_PRAGMAS_READ = _PRAGMAS_WITH_NAME | {
    "application_id", "collation_list", "compile_options", "data_version", "database_list",
    "encoding", "foreign_keys", "freelist_count", "function_list", "journal_mode",
    "module_list", "page_count", "page_size", "pragma_list", "schema_version",
    "user_version"}
_WHAT = {A.SQLITE_ATTACH: "ATTACH (and VACUUM, which attaches a file)",
         A.SQLITE_DETACH: "DETACH", A.SQLITE_INSERT: "INSERT", A.SQLITE_UPDATE: "UPDATE",
         A.SQLITE_DELETE: "DELETE", A.SQLITE_ALTER_TABLE: "ALTER TABLE",
         A.SQLITE_REINDEX: "REINDEX", A.SQLITE_ANALYZE: "ANALYZE",
         A.SQLITE_TRANSACTION: "BEGIN/COMMIT", A.SQLITE_SAVEPOINT: "SAVEPOINT",
         A.SQLITE_CREATE_VTABLE: "CREATE VIRTUAL TABLE", A.SQLITE_DROP_VTABLE: "DROP TABLE"}
_SCHEMA_CHANGE = {A.SQLITE_INSERT: "CREATE", A.SQLITE_DELETE: "DROP",
                  A.SQLITE_UPDATE: "changing the schema"}
for _name in dir(A):                    # CREATE_TEMP_VIEW -> "CREATE TEMP VIEW", …
    if _name.startswith(("SQLITE_CREATE_", "SQLITE_DROP_")) and "VTABLE" not in _name:
        _WHAT[getattr(A, _name)] = _name[len("SQLITE_"):].replace("_", " ")


class _Guard:
    """The authorizer and the clock of one connection."""

    def __init__(self) -> None:
        self.denied: str | None = None     # what the statement was refused for
        self.deadline = math.inf

    def authorize(self, action: int, arg1: str | None, arg2: str | None,
                  db: str | None, _source: str | None) -> int:
        if action in _ALLOWED:
            return A.SQLITE_OK
        if action == A.SQLITE_FUNCTION:
            if (arg2 or "").lower() not in _DENIED_FUNCTIONS:
                return A.SQLITE_OK
            return self._deny(f"the function {arg2}()")
        if action == A.SQLITE_PRAGMA:
            name = (arg1 or "").lower()
            if name in _PRAGMAS_WITH_NAME or (name in _PRAGMAS_READ and arg2 is None):
                return A.SQLITE_OK
            return self._deny(f"PRAGMA {name} with a value" if name in _PRAGMAS_READ
                              else f"PRAGMA {name}")
        if action == A.SQLITE_UPDATE and arg1 == "sqlite_master" and db == "main":
            # SQLite asks this when a statement first uses a table-valued function
            # (json_each, pragma_table_info); the file is read-only and query_only is on,
            # so no write can follow, and a user's own UPDATE of it is refused by SQLite
            return A.SQLITE_OK
        if arg1 in ("sqlite_master", "sqlite_temp_master") and action in _SCHEMA_CHANGE:
            # CREATE and DROP are first asked as a write to the schema table, and the
            # first refusal ends the asking: name them for what they are
            return self._deny(_SCHEMA_CHANGE[action])
        return self._deny(_WHAT.get(action, f"action {action}"))

    def _deny(self, what: str) -> int:
        self.denied = self.denied or what
        return A.SQLITE_DENY

    def progress(self) -> int:
        return 1 if time.monotonic() > self.deadline else 0


class Shell:
    """One read-only connection to a ledger, and its statements."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        uri = f"file:{self.path.resolve()}?mode=ro"
        self.conn = sqlite3.connect(uri, uri=True, timeout=5, isolation_level=None)
        # the schema is read now, so a file that is no ledger says so before any query
        self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        self.conn.execute("PRAGMA query_only = 1")
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
        self.guard = _Guard()
        self.conn.set_authorizer(self.guard.authorize)
        self.conn.set_progress_handler(self.guard.progress, _PROGRESS_STEPS)

    def close(self) -> None:
        self.conn.close()

    def execute(self, statement: str, *, timeout: float = TIMEOUT_SECONDS
                ) -> tuple[list[str], Iterator[tuple]]:
        """(column names, rows as they come). Raises UsageError for what a read-only
        shell refuses and for the time bound, sqlite3.Error for a wrong query."""
        self.guard.denied = None
        self.guard.deadline = time.monotonic() + timeout if timeout else math.inf
        self.timeout = timeout
        try:
            cur = self.conn.execute(statement)
        except sqlite3.Error as exc:
            raise self._explain(exc) from None
        columns = [d[0] for d in cur.description or ()]
        return columns, self._rows(cur)

    def _rows(self, cur: sqlite3.Cursor) -> Iterator[tuple]:
        try:
            while batch := cur.fetchmany(_BATCH):
                yield from batch
        except sqlite3.Error as exc:
            raise self._explain(exc) from None
        finally:
            cur.close()

    def _explain(self, exc: sqlite3.Error) -> Exception:
        if self.guard.denied and ("not authorized" in str(exc) or
                                  "authorization denied" in str(exc)):
            return UsageError(f"dreamd sql is read-only: {self.guard.denied} is not allowed")
        if "interrupted" in str(exc) and time.monotonic() > self.guard.deadline:
            return TimeBoundError(f"dreamd sql: stopped after {self.timeout:g} s (--timeout "
                                  f"SECONDS raises the bound, 0 removes it)")
        if "too many attached databases" in str(exc):
            return UsageError("dreamd sql is read-only: ATTACH is not allowed")
        return exc


class TimeBoundError(UsageError):
    """A statement ran past its time bound."""


# ---------------------------------------------------------------- output

def write(columns: list[str], rows: Iterable[tuple], fmt: str, out: IO[str], *,
          max_rows: int | None = None, notes: IO[str] | None = None) -> int:
    """Write rows as they come (table, tsv or json); at most `max_rows` (None = the
    format's default: TABLE_ROWS for a table, every row otherwise; 0 = every row).
    Returns the rows written. The rows left out are counted, within the time bound, and
    named in a note (on `out` under a table, on `notes` for the machine formats)."""
    if max_rows is None:
        max_rows = TABLE_ROWS if fmt == "table" else 0
    it = iter(rows)
    shown = _take(it, max_rows)
    if fmt == "json":
        n = _write_json(columns, shown, out)
    elif fmt == "tsv":
        n = _write_tsv(columns, shown, out)
    else:
        n = _write_table(columns, shown, out)
    if max_rows:
        more, complete = _count(it)
        if more:
            note = (f"{more if complete else f'at least {more}'} more rows not shown "
                    f"(--max-rows N shows more, 0 all of them)")
            if fmt == "table":
                print(f"… {note}", file=out)
            elif notes is not None:
                print(f"dreamd sql: {note}", file=notes)
    return n


def _take(rows: Iterator[tuple], limit: int) -> Iterator[tuple]:
    for i, row in enumerate(rows):
        yield row
        if limit and i + 1 >= limit:
            return


def _count(rows: Iterator[tuple]) -> tuple[int, bool]:
    """How many rows are left (stepping through them, never holding them), and whether
    that is all of them or the time bound stopped the count."""
    n = 0
    try:
        for _ in rows:
            n += 1
    except TimeBoundError:
        return n, False
    return n, True


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def _write_tsv(columns: list[str], rows: Iterable[tuple], out: IO[str]) -> int:
    n = 0
    out.write("\t".join(columns) + "\n")
    for n, row in enumerate(rows, 1):
        out.write("\t".join(_cell(v) for v in row) + "\n")
    return n


def _write_json(columns: list[str], rows: Iterable[tuple], out: IO[str]) -> int:
    """A JSON array, one object a line, written as the rows come."""
    n = 0
    out.write("[")
    for n, row in enumerate(rows, 1):
        out.write(("\n  " if n == 1 else ",\n  ")
                  + json.dumps(dict(zip(columns, row)), default=_json_value))
    out.write("\n]\n" if n else "]\n")
    return n


def _json_value(value: Any) -> Any:
    return value.hex() if isinstance(value, bytes) else str(value)


def _write_table(columns: list[str], rows: Iterable[tuple], out: IO[str]) -> int:
    """A table is laid out from all its rows: only ever the bounded ones."""
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False)
    for c in columns:
        table.add_column(c)
    n = 0
    for n, row in enumerate(rows, 1):
        table.add_row(*(_cell(v) for v in row))
    Console(file=out).print(table)
    return n


def statements(stream: Iterable[str]) -> Iterator[str]:
    """Split input into complete SQL statements (a ';' inside a string does not count)."""
    buf = ""
    for line in stream:
        buf += line
        start = 0
        for i, ch in enumerate(buf):
            if ch == ";" and sqlite3.complete_statement(buf[start:i + 1]):
                if buf[start:i + 1].strip(" \n;"):
                    yield buf[start:i + 1].strip()
                start = i + 1
        buf = buf[start:]
    if buf.strip():
        yield buf.strip()
