"""The governor worker: measures keyframe and in-between times, the display rate and the
buffer's trend from the ledger, runs the control law (dreamd/governor/law.py), publishes the
chosen N and interpolation size for the next batches (read by the keyframe worker when
it creates a batch, so changes land at segment boundaries) and records every change in
`governor_decisions` with its reason and measurements, logged once in words.

The display's time-stretch is paced by the display writer (`Pacer`, below); this worker
records when it starts and ends. Torch-free: `dreamd status` reads the decisions
(dreamd/ledger/read_model.py `decisions`).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import deque
from itertools import islice
from typing import Callable, Iterable, Sequence

from types import SimpleNamespace

from sqlalchemy import insert, select, update

from dreamd.governor.law import Bounds, Decision, Governor, Measurements, size_words, stretch
from dreamd.ledger import read_model
from dreamd.ledger.models import GovernorDecision, Interpolation, Keyframe, utcnow

log = logging.getLogger("dreamd.governor")
GD, KF, IP = GovernorDecision.__table__, Keyframe.__table__, Interpolation.__table__
KEYFRAMES_MEASURED = 5       # the median of the last few: one slow outlier moves nothing
BATCHES_MEASURED = 8
TREND_WINDOW = 30.0          # seconds of buffer samples at least (3 segments when longer)
STRETCH_QUIET = 20.0         # a stretch ends (record, log) after this long at full rate


# ---------------------------------------------------------------- what the others read

def current(ctx) -> tuple[int, float]:
    """(N, divisor) for the next batch: the governor's choice, or the user's settings
    when it is off or has not decided yet."""
    n, divisor = ctx.knob("generation.interpolation_frames"), ctx.cfg.generation.resolution_divisor
    chosen = ctx.facts.get("governor")
    if not ctx.knob("governor.enabled") or not chosen:
        return n, divisor
    return chosen["interpolation_frames"], chosen["resolution_divisor"]


def at_claim(ctx, batch, owner: str):
    """A batch claimed for its first attempt takes the governor's choice of now (it was
    made with the choice of when its keyframe completed: a whole buffer earlier); a
    retried one keeps its own, so a crashed attempt's files keep their names."""
    n, divisor = current(ctx)
    if batch.attempt != 1 or (batch.n_frames, float(batch.divisor or 1.0)) == (n, divisor):
        return batch
    with ctx.engine.begin() as conn:
        changed = conn.execute(update(IP).where(IP.c.id == batch.id, IP.c.lease_owner == owner)
                               .values(n_frames=n, divisor=divisor)).rowcount
    if not changed:
        return batch
    return SimpleNamespace(**{**batch._mapping, "n_frames": n, "divisor": divisor})


# ---------------------------------------------------------------- measuring
# What the measurements are, from plain numbers (the simulator in tests/governor_sim.py
# measures its simulated pipeline with these same functions), apart from how the rows
# are read from the ledger.

def keyframe_times(ms: Sequence[float], *, first_of_run: bool = False
                   ) -> tuple[float | None, float | None, int]:
    """The typical (median) and the slowest of the last keyframes' times in seconds, and
    how many: `ms` newest first; with `first_of_run`, its last is the run's first
    keyframe and is left out (a start warms up: imports, first calls, a model loading;
    it says nothing about the keyframes after it)."""
    ms = list(ms[:-1] if first_of_run else ms)[:KEYFRAMES_MEASURED]
    if not ms:
        return None, None, 0
    return statistics.median(ms) / 1000, max(ms) / 1000, len(ms)


def inbetween_times(batches: Iterable[tuple[float | None, float, int]]
                    ) -> tuple[dict[float, float], dict[float, int]]:
    """Median ms per frame (a batch's time over its frames) by the divisor it ran at, and
    how many batches each is, from (divisor, duration ms, n_frames), newest first."""
    by: dict[float, list[float]] = {}
    for divisor, duration_ms, n_frames in islice(batches, BATCHES_MEASURED):
        by.setdefault(round(float(divisor or 1.0), 3), []).append(duration_ms / (n_frames + 1))
    return ({d: statistics.median(v) for d, v in by.items()}, {d: len(v) for d, v in by.items()})


def buffer_trend(samples: Iterable[tuple[float, float]], now: float, frames: int,
                 fps: float) -> float | None:
    """The buffer's trend (seconds gained per second) over the last (time, buffer seconds)
    samples: at least TREND_WINDOW, three segments of `frames` in-betweens when longer.
    None until the samples cover the window: the start of a run (filling) is no trend."""
    window = max(TREND_WINDOW, 3 * (frames + 1) / fps)
    recent = [(t, v) for t, v in samples if now - t <= window]
    covered = recent and now - recent[0][0] >= 0.8 * window
    return slope(recent) if covered else None


