"""The read model: every question a surface asks about the dream, answered once, in
plain SQL on the sqlite3 module (no SQLAlchemy, no torch: `dreamd status` answers at
once). `dreamd status`, the dashboard, the web viewer and the daemon's own status.json
ask here, so they cannot disagree: whether a daemon is alive (one rule, `liveness`),
the buffer ahead of the playhead, the knobs in effect and where each comes from, the
pause and who made it, the keyframe in progress, the governor's decisions, the disk.

Each function takes a DB-API connection to the ledger: a read-only `connect()` here,
or the daemon's own (`dreamd.ledger.queries.dbapi(conn)` inside a SQLAlchemy
transaction). Rows come back as dicts whatever the connection's row factory.
Counting is bounded: rows per state come from the `state` indexes, the buffer from the
playback-order index, the keyframe in progress from the claim index.
"""

from __future__ import annotations

import json
import socket
import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

COUNTED_TABLES = ("keyframes", "interpolations", "frames", "embeddings", "controls")
# A heartbeat older than this means the daemon is gone even if its pid was reused.
HEARTBEAT_STALE = timedelta(seconds=30)
PENDING = ("available", "executing", "retryable")


def connect(path: str | Path, timeout: float = 5.0, *,
            check_same_thread: bool = True) -> sqlite3.Connection:
    """A read-only connection in autocommit mode: each statement is its own read, so one
    kept open for months (the display's, the controls' look) holds no snapshot."""
    uri = f"file:{Path(path).resolve()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None,
                           check_same_thread=check_same_thread)
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


def _all(conn, sql: str, params: dict[str, Any] | tuple = ()) -> list[dict[str, Any]]:
    """Rows as dicts, whatever the connection's row factory."""
    cur = conn.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, tuple(r))) for r in cur.fetchall()]


def _one(conn, sql: str, params: dict[str, Any] | tuple = ()) -> dict[str, Any] | None:
    rows = _all(conn, sql, params)
    return rows[0] if rows else None


