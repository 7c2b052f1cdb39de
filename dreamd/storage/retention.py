"""Retention: every file the daemon writes has an owner row and a limit, and the
ledger's own rows a horizon. The janitor runs one pass every few seconds, in small
batches, outside the display tick.

What goes, and when (the README's "Storage" section is the contract):
- frames (segment starts and in-betweens): shown ones beyond `display.max_output_frames`,
  and ready ones the playhead has passed;
- keyframe images: past `storage.keyframe_hours` (a thumbnail stays when
  `storage.thumbnails`), the row stays as history with `pruned_at` set;
- latents: as soon as no pending batch and not the chain's head needs them;
- injection blends: once their keyframe is no longer pending;
- over `storage.budget_gb`: shown frames, then keyframe images, then thumbnails,
  oldest first, until the data dir fits;
- rows: frames, embeddings (not cache members) and transitions past
  `storage.frame_history_hours`; keyframes, interpolations, injections, controls and
  thumbnails past `storage.history_days` (the `quality` rows measuring a keyframe or a
  batch go with it: ON DELETE CASCADE); the file is given back (incremental vacuum).

Never deleted while live: frames ahead of the playhead, the playhead's frame (on
screen) and the one before it, in-flight work and its inputs, the chain's newest
keyframe, cache members and their pictures. Rows first, then files: a crash in
between leaves an orphan file, which a later pass (or reconcile) removes, never a
live row without its file.
"""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import (Connection, Integer, and_, bindparam, column, or_, select, text,
                        update)

from dreamd.faults import pause_point
from dreamd.ledger import database, transitions
from dreamd.ledger.models import Embedding, Frame, Keyframe, RuntimeState, utcnow
from dreamd.storage.files import write_atomic
from dreamd.storage.paths import resolve, stored

log = logging.getLogger("dreamd.storage")
FR, KF, EM, RT = Frame.__table__, Keyframe.__table__, Embedding.__table__, RuntimeState.__table__
BATCH = 500                 # rows (or files) per step: a pass never holds the ledger long
KEEP_SHOWN_MIN = 10         # shown frames the budget leaves, the current and previous among them
FILE_GRACE = 10.0          # seconds: a blend younger than this may not have its row yet
# A latent is written only while its batch is pending (so needed); one deleted just
# after its write costs nothing (the batch holds the tensor): a short grace suffices.
LATENT_GRACE = 2.0
PENDING = ("available", "executing", "retryable")
DONE = ("completed", "discarded", "cancelled")
THUMB_SIZE = (128, 128)
EMBEDDINGS_KEPT = 16        # the newest embeddings stay whatever their age: this many more
                            # than four collapse windows (dreamd/memory/collapse.py reads them)
ROWS_SECONDS = 1.0          # the most one pass spends pruning rows


@dataclass
class PassReport:
    frames: int = 0
    keyframe_images: int = 0
    thumbnails: int = 0
    latents: int = 0
    blends: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    freed: int = 0          # bytes of files deleted

    def any(self) -> bool:
        return bool(self.frames or self.keyframe_images or self.thumbnails or self.latents
                    or self.blends or any(self.rows.values()))


def _unlink(path: Path | None) -> int:
    """Delete a file; its size, or 0 when it was not there."""
    if path is None:
        return 0
    try:
        size = path.stat().st_size
        path.unlink()
        return size
    except FileNotFoundError:
        return 0


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


# ---------------------------------------------------------------- what is live

# Each rule of what is live is written once, as SQL: the sets below and the pruning
# queries (which leave the protected rows out before their LIMIT) are built from it.
_PENDING = "(" + ",".join(f"'{s}'" for s in PENDING) + ")"
# the chain's head: the next img2img input, and the `from` of the next batch. `+state`
# keeps SQLite off ix_keyframes_claim (which would sort every completed row, ~16 ms on
# 50,000) and on ix_keyframes_chain_index, read backwards to the first completed row.
_HEAD = ("SELECT id FROM keyframes WHERE +state = 'completed' "
         "ORDER BY chain_index DESC, id DESC LIMIT 1")
_BATCH_ENDS = (f"SELECT from_keyframe_id FROM interpolations WHERE state IN {_PENDING} "
               f"UNION SELECT to_keyframe_id FROM interpolations WHERE state IN {_PENDING}")
