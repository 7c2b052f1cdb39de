"""The janitor: rescues expired leases, keeps disk use bounded (retention),
reconciles files with rows at start (files before rows means a crash can leave a
file no row names, never a row without its file), and checkpoints the WAL.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import and_, or_, select, update

from dreamd.storage.files import is_temp
from dreamd.ledger import transitions
from dreamd.ledger.models import DaemonRun, Embedding, Frame, Keyframe, RuntimeState, utcnow
from dreamd.ledger.states import JOB_ENTITIES
from dreamd.workers.context import WorkerContext

log = logging.getLogger("dreamd.janitor")
FR, KF, RT, DR = Frame.__table__, Keyframe.__table__, RuntimeState.__table__, DaemonRun.__table__
EM = Embedding.__table__
EVICT_BATCH = 500
CHECKPOINT_EVERY = 60.0


def rescue_all(ctx: WorkerContext, *, everything: bool = False) -> int:
    """Expired leases back to available (or discarded). At start, when this daemon holds
    the data dir's pid file, every executing row is abandoned: no one else can hold it."""
    n = 0
    with ctx.engine.begin() as conn:
        for entity in JOB_ENTITIES:
            result = transitions.rescue(conn, entity, every_lease=everything,
                                        worker="startup" if everything else "janitor")
            for state, ids in result.items():
                if ids:
                    log.warning("%d %s row(s) abandoned by a dead worker -> %s: %s", len(ids),
                                entity, state, ids[:10])
                n += len(ids)
    return n


def enforce_retention(ctx: WorkerContext) -> int:
    """Delete shown in-between files beyond `display.max_output_frames` (newest kept),
    and ready frames the playhead has passed (they can never be shown in order); frames
    in the aesthetic memory's cache are skipped."""
    keep = ctx.knob("display.max_output_frames")
    evicted = 0
    # the aesthetic memory's members keep their files while they are members
    member = FR.c.id.in_(select(EM.c.frame_id).where(EM.c.in_cache == 1))
    with ctx.reader.connect() as conn:
        old = conn.execute(select(FR.c.id, FR.c.path, FR.c.state)
                           .where(FR.c.state == "shown", FR.c.kind == "inbetween", ~member)
                           .order_by(FR.c.chain_index.desc(), FR.c.t.desc())
                           .limit(EVICT_BATCH).offset(keep)).all()
        rt = conn.execute(select(RT).where(RT.c.id == 1)).first()
        passed = []
        if rt is not None and rt.playhead_chain_index is not None:
            passed = conn.execute(select(FR.c.id, FR.c.path, FR.c.state).where(
                FR.c.state == "ready", ~member,
                or_(FR.c.chain_index < rt.playhead_chain_index,
                    and_(FR.c.chain_index == rt.playhead_chain_index,
                         FR.c.t < rt.playhead_t))).limit(EVICT_BATCH)).all()
    for rows, why in ((old, "retention"), (passed, "behind the playhead")):
        if not rows:
            continue
        # rows first, then files: a crash in between leaves a file with no live row,
        # which the next start's reconcile deletes; never a live row without its file
        now = utcnow()
        with ctx.engine.begin() as conn:
            for r in rows:
                transitions.transition(conn, "frame", r.id, r.state, "evicted", worker="janitor",
                                       now=now, values={"evicted_at": now}, detail=why)
        for r in rows:
            Path(r.path).unlink(missing_ok=True)
        evicted += len(rows)
    return evicted


def reconcile(ctx: WorkerContext) -> dict[str, int]:
    """At start: rows whose files vanished are evicted; files no live row names are
    deleted (an interrupted write); temp files are deleted."""
    cfg = ctx.cfg
    stats = {"rows_missing_file": 0, "orphan_files": 0, "temp_files": 0}
    with ctx.reader.connect() as conn:
        live = conn.execute(select(FR.c.id, FR.c.path, FR.c.state)
                            .where(FR.c.state.in_(("ready", "shown")))).all()
        keyframe_files = {Path(p) for p in conn.execute(
            select(KF.c.path).where(KF.c.path.is_not(None))).scalars()}
        # blended inputs of injected keyframes (dreamd/memory/injection.py)
        injection_files = {Path(p) for p in conn.execute(
            select(KF.c.input_path).where(KF.c.source == "injection")).scalars() if p}
    missing = [r for r in live if not Path(r.path).exists()]
    if missing:
        now = utcnow()
        with ctx.engine.begin() as conn:
            for r in missing:
                transitions.transition(conn, "frame", r.id, r.state, "evicted", worker="startup",
                                       now=now, values={"evicted_at": now},
                                       detail="file missing at start")
        stats["rows_missing_file"] = len(missing)
    named = {Path(r.path) for r in live}
    for folder, known in ((cfg.frames_dir, named), (cfg.keyframes_dir, keyframe_files),
                          (cfg.data_dir / "injections", injection_files)):
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            if is_temp(f):
                f.unlink(missing_ok=True)
                stats["temp_files"] += 1
            elif f.suffix == ".png" and f not in known:
                f.unlink(missing_ok=True)
                stats["orphan_files"] += 1
    if any(stats.values()):
        log.warning("reconciled files with the ledger: %s", stats)
    return stats


class Janitor:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.last_checkpoint = time.monotonic()

    def tick(self) -> None:
        rescue_all(self.ctx)
        enforce_retention(self.ctx)
        if time.monotonic() - self.last_checkpoint > CHECKPOINT_EVERY:
            self.last_checkpoint = time.monotonic()
            # outside any transaction (the raw connection is in autocommit mode)
            raw = self.ctx.engine.raw_connection()
            try:
                raw.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                raw.close()


def heartbeat(ctx: WorkerContext) -> None:
    with ctx.engine.begin() as conn:
        conn.execute(update(DR).where(DR.c.id == ctx.run_id).values(heartbeat_at=utcnow()))
