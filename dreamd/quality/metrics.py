"""The measurements themselves: pure functions on small copies of frames (numpy arrays,
height x width x 3, values 0-255), no ledger, no torch. The recorder (recorder.py) feeds
them a segment's frames and each keyframe as the workers make them; tests feed them
crafted sequences with known answers.

Units. Changes between frames are mean absolute differences of 0-255 channel values
(1.0 = every channel of every pixel moved by one level). Colour is CIELAB (D65) as
scikit-image's `rgb2lab` gives it: L 0-100, a and b about -100..100, and a change in
colour is a CIE76 delta E (about 2.3 is the smallest difference people notice).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from dreamd.ledger.read_model import POP_RATIO, STAGNANT_CHANGE   # the flags' thresholds

__all__ = ["POP_RATIO", "STAGNANT_CHANGE", "small_copy", "steps", "motion", "flicker",
           "boundary_change", "pop_ratio", "SegmentQuality", "measure_segment", "lab",
           "keyframe_change", "colour_drift", "KeyframeQuality", "measure_keyframe"]

SMALL_WIDTH = 64            # px: about the width of the copies measured
# The smallest typical step a pop ratio divides by (half a grey level, below anything
# visible): a still segment does not turn a one-level jump into an infinite ratio.
MIN_STEP = 0.5


def small_copy(image: Image.Image | np.ndarray, width: int = SMALL_WIDTH) -> np.ndarray:
    """A frame shrunk by a whole factor to about `width` px wide (between `width` and
    twice that; a 512x256 frame becomes 64x32), as float32 height x width x 3 in 0-255.

    Each pixel is the exact mean of its block, summed in integers: no resampling
    filter, and no rounding back to 8 bits, which would add a floor of about 0.6 to
    every flicker (the second difference of rounding errors). A few edge pixels
    beyond the last whole block are left out."""
    if isinstance(image, Image.Image):
        image = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    h, w = image.shape[:2]
    f = max(1, min(w // width, h))
    if f == 1:
        return image.astype(np.float32)
    hh, ww = h // f * f, w // f * f
    block = image[:hh, :ww]
    if image.dtype == np.uint8:
        # rows first, along contiguous memory (uint16 holds f <= 257 rows of 255)
        rows = np.add.reduce(block.reshape(hh // f, f, ww * 3), axis=1, dtype=np.uint16)
        # then the columns of each block: f whole-array adds beat a reduction over a
        # short strided axis (numpy's sum here cost 3x as much)
        cols = rows.reshape(hh // f, ww // f, f, 3)
        sums = cols[:, :, 0].astype(np.uint32)
        for i in range(1, f):
            sums += cols[:, :, i]
    else:
        sums = block.reshape(hh // f, f, ww // f, f, 3).sum(axis=(1, 3), dtype=np.float64)
    return (sums / float(f * f)).astype(np.float32)


def _same_size(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`a` at `b`'s size (a previous frame read back from a thumbnail may be a pixel off)."""
    if a.shape == b.shape:
        return a
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
    return np.asarray(im.resize((b.shape[1], b.shape[0]), Image.Resampling.BILINEAR),
                      dtype=np.float32)


# ---------------------------------------------------------------- a segment

def steps(frames: Sequence[np.ndarray]) -> np.ndarray:
    """The change between each frame and the next: len(frames) - 1 mean absolute
    differences (0-255)."""
    if len(frames) < 2:
        return np.zeros(0, dtype=np.float32)
    stack = np.stack(frames).astype(np.float32, copy=False)
    return np.abs(np.diff(stack, axis=0)).mean(axis=(1, 2, 3))


def motion(frames: Sequence[np.ndarray]) -> float | None:
    """How much the picture moves: the mean change between consecutive frames (0-255).
    None for fewer than two frames."""
    s = steps(frames)
    return float(s.mean()) if s.size else None


def flicker(frames: Sequence[np.ndarray]) -> float | None:
    """How much the change itself jumps from frame to frame: the mean absolute second
    difference |f[i+1] - 2 f[i] + f[i-1]| (0-255). A smooth morph (a linear fade) has
    about 0 whatever its speed; noise of standard deviation s between frames about 2 s.
    None for fewer than three frames."""
    if len(frames) < 3:
        return None
    stack = np.stack(frames).astype(np.float32, copy=False)
    second = stack[2:] - 2 * stack[1:-1] + stack[:-2]
    return float(np.abs(second).mean())


