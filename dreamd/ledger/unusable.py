"""Why a ledger file cannot be used, in one line the CLI can print instead of a traceback:
garbage or a truncated header, a damaged file, a data dir that cannot be written.

`explain(exc, db_path)` returns a LedgerUnusableError naming the file and what to do, or
None when `exc` is none of these (a real bug keeps its traceback).
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path
from typing import Iterator

from dreamd.errors import LedgerUnusableError

_NO_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, the driver error SQLAlchemy wraps, and what they were raised from."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(x for x in (getattr(e, "orig", None), e.__cause__, e.__context__)
                    if isinstance(x, BaseException))


def explain(exc: BaseException, db_path: Path | None) -> LedgerUnusableError | None:
    db = Path(db_path) if db_path else None
    for e in _chain(exc):
        if isinstance(e, sqlite3.Error):
            text = str(e)
            if "file is not a database" in text:
                where = db or "the ledger"
                return LedgerUnusableError(
                    f"{where}: not a SQLite database (garbage, or truncated at the start): "
                    f"move it aside (`mv {where} {where}.broken`) and dreamd starts a new "
                    f"ledger, or put a backup back")
            if "malformed" in text or "database corruption" in text:
                where = db or "the ledger"
                return LedgerUnusableError(
                    f"{where}: the ledger is damaged ({text}): save what can be saved with "
                    f"`sqlite3 {where} .recover | sqlite3 {where}.recovered`, then move it "
                    f"aside (`mv {where} {where}.broken`) and start again")
            if "readonly database" in text or "unable to open database file" in text \
                    or "disk I/O error" in text:
                return _cannot_write(db, db, text)
        if isinstance(e, OSError) and e.errno in _NO_WRITE:
            target = Path(e.filename) if e.filename else db
            return _cannot_write(target, db, e.strerror or str(e))
    return None


def _cannot_write(target: Path | None, db: Path | None, why: str) -> LedgerUnusableError:
    folder = db.parent if db else (target.parent if target else None)
    where = target or folder or "the data dir"
    if folder is not None and folder.exists() and not os.access(folder, os.W_OK):
        why = f"{why}; {folder} is read-only"
    return LedgerUnusableError(
        f"{where}: cannot write there ({why}): make {folder or 'the data dir'} writable, "
        f"or use --data-dir DIR for another data dir")