# Every branch is NOT NULL (a NULL would make `id NOT IN (...)` keep every row).
PROTECTED_KEYFRAMES = text(
    f"SELECT id FROM ({_HEAD}) "
    f"UNION SELECT parent_id FROM keyframes WHERE state IN {_PENDING} "
    "AND parent_id IS NOT NULL "
    f"UNION {_BATCH_ENDS} "
    "UNION SELECT f.keyframe_id FROM embeddings e JOIN frames f ON f.id = e.frame_id "
    "WHERE e.in_cache = 1 AND f.kind = 'keyframe' AND f.keyframe_id IS NOT NULL"
).columns(column("id", Integer))


def protected_keyframes(conn: Connection) -> set[int]:
    """Keyframes whose image is still needed: the chain's head (the next img2img input),
    inputs of pending keyframes, both ends of pending batches, and cache members."""
    return set(conn.execute(PROTECTED_KEYFRAMES).scalars())


def needed_latents(conn: Connection) -> set[str]:
    """Content hashes of the keyframes whose latents are still needed."""
    return set(conn.execute(text(
        "SELECT k.sha256 FROM keyframes k WHERE k.sha256 IS NOT NULL "
        f"AND (k.id IN ({_BATCH_ENDS}) OR k.id = ({_HEAD}))")).scalars())


def needed_blends(conn: Connection) -> set[str]:
    """Blended inputs (injections/) of keyframes still to be made."""
    return {p for p in conn.execute(text(
        "SELECT input_path FROM keyframes WHERE source = 'injection' "
        "AND state IN ('available','executing','retryable')")).scalars() if p}


# ---------------------------------------------------------------- frames

def evict_frames(ctx, *, budget_bytes: int = 0, report: PassReport | None = None) -> int:
    """Shown frames beyond `display.max_output_frames` (or, while over budget, beyond
    KEEP_SHOWN_MIN, oldest first, until `budget_bytes` are freed), and ready frames the
    playhead has passed. Cache members and the playhead's frame stay."""
    report = report or PassReport()
    keep = ctx.knob("display.max_output_frames")
    data_dir = ctx.cfg.data_dir
    member = FR.c.id.in_(select(EM.c.frame_id).where(EM.c.in_cache == 1))
    with ctx.reader.connect() as conn:
        rt = conn.execute(select(RT).where(RT.c.id == 1)).first()
        on_screen = rt.playhead_frame_id if rt is not None else None
        shown = select(FR.c.id, FR.c.path, FR.c.state).where(
            FR.c.state == "shown", ~member, FR.c.id != (on_screen or -1)
        ).order_by(FR.c.chain_index.desc(), FR.c.t.desc())
        old = conn.execute(shown.limit(BATCH).offset(keep)).all()
        if budget_bytes > 0:
            # over budget: the oldest shown frames first, the few on and near the screen
            # left out in SQL (read from the newest end, four batches never reached the
            # oldest when `display.max_output_frames` keeps more than that)
            near = shown.with_only_columns(FR.c.id).limit(KEEP_SHOWN_MIN).correlate(None)
            oldest = shown.where(FR.c.id.not_in(near)).order_by(None).order_by(
                FR.c.chain_index, FR.c.t)
            extra = conn.execute(oldest.limit(BATCH * 4)).all()
            seen = {r.id for r in old}
            need = budget_bytes - sum(_size(resolve(data_dir, r.path)) for r in old)
            for r in extra:
                if need <= 0:
                    break
                if r.id not in seen:
                    old.append(r)
                    need -= _size(resolve(data_dir, r.path))
        passed = []
        if rt is not None and rt.playhead_chain_index is not None:
            passed = conn.execute(select(FR.c.id, FR.c.path, FR.c.state).where(
                FR.c.state == "ready", ~member,
                or_(FR.c.chain_index < rt.playhead_chain_index,
                    and_(FR.c.chain_index == rt.playhead_chain_index,
                         FR.c.t < rt.playhead_t))).limit(BATCH)).all()
    evicted = 0
    for rows, why in ((old, "retention"), (passed, "behind the playhead")):
        if not rows:
            continue
        now = utcnow()
        with ctx.engine.begin() as conn:
            for r in rows:
                transitions.transition(conn, "frame", r.id, r.state, "evicted", worker="janitor",
                                       now=now, values={"evicted_at": now}, detail=why)
        pause_point("retention-frames-evicted", data_dir)
        for r in rows:
            report.freed += _unlink(resolve(data_dir, r.path))
        evicted += len(rows)
    report.frames += evicted
    return evicted


