"""The janitor: rescues expired leases, keeps the data dir within its limits
(dreamd/storage: retention, the budget, the free-space floor), and checkpoints the
WAL. Reconcile at start lives in dreamd/storage/reconcile.py.
"""

from __future__ import annotations

import json
import logging
import time

from sqlalchemy import text, update

from dreamd.conditions import settle_postpones
from dreamd.ledger import database, queries, transitions
from dreamd.ledger.models import ENTITY_MODELS, DaemonRun, utcnow
from dreamd.ledger.states import JOB_ENTITIES
from dreamd.quality import coherence
from dreamd.storage import retention, space
from dreamd.workers.context import WorkerContext

log = logging.getLogger("dreamd.janitor")
DR = DaemonRun.__table__
CHECKPOINT_EVERY = 60.0
# Seconds between walks of the data dir (the budget, the sizes in `dreamd status`): a stat
# per file, ~13 ms of CPU on a settled cache of ~3,300 files, most of the janitor's idle cost.
MEASURE_EVERY = 60.0
# Seconds between looks at the free space alone (one statvfs) for the floor: near it (under
# the resume mark) or paused under it, the walk and the floor's decision come at once.
FREE_EVERY = 15.0
# The whole retention pass (latents, blends, keyframe images, thumbnails, the history's
# rows: ~20 statements) when a keyframe was made since the last one, or this often; the
# passes between only evict shown frames, the one thing playback alone adds to.
FULL_PASS_EVERY = 60.0
LAST_KEYFRAME = text("SELECT max(id) FROM keyframes")
# A checkpoint that cannot fold the whole WAL back for this long means a reader holds an
# old snapshot of the ledger (an open sqlite3 shell, a database browser): the WAL then
# grows with every write (about 200 KB/s at the defaults) until that reader lets go.
WAL_HELD_AFTER = 120.0


def rescue_all(ctx: WorkerContext, *, everything: bool = False) -> int:
    """Expired leases back to available (or discarded). At start, when this daemon holds
    the data dir's pid file, every executing row is abandoned: no one else can hold it."""
    n = 0
    if not everything and not _any_executing(ctx):
        return 0          # nothing leased, nothing to rescue: no write lock taken
    with ctx.engine.begin() as conn:
        for entity in JOB_ENTITIES:
            mine = [] if everything else [
                i for e, i in [*ctx.in_hand, *ctx.owed_postpones] if e == entity]
            result = transitions.rescue(conn, entity, every_lease=everything, spare=mine,
                                        worker="startup" if everything else "janitor")
            for state, ids in result.items():
                if ids:
                    log.warning("%d %s row(s) abandoned by a dead worker -> %s: %s", len(ids),
                                entity, state, ids[:10])
                n += len(ids)
    return n


ANY_EXECUTING_SQL = text(" UNION ALL ".join(
    f"SELECT 1 FROM (SELECT 1 FROM {ENTITY_MODELS[e].__tablename__} "
    f"WHERE state = 'executing' LIMIT 1)" for e in JOB_ENTITIES))


def _any_executing(ctx: WorkerContext) -> bool:
    """Is any job row leased at all? (A read: the rescue itself is a write transaction,
    every 5 s, that finds nothing on a dream with nothing to make.)"""
    with ctx.reader.connect() as conn:
        return conn.execute(ANY_EXECUTING_SQL).first() is not None


def enforce_retention(ctx: WorkerContext) -> int:
    """Frames past retention or behind the playhead (dreamd/storage/retention.py)."""
    return retention.evict_frames(ctx)


