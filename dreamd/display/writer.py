"""The display writer: at `display.fps` it puts the next frame, in (chain_index, t)
order, on screen (`current_frame.png`, with the one the file held before in
`previous_frame.png` for a crossfade), marks it shown and moves the playhead, and
keeps `status.json` current. It never shows frames out of order: on underrun it
holds the last frame, counts the underrun, and buffers again.

Showing never waits on the ledger: a frame is shown, then recorded (shown, playhead)
through the display's own write connection, which gives up on a busy ledger in a
fraction of a second. While another process holds the write lock, playback goes on
from the frames already made, the records wait in memory, and the ledger is caught up
(with the times the frames were really shown) as soon as it is free.

The output folder's three files are the surface of readers that poll them (the
Rainmeter skin reads status.json every 100 ms and crossfades when its frame_number
changes): they are written together, the frame files first, so status.json never names
a frame that is not in current_frame.png, and previous_frame.png is always the frame
the file held before, the one such a reader showed last. While frames play they are
written with a frame at most every STATUS_GAP seconds: with every frame up to 10 fps,
with every other one at 15 (the web viewer, told of each frame, shows them all); at once
when the state changes (an underrun, a pause) and at a stop, so a held frame is the
last one shown.

What it costs, since it runs at every frame for months (bench/pipeline.py --idle-only):
the frames shown while playing are recorded together every RECORD_EVERY seconds (one
write transaction, not one per frame; at once when playback stops: an underrun, a
pause, a stop), the next frame is read on a kept read-only sqlite3 connection, and the
output files are written as above. A crash can lose the record of the last
RECORD_EVERY seconds of frames, never a frame: those are shown again after the restart.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from datetime import datetime, timezone

from sqlalchemy import bindparam, update

from dreamd.conditions import LEDGER_BUSY, classify, watch_ledger
from dreamd.display import status as status_json
from dreamd.storage.files import place_atomic, sweep_temps
from dreamd import faults
from dreamd.ledger import database, queries, read_model, transitions
from dreamd.ledger.models import RuntimeState, utcnow
from dreamd.workers.context import WorkerContext, log_timing, timed
from dreamd.governor.worker import Pacer

log = logging.getLogger("dreamd.display")
RT = RuntimeState.__table__
STATUS_EVERY = 0.5   # seconds between status.json writes, unless the state changes
# While frames play, the output files (the frame, the one before, status.json) are written
# with each one (the Rainmeter skin's crossfade waits for frame_number to change; it reads
# the file every 100 ms), but not more often than this: at most ~10 times a second, each
# time three new names and renames. 0.09, not 0.1, so a frame at 10 fps that comes a few
# ms early is still written.
STATUS_GAP = 0.09
RECORD_EVERY = 1.0   # seconds between ledger records of the frames shown while playing
COUNT_EVERY = 0.5    # seconds between recounts of the buffer (decremented in between)
BUSY_TIMEOUT_MS = 150  # the display's write connection: it has frames to show, not to wait
RECORD_RETRY = 0.5   # seconds between tries to record shown frames on a busy ledger
# The display gives up on the lock after 150 ms so that playback never waits, but the
# daemon's own writers can hold it that long (a retention batch, the catch-up after a
# lock): the ledger is called busy only when recording has failed for this long.
BUSY_AFTER = 3.0


# What `record` writes, built once: a statement built at every frame (its expressions,
# then its cache key) cost more CPU than running it.
_RECORD_UNDERRUNS = update(RT).where(RT.c.id == 1).values(
    underruns=RT.c.underruns + bindparam("_underruns"), updated_at=bindparam("_now"))
_RECORD_SHOWN = _RECORD_UNDERRUNS.values(
    playhead_frame_id=bindparam("_frame_id"), playhead_chain_index=bindparam("_chain"),
    playhead_t=bindparam("_t"), frames_shown=RT.c.frames_shown + bindparam("_shown"))


class DisplayWriter:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.out = ctx.cfg.output_dir
        self.out.mkdir(parents=True, exist_ok=True)
        # built once: Path objects made at every frame were a tenth of its CPU
        self.data_dir = ctx.cfg.data_dir
        self.root = os.fspath(self.data_dir)   # frames' paths: strings, not Path objects
        self.fault_points = faults.armed()     # the crash tests' (dreamd/faults.py)
        self.current_path = self.out / "current_frame.png"
        self.previous_path = self.out / "previous_frame.png"
        self.status_path = self.out / "status.json"
        stale = sweep_temps(self.out)   # temp links an interrupted swap left behind
        if stale:
            log.info("removed %d stale temp file(s) from %s", stale, self.out)
        rt = ctx.runtime()
        self.chain: int | None = rt.playhead_chain_index
        self.t: float | None = rt.playhead_t
        self.frames_shown = rt.frames_shown
        self.current: str | None = None     # the frame on screen (its file)
        self.placed: str | None = None      # the frame in current_frame.png (see place)
        self.prompt: str | None = None
        self.theme: str | None = None
        self.buffering = True
        self.in_underrun = False
        self.state = "starting"
        self.last_status = 0.0
        self.last_state = ""
        self.ahead = 0
        self.counted_at = float("-inf")
        self.counted_newest: int | None = None   # the newest frame's id at the last count
        # the frames to show next, read once per segment or recount (next_frames)
        self.upcoming: deque = deque()
        # shown, not yet in the ledger (a batch, or it was busy): (id, chain, t, time.time())
        self.pending: list[tuple[int, int, float, float]] = []
        self.pending_underruns = 0
        self.next_record = 0.0
        self.recorded_at = float("-inf")
        self.record_failing_since: float | None = None
        self.engine = _impatient_writer(ctx)
        self.timings: dict[str, float] = {}   # the last frame's, for its timing line
        self.pacer = Pacer(ctx)             # the daemon sets pacer.on_change
        # the web viewer's hook (dreamd/web/server.py): told of each frame on screen; it
        # only hands the news to the viewer's own thread, so it cannot hold playback up
        self.on_shown = None

    # ------------------------------------------------------------ queries
    def buffered(self, conn) -> int:
        return queries.frames_ahead(conn, self.chain, self.t)

    def look(self):
        """The display's own read-only sqlite3 connection, kept open (ctx.look): its
        queries run at every frame, and a pooled SQLAlchemy connection cost more than
        the queries. Autocommit: each statement is its own read, no snapshot is held
        between frames. Dropped after an error (the next tick opens it again)."""
        return self.ctx.look("display", timeout=BUSY_TIMEOUT_MS / 1000).connection()

    def _drop_look(self) -> None:
        self.ctx.look("display").close()

    # ------------------------------------------------------------ tick
    def tick(self) -> None:
        """One display step; a condition of the machine (a busy ledger, a full disk) is
        reported and ridden out, never raised into the scheduler."""
        try:
            self._tick()
        except Exception as exc:
            self.upcoming.clear()            # read again: a frame may be gone
            if isinstance(exc, read_model.sqlite3.Error):
                self._drop_look()
            kind = classify(exc)
            if kind is None:
                raise
            self.ctx.conditions.report(kind, "display", exc)
            self._status_maybe(self.ctx.knob("display.fps"), force=False, ahead=self.ahead)

    def _tick(self) -> None:
        ctx = self.ctx
        fps = ctx.knob("display.fps")
        self.record(batch=True)              # what is due, or was kept while it was busy
        if ctx.paused():
            self.record()                    # stopped here: the ledger says where
            self.state = "paused"
            self._status_maybe(fps, force=False)
            return
        now = time.monotonic()
        # Counting the buffer is the tick's dearest query (it walks every frame ahead):
        # twice a second is enough while frames play, and afresh whenever none can
        # (buffering, an underrun), so the status says what is ready now. The frames to
        # show are read again then too, and when a segment's run out. Nothing takes a
        # ready frame ahead of the playhead away while the daemon runs, so while no
        # frame is made (the newest id, a lookup, is the one of the last count) the
        # count counted down and the frames read stand (a file deleted behind the
        # daemon's back fails one tick, and the next reads them again).
        recount = self.buffering or now - self.counted_at >= COUNT_EVERY
        if recount and not self.buffering and \
                read_model.newest_frame(self.look()) == self.counted_newest:
            # no frame made since the last count: the frames ahead are those counted
            # less those shown since (counted down), and the ones to show are those read
            recount, self.counted_at = False, now
        if recount or not self.upcoming:
            self.upcoming = deque(read_model.next_frames(self.look(), self.chain, self.t))
        nxt = self.upcoming[0] if self.upcoming else None
        if recount or nxt is None:
            conn = self.look()
            self.counted_newest = read_model.newest_frame(conn)    # before the count
            self.ahead = read_model.frames_ahead(conn, self.chain, self.t)
            self.counted_at = now
        ahead = self.ahead
        seconds = ahead / fps
        first = self.current is None and self.chain is None
        if self.buffering:
            if seconds >= ctx.knob("display.min_buffer_seconds") and nxt is not None:
                self.buffering = False
            elif first and nxt is not None:
                self.state = "buffering"   # playback starts as soon as a frame exists
                self.show(self.upcoming.popleft(), fps, ahead=ahead - 1)
                return
            else:
                # after an underrun the status keeps saying so until playback resumes
                self.state = "underrun" if self.in_underrun else "buffering"
                self._status_maybe(fps, force=False, ahead=ahead)
                return
        if nxt is None:
            if not self.in_underrun:
                self.in_underrun = True
                self.pending_underruns += 1
                self.record()
                log.info("underrun: holding the last frame until the buffer refills")
            self.buffering = True
            self.state = "underrun"
            self._status_maybe(fps, force=True, ahead=ahead)
            return
        self.in_underrun = False
        self.pacer.pace(seconds)            # the governor's gentle slow-down on a low buffer
        self.ahead = max(0, ahead - 1)
        self.state = "playing"
        # the output files with every frame, up to one per STATUS_GAP: the Rainmeter skin
        # crossfades when frame_number changes
        self.show(self.upcoming.popleft(), fps, ahead=self.ahead, gap=STATUS_GAP)

    def show(self, frame, fps: float, *, ahead: int, gap: float = 0.0) -> None:
        """`frame` on screen: the playhead moves, the viewer is told, the output files
        are written when due (_status_maybe), the ledger records it (now or in a batch)."""
        self.timings = timings = {}
        # a string (a frame's path is relative to the data dir, or absolute): Path objects
        # made at every frame were a fifth of this method's CPU
        path = os.path.join(self.root, frame.path)
        # on screen now: the playhead moves in memory at once, the ledger records it
        # now or, while it is busy, as soon as it is free
        now = time.time()
        self.pending.append((frame.id, frame.chain_index, frame.pos, now))
        if frame.chain_index != self.chain or self.prompt is None:
            self.prompt, self.theme = read_model.chain_prompt(self.look(), frame.chain_index)
        self.current, self.chain, self.t = path, frame.chain_index, frame.pos
        self.frames_shown += 1
        if self.on_shown is not None:
            self.on_shown(frame.id, frame.chain_index, frame.pos, path, now)
        self._status_maybe(fps, force=True, ahead=ahead, gap=gap)
        if self.fault_points:
            faults.pause_point("frame-displayed", self.data_dir)
        with timed(timings, "ledger"):
            # the first frame at once (the ledger says playback began), then in batches
            self.record(batch=self.state == "playing")
        log_timing(log, "display", frame.id, timings)

    def place(self) -> None:
        """current_frame.png is the frame on screen, previous_frame.png the one it held
        before (what a reader of the files saw last): two hard links, each swapped in.
        Written with status.json (write_status), never more often."""
        if self.current is None or self.current == self.placed:
            return
        with timed(self.timings, "write"):
            # never the same file (each frame is its own): no look for one before
            if self.placed is not None:
                try:
                    place_atomic(self.placed, self.previous_path, check_same=False)
                except FileNotFoundError:
                    if os.path.exists(self.placed):   # it is the output folder that is gone
                        raise
            place_atomic(self.current, self.current_path, check_same=False)
        self.placed = self.current

    # ------------------------------------------------------------ the ledger's record
    def record(self, *, batch: bool = False) -> bool:
        """Write what was shown (frames, playhead, underruns) to the ledger; on a busy
        ledger keep it for the next try. With `batch`, only once RECORD_EVERY seconds
        have passed since the last record. True when nothing is left to write."""
        if not self.pending and not self.pending_underruns:
            return True
        now = time.monotonic()
        # a batch waits for RECORD_EVERY; what a busy ledger kept is tried every RECORD_RETRY
        if now < self.next_record or (batch and self.record_failing_since is None
                                      and now - self.recorded_at < RECORD_EVERY):
            return False
        pending, underruns = list(self.pending), self.pending_underruns
        try:
            with self.engine.begin() as conn:
                shown = [(frame_id, _utc(at)) for frame_id, _chain, _t, at in pending]
                stale = transitions.transition_each(
                    conn, "frame", [(frame_id, at, {"shown_at": at}) for frame_id, at in shown],
                    "ready", "shown", worker="display")
                for frame_id in stale:        # evicted meanwhile: nothing to do
                    log.warning("frame %d: no longer ready; not recorded as shown", frame_id)
                params = {"_underruns": underruns, "_now": utcnow()}
                if pending:
                    frame_id, chain, t, _at = pending[-1]
                    params.update(_frame_id=frame_id, _chain=chain, _t=t, _shown=len(pending))
                conn.execute(_RECORD_SHOWN if pending else _RECORD_UNDERRUNS, params)
        except Exception as exc:
            kind = classify(exc)
            if kind is None:
                raise
            now = time.monotonic()
            if self.record_failing_since is None:
                self.record_failing_since = now
            if kind != LEDGER_BUSY or now - self.record_failing_since >= BUSY_AFTER:
                self.ctx.conditions.report(kind, "display", exc)
            self.next_record = now + RECORD_RETRY
            return False
        del self.pending[:len(pending)]
        self.pending_underruns -= underruns
        self.next_record, self.recorded_at = 0.0, now
        self.record_failing_since = None
        return True

    def flush(self, timeout: float) -> bool:
        """At a stop: record what is still waiting, trying for up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.next_record = 0.0
            if self.record():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(RECORD_RETRY)

    def close(self) -> None:
        self._drop_look()
        self.engine.dispose()

    def status_heartbeat(self) -> None:
        """status.json at least once a second even when the display ticks slower (below
        1 fps a tick comes every 1/fps seconds) or a tick is slow: readers judge the
        daemon's liveness, and see a pause or a problem, by it. The daemon calls this
        every STATUS_EVERY seconds; it writes only when the ticks have not."""
        if time.monotonic() - self.last_status >= STATUS_EVERY:
            self._status_maybe(self.ctx.knob("display.fps"), force=True)

    # ------------------------------------------------------------ status.json
    def _status_maybe(self, fps: float, *, force: bool, ahead: int | None = None,
                      gap: float = 0.0) -> None:
        """status.json when `force`d (no sooner than `gap` seconds after the last one),
        when the state changed, or STATUS_EVERY seconds after the last one."""
        now = time.monotonic()
        state = (self.state, self.ctx.conditions.summary())
        changed = state != self.last_state
        since = now - self.last_status
        if not changed and since < (gap if force else STATUS_EVERY):
            return
        self.last_status = now
        try:
            if ahead is None:
                ahead = read_model.frames_ahead(self.look(), self.chain, self.t)
            self.write_status(fps, max(0, ahead))
        except Exception as exc:
            kind = classify(exc)
            if kind is None:
                raise
            self.ctx.conditions.report(kind, "status.json", exc)
        # after the write: a condition it met (and wrote down) is no change to write again
        self.last_state = (self.state, self.ctx.conditions.summary())

    def write_status(self, fps: float, ahead: int, *, daemon_status: str = "running",
                     state: str | None = None) -> None:
        """status.json, after the frame files (place): it never names a frame that
        current_frame.png does not hold. The frame files failing (a full disk) is
        reported, and status.json still written: it says so."""
        try:
            self.place()
        except Exception as exc:
            kind = classify(exc)
            if kind is None:
                raise
            self.ctx.conditions.report(kind, "display", exc)
        ctx, facts = self.ctx, self.ctx.facts
        n = ctx.knob("generation.interpolation_frames")
        paused = ctx.paused()
        status_json.write(self.status_path, status_json.build(
            status=state or ("paused" if paused else self.state),
            frame_number=self.frames_shown,
            keyframe_index=self.chain,
            generation_time=round(facts.get("generation_time", 0.0), 3),
            current_mode="hybrid" if n > 0 else "keyframes",
            # the backend making keyframes now: an in-process model that cannot be used
            # leaves them to the procedural fallback (backend_problem says why)
            backend=facts.get("backend_now") or ctx.cfg.generation.backend,
            codec=facts.get("codec"),
            current_prompt=self.prompt,
            cache_size=facts.get("cache_size", 0),
            buffer_seconds=round(ahead / fps, 2),
            buffer_target_seconds=ctx.knob("display.buffer_target_seconds"),
            is_buffering=self.buffering,
            fps=fps,
            paused=paused,
            pause_reason=facts.get("pause_reason"),
            uptime_hours=round((time.monotonic() - ctx.started_monotonic) / 3600, 4),
            daemon_status=daemon_status,
            comfyui_status=facts.get("comfyui_status", "n/a"),
            last_update=status_json.now_iso(),
            # a condition of the machine, or generation paused under the free-space floor
            problem="; ".join(p for p in (ctx.conditions.summary(),
                                          ctx.facts.get("storage_low"),
                                          ctx.facts.get("wal_held"),
                                          ctx.facts.get("backend_problem")) if p) or None,
            stale_after_seconds=status_json.stale_after(fps),
            theme=self.theme,
            paused_by=facts.get("paused_by") if paused else None,
            keyframe_progress=facts.get("keyframe_progress"),
            denoise=ctx.knob("generation.denoise"),
        ))


def _utc(epoch: float) -> datetime:
    """time.time() as the ledger stores times (naive UTC, as models.utcnow)."""
    return datetime.fromtimestamp(epoch, timezone.utc).replace(tzinfo=None)


def _impatient_writer(ctx: WorkerContext):
    """The display's own write engine: BEGIN IMMEDIATE like every writer, but a busy
    ledger is given up on after BUSY_TIMEOUT_MS (the frames are recorded later)."""
    from sqlalchemy import event

    engine = database.writer(ctx.engine.url.database)

    def impatient(dbapi_conn, _record) -> None:     # runs after database.writer's own
        dbapi_conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    event.listen(engine, "connect", impatient)
    watch_ledger(engine, ctx.conditions)
    return engine