# ---------------------------------------------------------------- keyframe images

def thumbnail(ctx, row) -> str | None:
    """A small JPEG of a keyframe image, written before the row names it."""
    from PIL import Image

    src = resolve(ctx.cfg.data_dir, row.path)
    dst = ctx.cfg.data_dir / "thumbs" / f"k{row.chain_index:06d}-{row.id}.jpg"
    try:
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.thumbnail(THUMB_SIZE)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=70)
    except (OSError, ValueError) as exc:
        log.warning("keyframe %d: no thumbnail (%s)", row.chain_index, exc)
        return None
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        # no fsync: a thumbnail lost to a power cut is only history (reconcile clears
        # the row's thumb_path), and an fsync each cost more than the rest of the pass
        write_atomic(dst, buf.getvalue())
    except OSError as exc:      # a full disk: the image still goes (that frees space)
        log.debug("keyframe %d: no thumbnail (%s)", row.chain_index, exc)
        return None
    return stored(ctx.cfg.data_dir, dst)


def prune_keyframe_images(ctx, now: datetime, *, budget_bytes: int = 0,
                          report: PassReport | None = None) -> int:
    """Keyframe images past `storage.keyframe_hours`, and, while over budget, the oldest
    others until `budget_bytes` are freed; never a protected one."""
    report = report or PassReport()
    s = ctx.cfg.storage
    data_dir = ctx.cfg.data_dir
    with ctx.reader.connect() as conn:
        # the protected are left out in SQL, before the limit: a cache of thousands of
        # members among the oldest would otherwise fill the window every pass (issue 20)
        rows = conn.execute(select(KF.c.id, KF.c.chain_index, KF.c.path, KF.c.completed_at)
                            .where(KF.c.state == "completed", KF.c.path.is_not(None),
                                   KF.c.pruned_at.is_(None),
                                   KF.c.id.not_in(PROTECTED_KEYFRAMES))
                            .order_by(KF.c.chain_index).limit(BATCH * 4)).all()
    cutoff = now - timedelta(hours=s.keyframe_hours) if s.keyframe_hours else None
    chosen, need = [], budget_bytes
    for r in rows:
        if cutoff is not None and r.completed_at is not None and r.completed_at < cutoff:
            chosen.append(r)
        elif need > 0:
            chosen.append(r)
        else:
            continue
        need -= _size(resolve(data_dir, r.path))
        if len(chosen) >= BATCH:
            break
    if not chosen:
        return 0
    thumbs = {r.id: thumbnail(ctx, r) if s.thumbnails else None for r in chosen}
    with ctx.engine.begin() as conn:
        for r in chosen:
            conn.execute(update(KF).where(KF.c.id == r.id, KF.c.pruned_at.is_(None))
                         .values(pruned_at=now, thumb_path=thumbs[r.id]))
    pause_point("retention-images-pruned", data_dir)
    for r in chosen:
        report.freed += _unlink(resolve(data_dir, r.path))
    report.keyframe_images += len(chosen)
    return len(chosen)


def prune_thumbnails(ctx, budget_bytes: int, report: PassReport) -> int:
    """The budget's last resort: the oldest thumbnails (their rows keep the history)."""
    if budget_bytes <= 0:
        return 0
    data_dir = ctx.cfg.data_dir
    with ctx.reader.connect() as conn:
        rows = conn.execute(select(KF.c.id, KF.c.thumb_path).where(KF.c.thumb_path.is_not(None))
                            .order_by(KF.c.chain_index).limit(BATCH)).all()
    chosen, need = [], budget_bytes
    for r in rows:
        if need <= 0:
            break
        chosen.append(r)
        need -= _size(resolve(data_dir, r.thumb_path))
    if not chosen:
        return 0
    with ctx.engine.begin() as conn:
        conn.execute(update(KF).where(KF.c.id.in_([r.id for r in chosen])).values(thumb_path=None))
    for r in chosen:
        report.freed += _unlink(resolve(data_dir, r.thumb_path))
    report.thumbnails += len(chosen)
    return len(chosen)