class Janitor:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.last_checkpoint = time.monotonic()
        self.measured_at = float("-inf")
        self.free_checked_at = float("-inf")          # the last look at the free space
        self.full_pass_at = float("-inf")            # the last whole retention pass
        self.full_pass_keyframe: int | None = -1     # the newest keyframe then
        self.over = 0                   # bytes over the budget (or under the floor) to free
        self.freed = 0                  # bytes retention freed since the last measurement
        self.stuck_over = False         # over budget with nothing left to delete: said once
        self.wal_incomplete_since: float | None = None   # monotonic: the first short checkpoint

    def tick(self) -> None:
        if self.ctx.owed_postpones:
            settle_postpones(self.ctx)      # before the rescue: the attempt is given back
        rescue_all(self.ctx)
        self.storage()
        if time.monotonic() - self.last_checkpoint > CHECKPOINT_EVERY:
            self.last_checkpoint = time.monotonic()
            self.checkpoint()

    # ------------------------------------------------------------ the WAL
    def checkpoint(self, now: float | None = None) -> None:
        """Fold the WAL back into the ledger (PASSIVE: never waits for anyone). When a
        reader's old snapshot keeps part of it there for WAL_HELD_AFTER, say so once (the
        log, status.json's problem, `dreamd status`); when it lets go, give the space
        back at once (a truncating checkpoint; `journal_size_limit` caps it after that)."""
        now = time.monotonic() if now is None else now
        _busy, frames, folded = database.pragma(self.ctx.engine,
                                                "PRAGMA wal_checkpoint(PASSIVE)")[0]
        facts = self.ctx.facts
        if frames > 0 and folded < frames:
            if self.wal_incomplete_since is None:
                self.wal_incomplete_since, facts["wal_held_at"] = now, utcnow()
            if now - self.wal_incomplete_since >= WAL_HELD_AFTER:
                said = facts.get("wal_held")
                size = space.wal_bytes(self.ctx.cfg.db_path)
                since = facts["wal_held_at"].strftime("%H:%M UTC")
                # the size kept current at each look; the log says it once
                facts["wal_held"] = (f"a reader has held the ledger since {since} (an open "
                                     f"sqlite3 shell or database browser?): its WAL has "
                                     f"grown to {space.human(size)}; close that reader")
                if not said:
                    log.warning("%s; the space comes back by itself once it lets go",
                                facts["wal_held"])
            return
        self.wal_incomplete_since = None
        if facts.pop("wal_held", None):
            facts.pop("wal_held_at", None)
            database.pragma(self.ctx.engine, "PRAGMA wal_checkpoint(TRUNCATE)")
            log.info("the reader let go of the ledger: its WAL is folded back and "
                     "truncated (%s now)", space.human(space.wal_bytes(self.ctx.cfg.db_path)))


    # ------------------------------------------------------------ storage
    def storage(self) -> None:
        """Retention every tick (the whole pass when a keyframe came, or every
        FULL_PASS_EVERY; else the shown frames only); the budget and the floor from a walk
        every MEASURE_EVERY, or at once when a look at the free space every FREE_EVERY
        finds the floor near."""
        ctx = self.ctx
        now = time.monotonic()
        if now - self.measured_at >= MEASURE_EVERY or (
                now - self.free_checked_at >= FREE_EVERY and self.floor_near(now)):
            self.measure()
        started = time.perf_counter()
        with ctx.reader.connect() as conn:
            newest = conn.execute(LAST_KEYFRAME).scalar()
        now = time.monotonic()
        full = (self.over > 0 or newest != self.full_pass_keyframe
                or now - self.full_pass_at >= FULL_PASS_EVERY)
        report = retention.run_pass(ctx, over_budget=self.over, frames_only=not full)
        if full:
            self.full_pass_at, self.full_pass_keyframe = now, newest
            report.freed += coherence.prune_palettes(ctx)   # colour references no run needs
        self.over = max(0, self.over - report.freed)
        self.freed += report.freed
        if log.isEnabledFor(logging.DEBUG):   # bench/churn.py reads these
            log.debug("timing janitor id=0 storage_ms=%.2f freed=%d",
                      (time.perf_counter() - started) * 1000, report.freed)
        if report.any():
            log.debug("retention: %s", report)
            if report.freed and self.over == 0 and ctx.facts.get("storage_low"):
                self.measure()          # the floor may be cleared now

    def floor_near(self, now: float) -> bool:
        """Between walks: is the floor in force, or the free space under the mark where it
        would resume? Then measure() decides, as it always did; else nothing to do."""
        self.free_checked_at = now
        if self.ctx.facts.get("storage_low"):
            return True
        floor = int(self.ctx.cfg.storage.min_free_gb * space.GB)
        if not floor:
            return False
        free = space.free_bytes(self.ctx.cfg.data_dir)
        return free is not None and free < space.resume_mark(floor)

    def measure(self) -> None:
        ctx, s = self.ctx, self.ctx.cfg.storage
        self.measured_at = self.free_checked_at = time.monotonic()
        u = space.measure(ctx.cfg.data_dir, budget_gb=s.budget_gb, floor_gb=s.min_free_gb)
        deficit = 0
        low = None
        if u.floor and u.free is not None:
            # hysteresis: generation resumes a little above the floor, not at it
            resume = space.resume_mark(u.floor)
            was_low = bool(ctx.facts.get("storage_low"))
            if u.free < u.floor or (was_low and u.free < resume):
                deficit = resume - u.free
                low = (f"low disk space: {space.human(u.free)} free on the data dir's disk, "
                       f"below the floor of {space.human(u.floor)} (storage.min_free_gb)")
        self.budget_check(u, freed=self.freed)
        self.freed = 0
        self.over = max(u.over_budget(), deficit)
        self.set_low(low)
        try:
            with ctx.engine.begin() as conn:
                queries.update_runtime(conn, storage=json.dumps(
                    {**u.as_dict(), "low": low, "wal_held": ctx.facts.get("wal_held")}))
        except Exception:   # a busy ledger: the next measurement records it
            log.debug("storage usage not recorded", exc_info=True)

    def budget_check(self, u: space.Usage, *, freed: int) -> None:
        """Over the budget twice in a row with nothing freed in between: what is left is
        what the dream needs (the ledger, frames not yet shown, keyframes still in use),
        so the budget is too small for this configuration. Said once, with the size that
        would do; the dream goes on over budget rather than delete what it needs."""
        over = u.over_budget()
        if over and freed == 0 and self.over > 0:
            if not self.stuck_over:
                log.warning("the data dir is %s, over storage.budget_gb (%s), and nothing "
                            "more can be deleted: the rest is the ledger (%s) and what "
                            "playback still needs; raise storage.budget_gb to at least %.1f",
                            space.human(u.managed), space.human(u.budget),
                            space.human(u.parts.get("ledger", 0)),
                            max(0.1, round(u.managed * 1.5 / space.GB + 0.05, 1)))
            self.stuck_over = True
        elif not over:
            self.stuck_over = False

    def set_low(self, reason: str | None) -> None:
        """Pause generation under the free-space floor (playback goes on from the buffer);
        said once when it starts and once when it ends."""
        facts = self.ctx.facts
        if reason and not facts.get("storage_low"):
            log.warning("%s: generation paused, playback goes on from the buffer; it "
                        "resumes by itself when there is room (free space or lower "
                        "storage.min_free_gb)", reason)
        elif not reason and facts.get("storage_low"):
            log.info("disk space is back: generation resumes")
            self.ctx.wake("planner")
        facts["storage_low"] = reason


def heartbeat(ctx: WorkerContext) -> None:
    with ctx.engine.begin() as conn:
        conn.execute(update(DR).where(DR.c.id == ctx.run_id).values(heartbeat_at=utcnow()))