def state_counts(conn) -> dict[str, dict[str, int]]:
    """{table: {state: rows}}; each table's count walks its state index only."""
    out: dict[str, dict[str, int]] = {}
    for name in COUNTED_TABLES:
        rows = conn.execute(f"SELECT state, count(*) FROM {name} GROUP BY state").fetchall()
        out[name] = {state: n for state, n in sorted(tuple(r) for r in rows)}
    return out


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _dt(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def json_object(raw: Any) -> dict[str, Any] | None:
    """A JSON column holding an object, parsed; None when empty or not an object."""
    try:
        value = json.loads(raw) if raw else None
    except (TypeError, ValueError):     # JSONDecodeError, and a BLOB that is not UTF-8
        return None
    return value if isinstance(value, dict) else None


def ago(seconds: float) -> str:
    """A duration as people say it: 12 s, 5 min, 3.5 h, 4 days."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


# ---------------------------------------------------------------- is a daemon alive

def pid_alive(pid: int) -> bool:
    # psutil (dreamd/platform.py), never os.kill(pid, 0): on Windows that call ends the
    # process it asks about, so `dreamd status` would have stopped the daemon
    from dreamd.platform import pid_alive as alive
    return alive(pid)


@dataclass(frozen=True)
class Liveness:
    alive: bool
    state: str                      # running | stopped | died | never
    line: str                       # said plainly, for a person
    run: dict[str, Any] | None = field(default=None, compare=False)


def liveness(run: dict[str, Any] | None, now: datetime | None = None,
             host: str | None = None) -> Liveness:
    """The one rule every surface uses: the last run is alive when it recorded no stop,
    its heartbeat (written every 5 s) is younger than HEARTBEAT_STALE, and, when it
    runs on this host, its pid exists. The pid of a daemon on another host (a data dir
    on a shared disk) cannot be checked from here: its heartbeat decides."""
    if run is None:
        return Liveness(False, "never", "no daemon has run on this data dir yet: start one "
                        "with `dreamd run`")
    now = now or utcnow()
    host = host or socket.gethostname()
    label = f"run {run['id']}, pid {run['pid']} on {run['host']}"
    if run.get("stopped_at") is not None:
        return Liveness(False, "stopped", f"no daemon running: the last one ({label}) "
                        f"stopped {ago((now - _dt(run['stopped_at'])).total_seconds())} ago "
                        f"({run.get('exit_reason') or 'stopped'})", run)
    beat = _dt(run.get("heartbeat_at"))
    age = (now - beat).total_seconds() if beat is not None else float("inf")
    if age >= HEARTBEAT_STALE.total_seconds() or (run["host"] == host
                                                  and not pid_alive(run["pid"])):
        said = f"its heartbeat is {ago(age)} old" if beat is not None else "no heartbeat"
        return Liveness(False, "died", f"no daemon running: the last one ({label}) died; "
                        f"{said}", run)
    return Liveness(True, "running", f"daemon running ({label}), heartbeat {ago(age)} ago",
                    run)


def last_run(conn) -> dict[str, Any] | None:
    return _one(conn, "SELECT * FROM daemon_runs ORDER BY id DESC LIMIT 1")


# ---------------------------------------------------------------- the playhead and the buffer
# A playhead of (-1, -1) means "before the first frame" (chain indexes start at 0).
_AFTER = "(chain_index > :c OR (chain_index = :c AND t > :t))"
AHEAD_SQL = f"SELECT count(*) FROM frames WHERE state = 'ready' AND {_AFTER}"
AHEAD_UP_TO_SQL = (f"SELECT count(*) FROM (SELECT 1 FROM frames WHERE state = 'ready' AND "
                   f"{_AFTER} LIMIT :n)")
NEXT_SQL = (f"SELECT id, chain_index, t AS pos, path FROM frames WHERE state = 'ready' AND "
            f"{_AFTER} ORDER BY chain_index, t LIMIT 1")
MAKING_SQL = ("SELECT count(*) FROM interpolations WHERE state IN ('available', 'executing', "
              "'retryable') AND chain_index >= :c AND chain_index < :until")


def _playhead(chain: int | None, t: float | None) -> dict[str, Any]:
    return {"c": -1, "t": -1.0} if chain is None else {"c": chain, "t": t}


def frames_ahead(conn, chain: int | None, t: float | None, at_most: int | None = None) -> int:
    """Ready frames after the playhead (chain, t), in playback order; counted up to
    `at_most` only, for a worker that only asks whether the buffer reaches a mark (the
    count walks the whole buffer, and the buffer can be hours of frames)."""
    if at_most is not None:
        return conn.execute(AHEAD_UP_TO_SQL, {**_playhead(chain, t), "n": at_most}).fetchone()[0]
    return conn.execute(AHEAD_SQL, _playhead(chain, t)).fetchone()[0]


class Ready(NamedTuple):
    """A frame ready to show. (Its `t` is `pos`: Row.t is SQLAlchemy's tuple accessor.)"""

    id: int
    chain_index: int
    pos: float
    path: str


def frames_ahead_of_playhead(conn, at_most: int | None = None) -> int:
    """Ready frames after the playhead the ledger records (all of them before the first
    frame is shown, or without a runtime row yet); up to `at_most` (frames_ahead)."""
    try:
        row = _one(conn, "SELECT playhead_chain_index AS c, playhead_t AS t "
                         "FROM runtime_state WHERE id = 1")
    except sqlite3.OperationalError as exc:
        # a ledger before its first migration; asked, not looked up in sqlite_master
        # first: the idle workers ask this every two seconds and the look-up cost more
        if "no such table" not in str(exc):
            raise
        row = None
    return frames_ahead(conn, *((row["c"], row["t"]) if row else (None, None)), at_most)


def next_frame(conn, chain: int | None, t: float | None) -> Ready | None:
    """The next ready frame after the playhead, unless an earlier segment is still being
    made (its frames would have to come first): playback never goes out of order. With
    no playhead yet every earlier segment counts: playback starts at the first."""
    found = conn.execute(NEXT_SQL, _playhead(chain, t)).fetchone()
    if found is None:
        return None
    row = Ready(*tuple(found))
    if row.chain_index <= (-1 if chain is None else chain):
        return row
    making = conn.execute(MAKING_SQL, {"c": -1 if chain is None else chain,
                                       "until": row.chain_index}).fetchone()[0]
    return None if making else row


def newest_frame(conn) -> int | None:
    """The newest frame row's id (a lookup at the end of the id index, not a count)."""
    return conn.execute("SELECT max(id) FROM frames").fetchone()[0]


SEGMENT_REST_SQL = ("SELECT id, chain_index, t AS pos, path FROM frames WHERE state = 'ready' "
                    "AND chain_index = :c AND t > :t ORDER BY t")


def next_frames(conn, chain: int | None, t: float | None) -> list[Ready]:
    """next_frame, and after it the rest of its segment's ready frames, in order (a
    segment's frames are made together, so none of them can be missing in between):
    the display reads this once per segment or per recount, not once per frame."""
    first = next_frame(conn, chain, t)
    if first is None:
        return []
    rest = conn.execute(SEGMENT_REST_SQL, {"c": first.chain_index, "t": first.pos})
    return [first, *(Ready(*tuple(r)) for r in rest.fetchall())]


CHAIN_PROMPT_SQL = ("SELECT prompt, theme FROM keyframes WHERE chain_index = ? "
                    "AND state = 'completed' LIMIT 1")


def chain_prompt(conn, chain: int) -> tuple[str | None, str | None]:
    """The prompt and theme of the keyframe that begins segment `chain` (None, None if
    there is none)."""
    row = conn.execute(CHAIN_PROMPT_SQL, (chain,)).fetchone()
    return (row[0], row[1]) if row else (None, None)


@dataclass(frozen=True)
class Buffer:
    frames: int
    seconds: float
    target_seconds: float
    fps: float


def buffer(frames: int, fps: float, target_seconds: float) -> Buffer:
    """The buffer as every surface says it: frames ahead, and seconds at the display rate."""
    return Buffer(frames, round(frames / fps, 2), target_seconds, fps)


# ---------------------------------------------------------------- the knobs in effect

@dataclass(frozen=True)
class Knob:
    value: Any
    source: str                     # "config" or "stored by `dreamd set`"
    problem: str | None = None      # a stored value that no longer validates: why


STORED = "stored by `dreamd set`"


def check_stored(stored: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Stored knobs split into those that still validate and {key: why not} for the rest
    (a NaN an older dreamd let through, a range or a key that changed since): the
    daemon drops the second at start, with a warning each."""
    from dreamd import config
    from dreamd.errors import ConfigError

    good, bad = {}, {}
    for key, value in stored.items():
        try:
            good[key] = config.check_value(config.live_key(key), value)
        except ConfigError as exc:
            bad[key] = str(exc)
    return good, bad


def knobs(stored: dict[str, Any] | None, cfg) -> dict[str, Knob]:
    """Every live knob's value in effect: the one `dreamd set` stored when it still
    validates, else the config's (with why the stored one does not count)."""
    from dreamd import config

    good, bad = check_stored(stored or {})
    out: dict[str, Knob] = {}
    for key in config.live_knobs():
        section, name = key.split(".")
        if key in good:
            out[key] = Knob(good[key], STORED)
        else:
            out[key] = Knob(getattr(getattr(cfg, section), name), "config", bad.get(key))
    return out


def stored_knobs(conn) -> dict[str, Any]:
    """What `dreamd set` stored ({} on a ledger without its runtime row yet)."""
    if not _has(conn, "runtime_state"):
        return {}
    row = _one(conn, "SELECT knobs FROM runtime_state WHERE id = 1")
    return (json_object(row["knobs"]) if row else None) or {}


# ---------------------------------------------------------------- the pause

PAUSE_SOURCE_SQL = ("SELECT args FROM controls WHERE command = 'pause' AND state = 'applied' "
                    "ORDER BY id DESC LIMIT 1")


@dataclass(frozen=True)
class Pause:
    paused: bool
    reason: str | None = None
    by: str | None = None           # user | guard (the game guard: it resumes by itself)


def pause(runtime: dict[str, Any] | None, conn) -> Pause:
    """The pause in force and who made it: "guard" when the last applied pause came from
    the game guard, else "user". A pause whose row was pruned counts as the user's: the
    guard never undoes a pause it cannot prove is its own."""
    from dreamd.guard import source_of

    if not runtime or not runtime.get("paused"):
        return Pause(False)
    row = _one(conn, PAUSE_SOURCE_SQL)
    return Pause(True, runtime.get("pause_reason"), source_of(row["args"]) if row else "user")


# ---------------------------------------------------------------- work in progress

IN_PROGRESS_SQL = ("SELECT chain_index, state, theme, attempt, started_at FROM keyframes "
                   f"WHERE state IN {PENDING} ORDER BY chain_index DESC LIMIT 1")


def in_progress(conn) -> dict[str, Any] | None:
    """The keyframe being made (or waiting to be): the newest pending one."""
    return _one(conn, IN_PROGRESS_SQL)


# ---------------------------------------------------------------- the governor

DECISIONS_SHOWN = 5


def decisions(conn, limit: int = DECISIONS_SHOWN) -> list[dict[str, Any]]:
    """The governor's last decisions, newest first (none on a ledger before 0006)."""
    if conn is None or not _has(conn, "governor_decisions"):
        return []
    out = []
    for d in _all(conn, "SELECT * FROM governor_decisions ORDER BY id DESC LIMIT ?", (limit,)):
        try:
            d["detail"] = json.loads(d["detail"]) if d["detail"] else None
        except json.JSONDecodeError:
            pass
        out.append(d)
    return out


def governor(conn, cfg, alive: bool, knobs_: dict[str, Knob] | None = None) -> dict[str, Any]:
    """{"enabled", "interpolation_frames", "resolution_divisor", "stretch", "settings",
    "decisions"}: what the next batches use (the last decision's choice while a daemon
    runs, else the user's settings, which the next start begins from unless the last
    choice still fits), and the last decisions, newest first."""
    g = cfg.generation
    k = knobs_ if knobs_ is not None else knobs(stored_knobs(conn) if conn else None, cfg)
    enabled = bool(k["governor.enabled"].value)
    n = k["generation.interpolation_frames"].value
    out: dict[str, Any] = {
        "enabled": enabled, "interpolation_frames": n, "resolution_divisor": g.resolution_divisor,
        "stretch": 1.0,
        "settings": {"interpolation_frames": n, "resolution_divisor": g.resolution_divisor,
                     "max_interpolation_frames": max(n, cfg.governor.max_interpolation_frames),
                     "max_resolution_divisor": max(g.resolution_divisor,
                                                   cfg.governor.max_resolution_divisor)},
        "decisions": decisions(conn)}
    last = out["decisions"][0] if out["decisions"] else None
    if enabled and alive and last is not None:
        out.update(interpolation_frames=last["interpolation_frames"],
                   resolution_divisor=last["resolution_divisor"], stretch=last["stretch"])
    return out


# ---------------------------------------------------------------- all of it

@dataclass
class Status:
    """What `dreamd status --json` says, and what every surface reads its answers from."""

    revision: str | None = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    last_run: dict[str, Any] | None = None
    daemon: Liveness = field(default_factory=lambda: liveness(None))
    pause: Pause = field(default_factory=lambda: Pause(False))
    playhead: dict[str, Any] | None = None
    in_progress: dict[str, Any] | None = None
    buffer: Buffer | None = None
    knobs: dict[str, Knob] = field(default_factory=dict)
    comfyui: dict[str, Any] | None = None
    storage_recorded: dict[str, Any] | None = None
    governor: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None   # the last hour's (ledgers from 0008 on)

    def as_json(self) -> dict[str, Any]:
        return {
            "counts": self.counts, "last_run": self.last_run, "alive": self.daemon.alive,
            "daemon": self.daemon.line, "paused": self.pause.paused,
            "pause_reason": self.pause.reason, "paused_by": self.pause.by,
            "playhead": self.playhead, "in_progress": self.in_progress,
            "buffer": asdict(self.buffer) if self.buffer else None,
            "knobs": {k: asdict(v) for k, v in self.knobs.items()},
            "comfyui": self.comfyui, "governor": self.governor, "quality": self.quality}


def status(conn, cfg, *, now: datetime | None = None, host: str | None = None,
           counts: bool = True) -> Status:
    """The dream as the ledger has it, in one read (the caller holds one transaction for
    a consistent answer). `counts=False` skips the rows per state (the dashboard counts
    less often)."""
    out = Status(revision=revision(conn) if conn is not None else None)
    if out.revision is None or not _has(conn, "runtime_state"):     # no ledger yet
        out.knobs = knobs(None, cfg)
        out.governor = governor(None, cfg, alive=False, knobs_=out.knobs)
        return out
    out.last_run = last_run(conn)
    out.daemon = liveness(out.last_run, now, host)
    # SELECT *: a ledger at an older revision answers too (and is told to upgrade)
    rt = _one(conn, "SELECT * FROM runtime_state WHERE id = 1") or {}
    out.knobs = knobs(json_object(rt.get("knobs")), cfg)
    out.pause = pause(rt, conn)
    chain, t = rt.get("playhead_chain_index"), rt.get("playhead_t")
    if rt:
        out.playhead = {"frame_id": rt.get("playhead_frame_id"), "chain_index": chain, "t": t,
                        "frames_shown": rt.get("frames_shown"), "underruns": rt.get("underruns")}
    out.buffer = buffer(frames_ahead(conn, chain, t), out.knobs["display.fps"].value,
                        out.knobs["display.buffer_target_seconds"].value)
    out.in_progress = in_progress(conn)
    out.comfyui = json_object(rt.get("comfyui_health"))
    out.storage_recorded = json_object(rt.get("storage"))
    out.governor = governor(conn, cfg, out.daemon.alive, out.knobs)
    out.quality = quality(conn, now, floor=out.knobs["quality.stagnation_floor"].value)
    if counts:
        out.counts = state_counts(conn)
    return out


# ---------------------------------------------------------------- the dream's quality
# Rows of `quality` (dreamd/quality/recorder.py): per segment and per keyframe. A
# window's averages walk ix_quality_created_at; the newest rows ix_quality_entity_chain_index.

QUALITY_HOUR = timedelta(hours=1)
STREAK_LOOKBACK = 100       # keyframes looked at for the stagnant streak
# Where a measurement becomes a flag (the view quality_per_hour, migration 0008, has
# the same numbers in its SQL). A boundary change this many times the typical step
# around it is a pop (a smooth slerp chain stays near 1); a keyframe whose mean
# per-pixel delta E to the previous one is below STAGNANT_CHANGE (about one
# just-noticeable difference) looks the same as it: stagnant.
POP_RATIO = 3.0
STAGNANT_CHANGE = 2.3

QUALITY_WINDOW_SQL = (
    "SELECT sum(entity = 'segment') AS segments, avg(motion) AS motion_avg, "
    "max(motion) AS motion_max, avg(flicker) AS flicker_avg, max(flicker) AS flicker_max, "
    "count(CASE WHEN entity = 'segment' AND pop >= :pop THEN 1 END) AS pops, "
    "max(pop) AS pop_max, sum(entity = 'keyframe') AS keyframes, avg(drift) AS drift_avg, "
    "max(drift) AS drift_max, avg(change) AS change_avg, "
    "count(CASE WHEN entity = 'keyframe' AND change < :floor THEN 1 END) AS stagnant "
    "FROM quality WHERE created_at >= :since")
# a keyframe's colour beside its reference's (the first of its run of one theme)
QUALITY_KEYFRAMES_SQL = (
    "SELECT q.chain_index, q.created_at, q.lab_l, q.lab_a, q.lab_b, q.lab_l_std, "
    "q.saturation, q.brightness, q.contrast, q.change, q.drift, r.chain_index AS reference, "
    "r.lab_l AS reference_l, r.lab_a AS reference_a, r.lab_b AS reference_b "
    "FROM quality q LEFT JOIN quality r ON r.keyframe_id = q.reference_id "
    "WHERE q.entity = 'keyframe' ")
QUALITY_SEGMENTS_SQL = (
    "SELECT chain_index, created_at, n_frames, motion, flicker, boundary, pop, measure_ms "
    "FROM quality q WHERE entity = 'segment' ")
NEWEST = " ORDER BY q.chain_index DESC, q.id DESC LIMIT 1"
OLDEST_FIRST = " AND q.created_at >= :since ORDER BY q.chain_index, q.id"


def _rounded(row: dict[str, Any] | None, digits: int = 3) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in row.items()}


def _since(when: datetime | None) -> str:
    """A time as the ledger stores it (text compares in order); '' = from the first row."""
    return "" if when is None else when.isoformat(sep=" ", timespec="microseconds")


def quality_window(conn, since: datetime | None,
                   floor: float = STAGNANT_CHANGE) -> dict[str, Any]:
    """Segments and keyframes measured since `since` (None: all the ledger keeps):
    motion and flicker (mean, max), pops (boundaries at or above POP_RATIO times the
    typical step) and the worst, keyframe drift from its reference (mean, max) and
    change from the previous keyframe (mean), stagnant keyframes (change below
    STAGNANT_CHANGE), and stagnation breaks when the ledger records them."""
    row = _one(conn, QUALITY_WINDOW_SQL, {"pop": POP_RATIO, "floor": floor,
                                          "since": _since(since)}) or {}
    out = {k: (v or 0) if k in ("segments", "pops", "keyframes", "stagnant") else v
           for k, v in row.items()}
    if _has(conn, "breaks"):        # the stagnation breaker's record (dreamd/quality/)
        out["breaks"] = conn.execute("SELECT count(*) FROM breaks WHERE created_at >= ?",
                                     (_since(since),)).fetchone()[0]
    return _rounded(out)


def stagnant_streak(conn, floor: float = STAGNANT_CHANGE) -> int:
    """How many of the newest keyframes in a row changed less than `floor`."""
    streak = 0
    for (change,) in conn.execute(
            "SELECT change FROM quality WHERE entity = 'keyframe' "
            "ORDER BY chain_index DESC, id DESC LIMIT ?", (STREAK_LOOKBACK,)).fetchall():
        if change is None or change >= floor:
            break
        streak += 1
    return streak


def quality(conn, now: datetime | None = None, start: datetime | None = None,
            floor: float = STAGNANT_CHANGE) -> dict[str, Any] | None:
    """The dream's quality as every surface says it: the last hour's window, the
    window since `start` when given (`dreamd stats`: the last run's start), the newest
    keyframe (its colour against its reference's) and segment, and the stagnant
    streak. `floor`: the stagnation floor in effect (the knob quality.stagnation_floor,
    which the breaker uses too; the view quality_per_hour counts with the default).
    None on a ledger before 0008."""
    if conn is None or not _has(conn, "quality"):
        return None
    now = now or utcnow()
    out: dict[str, Any] = {"last_hour": quality_window(conn, now - QUALITY_HOUR, floor)}
    if start is not None:
        out["since_start"] = quality_window(conn, start, floor)
        out["start"] = _since(start)
    out["keyframe"] = _rounded(_one(conn, QUALITY_KEYFRAMES_SQL + NEWEST))
    out["segment"] = _rounded(_one(conn, QUALITY_SEGMENTS_SQL + NEWEST))
    out["stagnant_streak"] = stagnant_streak(conn, floor)
    out["thresholds"] = {"pop_ratio": POP_RATIO, "stagnant_change": floor}
    return out


def quality_series(conn, since: datetime | None = None) -> dict[str, list[dict[str, Any]]]:
    """Everything `dreamd stats --plot` draws, oldest first: segments (motion, flicker,
    pop), keyframes (colour and its reference's, drift, change), injections, the
    keyframes' embedding vectors (float32 blobs) and stagnation breaks."""
    params = {"since": _since(since)}
    out: dict[str, list[dict[str, Any]]] = {"segments": [], "keyframes": [],
                                            "injections": [], "vectors": [], "breaks": []}
    if not _has(conn, "quality"):
        return out
    out["segments"] = _all(conn, QUALITY_SEGMENTS_SQL + OLDEST_FIRST, params)
    out["keyframes"] = _all(conn, QUALITY_KEYFRAMES_SQL + OLDEST_FIRST, params)
    out["injections"] = _all(
        conn, "SELECT k.chain_index, i.kind, i.reason, i.created_at FROM injections i "
        "JOIN keyframes k ON k.id = i.keyframe_id WHERE i.created_at >= :since "
        "ORDER BY k.chain_index", params)
    out["vectors"] = _all(
        conn, "SELECT f.chain_index, f.created_at, e.model, e.vector FROM embeddings e "
        "JOIN frames f ON f.id = e.frame_id WHERE e.state = 'completed' "
        "AND f.kind = 'keyframe' AND e.vector IS NOT NULL AND f.created_at >= :since "
        "ORDER BY f.chain_index", params)
    if _has(conn, "breaks"):
        out["breaks"] = _all(conn, "SELECT chain_index, created_at FROM breaks "
                                   "WHERE created_at >= :since ORDER BY chain_index", params)
    return out


# ---------------------------------------------------------------- the workers' idle questions
# What the daemon's workers ask every two seconds, mostly to learn there is nothing to
# do, on each worker's kept connection (dreamd/workers/look.py): through SQLAlchemy Core
# on a pooled connection these cost several times what SQLite takes to answer them.
# `+state` keeps SQLite off the state index where the answer is at one end of another
# (the newest rows): that index would read every completed row of the history and sort
# them, a cost that grows for months; the other walks back a few rows. Same rows.

JOB_TABLES = {"keyframe": "keyframes", "interpolation": "interpolations",
              "embedding": "embeddings"}


def stamp(at: datetime) -> str:
    """A time as the ledger stores it (SQLAlchemy's SQLite DATETIME: the digits of naive
    UTC, always with microseconds), so comparing the text compares the times. (isoformat:
    strftime costs a worker's idle tick more than the question it is for.)"""
    return at.replace(tzinfo=None).isoformat(" ", "microseconds")


def has_due(conn, entity: str, now: datetime | None = None) -> bool:
    """Is a row of `entity` claimable, or about to be staged (retryable, its backoff
    over)? What an idle worker polls instead of taking the write lock to find nothing."""
    table = JOB_TABLES.get(entity)
    if table is None:
        raise ValueError(f"{entity!r} rows are not claimed: expected one of "
                         f"{', '.join(JOB_TABLES)}")
    return conn.execute(f"SELECT 1 FROM {table} WHERE state IN ('available', 'retryable') "
                        "AND scheduled_at <= ? LIMIT 1",
                        (stamp(now or utcnow()),)).fetchone() is not None


# the planner's
LAST_KEYFRAME_SQL = ("SELECT * FROM keyframes WHERE +state = 'completed' "
                     "ORDER BY chain_index DESC LIMIT 1")
COMING_SQL = f"SELECT coalesce(sum(n_frames + 1), 0) FROM interpolations WHERE state IN {PENDING}"


def last_keyframe(conn) -> dict[str, Any] | None:
    """The chain's newest completed keyframe (the next one's img2img input)."""
    return _one(conn, LAST_KEYFRAME_SQL)


def frames_coming(conn) -> int:
    """Frames that interpolation batches not yet done will produce."""
    return conn.execute(COMING_SQL).fetchone()[0]


def theme_index(conn) -> int:
    """The theme offset `dreamd` commands moved the rotation by (0 without a runtime row)."""
    row = conn.execute("SELECT theme_index FROM runtime_state WHERE id = 1").fetchone()
    return row[0] if row else 0


# the governor's measurements (dreamd/governor/worker.py says what they mean)
KEYFRAMES_TIMED = "FROM keyframes WHERE +state = 'completed' AND generation_ms IS NOT NULL"


def keyframe_ms(conn, limit: int, since: datetime | None = None) -> list[float]:
    """generation_ms of the last `limit` completed keyframes (of those started since
    `since`), newest first."""
    if since is None:
        sql, params = f"SELECT generation_ms {KEYFRAMES_TIMED} ORDER BY id DESC LIMIT ?", (limit,)
    else:
        sql = f"SELECT generation_ms {KEYFRAMES_TIMED} AND started_at >= ? ORDER BY id DESC LIMIT ?"
        params = (stamp(since), limit)
    return [r[0] for r in conn.execute(sql, params).fetchall()]


def batch_times(conn, limit: int, since: datetime | None = None) -> list[dict[str, Any]]:
    """The last `limit` completed interpolation batches with a time, newest first:
    {id, divisor, duration_ms, n_frames, first}; `first` is 1 for the first completed
    batch started since `since` (with or without a time), else 0 or None."""
    first = ("SELECT min(id) FROM interpolations WHERE +state = 'completed' "
             "AND started_at >= :since")
    return _all(conn, f"SELECT id, divisor, duration_ms, n_frames, id = ({first}) AS first "
                      "FROM interpolations WHERE +state = 'completed' "
                      "AND duration_ms IS NOT NULL ORDER BY id DESC LIMIT :n",
                {"n": limit, "since": None if since is None else stamp(since)})


# the embedding worker's
NEW_FRAMES_SQL = ("SELECT f.id, f.kind, f.t, f.interpolation_id, f.chain_index, i.n_frames "
                  "FROM frames f LEFT OUTER JOIN interpolations i ON i.id = f.interpolation_id "
                  "WHERE f.id > ? AND +f.state IN ('ready', 'shown') ORDER BY f.id")


def frames_after(conn, seen: int) -> list[dict[str, Any]]:
    """Ready or shown frames with an id above `seen`, oldest first, with their batch's
    size: {id, kind, t, interpolation_id, chain_index, n_frames}."""
    return _all(conn, NEW_FRAMES_SQL, (seen,))


def embedded_frames(conn, model: str, from_id: int) -> set[int]:
    """Frames from `from_id` on that have an embedding row of `model`, in any state."""
    return {r[0] for r in conn.execute("SELECT frame_id FROM embeddings WHERE frame_id >= ? "
                                       "AND model = ?", (from_id, model)).fetchall()}


def embeddings_waiting(conn) -> int:
    return conn.execute("SELECT count(*) FROM embeddings "
                        "WHERE state = 'available'").fetchone()[0]


def embeddings_to_shed(conn, n: int) -> list[int]:
    """The `n` waiting embedding rows to cancel under load: midpoints first, then the
    oldest."""
    return [r[0] for r in conn.execute(
        "SELECT e.id FROM embeddings e JOIN frames f ON f.id = e.frame_id "
        "WHERE e.state = 'available' ORDER BY f.kind = 'keyframe', e.id LIMIT ?",
        (n,)).fetchall()]