# ---------------------------------------------------------------- latents and blends

def _stale(entry: os.DirEntry, now: float, grace: float = FILE_GRACE) -> bool:
    try:
        return now - entry.stat().st_mtime > grace
    except OSError:
        return False


def prune_latents(ctx, report: PassReport) -> int:
    """Latents are a cache of the codec's work: kept while a pending batch or the next
    one (the chain's head) needs them. Named by content hash, so never another image's."""
    folder = ctx.cfg.data_dir / "latents"
    if not folder.is_dir():
        return 0
    with ctx.reader.connect() as conn:
        needed = needed_latents(conn)
    now, n = time.time(), 0
    with os.scandir(folder) as it:
        for e in it:
            if e.name.split("-", 1)[0] in needed or not _stale(e, now, LATENT_GRACE):
                continue
            report.freed += _unlink(Path(e.path))
            n += 1
    report.latents += n
    return n


def prune_blends(ctx, report: PassReport) -> int:
    """Blended injection inputs go once their keyframe is made (or dropped)."""
    folder = ctx.cfg.data_dir / "injections"
    if not folder.is_dir():
        return 0
    with ctx.reader.connect() as conn:
        needed = {resolve(ctx.cfg.data_dir, p) for p in needed_blends(conn)}
    now, n = time.time(), 0
    with os.scandir(folder) as it:
        for e in it:
            if Path(e.path) in needed or not _stale(e, now):
                continue
            report.freed += _unlink(Path(e.path))
            n += 1
    report.blends += n
    return n


# ---------------------------------------------------------------- rows

def _delete_batch(conn: Connection, table: str, where: str, params: dict) -> int:
    return conn.execute(text(
        f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {where} "
        f"ORDER BY id LIMIT {BATCH})"), params).rowcount


def prune_rows(ctx, now: datetime, report: PassReport) -> bool:
    """One batch of each kind of history past its horizon, children before parents
    (foreign keys). True when a batch was full: there is more to prune."""
    s = ctx.cfg.storage
    rows = report.rows
    before = dict(rows)
    if s.frame_history_hours:
        cut = now - timedelta(hours=s.frame_history_hours)
        with ctx.engine.begin() as conn:
            rows["transitions"] = rows.get("transitions", 0) + _delete_batch(
                conn, "transitions", "at < :cut", {"cut": cut})
            rows["embeddings"] = rows.get("embeddings", 0) + _delete_batch(
                conn, "embeddings",
                "in_cache = 0 AND state IN ('completed','discarded','cancelled') "
                "AND created_at < :cut AND id <= (SELECT MAX(id) FROM embeddings) - :kept",
                {"cut": cut, "kept": EMBEDDINGS_KEPT + 4 * ctx.cfg.cache.collapse_window})
            rows["frames"] = rows.get("frames", 0) + _delete_batch(
                conn, "frames",
                "state = 'evicted' AND created_at < :cut "
                "AND id NOT IN (SELECT frame_id FROM embeddings) "
                "AND id NOT IN (SELECT source_frame_id FROM injections "
                "               WHERE source_frame_id IS NOT NULL) "
                "AND id NOT IN (SELECT playhead_frame_id FROM runtime_state "
                "               WHERE playhead_frame_id IS NOT NULL)", {"cut": cut})
    if s.history_days:
        cut = now - timedelta(days=s.history_days)
        with ctx.engine.begin() as conn:
            rows["controls"] = rows.get("controls", 0) + _delete_batch(
                conn, "controls", "state IN ('applied','rejected') AND created_at < :cut",
                {"cut": cut})
            # the newest decision stays: it is what the governor resumes from
            rows["governor_decisions"] = rows.get("governor_decisions", 0) + _delete_batch(
                conn, "governor_decisions",
                "at < :cut AND id != (SELECT MAX(id) FROM governor_decisions)", {"cut": cut})
            rows["interpolations"] = rows.get("interpolations", 0) + _delete_batch(
                conn, "interpolations",
                "state IN ('completed','discarded','cancelled') AND created_at < :cut "
                "AND id NOT IN (SELECT interpolation_id FROM frames "
                "               WHERE interpolation_id IS NOT NULL)", {"cut": cut})
            head = conn.execute(select(KF.c.id).where(KF.c.state == "completed")
                                .order_by(KF.c.chain_index.desc()).limit(1)).scalar() or -1
            old = conn.execute(text(
                "SELECT id, path, thumb_path, pruned_at FROM keyframes "
                "WHERE state IN ('completed','discarded','cancelled') AND created_at < :cut "
                "AND id != :head "
                "AND id NOT IN (SELECT keyframe_id FROM frames WHERE keyframe_id IS NOT NULL) "
                "AND id NOT IN (SELECT from_keyframe_id FROM interpolations) "
                "AND id NOT IN (SELECT to_keyframe_id FROM interpolations) "
                f"ORDER BY id LIMIT {BATCH}"), {"cut": cut, "head": head}).all()
            ids = [r.id for r in old]
            if ids:
                conn.execute(text("DELETE FROM injections WHERE keyframe_id IN :ids")
                             .bindparams(bindparam("ids", expanding=True)), {"ids": ids})
                conn.execute(text("UPDATE keyframes SET parent_id = NULL WHERE parent_id IN :ids")
                             .bindparams(bindparam("ids", expanding=True)), {"ids": ids})
                conn.execute(text("DELETE FROM keyframes WHERE id IN :ids")
                             .bindparams(bindparam("ids", expanding=True)), {"ids": ids})
            rows["keyframes"] = rows.get("keyframes", 0) + len(ids)
        if old:
            pause_point("retention-rows-pruned", ctx.cfg.data_dir)
        for r in old:
            if r.pruned_at is None:
                report.freed += _unlink(resolve(ctx.cfg.data_dir, r.path))
            report.freed += _unlink(resolve(ctx.cfg.data_dir, r.thumb_path))
    return any(rows.get(k, 0) - before.get(k, 0) >= BATCH for k in rows)


