"""A simulated pipeline for the governor's control law: a planner, a keyframe stage and
an interpolation stage that share a machine, and a display at a fixed rate, stepped in
simulated time. Stage times come from functions of (time, divisor) with seeded noise,
so a scenario is deterministic. What the governor sees is measured as the worker
measures it in the daemon, by the worker's own functions (dreamd/governor/worker.py):
the median of the last keyframe times, the median ms per frame by divisor of the last
batches, the buffer and its trend.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from dreamd.governor.law import Bounds, Governor, Measurements
from dreamd.governor.worker import buffer_trend, inbetween_times, keyframe_times


@dataclass
class Run:
    decisions: list = field(default_factory=list)        # (time, Decision)
    underruns: list = field(default_factory=list)        # times
    settings: list = field(default_factory=list)         # (time, N, divisor) per batch made
    shown: int = 0

    def underruns_after(self, t: float) -> int:
        return sum(1 for u in self.underruns if u > t)

    def last_change(self) -> float:
        return self.decisions[-1][0] if self.decisions else 0.0


def simulate(bounds: Bounds, keyframe: Callable[[float], float],
             per_frame: Callable[[float, float], float], *, fps: float = 4.0,
             seconds: float = 900.0, share: float = 0.5, noise: float = 0.0, seed: int = 0,
             target: float = 30.0, min_buffer: float = 5.0, dt: float = 0.05,
             bounds_at: Callable[[float], Bounds] | None = None) -> Run:
    """`keyframe(t)`: seconds a keyframe takes alone; `per_frame(t, divisor)`: seconds an
    in-between takes alone; `share`: how much the two stages slow each other when both
    run (0 = not at all, 1 = they take turns). `noise`: relative spread of every time."""
    rng = random.Random(seed)
    jitter = (lambda: rng.lognormvariate(0.0, noise)) if noise else (lambda: 1.0)
    gov = Governor(bounds)
    run = Run()
    t = 0.0
    buffer = 0.0                  # frames ready
    kf_left = None                # work left on the keyframe in flight (seconds alone)
    kf_started = 0.0
    have_previous = False
    batches: list[tuple[int, float]] = []   # queued (N, divisor)
    ip = None                     # (N, divisor, work left, started)
    # as the ledger holds them, oldest first: keyframes' generation_ms, and batches'
    # (divisor, duration_ms, n_frames)
    kf_ms: list[float] = []
    ip_rows: list[tuple[float, float, int]] = []
    samples: list[tuple[float, float]] = []
    playing, credit, next_gov = False, 0.0, 0.0
    while t < seconds:
        b = bounds_at(t) if bounds_at else bounds
        coming = sum(n + 1 for n, _ in batches) + (ip[0] + 1 if ip else 0)
        if kf_left is None and buffer + coming < target * fps:
            kf_left, kf_started = keyframe(t) * jitter(), t
        both = kf_left is not None and ip is not None
        speed = 1.0 / (1.0 + share) if both else 1.0
        if kf_left is not None:
            kf_left -= dt * speed
            if kf_left <= 0:
                kf_ms.append((t - kf_started) * 1000)
                kf_left = None
                if have_previous:
                    batches.append((gov.frames, gov.divisor))
                have_previous = True
        if ip is None and batches:
            batches.pop(0)
            n, d = gov.frames, gov.divisor        # read again when claimed
            run.settings.append((t, n, d))
            ip = (n, d, (n + 1) * per_frame(t, d) * jitter(), t)
        if ip is not None:
            n, d, left, started = ip
            left -= dt * speed
            if left <= 0:
                buffer += n + 1
                ip_rows.append((d, (t - started) * 1000, n))
                ip = None
            else:
                ip = (n, d, left, started)
        # the display
        if not playing and buffer >= max(1.0, min_buffer * fps):
            playing = True
        if playing:
            credit += fps * dt
            while credit >= 1.0:
                credit -= 1.0
                if buffer >= 1.0:
                    buffer -= 1.0
                    run.shown += 1
                else:
                    playing, credit = False, 0.0
                    run.underruns.append(t)
                    break
        if t >= next_gov:
            next_gov = t + 2.0
            samples.append((t, buffer / fps))
            # no warm-up to leave out here: a simulated stage's first run is like the rest
            typical, slowest, count = keyframe_times(kf_ms[::-1])
            ms_by, batches_by = inbetween_times(reversed(ip_rows))
            m = Measurements(
                fps=fps, keyframe_seconds=typical, keyframe_seconds_high=slowest,
                keyframe_samples=count, inbetween_ms=ms_by, inbetween_samples=batches_by,
                buffer_seconds=buffer / fps, buffer_target=target,
                trend=buffer_trend(samples, t, gov.frames, fps))
            decision = gov.update(m, b, t)
            if decision is not None:
                run.decisions.append((t, decision))
        t += dt
    return run


def reversals(run: Run) -> int:
    """How often N or the divisor changed direction (up then down, or down then up)."""
    count = 0
    if not run.decisions:
        return 0
    first = run.decisions[0][1]
    for start, pick in ((first.previous_frames, lambda d: d.frames),
                        (first.previous_divisor, lambda d: d.divisor)):
        values = [start] + [pick(d) for _, d in run.decisions]
        signs = [1 if b > a else -1 for a, b in zip(values, values[1:]) if b != a]
        count += sum(1 for a, b in zip(signs, signs[1:]) if a != b)
    return count
