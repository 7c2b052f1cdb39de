"""The governor's control law: from measured stage times it chooses the interpolation
frames N and the interpolation size (the resolution divisor) so that production stays
ahead of playback, within the user's bounds; and how much to slow the display when the
buffer runs low. Pure: no clock, no ledger, no torch. The worker that measures, records
and publishes its decisions is dreamd/governor/worker.py.

The model. A segment (keyframe k to k+1) shows N+1 frames in (N+1)/fps seconds. Making
it costs the keyframe time K and the in-betweens I = (N+1)·p(d), p(d) being the time
per frame at divisor d. The two stages run in parallel threads, but on one machine
they share it: a segment takes max(K, I) + share·min(K, I), share between 0 (they
never compete: ComfyUI on a GPU) and 1 (they take turns on one CPU). Its load,
fps·time/(N+1), is the share of the playback time production needs; below 1 it keeps
up. The size comes first (in-betweens alone must fit in the display time: fps·p), then
N (a longer morph spreads the keyframe time over more frames). Both move with
hysteresis (a change needs a clear margin, and lands on a set-point well inside it) and
a minimum dwell between changes; when the buffer drains although the model says the
machine keeps up, the model learns the stages share more than it thought.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

# Interpolation sizes it may pick, as divisors: full, 3/4, 1/2, 3/8, 1/4, 3/16, 1/8.
# Integer ones divide every keyframe size (multiples of 8), as the pixel codec needs.
LADDER = (1.0, 1.333, 2.0, 2.667, 4.0, 5.333, 8.0)

# In-betweens alone, as a share of the display time (fps · ms per frame):
DECODE_SLOW = 0.8       # above this the size goes down…
DECODE_FIT = 0.6        # …to the largest size predicted at or below this
DECODE_HEADROOM = 0.45  # a larger size is taken only when predicted at or below this
ONE_SAMPLE = 2.0        # a single measurement tightens only past this times the threshold
# The whole pipeline's load (see the module doc):
LOAD_HIGH = 0.95        # above this N goes up…
LOAD_TARGET = 0.8       # …to the smallest N predicted at or below this
LOWER_BY = 0.15         # N comes down only when it frees at least this share of frames
RELAX_DWELLS = 2        # …and relaxing (N down, size up) was called for this many dwells
#                         in a row: tighten fast, relax slowly (noise cannot flip it)
RELAX_STEP = 1 / 3      # relaxing takes N down by at most this share, the size up one step
# The buffer says whether the model's worry is real: nothing tightens (N up, size down)
# while it is this full, relative to the target (production keeps up), and nothing
# relaxes (N down, size up) while it is below RELAX_BELOW of it.
FULL = 0.9
RELAX_BELOW = 0.8
# Sharing of the machine between the keyframe and interpolation stages. The measured
# times already include most of it (they are wall times): a small margin to start.
SHARE_START = 0.25
SHARE_STEP = 0.25
CORRECTION_STEP = 1.25  # past share 1, the load is multiplied by this per drain seen
CORRECTION_MAX = 3.0
DRAIN_TREND = -0.05     # buffer seconds lost per second that count as draining
STEADY_TREND = 0.02     # a buffer moving less than this (s per s) is steady
SEEN_FOR = 300.0        # seconds a size's measured speed bounds its prediction

# Display time-stretch: the rate steps down from 1 to the floor as the buffer falls
# below its low mark, in steps of STRETCH_STEP; it steps back up half a step later.
STRETCH_STEP = 0.05


@dataclass(frozen=True)
class Bounds:
    """What the user allows. The preferred values are the user's own settings
    (`generation.interpolation_frames`, `generation.resolution_divisor`): N never goes
    below the preferred N, the size never above the preferred size."""

    frames: int                 # the preferred N (the floor); 0 = keyframes only, kept
    max_frames: int             # the most N may become
    divisor: float              # the preferred divisor (the largest size)
    max_divisor: float          # the smallest size, as a divisor
    enabled: bool = True
    dwell: float = 30.0         # seconds between two changes

    @property
    def top_frames(self) -> int:
        return self.frames if self.frames == 0 else max(self.frames, self.max_frames)

    def sizes(self) -> list[float]:
        """The divisors it may use, largest size first."""
        top = max(self.divisor, self.max_divisor)
        return [self.divisor] + [d for d in LADDER if self.divisor < d <= top + 1e-9]


@dataclass(frozen=True)
class Measurements:
    """What the worker measured, all optional but the display rate."""

    fps: float                                  # the display rate the user set
    keyframe_seconds: float | None = None       # typical time of a keyframe (median)
    keyframe_seconds_high: float | None = None  # the slowest of the same recent ones
    # typical ms per in-between frame (whole batch / frames) by the divisor it ran at
    inbetween_ms: dict[float, float] = field(default_factory=dict)
    # how many batches (keyframes) those are: one alone must be far off to count
    inbetween_samples: dict[float, int] = field(default_factory=dict)
    keyframe_samples: int | None = None
    buffer_seconds: float | None = None         # ready ahead of the playhead
    buffer_target: float | None = None          # display.buffer_target_seconds
    trend: float | None = None                  # buffer seconds gained per second, recently


@dataclass(frozen=True)
class Decision:
    """A change of N and/or size, with why, in a code and in words."""

    frames: int
    divisor: float
    reason: str        # slow_keyframes | fast_keyframes | slow_inbetweens | headroom |
    #                    draining | bounds | off
    message: str
    load: float | None  # predicted load after the change (<1 keeps up)
    previous_frames: int
    previous_divisor: float


def size_words(divisor: float) -> str:
    """'full size', '1/2 size', '3/4 size'…"""
    if divisor <= 1.0 + 1e-9:
        return "full size"
    f = Fraction(1 / divisor).limit_denominator(16)
    return f"{f.numerator}/{f.denominator} size"


class Governor:
    """The law's state: the current choice, when it last changed, what it learned."""

    def __init__(self, bounds: Bounds, frames: int | None = None,
                 divisor: float | None = None) -> None:
        self.bounds = bounds
        self.frames = bounds.frames if frames is None else frames
        self.divisor = bounds.divisor if divisor is None else divisor
        self.changed_at = -math.inf
        self.share = SHARE_START
        self.correction = 1.0
        self.learned_at = -math.inf
        self.relax_since: float | None = None   # since when relaxing has been called for
        self.now = 0.0
        # (ms per frame, when) last measured at each divisor: a size left for being slow
        # is not predicted faster than it was measured (no flip-flop between two sizes),
        # until SEEN_FOR has passed (the machine may have become less busy)
        self.seen: dict[float, tuple[float, float]] = {}

    # ------------------------------------------------------------ the model
    def per_frame(self, m: Measurements, divisor: float) -> float | None:
        """Seconds per in-between at `divisor`: measured there; else, from two sizes
        measured, a fixed part (writing full-size frames, the ledger) plus a part that
        scales with the area, a + b/d²; from one, all of it scaled by area. Never below
        what was last seen there."""
        if divisor in m.inbetween_ms:
            return m.inbetween_ms[divisor] / 1000
        seen = {d: ms for d, (ms, at) in self.seen.items() if self.now - at < SEEN_FOR}
        known = {**seen, **m.inbetween_ms}
        if not known:
            return None
        near = sorted(known, key=lambda d: abs(math.log(d / divisor)))
        d1 = near[0]
        predicted = known[d1] * (d1 / divisor) ** 2
        if len(near) > 1 and near[1] != d1:
            d2 = near[1]
            b = (known[d1] - known[d2]) / (d1 ** -2 - d2 ** -2)
            a = known[d1] - b * d1 ** -2
            if b > 0 and a >= 0:            # a fit that makes sense (noise can break it)
                predicted = a + b / divisor ** 2
        if divisor in seen:
            predicted = max(predicted, seen[divisor])
        return predicted / 1000

    def load(self, m: Measurements, frames: int, divisor: float,
             high: bool = False) -> float | None:
        """Share of the playback time production needs at (frames, divisor); `high`:
        with the slowest recent keyframe instead of the typical one."""
        k = (m.keyframe_seconds_high or m.keyframe_seconds) if high else m.keyframe_seconds
        p = self.per_frame(m, divisor)
        if k is None and p is None:
            return None
        k, p = k or 0.0, p or 0.0
        inbetweens = (frames + 1) * p
        busy = max(k, inbetweens) + self.share * min(k, inbetweens)
        return self.correction * m.fps * busy / (frames + 1)

    # ------------------------------------------------------------ the decision
    def update(self, m: Measurements, bounds: Bounds, now: float) -> Decision | None:
        """The new choice when it changes, else None. `now` is any monotonic clock."""
        self.bounds = b = bounds
        self.now = now
        for d, ms in m.inbetween_ms.items():
            self.seen[d] = (ms, now)
        before = (self.frames, self.divisor)
        if not b.enabled:
            return self._set(b.frames, b.divisor, "off", "governor off: your settings "
                             f"({self._n_words(b.frames)}, {size_words(b.divisor)})", None,
                             now) if before != (b.frames, b.divisor) else None
        sizes = b.sizes()
        frames = min(max(self.frames, b.frames), b.top_frames)
        divisor = self.divisor if self.divisor in sizes else min(
            sizes, key=lambda d: abs(d - self.divisor))
        if (frames, divisor) != before:
            return self._set(frames, divisor, "bounds",
                             f"your settings changed: {self._n_words(frames)}, "
                             f"{size_words(divisor)}", self.load(m, frames, divisor), now)
        if now - self.changed_at < b.dwell:
            return None
        learned = self._learn(m, now)
        fill = (None if m.buffer_seconds is None or not m.buffer_target
                else m.buffer_seconds / m.buffer_target)
        rising = m.trend is not None and m.trend > STEADY_TREND
        falling = m.trend is not None and m.trend < -STEADY_TREND
        may_tighten = (fill is None or fill < FULL) and not rising
        may_relax = (fill is None or fill >= RELAX_BELOW) and not falling
        # the model alone says whether to relax; the buffer only when, at the end of
        # RELAX_DWELLS dwells of the model saying so
        divisor, why_size = self._size(m, sizes, may_tighten, True)
        frames, why_n = self._frames(m, divisor, may_tighten, True)
        relaxing = frames < before[0] or divisor < before[1]
        tightening = frames > before[0] or divisor > before[1]
        if not relaxing or tightening:
            self.relax_since = None
        elif self.relax_since is None:
            self.relax_since = now
        if relaxing and not tightening and (
                now - self.relax_since < RELAX_DWELLS * b.dwell or not may_relax):
            return None
        self.relax_since = None
        if (frames, divisor) == before:
            return None
        reason = ("draining" if learned else why_size or why_n)
        words = []
        if learned:
            words.append(f"the buffer is draining ({m.trend:+.2f} s a second) although the "
                         f"stages looked fast enough: allowing for them sharing the machine")
        if divisor != before[1]:
            words.append(self._size_message(m, before[1], divisor))
        if frames != before[0]:
            words.append(self._frames_message(m, frames))
        return self._set(frames, divisor, reason, "; ".join(words),
                         self.load(m, frames, divisor), now)

    def _set(self, frames: int, divisor: float, reason: str, message: str,
             load: float | None, now: float) -> Decision:
        d = Decision(frames=frames, divisor=divisor, reason=reason, message=message,
                     load=None if load is None else round(load, 3),
                     previous_frames=self.frames, previous_divisor=self.divisor)
        self.frames, self.divisor, self.changed_at = frames, divisor, now
        return d

    def _learn(self, m: Measurements, now: float) -> bool:
        """Draining while the model says it keeps up: the stages share the machine more
        than assumed. At most once per dwell."""
        if (m.trend is None or m.buffer_seconds is None or not m.buffer_target
                or now - self.learned_at < self.bounds.dwell):
            return False
        draining = m.trend < DRAIN_TREND and m.buffer_seconds < 0.5 * m.buffer_target
        predicted = self.load(m, self.frames, self.divisor)
        if not draining or predicted is None or predicted > LOAD_HIGH:
            return False
        if self.share < 1.0:
            self.share = min(1.0, self.share + SHARE_STEP)
        elif self.correction < CORRECTION_MAX:
            self.correction = min(CORRECTION_MAX, self.correction * CORRECTION_STEP)
        else:
            return False
        self.learned_at = now
        return True

    def _size(self, m: Measurements, sizes: list[float], may_tighten: bool,
              may_relax: bool) -> tuple[float, str | None]:
        """The interpolation size: smaller when in-betweens alone cannot keep up, larger
        when there is clear headroom."""
        current = self.divisor
        p = m.inbetween_ms.get(current)
        if p is None:               # nothing measured at this size yet: wait for it
            return current, None
        busy = lambda d: self.correction * m.fps * (self.per_frame(m, d) or 0.0)  # noqa: E731
        lone = m.inbetween_samples.get(current, 2) < 2
        if busy(current) > DECODE_SLOW * (ONE_SAMPLE if lone else 1.0):
            if not may_tighten:
                return current, None
            smaller = [d for d in sizes if d > current]
            fit = [d for d in smaller if busy(d) <= DECODE_FIT]
            if fit:
                return fit[0], "slow_inbetweens"
            # none fits: the smallest, if it helps at all (a fixed cost does not shrink)
            if smaller and busy(smaller[-1]) < 0.8 * busy(current):
                return smaller[-1], "slow_inbetweens"
            return current, None
        larger = [d for d in sizes if d < current and busy(d) <= DECODE_HEADROOM]
        if larger and may_relax:
            return larger[-1], "headroom"
        return current, None

    def _frames(self, m: Measurements, divisor: float, may_tighten: bool,
                may_relax: bool) -> tuple[int, str | None]:
        """N: up when the pipeline needs more than LOAD_HIGH of the playback time, to the
        smallest N at LOAD_TARGET with the typical keyframe time; down towards the
        preferred N only to where even the slowest recent keyframe stays at LOAD_TARGET,
        and only when that frees enough (noisy keyframe times widen the band)."""
        b, current = self.bounds, self.frames
        if b.frames == 0 or m.keyframe_seconds is None:
            return current, None       # keyframes only is the user's choice; or no data
        up, down = self._n_for(m, divisor, False), self._n_for(m, divisor, True)
        lone = m.keyframe_samples is not None and m.keyframe_samples < 2
        high = LOAD_HIGH * (ONE_SAMPLE if lone else 1.0)
        if up > current and self.load(m, current, divisor) > high and may_tighten:
            return up, "slow_keyframes"
        if down < current - max(2, LOWER_BY * current) and may_relax:
            return max(down, math.ceil(current * (1 - RELAX_STEP))), "fast_keyframes"
        return current, None

    def _n_for(self, m: Measurements, divisor: float, high: bool) -> int:
        """The smallest N within bounds at LOAD_TARGET; when none is, the smallest nearly
        as good as the most (more would change the look for nothing)."""
        lo, hi = self.bounds.frames, self.bounds.top_frames
        found = next((n for n in range(lo, hi + 1)
                      if self.load(m, n, divisor, high) <= LOAD_TARGET), None)
        if found is not None:
            return found
        best = self.load(m, hi, divisor, high)
        return next(n for n in range(lo, hi + 1)
                    if self.load(m, n, divisor, high) <= best * 1.05)

    # ------------------------------------------------------------ words
    @staticmethod
    def _n_words(frames: int) -> str:
        return "keyframes only" if frames == 0 else f"{frames} in-betweens"

    def _frames_message(self, m: Measurements, frames: int) -> str:
        k = f"keyframes take {m.keyframe_seconds:.1f} s"
        if frames == self.bounds.frames:
            return f"{k}: back to your {frames} in-betweens"
        return f"{k}: morphing over {frames} frames"

    @staticmethod
    def _size_message(m: Measurements, before: float, after: float) -> str:
        budget = 1000 / m.fps
        measured = m.inbetween_ms.get(before)
        took = f"{measured:.0f} ms a frame" if measured is not None else "?"
        if after > before:
            return (f"in-betweens take {took} at {size_words(before)}, the display needs one "
                    f"every {budget:.0f} ms: interpolating at {size_words(after)}")
        return (f"in-betweens have headroom ({took} at {size_words(before)}, one every "
                f"{budget:.0f} ms needed): interpolating at {size_words(after)}")

    def state(self) -> dict[str, float]:
        """What it learned, for the record."""
        return {"share": self.share, "correction": round(self.correction, 3)}


def stretch(buffer_seconds: float, low_seconds: float, floor: float, current: float) -> float:
    """The display rate, as a fraction of `display.fps`, for this buffer: 1 at or above
    `low_seconds`, down to `floor` as the buffer empties, in steps of STRETCH_STEP. It
    slows at once and speeds up again only half a step past the mark (no flutter)."""
    if floor >= 1.0 or low_seconds <= 0:
        return 1.0
    def level(b: float) -> float:
        if b >= low_seconds:
            return 1.0
        raw = floor + (1.0 - floor) * max(0.0, b) / low_seconds
        steps = math.floor((raw - floor) / STRETCH_STEP + 1e-9)
        return round(min(1.0, floor + steps * STRETCH_STEP), 4)
    slower = level(buffer_seconds)
    if slower < current:
        return slower
    back = level(buffer_seconds - 0.5 * STRETCH_STEP / (1.0 - floor) * low_seconds)
    return max(current, back) if back > current else current


