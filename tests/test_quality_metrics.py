"""The measurements on crafted frame sequences with known answers: a still image, a
linear fade, noise, a hard cut at a boundary; a keyframe's colour and change."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dreamd.quality import metrics as m

H, W = 32, 64


def flat(value, h=H, w=W) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.float32)


def fade(start: float, stop: float, n: int) -> list[np.ndarray]:
    return [flat(v) for v in np.linspace(start, stop, n)]


def test_a_still_image_has_no_motion_no_flicker_and_no_pop():
    frames = [flat(120.0)] * 11
    q = m.measure_segment(frames, previous_last=flat(120.0), previous_motion=0.0)
    assert q == m.SegmentQuality(11, 0.0, 0.0, 0.0, 0.0)


def test_a_linear_fade_moves_at_a_constant_rate_without_flicker():
    frames = fade(0.0, 200.0, 11)                     # 20 levels a step
    assert m.steps(frames) == pytest.approx([20.0] * 10)
    q = m.measure_segment(frames, previous_last=flat(-20.0 + 0.0), previous_motion=20.0)
    assert q.motion == pytest.approx(20.0)
    assert q.flicker == pytest.approx(0.0, abs=1e-4)
    # the boundary step is one more step of the same fade: seamless
    assert q.boundary == pytest.approx(20.0)
    assert q.pop == pytest.approx(1.0)


def test_a_linear_fade_through_8_bit_images_has_flicker_near_zero():
    """What the worker measures: rounded PNG-like frames, scaled down."""
    frames = [Image.fromarray(np.full((256, 512, 3), round(v), np.uint8))
              for v in np.linspace(10, 190, 11)]
    smalls = [m.small_copy(f) for f in frames]
    assert smalls[0].shape == (32, 64, 3)
    assert m.motion(smalls) == pytest.approx(18.0)
    assert m.flicker(smalls) < 0.6                   # rounding only, against 18 of motion


def test_noise_between_frames_is_flicker():
    rng = np.random.default_rng(1)
    base = fade(60.0, 160.0, 11)
    noisy = [f + rng.normal(0, 8.0, f.shape).astype(np.float32) for f in base]
    smooth = m.flicker(base)
    rough = m.flicker(noisy)
    assert smooth == pytest.approx(0.0, abs=1e-4)
    # independent noise of sd s: |x0 - 2 x1 + x2| has sd sqrt(6) s, mean ~1.95 s
    assert rough == pytest.approx(1.95 * 8.0, rel=0.05)
    assert rough > m.motion(base)                    # noise dominates a slow fade


def test_a_hard_cut_at_the_boundary_is_a_pop_far_above_one():
    previous_last = flat(30.0)
    frames = fade(220.0, 230.0, 11)                   # a gentle segment after a cut
    q = m.measure_segment(frames, previous_last, previous_motion=1.0)
    assert q.boundary == pytest.approx(190.0)
    assert q.pop == pytest.approx(190.0 / 1.0)
    assert q.pop >= 50 * m.POP_RATIO


def test_pop_divides_by_at_least_min_step():
    assert m.pop_ratio(1.0, 0.0) == pytest.approx(1.0 / m.MIN_STEP)
    assert m.pop_ratio(0.0, 0.0) == 0.0


def test_unknown_sides_of_a_boundary():
    frames = fade(0, 100, 6)
    q = m.measure_segment(frames)                      # the first segment ever
    assert (q.boundary, q.pop) == (None, None)
    assert q.motion == pytest.approx(20.0)
    one = m.measure_segment([flat(5.0)], previous_last=flat(1.0))   # no in-betweens
    assert (one.motion, one.flicker, one.boundary, one.pop) == (None, None, 4.0, None)
    two = m.measure_segment([flat(5.0)], previous_last=flat(1.0), previous_motion=2.0)
    assert two.pop == pytest.approx(2.0)
    assert m.flicker(fade(0, 10, 2)) is None


def test_the_typical_step_is_both_sides_of_the_boundary():
    frames = fade(0.0, 100.0, 11)                     # 10 a step
    q = m.measure_segment(frames, previous_last=flat(-30.0), previous_motion=20.0)
    assert q.pop == pytest.approx(30.0 / 15.0)


def test_keyframe_colour_of_known_colours():
    grey = m.measure_keyframe(flat(128.0))
    assert grey.lab_l == pytest.approx(53.59, abs=0.05)   # sRGB 128 grey
    assert grey.lab_a == pytest.approx(0.0, abs=0.01) and grey.lab_b == pytest.approx(0, abs=0.01)
    assert grey.lab_l_std == pytest.approx(0.0, abs=0.01)
    assert (grey.saturation, grey.contrast) == (0.0, 0.0)
    assert grey.brightness == 128.0 and grey.change is None

    red = np.zeros((H, W, 3), np.float32)
    red[..., 0] = 255
    q = m.measure_keyframe(red)
    assert (q.lab_l, q.lab_a, q.lab_b) == pytest.approx((53.24, 80.09, 67.20), abs=0.05)
    assert q.saturation == pytest.approx(1.0)

    half = flat(0.0)
    half[:, W // 2:] = 255                            # black | white
    q = m.measure_keyframe(half)
    assert q.lab_l == pytest.approx(50.0, abs=0.01) and q.lab_l_std == pytest.approx(50.0, abs=0.01)
    assert q.contrast == pytest.approx(127.5) and q.brightness == pytest.approx(127.5)


def test_keyframe_change_is_delta_e_and_sees_shapes_as_well_as_colour():
    a = flat(0.0)
    a[:, W // 2:] = 255
    mirrored = a[:, ::-1].copy()                       # same colours, other places
    assert m.keyframe_change(a, a) == 0.0
    assert m.keyframe_change(a, mirrored) == pytest.approx(100.0, abs=0.01)
    q = m.measure_keyframe(flat(130.0), previous=flat(128.0))
    assert 0 < q.change < m.STAGNANT_CHANGE             # two levels: not noticeable


def test_colour_drift_is_the_distance_between_mean_colours():
    assert m.colour_drift((50, 10, -5), (50, 10, -5)) == 0.0
    assert m.colour_drift((53, 14, -5), (50, 10, -5)) == pytest.approx(5.0)


def test_small_copy_is_the_exact_mean_of_whole_blocks():
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (256, 512, 3), dtype=np.uint8)
    small = m.small_copy(Image.fromarray(frame))
    assert small.shape == (32, 64, 3) and small.dtype == np.float32
    exact = frame.reshape(32, 8, 64, 8, 3).mean(axis=(1, 3))
    assert np.abs(small - exact).max() < 1e-4              # not rounded to 8 bits
    assert np.abs(m.small_copy(frame.astype(np.float64)) - exact).max() < 1e-4
    # a size that is no multiple: whole blocks, the edge left out
    odd = m.small_copy(Image.new("RGB", (200, 101), (9, 8, 7)))
    assert odd.shape == (33, 66, 3) and float(odd[..., 0].mean()) == 9.0
    # narrower than twice the width: kept as it is
    assert m.small_copy(Image.new("RGB", (100, 33), 0)).shape == (33, 100, 3)
    gray = m.small_copy(Image.new("L", (128, 64), 90))
    assert gray.shape == (32, 64, 3) and float(gray.mean()) == 90.0


def test_a_thumbnail_compares_with_the_full_frame_it_was_made_from():
    im = Image.new("RGB", (512, 256), (200, 40, 40))
    thumb = m.small_copy(Image.new("RGB", (128, 62), (200, 40, 40)))   # a pixel off
    assert thumb.shape == (31, 64, 3)
    assert m.keyframe_change(thumb, m.small_copy(im)) == pytest.approx(0.0, abs=1e-6)
    assert m.boundary_change(thumb, m.small_copy(im)) == pytest.approx(0.0, abs=1e-6)


def test_a_fade_measured_through_small_copies_has_no_rounding_floor():
    """8-bit frames of a slow fade: the small copies keep the block means unrounded, so
    the flicker is that of the frames themselves (a fade that dithers between levels)."""
    rng = np.random.default_rng(5)
    base = rng.uniform(40, 200, (256, 512, 3))
    frames = [Image.fromarray(np.round(base + 0.37 * i).astype(np.uint8)) for i in range(11)]
    smalls = [m.small_copy(f) for f in frames]
    assert m.motion(smalls) == pytest.approx(0.37, abs=0.02)
    # rounding errors averaged over 8x8 blocks: ~0.07 (8-bit small copies gave ~0.57)
    assert m.flicker(smalls) < 0.15
