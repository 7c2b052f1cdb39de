"""Which frames an export holds, in playback order (chain_index, t), and where each
comes from: its file when retention left it, else the segment made again from its two
keyframes with the codec that made it, else a gap the export names.

Read-only (sqlite3 `mode=ro`): an export never waits for the daemon or changes the
ledger.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from dreamd.errors import UsageError
from dreamd.storage.paths import resolve


@dataclass
class Keyframe:
    id: int
    chain_index: int
    theme: str
    path: Path | None          # the raw image, when retention left it
    thumb: Path | None
    width: int
    height: int
    completed_at: str | None


@dataclass
class Segment:
    """Keyframe k and the in-betweens towards k+1 (just k, for the last one)."""
    start: Keyframe
    end: Keyframe | None
    n: int                      # in-betweens (0 when the pair was never interpolated)
    codec: str | None
    divisor: float
    files: dict[float, Path] = field(default_factory=dict)   # t -> frame file on disk
    made: bool = True           # its frames were made (a completed batch or frame rows)

    @property
    def positions(self) -> list[float]:
        return [i / (self.n + 1) for i in range(self.n + 1)] if self.end else [0.0]

    def missing(self) -> list[float]:
        return [t for t in self.positions if _key(t) not in self.files]

    def remakable(self) -> bool:
        """Both keyframe images are still on disk and a codec is known."""
        return (self.end is not None and self.codec is not None and self.start.path is not None
                and self.end.path is not None)


@dataclass
class Plan:
    segments: list[Segment]
    first: tuple[int, float] | None = None     # trim: the first (chain, t) to write
    last: tuple[int, float] | None = None      # …and the last
    unmade: list[int] = field(default_factory=list)   # newest keyframes with no frames yet

    def slots(self) -> list[tuple[Segment, float]]:
        out = []
        for seg in self.segments:
            for t in seg.positions:
                pos = (seg.start.chain_index, t)
                if self.first and pos < self.first or self.last and pos > self.last:
                    continue
                out.append((seg, t))
        return out


def _key(t: float) -> float:
    return round(t, 6)


def _keyframes(conn: sqlite3.Connection, data_dir: Path, where: str, params: tuple,
               order: str = "ASC", limit: int = -1) -> list[Keyframe]:
    rows = conn.execute(
        f"SELECT id, chain_index, theme, path, thumb_path, width, height, completed_at "
        f"FROM keyframes WHERE state = 'completed' AND {where} "
        f"ORDER BY chain_index {order} LIMIT ?", (*params, limit)).fetchall()
    out = []
    for r in rows:
        p = resolve(data_dir, r["path"])
        th = resolve(data_dir, r["thumb_path"])
        out.append(Keyframe(r["id"], r["chain_index"], r["theme"],
                            p if p is not None and p.exists() else None,
                            th if th is not None and th.exists() else None,
                            r["width"], r["height"], r["completed_at"]))
    return sorted(out, key=lambda k: k.chain_index)


def keyframes(conn: sqlite3.Connection, data_dir: Path, *, first: int | None = None,
              last: int | None = None, newest: int | None = None) -> list[Keyframe]:
    """Completed keyframes by chain index: [first, last], or the newest N."""
    if newest is not None:
        return _keyframes(conn, data_dir, "1", (), "DESC", newest)
    lo = -1 if first is None else first
    hi = 2**62 if last is None else last
    return _keyframes(conn, data_dir, "chain_index BETWEEN ? AND ?", (lo, hi))


def segments(conn: sqlite3.Connection, data_dir: Path, kfs: list[Keyframe]) -> list[Segment]:
    if not kfs:
        return []
    lo, hi = kfs[0].chain_index, kfs[-1].chain_index
    batches = {r["chain_index"]: r for r in conn.execute(
        "SELECT chain_index, n_frames, codec, divisor FROM interpolations "
        "WHERE state = 'completed' AND chain_index BETWEEN ? AND ? ORDER BY id", (lo, hi))}
    files: dict[int, dict[float, Path]] = {}
    rows = {r[0] for r in conn.execute("SELECT DISTINCT chain_index FROM frames "
                                       "WHERE chain_index BETWEEN ? AND ?", (lo, hi))}
    for r in conn.execute("SELECT chain_index, t, path FROM frames WHERE state != 'evicted' "
                          "AND chain_index BETWEEN ? AND ?", (lo, hi)):
        p = resolve(data_dir, r["path"])
        if p is not None and p.exists():
            files.setdefault(r["chain_index"], {})[_key(r["t"])] = p
    out = []
    for a, b in zip(kfs, [*kfs[1:], None]):
        batch = batches.get(a.chain_index) if b is not None and \
            b.chain_index == a.chain_index + 1 else None
        out.append(Segment(a, b if batch else None, batch["n_frames"] if batch else 0,
                           batch["codec"] if batch else None,
                           float(batch["divisor"] or 1.0) if batch else 1.0,
                           files.get(a.chain_index, {}),
                           made=a.chain_index in batches or a.chain_index in rows))
    return out


def playhead(conn: sqlite3.Connection) -> tuple[int, float] | None:
    """The last shown (chain, t), else the newest frame made, else None."""
    rt = conn.execute("SELECT playhead_chain_index, playhead_t FROM runtime_state "
                      "WHERE id = 1").fetchone()
    if rt and rt[0] is not None:
        return rt[0], rt[1]
    row = conn.execute("SELECT chain_index, t FROM frames ORDER BY chain_index DESC, t DESC "
                       "LIMIT 1").fetchone()
    return (row[0], row[1]) if row else None


def by_seconds(conn: sqlite3.Connection, data_dir: Path, seconds: float,
               display_fps: float) -> Plan:
    """The last `seconds` of the dream as the display played it, ending at the playhead."""
    end = playhead(conn)
    if end is None:
        raise UsageError("nothing to export yet: no frame has been made (start the daemon)")
    want = max(1, round(seconds * display_fps))
    # every segment holds at least one frame: `want` keyframes back always cover it
    kfs = _keyframes(conn, data_dir, "chain_index <= ?", (end[0] + 1,), "DESC", want + 1)
    segs = segments(conn, data_dir, kfs)
    plan = Plan(segs, last=(end[0], end[1] + 1e-9))
    slots = plan.slots()
    if len(slots) > want:
        seg, t = slots[-want]
        plan.first = (seg.start.chain_index, t - 1e-9)
    return plan


def by_chain(conn: sqlite3.Connection, data_dir: Path, first: int | None,
             last: int | None, newest: int | None) -> Plan:
    kfs = keyframes(conn, data_dir, first=first, last=last, newest=newest)
    if not kfs:
        raise UsageError(f"no completed keyframe in the range asked for "
                         f"({_describe(first, last, newest)}): `dreamd history` lists them")
    plan = Plan(segments(conn, data_dir, kfs))
    # the newest keyframes may have no frames yet (their pair is still being
    # interpolated): the export ends before them, and says so
    while plan.segments and not plan.segments[-1].made:
        plan.unmade.insert(0, plan.segments.pop().start.chain_index)
    if not plan.segments:
        raise UsageError(f"keyframes {plan.unmade[0]} to {plan.unmade[-1]} have no frames "
                         f"yet (still being interpolated): nothing to export")
    # the range ends at its last keyframe: the frames towards the next one are not in it
    plan.segments[-1].end, plan.segments[-1].n = None, 0
    return plan


def _describe(first, last, newest) -> str:
    if newest is not None:
        return f"the last {newest}"
    return f"from {first if first is not None else 'the first'} to " \
           f"{last if last is not None else 'the last'}"