def boundary_change(previous_last: np.ndarray, first: np.ndarray) -> float:
    """The change across a keyframe boundary: from the last frame shown before it (the
    previous segment's last in-between) to the segment's first frame (0-255)."""
    return float(np.abs(first.astype(np.float32) - _same_size(previous_last, first)).mean())


def pop_ratio(boundary: float, typical: float) -> float:
    """The boundary change against the typical step around it (floored at MIN_STEP): 1
    is seamless, POP_RATIO and above is counted as a pop."""
    return float(boundary / max(typical, MIN_STEP))


@dataclass(frozen=True)
class SegmentQuality:
    """One interpolation batch (keyframe k to k+1, its first frame and in-betweens)."""

    n_frames: int
    motion: float | None        # mean change between consecutive frames
    flicker: float | None       # mean absolute second difference
    boundary: float | None      # change into the first frame from the frame before it
    pop: float | None           # boundary / typical step (the two segments' motion)

    def as_row(self) -> dict:
        return asdict(self)


def measure_segment(frames: Sequence[np.ndarray], previous_last: np.ndarray | None = None,
                    previous_motion: float | None = None) -> SegmentQuality:
    """Motion and flicker of a segment's frames (small copies, in playback order), and
    the pop where it begins: the change from `previous_last` (the previous segment's
    last frame, None when unknown) into its first frame, against the typical step, the
    mean of this segment's motion and the previous one's (`previous_motion`, when
    known): either side of a boundary is what the eye compares the jump with."""
    m = motion(frames)
    boundary = pop = None
    if previous_last is not None and len(frames):
        boundary = boundary_change(previous_last, frames[0])
        around = [v for v in (m, previous_motion) if v is not None]
        if around:
            pop = pop_ratio(boundary, float(np.mean(around)))
    return SegmentQuality(len(frames), m, flicker(frames), boundary, pop)


# ---------------------------------------------------------------- a keyframe

def lab(small: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of a 0-255 RGB array, by scikit-image."""
    from skimage.color import rgb2lab

    return rgb2lab(np.clip(small, 0, 255) / 255.0)


def keyframe_change(previous: np.ndarray, current: np.ndarray) -> float:
    """How different a keyframe looks from the previous one: the mean per-pixel CIE76
    delta E between them (0 for the same picture; about 2.3 is just noticeable). It
    sees both a shift of colour and a change of shapes in the same colours, which a
    histogram distance would miss."""
    from skimage.color import deltaE_cie76

    return float(deltaE_cie76(lab(_same_size(previous, current)), lab(current)).mean())


def colour_drift(lab_mean: Sequence[float], reference_mean: Sequence[float]) -> float:
    """How far a keyframe's mean colour has moved from the reference's: the delta E
    between the two mean (L, a, b)."""
    return float(np.linalg.norm(np.asarray(lab_mean, float) - np.asarray(reference_mean, float)))


@dataclass(frozen=True)
class KeyframeQuality:
    """One keyframe's colour, and its change from the previous keyframe."""

    lab_l: float                # mean L* (0-100)
    lab_a: float                # mean a* (green - / red +)
    lab_b: float                # mean b* (blue - / yellow +)
    lab_l_std: float            # spread of L* over the picture: its contrast in lightness
    lab_a_std: float
    lab_b_std: float
    saturation: float           # mean HSV saturation, 0-1
    brightness: float           # mean of the RGB channels, 0-255
    contrast: float             # standard deviation of the RGB channels, 0-255
    change: float | None        # mean delta E from the previous keyframe (None: first)

    @property
    def lab_mean(self) -> tuple[float, float, float]:
        return (self.lab_l, self.lab_a, self.lab_b)

    def as_row(self) -> dict:
        return asdict(self)


def measure_keyframe(small: np.ndarray, previous: np.ndarray | None = None) -> KeyframeQuality:
    """Colour of a keyframe (its small copy) and its change from `previous` (the
    previous keyframe's small copy, None when there is none)."""
    from skimage.color import rgb2hsv

    small = small.astype(np.float32, copy=False)
    values = lab(small)
    mean, spread = values.mean(axis=(0, 1)), values.std(axis=(0, 1))
    saturation = float(rgb2hsv(np.clip(small, 0, 255) / 255.0)[..., 1].mean())
    change = keyframe_change(previous, small) if previous is not None else None
    return KeyframeQuality(float(mean[0]), float(mean[1]), float(mean[2]), float(spread[0]),
                           float(spread[1]), float(spread[2]), saturation,
                           float(small.mean()), float(small.std()), change)
