"""The dashboard's read side: one `Snapshot` of the dream from the ledger (read-only),
status.json and the GPU, taken in a worker thread. Nothing here touches a widget; a
locked or missing ledger becomes a `problem` line, never an exception.

Liveness is judged the way the README asks every reader to: status.json is stale
when `last_update` is older than `stale_after_seconds`, and the ledger's last
`daemon_runs` row must have a fresh heartbeat and no `stopped_at`.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from dreamd.ledger.read_model import ago
from dreamd.tui import gpu

HISTORY_ROWS = 40
EVENT_ROWS = 30
COUNTS_EVERY = 5.0          # seconds between the (dearer) rows-per-state counts
RATE_WINDOW = timedelta(seconds=60)
KEYFRAME_WINDOW = timedelta(minutes=10)


@dataclass
class Daemon:
    alive: bool
    line: str                       # said plainly: running, stopped, not answering, never
    run: dict[str, Any] | None = None


@dataclass
class Snapshot:
    taken_at: datetime
    daemon: Daemon
    status: dict[str, Any] | None   # status.json while fresh, else None
    problem: str | None = None      # the ledger could not be read: why
    paused: bool = False
    pause_reason: str | None = None
    knobs: dict[str, Any] = field(default_factory=dict)
    fps: float | None = None        # display rate (status.json, or knob/config)
    buffer_seconds: float | None = None
    buffer_target: float | None = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    keyframes_per_minute: float | None = None
    produced_fps: float | None = None
    shown_fps: float | None = None
    underruns: int | None = None
    frames_shown: int | None = None
    backend: str | None = None
    codec: str | None = None
    comfyui: dict[str, Any] | None = None
    in_progress: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    controls: dict[int, dict[str, Any]] = field(default_factory=dict)
    governor: dict[str, Any] | None = None    # its last decision (ledgers from 0006 on)
    quality: dict[str, Any] | None = None     # the read model's, last hour (0008 on)
    gpu: gpu.Reading | None = None
    found: Any = None               # the read model's Status this snapshot was made from


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Reader:
    """Takes snapshots of one data dir. Keeps what rates need between two snapshots
    (frames shown then and now) and a pooled read-only engine; one thread uses it."""

    def __init__(self, cfg, *, now: Callable[[], datetime] = utcnow,
                 gpu_reader: Callable[[], gpu.Reading] = gpu.read,
                 host: str | None = None) -> None:
        self.cfg = cfg
        self.now = now
        self.gpu_reader = gpu_reader
        self.host = host or socket.gethostname()
        self.conn = None            # sqlite3, read-only: no SQLAlchemy import to wait for
        self._counts: dict[str, dict[str, int]] = {}
        self._counted_at = float("-inf")
        self._shown: tuple[float, int] | None = None     # (monotonic, frames_shown)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # ------------------------------------------------------------ status.json
    def status_json(self, now: datetime) -> tuple[dict[str, Any] | None, str | None]:
        """(status.json when fresh, else None; its age said in words when stale)."""
        path = self.cfg.output_dir / "status.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            updated = datetime.fromisoformat(data["last_update"]).astimezone(timezone.utc)
        except FileNotFoundError:
            return None, "no status.json yet"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return None, f"status.json unreadable ({exc})"
        age = (now - updated.replace(tzinfo=None)).total_seconds()
        limit = float(data.get("stale_after_seconds") or 10.0)
        if age > limit:
            return None, f"status.json {ago(age)} old (stale after {limit:g} s)"
        return data, None

    # ------------------------------------------------------------ the snapshot
    def read(self, controls: set[int] | frozenset[int] = frozenset(),
             with_gpu: bool = True) -> Snapshot:
        now = self.now()
        status, stale = self.status_json(now)
        snap = Snapshot(taken_at=now, daemon=Daemon(False, "no daemon running"), status=status)
        if with_gpu:
            snap.gpu = self.gpu_reader()
        if status:
            snap.fps, snap.buffer_seconds = status.get("fps"), status.get("buffer_seconds")
            snap.buffer_target = status.get("buffer_target_seconds")
            snap.backend, snap.codec = status.get("backend"), status.get("codec")
        try:
            self._read_ledger(snap, controls, now)
        except Exception as exc:       # locked, damaged, being replaced: said, not raised
            from dreamd.ledger.unusable import explain

            why = explain(exc, self.cfg.db_path)
            snap.problem = str(why) if why else f"the ledger cannot be read now: {exc}"
            self.close()
        snap.daemon = self._daemon(snap, status, stale)
        return snap

    def _read_ledger(self, snap: Snapshot, controls, now: datetime) -> None:
        from dreamd.ledger import read_model

        if not self.cfg.db_path.exists():
            snap.problem = f"no ledger at {self.cfg.db_path} yet: start the daemon (`dreamd run`)"
            return
        if self.conn is None:
            self.conn = read_model.connect(self.cfg.db_path)
        conn = self.conn
        conn.execute("BEGIN")                           # one consistent read
        try:
            self._read(conn, snap, controls, now)
        finally:
            conn.execute("ROLLBACK")

    def _read(self, conn, snap: Snapshot, controls, now: datetime) -> None:
        from dreamd.ledger import read_model

        def one(sql: str, **kw) -> dict[str, Any] | None:
            row = conn.execute(sql, kw).fetchone()
            return dict(row) if row is not None else None

        def every(sql: str, **kw) -> list[dict[str, Any]]:
            return [dict(r) for r in conn.execute(sql, kw).fetchall()]

        if one("SELECT 1 FROM sqlite_master WHERE name = 'runtime_state'") is None:
            snap.problem = f"{self.cfg.db_path} has no tables yet: start the daemon"
            return
        # the read model's answers: the same as `dreamd status`, the viewer, status.json
        found = read_model.status(conn, self.cfg, now=now, host=self.host, counts=False)
        snap.daemon.run = found.last_run
        snap.found = found
        snap.paused, snap.pause_reason = found.pause.paused, found.pause.reason
        snap.knobs = {k: v.value for k, v in found.knobs.items()}
        snap.in_progress = found.in_progress
        snap.comfyui = found.comfyui
        snap.quality = found.quality
        if found.playhead:
            snap.underruns, snap.frames_shown = (found.playhead["underruns"],
                                                 found.playhead["frames_shown"])
            self._shown_rate(snap, found.playhead["frames_shown"])
        if snap.fps is None and found.buffer is not None:
            snap.fps, snap.buffer_seconds = found.buffer.fps, found.buffer.seconds
            snap.buffer_target = found.buffer.target_seconds
        if snap.backend is None:
            snap.backend = ((found.last_run or {}).get("backend")
                            or self.cfg.generation.backend)
        if snap.codec is None:
            row = one("SELECT codec FROM interpolations WHERE codec IS NOT NULL "
                      "ORDER BY id DESC LIMIT 1")
            snap.codec = row["codec"] if row else None
        mono = time.monotonic()
        if mono - self._counted_at >= COUNTS_EVERY:
            self._counts, self._counted_at = read_model.state_counts(conn), mono
        snap.counts = self._counts
        made = one("SELECT count(*) AS n FROM frames WHERE created_at > :s",
                   s=_db(now - RATE_WINDOW))["n"]
        snap.produced_fps = round(made / RATE_WINDOW.total_seconds(), 2)
        snap.history = every(
            "SELECT k.id, k.chain_index, k.theme, k.denoise, k.source, k.backend, "
            "k.generation_ms, k.state, k.path, k.thumb_path, k.completed_at, "
            "i.kind AS injection, i.reason AS injection_reason "
            "FROM keyframes k LEFT JOIN injections i ON i.keyframe_id = k.id "
            "ORDER BY k.chain_index DESC, k.id DESC LIMIT :n", n=HISTORY_ROWS)
        recent = [h for h in snap.history if h["completed_at"] is not None
                  and _dt(h["completed_at"]) > now - KEYFRAME_WINDOW]
        snap.keyframes_per_minute = round(len(recent) / (KEYFRAME_WINDOW.total_seconds() / 60),
                                          2)
        snap.events = every("SELECT id, at, entity, entity_id, from_state, to_state, event, "
                            "worker, detail FROM transitions ORDER BY id DESC LIMIT :n",
                            n=EVENT_ROWS)
        decisions = (found.governor or {}).get("decisions") or []
        snap.governor = decisions[0] if decisions else None
        if controls:
            ids = ",".join(str(int(i)) for i in controls)
            snap.controls = {r["id"]: r for r in every(
                f"SELECT id, command, args, state, error, created_at, applied_at "
                f"FROM controls WHERE id IN ({ids})")}

    def _shown_rate(self, snap: Snapshot, shown: int) -> None:
        mono = time.monotonic()
        if self._shown is not None and mono - self._shown[0] > 0.5:
            then, before = self._shown
            snap.shown_fps = round(max(0, shown - before) / (mono - then), 2)
            self._shown = (mono, shown)
        elif self._shown is None:
            self._shown = (mono, shown)

    def knob(self, snap: Snapshot, path: str) -> Any:
        """A live knob's value in effect (the read model's: stored by `dreamd set` when it
        still validates, else the config's)."""
        if path in snap.knobs:
            return snap.knobs[path]
        section, name = path.split(".")
        return getattr(getattr(self.cfg, section), name)

    def _daemon(self, snap: Snapshot, status: dict[str, Any] | None,
                stale: str | None) -> Daemon:
        """The read model's liveness; and a live daemon whose status.json went stale is
        said to be not answering (hung, or unable to write)."""
        from dreamd.ledger import read_model

        found = snap.found
        if found is None or found.last_run is None:
            if status:
                return Daemon(True, "a daemon is writing status.json (its ledger is "
                              "not readable)")
            return Daemon(False, read_model.liveness(None).line)
        live = found.daemon
        if live.alive and stale and stale != "no status.json yet":
            run = found.last_run
            return Daemon(False, f"the daemon (run {run['id']}, pid {run['pid']} on "
                          f"{run['host']}) is not answering: {stale}", run)
        return Daemon(live.alive, live.line, found.last_run)


def _dt(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def _db(value: datetime) -> str:
    """A time as the ledger stores it (text compares in order)."""
    return value.isoformat(sep=" ", timespec="microseconds")
