"""A glance at the ledger for `dreamd status`, with the sqlite3 module alone: importing
SQLAlchemy and mapping the models cost `dreamd status` most of its half second to a
second and a half (profiled on a busy 2-core machine, bench/RESULTS.md), and a status
must answer at once. Read-only (`mode=ro`): it never waits for the daemon's writers.

Counting is bounded: rows per state come from the `state` indexes, the buffer from the
playback-order index, the keyframe in progress from the claim index.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

COUNTED_TABLES = ("keyframes", "interpolations", "frames", "embeddings", "controls")
# A heartbeat older than this means the daemon is gone even if its pid was reused.
HEARTBEAT_STALE = timedelta(seconds=30)
PENDING = ("available", "executing", "retryable")


def connect(path: str | Path, timeout: float = 5.0) -> sqlite3.Connection:
    uri = f"file:{Path(path).resolve()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def migrations_dir() -> Path:
    """Alembic's script location, shipped inside the package as dreamd.migrations."""
    from importlib import resources

    return Path(str(resources.files("dreamd.migrations")))


def head_revision() -> str:
    """The newest migration, read from the version files without importing Alembic
    (which alone costs `dreamd status` a quarter of a second)."""
    import re

    from dreamd.errors import LedgerError

    revs: dict[str, str | None] = {}
    for f in (migrations_dir() / "versions").glob("*.py"):
        text_ = f.read_text(encoding="utf-8")
        rev = re.search(r"^revision\s*=\s*['\"]([^'\"]+)['\"]", text_, re.M)
        down = re.search(r"^down_revision\s*=\s*(?:['\"]([^'\"]+)['\"]|None)", text_, re.M)
        if rev:
            revs[rev.group(1)] = down.group(1) if down else None
    heads = set(revs) - {d for d in revs.values() if d}
    if len(heads) != 1:
        raise LedgerError(f"{migrations_dir()}: expected one head revision, found {sorted(heads)}")
    return heads.pop()


def revision(conn: sqlite3.Connection) -> str | None:
    if not _has(conn, "alembic_version"):
        return None
    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


def _has(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone() \
        is not None


def state_counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """{table: {state: rows}}; each table's count walks its state index only."""
    out: dict[str, dict[str, int]] = {}
    for name in COUNTED_TABLES:
        rows = conn.execute(f"SELECT state, count(*) FROM {name} GROUP BY state").fetchall()
        out[name] = {state: n for state, n in sorted(tuple(r) for r in rows)}
    return out


def pid_alive(pid: int) -> bool:
    # psutil (dreamd/platform.py), never os.kill(pid, 0): on Windows that call ends the
    # process it asks about, so `dreamd status` would have stopped the daemon
    from dreamd.platform import pid_alive as alive
    return alive(pid)


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _dt(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def run_alive(run: dict[str, Any] | None, now: datetime | None = None) -> bool:
    """A run is alive when it has not stopped, its heartbeat is fresh and its pid exists."""
    if run is None or run.get("stopped_at") is not None:
        return False
    now = now or utcnow()
    beat = _dt(run["heartbeat_at"])
    return beat is not None and now - beat < HEARTBEAT_STALE and pid_alive(run["pid"])


def json_object(raw: Any) -> dict[str, Any] | None:
    """A JSON column holding an object, parsed; None when empty or not an object."""
    try:
        value = json.loads(raw) if raw else None
    except (TypeError, ValueError):     # JSONDecodeError, and a BLOB that is not UTF-8
        return None
    return value if isinstance(value, dict) else None


def status(conn: sqlite3.Connection, *, fps: float, buffer_target: float) -> dict[str, Any]:
    """What `dreamd status` reports beyond the paths and revisions. `fps` and
    `buffer_target` are the config's; a knob stored by `dreamd set` wins over them."""
    run = conn.execute("SELECT * FROM daemon_runs ORDER BY id DESC LIMIT 1").fetchone()
    run_d = dict(run) if run else None
    # SELECT *: a ledger at an older revision answers too (and is told to upgrade)
    rt_row = conn.execute("SELECT * FROM runtime_state WHERE id = 1").fetchone()
    rt = dict(rt_row) if rt_row else {}
    knobs = json_object(rt.get("knobs")) or {}
    fps = float(knobs.get("display.fps", fps))
    target = float(knobs.get("display.buffer_target_seconds", buffer_target))
    chain, t = rt.get("playhead_chain_index"), rt.get("playhead_t")
    ahead = conn.execute(
        "SELECT count(*) FROM frames WHERE state = 'ready' AND "
        "(chain_index > ? OR (chain_index = ? AND t > ?))",
        (-1, -1, -1.0) if chain is None else (chain, chain, t)).fetchone()[0]
    making = conn.execute(
        "SELECT chain_index, state, theme, attempt, started_at FROM keyframes "
        f"WHERE state IN {PENDING} ORDER BY chain_index DESC LIMIT 1").fetchone()
    return {
        "counts": state_counts(conn),
        "last_run": run_d,
        "alive": run_alive(run_d),
        "paused": bool(rt.get("paused")),
        "pause_reason": rt.get("pause_reason"),
        "playhead": ({"frame_id": rt.get("playhead_frame_id"), "chain_index": chain, "t": t,
                      "frames_shown": rt.get("frames_shown"),
                      "underruns": rt.get("underruns")} if rt else None),
        "in_progress": dict(making) if making else None,
        "buffer": {"frames": ahead, "seconds": round(ahead / fps, 2), "target_seconds": target,
                   "fps": fps},
        "comfyui": json_object(rt.get("comfyui_health")),
        "storage_recorded": json_object(rt.get("storage")),
    }
