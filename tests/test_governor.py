"""The governor's control law (dreamd/governor/law.py) on simulated pipelines
(tests/governor_sim.py): stage times as functions of time and size, with seeded noise,
so every scenario is deterministic. It must converge without oscillating, stay within
the user's bounds, leave a fast machine alone, and stop the underruns once settled."""

from __future__ import annotations

import pytest

from dreamd.governor.law import (LADDER, Bounds, Governor, Measurements, size_words, stretch)
from tests.governor_sim import reversals, simulate

USER = Bounds(frames=10, max_frames=120, divisor=1.0, max_divisor=4.0, dwell=30.0)
FAST_KEYFRAME = lambda t: 0.08                                   # noqa: E731  procedural
PIXEL = lambda t, d: 0.005 + 0.025 / d ** 2                      # noqa: E731  pixel codec
TAESD = lambda t, d: 0.024 + 0.3 / d ** 2                        # noqa: E731  324 ms at full size


def within(run, bounds: Bounds) -> None:
    for _, n, d in run.settings:
        assert bounds.frames <= n <= bounds.top_frames
        assert bounds.divisor <= d <= max(bounds.divisor, bounds.max_divisor)


def test_a_fast_machine_is_left_at_the_users_settings():
    run = simulate(USER, FAST_KEYFRAME, PIXEL, seconds=900)
    assert run.decisions == []
    assert {(n, d) for _, n, d in run.settings} == {(10, 1.0)}
    assert run.underruns == []


def test_slow_keyframes_morph_longer_and_the_underruns_stop():
    run = simulate(USER, lambda t: 10.0, PIXEL, seconds=900)
    assert [d.reason for _, d in run.decisions] == ["slow_keyframes"]
    t, d = run.decisions[0]
    # 10 s keyframes at 4 fps need more than 40 frames a segment to keep up
    assert 40 < d.frames <= 120 and d.divisor == 1.0
    assert d.message == f"keyframes take 10.0 s: morphing over {d.frames} frames"
    assert run.underruns_after(t + 60) == 0
    within(run, USER)


def test_slow_decoding_shrinks_the_interpolation_size_to_what_keeps_up():
    run = simulate(USER, lambda t: 0.1, TAESD, seconds=900)
    assert [d.reason for _, d in run.decisions] == ["slow_inbetweens"]
    t, d = run.decisions[0]
    assert d.divisor == 2.0 and d.frames == 10          # 3/4 size would not keep up
    assert "interpolating at 1/2 size" in d.message
    assert run.underruns_after(t + 60) == 0
    within(run, USER)


def test_twice_the_display_rate_takes_a_smaller_size():
    run = simulate(USER, lambda t: 0.1, TAESD, fps=8.0, seconds=600)
    assert len(run.decisions) == 1 and run.decisions[0][1].divisor > 2.0
    assert run.underruns_after(run.last_change() + 60) == 0


def test_a_sudden_slowdown_is_followed_once():
    run = simulate(USER, lambda t: 1.0 if t < 300 else 8.0, PIXEL, seconds=900)
    assert len(run.decisions) == 1
    t, d = run.decisions[0]
    assert 300 < t < 360 and d.reason == "slow_keyframes" and d.frames > 30
    assert run.underruns == []               # the 30 s buffer covers the reaction time


def test_recovery_goes_back_to_the_users_settings_step_by_step():
    slow = lambda t: t < 300                                     # noqa: E731
    run = simulate(USER, lambda t: 8.0 if slow(t) else 0.5,
                   lambda t, d: TAESD(t, d) if slow(t) else 0.01 + 0.05 / d ** 2, seconds=1500)
    after = [(t, d) for t, d in run.decisions if t > 300]
    assert after, run.decisions
    # back to full size and to N near the user's, never past them
    final = run.decisions[-1][1]
    assert final.divisor == 1.0 and final.frames <= 15
    # relaxing is gradual and never turns around
    frames = [d.frames for _, d in after]
    divisors = [d.divisor for _, d in after]
    assert frames == sorted(frames, reverse=True) and divisors == sorted(divisors, reverse=True)
    # a size step at a time, each after two dwells at least
    assert all(b - a >= 60 for (a, _), (b, _) in zip(after, after[1:]))
    within(run, USER)


@pytest.mark.parametrize("seed", range(8))
def test_noisy_keyframe_times_settle_without_oscillating(seed):
    """15 % noise on every keyframe: it settles within minutes and stays. Seen here: 7
    of these 8 seeds only ever go up (1-2 changes); seed 3 goes 23, 32, 26, 32 in its
    first 7.5 minutes (a relax that the keyframes then proved too early), then holds."""
    run = simulate(USER, lambda t: 5.0, PIXEL, noise=0.15, seed=seed, seconds=1200)
    assert 1 <= len(run.decisions) <= 4
    assert reversals(run) <= 2
    assert run.last_change() < 480           # settled: nothing in the last 12 minutes
    assert run.underruns_after(run.last_change() + 60) == 0
    within(run, USER)


@pytest.mark.parametrize("seed", range(3))
def test_noisy_decoding_settles_on_one_size(seed):
    run = simulate(USER, lambda t: 0.3, TAESD, noise=0.2, seed=seed, seconds=900)
    assert len({d.divisor for _, d in run.decisions}) == 1
    assert run.underruns_after(run.last_change() + 60) == 0


def test_the_users_maximum_bounds_n():
    bounds = Bounds(frames=10, max_frames=20, divisor=1.0, max_divisor=1.0, dwell=30.0)
    run = simulate(bounds, lambda t: 10.0, TAESD, seconds=600)
    within(run, bounds)
    # as far as helps (within 5 % of the most it may), though not enough
    assert 18 <= run.decisions[-1][1].frames <= 20
    assert {d for _, _, d in run.settings} == {1.0}


