"""The game guard's senses: which known game is running (games.py, psutil) and whether
another process is using the generation GPU (gpu.py, pynvml). What the guard does
about it, pause, free and resume through control rows, is dreamd/workers/guard.py.
"""

from __future__ import annotations

import json
import sqlite3

GUARD = "guard"             # args["source"] of the guard's control rows


def source_of(args: str | None) -> str:
    """Who sent a pause, from its control row's args: "guard" or "user"."""
    try:
        return GUARD if json.loads(args or "{}").get("source") == GUARD else "user"
    except (ValueError, AttributeError):
        return "user"


def paused_by(conn: sqlite3.Connection) -> str | None:
    """`dreamd status`'s answer (plain sqlite3, like the rest of it): who made the pause
    in force, None when not paused. A pause whose row was pruned counts as the user's:
    the guard never undoes a pause it cannot prove is its own."""
    row = conn.execute("SELECT paused FROM runtime_state WHERE id = 1").fetchone()
    if not row or not row[0]:
        return None
    args = conn.execute("SELECT args FROM controls WHERE command = 'pause' AND state = "
                        "'applied' ORDER BY id DESC LIMIT 1").fetchone()
    return source_of(args[0]) if args else "user"


def paused_by_in(db_path) -> str | None:
    """paused_by() on the ledger at `db_path`, opened read-only."""
    from urllib.request import pathname2url     # a path with ?, # or % stays a path

    conn = sqlite3.connect(f"file:{pathname2url(str(db_path))}?mode=ro", uri=True)
    try:
        return paused_by(conn)
    except sqlite3.Error:         # no such table yet: an empty or old ledger
        return None
    finally:
        conn.close()
