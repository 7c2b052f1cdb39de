"""Where the in-betweens sit on the slerp between two keyframes: the interpolation
worker plays a segment's frames at t = i/(N+1) and slerps at `eased(t)`.

`linear` keeps even steps. `smooth` slows the morph near both keyframes and speeds it
up between them (speed 0.5 at a keyframe, 1.5 half-way): where one segment moves fast
and the next slowly, or the chain turns at a keyframe, the step across the keyframe
stays below the steps inside the segments, so it does not pop (bench/RESULTS.md,
"Quality controls", measures the pop ratio with and without).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

EASES = ("linear", "smooth")
# The share of the speed taken from the keyframes and given to the middle: 1 would stop
# the morph at every keyframe (two nearly equal frames: a stall the eye sees), 0 is linear.
SMOOTH_DEPTH = 0.5


def eased(ts: Sequence[float], ease: str = "linear") -> list[float]:
    """The slerp position of each playback position t in [0, 1]: t itself (linear), or
    t - d sin(2 pi t) / (2 pi) (smooth, d = SMOOTH_DEPTH), which keeps 0 and 1 where they
    are, never runs backwards, and is symmetric about the middle of the segment."""
    if ease == "linear":
        return [float(t) for t in ts]
    if ease == "smooth":
        return [min(1.0, max(0.0, t - SMOOTH_DEPTH * math.sin(2 * math.pi * t) / (2 * math.pi)))
                for t in map(float, ts)]
    raise ValueError(f"quality.ease = {ease!r}: expected one of {EASES}")