def test_keyframes_only_stays_keyframes_only_and_off_is_off():
    keyframes_only = Bounds(frames=0, max_frames=120, divisor=1.0, max_divisor=4.0)
    run = simulate(keyframes_only, lambda t: 10.0, PIXEL, seconds=300)
    assert {n for _, n, _ in run.settings} == {0}
    off = Bounds(frames=10, max_frames=120, divisor=1.0, max_divisor=4.0, enabled=False)
    run = simulate(off, lambda t: 10.0, TAESD, seconds=300)
    assert run.decisions == [] and {(n, d) for _, n, d in run.settings} == {(10, 1.0)}


def test_bounds_that_change_apply_at_once_and_turning_it_off_restores_the_settings():
    gov = Governor(USER)
    slow = Measurements(fps=4.0, keyframe_seconds=10.0, keyframe_seconds_high=10.0,
                        inbetween_ms={1.0: 400.0})
    d = gov.update(slow, USER, now=0.0)
    assert d is not None and d.frames > 40 and d.divisor > 1.0
    # the user raises the floor above its choice: applied now, inside the dwell
    higher = Bounds(frames=90, max_frames=120, divisor=1.0, max_divisor=4.0)
    d = gov.update(slow, higher, now=1.0)
    assert d.reason == "bounds" and d.frames == 90
    off = Bounds(frames=10, max_frames=120, divisor=1.0, max_divisor=4.0, enabled=False)
    d = gov.update(slow, off, now=2.0)
    assert (d.reason, d.frames, d.divisor) == ("off", 10, 1.0)
    assert gov.update(slow, off, now=100.0) is None


def test_nothing_is_decided_without_measurements_or_inside_the_dwell():
    gov = Governor(USER)
    assert gov.update(Measurements(fps=4.0), USER, now=0.0) is None
    slow = Measurements(fps=4.0, keyframe_seconds=10.0, inbetween_ms={1.0: 20.0})
    assert gov.update(slow, USER, now=1.0) is not None
    slower = Measurements(fps=4.0, keyframe_seconds=30.0, inbetween_ms={1.0: 20.0})
    assert gov.update(slower, USER, now=20.0) is None        # 30 s dwell
    assert gov.update(slower, USER, now=31.0).reason == "slow_keyframes"


def test_a_draining_buffer_teaches_it_that_the_stages_share_the_machine():
    gov = Governor(USER)
    # the model says N = 10 keeps up (load ~0.5); the buffer says otherwise
    m = Measurements(fps=4.0, keyframe_seconds=1.2, keyframe_seconds_high=1.2,
                     inbetween_ms={1.0: 100.0}, buffer_seconds=4.0, buffer_target=30.0,
                     trend=-0.3)
    decisions = [gov.update(m, USER, now=t) for t in range(0, 300, 2)]
    made = [d for d in decisions if d is not None]
    assert made and made[0].reason == "draining" and "draining" in made[0].message
    assert made[0].frames > 10 or made[0].divisor > 1.0
    assert gov.share > 0.25


def test_size_words_and_the_ladder():
    assert [size_words(d) for d in LADDER[:5]] == ["full size", "3/4 size", "1/2 size",
                                                   "3/8 size", "1/4 size"]
    assert Bounds(frames=10, max_frames=0, divisor=1.5, max_divisor=4.0).sizes() == \
        [1.5, 2.0, 2.667, 4.0]
    assert Bounds(frames=10, max_frames=0, divisor=2.0, max_divisor=1.0).sizes() == [2.0]


def test_stretch_slows_gently_as_the_buffer_empties_and_comes_back_with_a_margin():
    low, floor = 10.0, 0.85
    assert stretch(12.0, low, floor, 1.0) == 1.0
    rates, rate = [], 1.0
    for b in [9.9, 8, 6, 4, 2, 0.5, 0.0]:
        rate = stretch(b, low, floor, rate)
        rates.append(rate)
    assert rates == sorted(rates, reverse=True) and rates[-1] == floor
    assert all(floor <= r < 1.0 for r in rates)
    assert all(round((r - floor) / 0.05, 6).is_integer() for r in rates)   # 5 % steps
    # refilling: no flutter at a step's edge, full rate only past the mark
    assert stretch(0.2, low, floor, 0.85) == 0.85
    assert stretch(9.9, low, floor, 0.85) < 1.0
    assert stretch(low + 2.0, low, floor, 0.85) == 1.0
    assert stretch(5.0, low, 1.0, 1.0) == 1.0          # min_stretch 1: never


def test_one_measurement_alone_must_be_far_off_to_count():
    """A start warms up (first calls, imports, other workers loading): one batch 7 %
    over the display's budget is no reason to shrink the size; two are, and one far
    off (a decoder 10x too slow) is at once."""
    gov = Governor(USER)
    lone = Measurements(fps=4.0, inbetween_ms={1.0: 268.0}, inbetween_samples={1.0: 1})
    assert gov.update(lone, USER, now=0.0) is None
    two = Measurements(fps=4.0, inbetween_ms={1.0: 268.0}, inbetween_samples={1.0: 2})
    assert gov.update(two, USER, now=2.0).divisor > 1.0
    far = Measurements(fps=4.0, inbetween_ms={1.0: 2600.0}, inbetween_samples={1.0: 1})
    assert Governor(USER).update(far, USER, now=0.0).divisor == 4.0