def give_back_space(ctx) -> None:
    """Return the pages pruning freed to the OS (auto_vacuum = INCREMENTAL), a bounded
    number at a time so the write lock is held briefly."""
    database.pragma(ctx.engine, "PRAGMA incremental_vacuum(2000)")


def ensure_incremental_vacuum(db_path: Path) -> bool:
    """Turn on incremental auto-vacuum for a ledger made without it (one VACUUM, once).
    Returns True when it had to."""
    import sqlite3

    con = sqlite3.connect(db_path, isolation_level=None, timeout=30)
    try:
        if con.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
            return False
        con.execute("PRAGMA auto_vacuum = INCREMENTAL")
        con.execute("VACUUM")       # needs room for a copy of the ledger
        return True
    except sqlite3.Error as exc:    # no room, or busy: pruning still works, the file stays
        log.warning("%s: could not turn on incremental vacuum (%s); will try at the next "
                    "start", db_path, exc)
        return False
    finally:
        con.close()


# ---------------------------------------------------------------- one pass

def run_pass(ctx, *, over_budget: int = 0, now: datetime | None = None,
             frames_only: bool = False) -> PassReport:
    """One retention pass: horizons always, the budget when `over_budget` bytes must go.
    `frames_only`: the shown frames only (what playback alone adds to; the janitor's
    passes between two keyframes, see Janitor.storage)."""
    now = now or utcnow()
    report = PassReport()
    if frames_only and not over_budget:
        evict_frames(ctx, report=report)
        return report
    prune_latents(ctx, report)
    prune_blends(ctx, report)
    need = max(0, over_budget - report.freed)
    evict_frames(ctx, budget_bytes=need, report=report)
    need = max(0, over_budget - report.freed)
    prune_keyframe_images(ctx, now, budget_bytes=need, report=report)
    need = max(0, over_budget - report.freed)
    prune_thumbnails(ctx, need, report)
    # batches until the history is caught up (a fast dream makes ~15 transitions per
    # keyframe), each its own short transaction, within ROWS_SECONDS a pass
    deadline = time.monotonic() + ROWS_SECONDS
    while prune_rows(ctx, now, report) and time.monotonic() < deadline:
        pass
    if any(report.rows.values()):
        give_back_space(ctx)
    return report