def keyframe_seconds(conn, since=None) -> tuple[float | None, float | None, int]:
    """keyframe_times of the last completed keyframes, of those started since `since`
    (its first left out). `conn`: a DB-API connection (the read model's questions)."""
    if since is None:
        return keyframe_times(read_model.keyframe_ms(conn, KEYFRAMES_MEASURED + 1),
                              first_of_run=False)
    # one more than measured: fewer than that are all this run made, its first among them
    ms = read_model.keyframe_ms(conn, KEYFRAMES_MEASURED + 2, since)
    return keyframe_times(ms[:KEYFRAMES_MEASURED + 1],
                          first_of_run=len(ms) <= KEYFRAMES_MEASURED + 1)


def inbetween_ms(conn, since=None) -> tuple[dict[float, float], dict[float, int]]:
    """inbetween_times of the last completed batches; the first batch started since
    `since` left out (the codec's first calls build its kernels: twice the time of the
    next ones, measured). `conn`: a DB-API connection."""
    rows = read_model.batch_times(conn, BATCHES_MEASURED + 1, since)
    return inbetween_times((r["divisor"], r["duration_ms"], r["n_frames"]) for r in rows
                           if not r["first"])


def slope(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (time, value) samples."""
    if len(samples) < 3:
        return None
    mt = sum(t for t, _ in samples) / len(samples)
    mv = sum(v for _, v in samples) / len(samples)
    den = sum((t - mt) ** 2 for t, _ in samples)
    return None if den <= 0 else sum((t - mt) * (v - mv) for t, v in samples) / den


class GovernorWorker:
    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.samples: deque[tuple[float, float]] = deque(maxlen=2000)
        self.stretch_low: float | None = None       # lowest rate of the current stretch
        self.full_since: float | None = None        # back at full rate since
        self.since = utcnow()                       # keyframes of this run are measured
        self.law = Governor(self.bounds())
        self.restore()

    def bounds(self) -> Bounds:
        ctx, g = self.ctx, self.ctx.cfg.governor
        return Bounds(frames=ctx.knob("generation.interpolation_frames"),
                      max_frames=g.max_interpolation_frames,
                      divisor=float(ctx.cfg.generation.resolution_divisor),
                      max_divisor=g.max_resolution_divisor,
                      enabled=bool(ctx.knob("governor.enabled")), dwell=g.dwell_seconds)

    def restore(self) -> None:
        """A restarted daemon goes on from the last choice (same machine, same load),
        when it still lies within the bounds; else the first tick moves it into them."""
        with self.ctx.reader.connect() as conn:
            last = conn.execute(select(GD).order_by(GD.c.id.desc()).limit(1)).first()
        if last is None or not self.law.bounds.enabled:
            return
        b = self.law.bounds
        if (b.frames <= last.interpolation_frames <= b.top_frames
                and last.resolution_divisor in b.sizes()
                and (last.interpolation_frames, last.resolution_divisor) != (b.frames, b.divisor)):
            self.law.frames, self.law.divisor = last.interpolation_frames, last.resolution_divisor
            self.publish(None)
            log.info("governor: going on from the last run's choice: %d in-betweens, %s",
                     self.law.frames, size_words(self.law.divisor))

    def measure(self, conn, now: float) -> Measurements:
        """The measurements of now, read on `conn` (a DB-API connection)."""
        ctx = self.ctx
        fps = ctx.knob("display.fps")
        buffer = read_model.frames_ahead_of_playhead(conn) / fps
        self.samples.append((now, buffer))
        typical, slowest, count = keyframe_seconds(conn, self.since)
        per_frame, batches = inbetween_ms(conn, self.since)
        return Measurements(fps=fps, keyframe_seconds=typical, keyframe_seconds_high=slowest,
                            keyframe_samples=count, inbetween_ms=per_frame,
                            inbetween_samples=batches, buffer_seconds=buffer,
                            buffer_target=ctx.knob("display.buffer_target_seconds"),
                            trend=buffer_trend(self.samples, now, self.law.frames, fps))

    def tick(self) -> Decision | None:
        ctx = self.ctx
        now = time.monotonic()
        if not ctx.may_generate() or ctx.facts.get("backend_unusable"):
            # paused, below the disk floor, no backend: the buffer's fall says nothing
            # about the machine's speed
            self.samples.clear()
            return None
        # the read model's questions on the governor's kept connection (a pooled
        # SQLAlchemy one cost more than the questions), in one read transaction as before
        with ctx.look("governor").reading(snapshot=True) as conn:
            m = self.measure(conn, now)
        self._stretch(m, now)
        decision = self.law.update(m, self.bounds(), now)
        if decision is not None:
            self.record(decision.reason, decision.message, m, decision)
            self.publish(decision)
            log.info("governor: %s", decision.message)
        return decision

    def publish(self, decision: Decision | None) -> None:
        self.ctx.facts["governor"] = {
            "interpolation_frames": self.law.frames, "resolution_divisor": self.law.divisor,
            "reason": decision.reason if decision else "resumed",
            "message": decision.message if decision else "going on from the last run"}

    def _stretch(self, m: Measurements, now: float) -> None:
        """Record a stretch of the display once when it starts and once when it ends
        (STRETCH_QUIET at full rate: a buffer that dips at every segment is one stretch)."""
        rate = self.ctx.facts.get("stretch", 1.0)
        fps = m.fps
        if rate < 1.0:
            self.full_since = None
        elif self.full_since is None:
            self.full_since = now
        if rate < 1.0 and self.stretch_low is None:
            self.stretch_low = rate
            text = (f"the buffer is low ({m.buffer_seconds:.1f} s): showing frames a little "
                    f"slower ({rate * 100:.0f} % of {fps:g} fps, at least "
                    f"{self.ctx.cfg.governor.min_stretch * 100:.0f} %) until it refills")
            self.record("stretch", text, m, None, rate)
            log.info("governor: %s", text)
        elif rate < 1.0:
            self.stretch_low = min(self.stretch_low, rate)
        elif self.stretch_low is not None and now - self.full_since >= STRETCH_QUIET:
            text = (f"the buffer refilled ({m.buffer_seconds:.1f} s): the display is back at "
                    f"{fps:g} fps (it went down to {self.stretch_low * 100:.0f} %)")
            self.record("stretch_end", text, m, None, 1.0)
            self.stretch_low = None
            log.info("governor: %s", text)

    def record(self, reason: str, message: str, m: Measurements, d: Decision | None,
               rate: float | None = None) -> None:
        law = self.law
        previous = law.divisor if d is None else d.previous_divisor
        detail = {"inbetween_ms_by_divisor": {f"{k:g}": round(v, 1)
                                              for k, v in m.inbetween_ms.items()},
                  "buffer_target_seconds": m.buffer_target, **law.state(),
                  "bounds": {"frames": law.bounds.frames, "max_frames": law.bounds.top_frames,
                             "divisor": law.bounds.divisor,
                             "max_divisor": max(law.bounds.sizes())}}
        ms = m.inbetween_ms.get(previous)
        with self.ctx.engine.begin() as conn:
            conn.execute(insert(GD).values(
                at=utcnow(), run_id=self.ctx.run_id, reason=reason, message=message,
                interpolation_frames=law.frames, resolution_divisor=law.divisor,
                stretch=rate if rate is not None else self.ctx.facts.get("stretch", 1.0),
                previous_frames=d.previous_frames if d else law.frames,
                previous_divisor=previous,
                keyframe_seconds=_round(m.keyframe_seconds, 3),
                inbetween_ms=_round(ms, 1), fps=m.fps,
                buffer_seconds=_round(m.buffer_seconds, 2), buffer_trend=_round(m.trend, 3),
                load=d.load if d else _round(law.load(m, law.frames, law.divisor), 3),
                detail=json.dumps(detail, sort_keys=True)))


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


class Pacer:
    """The display's rate under the time-stretch: the display writer calls `pace` with
    the buffer before each frame; `on_change` (set by the daemon) reschedules it."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.rate = 1.0
        self.on_change: Callable[[], None] = lambda: None

    def pace(self, buffer_seconds: float) -> float:
        ctx, g = self.ctx, self.ctx.cfg.governor
        rate = 1.0
        if ctx.knob("governor.enabled") and g.stretch:
            # below the buffering mark (at most a third of the target) it slows: an
            # underrun would stop until that much is ready again
            low = min(ctx.knob("display.min_buffer_seconds"),
                      ctx.knob("display.buffer_target_seconds") / 3)
            rate = stretch(buffer_seconds, low, g.min_stretch, self.rate)
        if rate != self.rate:
            self.rate = rate
            ctx.facts["stretch"] = rate
            self.on_change()
        return rate
