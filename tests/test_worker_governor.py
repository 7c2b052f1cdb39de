"""The governor's worker in-process on a real ledger (the control law itself is
tests/test_governor.py): what it measures (keyframe and in-between times, the buffer
and its trend), the choice the next batch takes, what `governor_decisions` records for
`dreamd status`, a restart going on from the last choice, the display's time-stretch
recorded once when it starts and once when it ends, and the pacer's rate."""

from __future__ import annotations

import json
from datetime import timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import insert, select, text, update

from dreamd.governor.law import Bounds, Decision, Measurements
from dreamd.governor.worker import (GovernorWorker, Pacer, at_claim, current, inbetween_ms,
                                    keyframe_seconds, slope)
from dreamd.ledger import read_model, transitions
from dreamd.ledger.models import GovernorDecision, Interpolation, Keyframe, utcnow
from dreamd.ledger.queries import dbapi
from tests.conftest import worker_context
from tests.test_governor_daemon import CONFIG

KF, IP, GD = Keyframe.__table__, Interpolation.__table__, GovernorDecision.__table__


@pytest.fixture
def ctx(db_path):
    yield from worker_context(db_path, CONFIG)


@pytest.fixture
def make(contexts):
    """A context on CONFIG with some of its values changed: {"governor.min_stretch": 0.8}."""

    def _make(changes: dict):
        ctx = contexts(CONFIG)
        for path, value in changes.items():
            section, name = path.split(".")
            setattr(getattr(ctx.cfg, section), name, value)
        return ctx
    return _make


def keyframe(conn, k: int, ms: float | None, *, state: str = "completed", started=None) -> int:
    now = utcnow()
    return conn.execute(insert(KF).values(
        chain_index=k, state=state, backend="procedural", theme="t", prompt="p", seed=k,
        denoise=0.3, source="img2img", width=128, height=64, path=f"keyframes/k{k}.png",
        generation_ms=ms, started_at=started or now, completed_at=now, created_at=now,
        scheduled_at=now)).inserted_primary_key[0]


def batch(conn, k: int, ms: float | None, *, n: int = 4, divisor: float | None = 1.0,
          state: str = "completed", started=None) -> int:
    ends = conn.execute(select(KF.c.id).where(KF.c.chain_index >= 900)
                        .order_by(KF.c.id)).scalars().all()
    if not ends:       # the keyframes every batch morphs between (not measured)
        ends = [keyframe(conn, 900, None), keyframe(conn, 901, None)]
    return conn.execute(insert(IP).values(
        chain_index=k, from_keyframe_id=ends[0], to_keyframe_id=ends[1], n_frames=n, divisor=divisor,
        state=state, duration_ms=ms, codec="pixel",
        started_at=started or utcnow())).inserted_primary_key[0]


def frames(conn, n: int, chain: int = 0) -> None:
    for i in range(n):
        transitions.create(conn, "frame", {"chain_index": chain, "t": i / (n + 1),
                                           "kind": "inbetween", "path": f"f{chain}_{i}.png"})


# ---------------------------------------------------------------- measuring

def test_keyframe_times_are_the_median_and_slowest_of_the_last_five(ctx):
    with ctx.reader.connect() as conn:
        assert keyframe_seconds(dbapi(conn)) == (None, None, 0)
    with ctx.engine.begin() as conn:
        for k, ms in enumerate([9000, 1000, 2000, 3000, 8000, 4000, 5000]):
            keyframe(conn, k, ms)
        keyframe(conn, 7, None)                          # not measured
        keyframe(conn, 8, 99000, state="executing")      # not done
        keyframe(conn, 9, 99000, state="discarded")
    with ctx.reader.connect() as conn:
        # the newest five done: 5000, 4000, 8000, 3000, 2000
        assert keyframe_seconds(dbapi(conn)) == (4.0, 8.0, 5)


def test_the_runs_first_keyframe_is_left_out_and_earlier_runs_are_not_measured(ctx):
    since = utcnow()
    with ctx.engine.begin() as conn:
        keyframe(conn, 0, 50000, started=since - timedelta(seconds=60))   # an earlier run
        keyframe(conn, 1, 30000, started=since + timedelta(seconds=1))    # warming up
        keyframe(conn, 2, 2000, started=since + timedelta(seconds=40))
    with ctx.reader.connect() as conn:
        assert keyframe_seconds(dbapi(conn), since) == (2.0, 2.0, 1)
        assert keyframe_seconds(dbapi(conn)) == (30.0, 50.0, 3)
    with ctx.engine.begin() as conn:
        for k in (10, 11, 12):                                   # 5 of this run
            keyframe(conn, k, 2000, started=since + timedelta(seconds=k))
    with ctx.reader.connect() as conn:
        assert keyframe_seconds(dbapi(conn), since) == (2.0, 2.0, 4)
    with ctx.engine.begin() as conn:
        conn.execute(text("DELETE FROM keyframes WHERE chain_index >= 10"))
    with ctx.engine.begin() as conn:
        for k in range(3, 7):                                    # 6 of this run now
            keyframe(conn, k, 1000 * k, started=since + timedelta(seconds=40 * k))
    with ctx.reader.connect() as conn:
        assert keyframe_seconds(dbapi(conn), since) == (4.0, 6.0, 5)   # 6000…2000
    with ctx.engine.begin() as conn:
        keyframe(conn, 7, 7000, started=since + timedelta(seconds=300))
    with ctx.reader.connect() as conn:
        # 7 of this run: the first is far behind the newest five anyway
        assert keyframe_seconds(dbapi(conn), since) == (5.0, 7.0, 5)


def test_in_between_times_are_per_frame_medians_by_divisor(ctx):
    since = utcnow()
    with ctx.engine.begin() as conn:
        batch(conn, 0, 99000,                                    # the oldest: past the 8
              started=since - timedelta(seconds=60))
        batch(conn, 1, 1000, n=4)                                # 200 ms a frame
        batch(conn, 2, 1500, n=4)                                # 300
        batch(conn, 3, 2000, n=4)                                # 400
        batch(conn, 4, 900, n=2, divisor=2.0)                    # 300
        batch(conn, 5, 600, n=2, divisor=2.0)                    # 200
        batch(conn, 6, 250, n=4, divisor=1.33333)                # 50
        batch(conn, 7, None)                                     # not measured
        batch(conn, 8, 99000, state="executing")
        batch(conn, 9, 500, n=9)                                 # 50
        batch(conn, 10, 1000, n=9)                               # 100
    with ctx.reader.connect() as conn:
        per, count = inbetween_ms(dbapi(conn))
        assert per == {1.0: 200.0, 2.0: 250.0, 1.333: 50.0}
        assert count == {1.0: 5, 2.0: 2, 1.333: 1}
        # of this run, the first batch done is left out (the codec builds its kernels):
        # the one before it comes into the eight
        per, count = inbetween_ms(dbapi(conn), since)
        assert count == {1.0: 5, 2.0: 2, 1.333: 1}
        assert per == {1.0: 300.0, 2.0: 250.0, 1.333: 50.0}     # 19800, 400, 300, 50, 100
    # the run's first batch failed: the first one done is still the one left out
    with ctx.engine.begin() as conn:
        conn.execute(update(IP).where(IP.c.chain_index == 0)
                     .values(state="discarded", started_at=since + timedelta(seconds=1)))
        conn.execute(text("UPDATE interpolations SET id = 0 WHERE chain_index = 0"))
    with ctx.reader.connect() as conn:
        assert inbetween_ms(dbapi(conn), since)[1] == {1.0: 4, 2.0: 2, 1.333: 1}


def test_the_trend_is_the_least_squares_slope():
    assert slope([(0.0, 1.0), (1.0, 2.0)]) is None                # too few
    assert slope([(5.0, 1.0), (5.0, 2.0), (5.0, 3.0)]) is None    # no time passed
    assert slope([(0.0, 10.0), (1.0, 9.0), (2.0, 8.0)]) == pytest.approx(-1.0)
    assert slope([(0.0, 0.0), (1.0, 3.0), (2.0, 2.0), (3.0, 7.0)]) == pytest.approx(2.0)
    assert slope([(10.0, 0.0), (12.0, 1.0), (16.0, 3.0)]) == pytest.approx(0.5)
    assert slope([(0.0, 0.0), (0.1, 1.0), (0.2, 2.0)]) == pytest.approx(10.0)   # close


def test_the_buffer_and_its_trend_over_a_whole_window(make):
    ctx = make({})
    ctx.set_knobs({"display.buffer_target_seconds": 24.0})
    worker = GovernorWorker(ctx)
    with ctx.engine.begin() as conn:
        frames(conn, 8)
    with ctx.reader.connect() as conn:
        m = worker.measure(dbapi(conn), 100.0)
        assert (m.fps, m.buffer_seconds, m.buffer_target, m.trend) == (4.0, 2.0, 24.0, None)
        assert (m.keyframe_seconds, m.keyframe_samples, m.inbetween_ms) == (None, 0, {})
        # a trend needs 0.8 of the 30 s window covered by samples
        worker.samples.clear()
        worker.samples.extend([(77.0, 2.0), (85.0, 1.0), (94.0, 2.0)])
        assert worker.measure(dbapi(conn), 100.0).trend is None          # 23 s
        worker.samples.appendleft((76.0, 3.0))                    # 24 s
        m = worker.measure(dbapi(conn), 100.0)
        assert m.trend == pytest.approx(slope([(76.0, 3.0), (77.0, 2.0), (85.0, 1.0),
                                               (94.0, 2.0), (100.0, 2.0), (100.0, 2.0)]))
        worker.samples.clear()
        worker.samples.extend([(0.0, 9.0), (69.9, 9.0), (70.0, 5.0), (85.0, 1.0)])
        m = worker.measure(dbapi(conn), 100.0)                           # 30 s back, not 30.1
        assert m.trend == pytest.approx(slope([(70.0, 5.0), (85.0, 1.0), (100.0, 2.0)]))
        # a long segment widens the window: 3 segments of 40 frames at 4 fps = 30.75 s
        worker.law.frames = 40
        worker.samples.clear()
        worker.samples.extend([(68.8, 9.0), (69.3, 4.0), (75.0, 3.0), (90.0, 2.0)])
        m = worker.measure(dbapi(conn), 100.0)
        assert m.trend == pytest.approx(slope([(69.3, 4.0), (75.0, 3.0), (90.0, 2.0),
                                               (100.0, 2.0)]))


def test_an_earlier_runs_keyframes_and_batches_are_not_measured(ctx):
    with ctx.engine.begin() as conn:
        for k in range(3):
            keyframe(conn, k, 50000, started=utcnow() - timedelta(minutes=5))
        batch(conn, 0, 9000, started=utcnow() - timedelta(minutes=5))
    worker = GovernorWorker(ctx)
    with ctx.engine.begin() as conn:
        batch(conn, 1, 500)                      # this run's first: its kernels built
    with ctx.reader.connect() as conn:
        m = worker.measure(dbapi(conn), 0.0)
    # keyframes of this run only; batches of any run but this one's first
    assert (m.keyframe_seconds, m.keyframe_samples, m.inbetween_ms) == (None, 0, {1.0: 1800.0})


def test_a_measurement_carries_the_slowest_keyframe_and_the_batch_counts(ctx):
    """The law reads the slowest recent keyframe (an N-down with noisy keyframes) and
    how many batches each size has (one batch alone must be far off): measure passes
    both on, for this run's work."""
    worker = GovernorWorker(ctx)
    with ctx.engine.begin() as conn:
        for k, ms in enumerate([700, 2000, 6000, 3000]):         # the first: left out
            keyframe(conn, k, ms)
        for k, (ms, divisor) in enumerate([(100, 1.0), (800, 1.0), (1200, 1.0),
                                           (400, 2.0)]):        # the first: left out
            batch(conn, 10 + k, ms, divisor=divisor)
    with ctx.reader.connect() as conn:
        m = worker.measure(dbapi(conn), 0.0)
    assert (m.keyframe_seconds, m.keyframe_seconds_high, m.keyframe_samples) == (3.0, 6.0, 3)
    assert m.inbetween_ms == {1.0: 200.0, 2.0: 80.0}            # ms / (n + 1) frames
    assert m.inbetween_samples == {1.0: 2, 2.0: 1}


def test_nothing_is_measured_while_paused_short_of_disk_or_without_a_backend(ctx):
    worker = GovernorWorker(ctx)
    with ctx.engine.begin() as conn:
        for k in range(4):
            keyframe(conn, k, 9800.0)
    for fact in ("paused", "storage_low", "backend_unusable"):
        worker.samples.extend([(0.0, 1.0)] * 3)
        ctx.facts[fact] = True
        assert worker.tick() is None and len(worker.samples) == 0
        ctx.facts[fact] = False
    ctx.stopping.set()
    assert worker.tick() is None
    ctx.stopping.clear()
    assert worker.tick().reason == "slow_keyframes" and len(worker.samples) == 1


# ---------------------------------------------------------------- the choice, published

def test_the_next_batch_takes_the_choice_unless_off_or_retried(ctx):
    assert current(ctx) == (4, 1.0)
    ctx.set_knobs({"generation.interpolation_frames": 6})
    assert current(ctx) == (6, 1.0)                       # the user's live setting
    ctx.facts["governor"] = {"interpolation_frames": 40, "resolution_divisor": 2.0}
    assert current(ctx) == (40, 2.0)
    ctx.set_knobs({"governor.enabled": False, "generation.interpolation_frames": 6})
    assert current(ctx) == (6, 1.0)
    ctx.set_knobs({})
    with ctx.engine.begin() as conn:
        ids = [batch(conn, k, None, state="available", divisor=d)
               for k, d in enumerate([1.0, 1.0, 2.0, 1.0])]
        claimed = transitions.claim(conn, "interpolation", "me", limit=4, lease_seconds=30)
    first, second, same, retried = claimed

    def like(row, **changes):
        return SimpleNamespace(**{**row._mapping, **changes})
    again = like(retried, attempt=2)                           # keeps its own
    assert at_claim(ctx, again, "me") is again
    unchanged = like(same, n_frames=40)                        # made with it already
    assert at_claim(ctx, unchanged, "me") is unchanged
    got = at_claim(ctx, first, "other-owner")                 # no longer ours: untouched
    assert got is first
    got = at_claim(ctx, second, "me")
    assert (got.n_frames, got.divisor, got.id, got.attempt) == (40, 2.0, ids[1], 1)
    with ctx.reader.connect() as conn:
        stored = conn.execute(select(IP.c.id, IP.c.n_frames, IP.c.divisor)
                              .order_by(IP.c.id)).all()
    assert [tuple(r) for r in stored] == [(ids[0], 4, 1.0), (ids[1], 40, 2.0),
                                          (ids[2], 4, 2.0), (ids[3], 4, 1.0)]


def test_a_decision_is_recorded_with_what_was_measured(make):
    ctx = make({"governor.max_interpolation_frames": 60,
                "governor.max_resolution_divisor": 2.0})
    worker = GovernorWorker(ctx)
    with ctx.engine.begin() as conn:
        for k in range(4):
            keyframe(conn, k, 9876.5)
        before = utcnow() - timedelta(minutes=1)                 # an earlier run's
        batch(conn, 0, 1234.0, n=4, started=before)
        batch(conn, 1, 1234.0, n=4, started=before)
        frames(conn, 6)
    d = worker.tick()
    assert d is not None and d.reason == "slow_inbetweens"
    assert d.divisor > 1.0
    assert ctx.facts["governor"] == {"interpolation_frames": d.frames,
                                     "resolution_divisor": d.divisor,
                                     "reason": "slow_inbetweens", "message": d.message}
    with ctx.reader.connect() as conn:
        (row,) = conn.execute(select(GD)).all()
        shown = read_model.decisions(dbapi(conn))
    assert (row.run_id, row.reason, row.message) == (1, d.reason, d.message)
    assert (row.interpolation_frames, row.resolution_divisor) == (d.frames, d.divisor)
    assert (row.previous_frames, row.previous_divisor) == (4, 1.0)
    assert (row.keyframe_seconds, row.inbetween_ms, row.fps) == (9.877, 246.8, 4.0)
    assert (row.buffer_seconds, row.buffer_trend, row.stretch) == (1.5, None, 1.0)
    assert row.load == d.load and row.at is not None
    detail = json.loads(row.detail)
    assert detail == {"inbetween_ms_by_divisor": {"1": 246.8}, "buffer_target_seconds": 30.0,
                      "share": 0.25, "correction": 1.0,
                      "bounds": {"frames": 4, "max_frames": 60, "divisor": 1.0,
                                 "max_divisor": 2.0}}
    (s,) = shown
    assert s["reason"] == d.reason and s["detail"] == detail
    assert s["at"][:19] == row.at.isoformat(sep=" ", timespec="seconds")


def test_decisions_come_newest_first_as_many_as_asked(ctx):
    with ctx.engine.begin() as conn:
        for i in range(7):
            conn.execute(insert(GD).values(
                reason=f"r{i}", message="m", interpolation_frames=4 + i, resolution_divisor=1.0,
                stretch=1.0, fps=4.0, at=utcnow(),
                detail=None if i == 5 else json.dumps({"i": i})))
    with ctx.reader.connect() as conn:
        assert [d["reason"] for d in read_model.decisions(dbapi(conn))] == \
            ["r6", "r5", "r4", "r3", "r2"]
        got = read_model.decisions(dbapi(conn), limit=3)
    assert [d["reason"] for d in got] == ["r6", "r5", "r4"]
    assert got[1]["detail"] is None and got[2]["detail"] == {"i": 4}


def previous(ctx, frames: int, divisor: float) -> None:
    with ctx.engine.begin() as conn:
        conn.execute(insert(GD).values(reason="slow_keyframes", message="m", stretch=1.0,
                                       interpolation_frames=frames, resolution_divisor=divisor,
                                       fps=4.0, at=utcnow()))


@pytest.mark.parametrize("last, restored", [
    ((40, 2.0), (40, 2.0)),          # within the bounds: goes on from it
    ((4, 2.0), (4, 2.0)),            # the user's N, a smaller size
    ((120, 4.0), (120, 4.0)),        # at the top of both
    ((121, 2.0), (4, 1.0)),          # more in-betweens than now allowed
    ((3, 2.0), (4, 1.0)),            # fewer than the user's N
    ((40, 3.0), (4, 1.0)),           # a size not on the ladder
    ((40, 8.0), (4, 1.0)),           # a size smaller than now allowed
])
def test_a_restart_goes_on_from_the_last_choice_only_within_the_bounds(ctx, last, restored):
    previous(ctx, *last)
    worker = GovernorWorker(ctx)
    assert (worker.law.frames, worker.law.divisor) == restored
    if restored == last:
        assert ctx.facts["governor"] == {"interpolation_frames": last[0],
                                         "resolution_divisor": last[1], "reason": "resumed",
                                         "message": "going on from the last run"}
        assert current(ctx) == last
    else:
        assert "governor" not in ctx.facts


def test_the_bounds_are_the_users_settings_read_live(make):
    ctx = make({"governor.max_interpolation_frames": 60, "governor.max_resolution_divisor": 2.0,
                "generation.resolution_divisor": 1.333})
    worker = GovernorWorker(ctx)
    assert worker.bounds() == Bounds(frames=4, max_frames=60, divisor=1.333, max_divisor=2.0,
                                     enabled=True, dwell=5.0)
    ctx.set_knobs({"generation.interpolation_frames": 8, "governor.enabled": False})
    assert worker.bounds() == Bounds(frames=8, max_frames=60, divisor=1.333, max_divisor=2.0,
                                     enabled=False, dwell=5.0)


def test_a_restart_at_the_users_settings_or_turned_off_publishes_nothing(make):
    ctx = make({})
    previous(ctx, 4, 1.0)
    GovernorWorker(ctx)
    assert "governor" not in ctx.facts
    previous(ctx, 40, 2.0)
    ctx.set_knobs({"governor.enabled": False})
    assert GovernorWorker(ctx).law.frames == 4 and "governor" not in ctx.facts


# ---------------------------------------------------------------- the time-stretch

def test_a_stretch_is_recorded_once_when_it_starts_and_once_when_it_ends(make):
    ctx = make({"governor.min_stretch": 0.8})
    worker = GovernorWorker(ctx)

    def m(buffer: float) -> Measurements:
        return Measurements(fps=4.0, buffer_seconds=buffer, buffer_target=30.0,
                            inbetween_ms={1.0: 12.34})

    def recorded():
        with ctx.reader.connect() as conn:
            return conn.execute(select(GD.c.reason, GD.c.message, GD.c.stretch,
                                       GD.c.buffer_seconds, GD.c.inbetween_ms,
                                       GD.c.previous_frames)
                                .order_by(GD.c.id)).all()
    worker._stretch(m(20.0), 0.0)
    assert recorded() == []                                   # full rate: nothing
    ctx.facts["stretch"] = 0.95
    worker._stretch(m(1.23), 10.0)
    ctx.facts["stretch"] = 0.85
    worker._stretch(m(0.5), 11.0)
    ctx.facts["stretch"] = 0.9
    worker._stretch(m(0.7), 12.0)
    assert recorded() == [(
        "stretch", "the buffer is low (1.2 s): showing frames a little slower (95 % of 4 fps, "
        "at least 80 %) until it refills", 0.95, 1.23, 12.3, 4)]
    ctx.facts["stretch"] = 1.0
    worker._stretch(m(3.0), 13.0)
    ctx.facts["stretch"] = 0.95                                # a dip: the same stretch
    worker._stretch(m(2.0), 20.0)
    ctx.facts["stretch"] = 1.0
    worker._stretch(m(3.0), 21.0)
    worker._stretch(m(3.5), 40.9)
    assert len(recorded()) == 1                               # not 20 s at full rate yet
    worker._stretch(m(4.56), 41.0)
    assert recorded()[1] == (
        "stretch_end", "the buffer refilled (4.6 s): the display is back at 4 fps (it went "
        "down to 85 %)", 1.0, 4.56, 12.3, 4)
    worker._stretch(m(5.0), 100.0)
    assert len(recorded()) == 2
    # the next stretch starts afresh
    ctx.facts["stretch"] = 0.9
    worker._stretch(m(1.0), 101.0)
    assert [r.reason for r in recorded()] == ["stretch", "stretch_end", "stretch"]
    assert recorded()[2].stretch == 0.9


def test_a_stretch_is_recorded_when_the_worker_ticks(ctx):
    worker = GovernorWorker(ctx)
    ctx.facts["stretch"] = 0.9
    assert worker.tick() is None
    with ctx.reader.connect() as conn:
        assert conn.execute(select(GD.c.reason)).scalars().all() == ["stretch"]
    ctx.facts["stretch"] = 1.0                  # back at full rate: not 20 s yet
    assert worker.tick() is None
    with ctx.reader.connect() as conn:
        assert conn.execute(select(GD.c.reason)).scalars().all() == ["stretch"]


def test_the_pacer_slows_below_the_buffering_mark_and_says_so(make):
    ctx = make({"display.min_buffer_seconds": 6.0, "governor.min_stretch": 0.8})
    changes = []
    pacer = Pacer(ctx)
    pacer.on_change = lambda: changes.append(pacer.rate)
    assert pacer.pace(12.0) == 1.0 and changes == [] and "stretch" not in ctx.facts
    # the mark: min_buffer_seconds (6) or a third of the target (10), the lower
    assert pacer.pace(6.0) == 1.0
    assert pacer.pace(5.9) == 0.95 and ctx.facts["stretch"] == 0.95
    assert pacer.pace(0.0) == 0.8 and changes == [0.95, 0.8]
    assert pacer.pace(0.0) == 0.8 and changes == [0.95, 0.8]      # no change, no call
    ctx.set_knobs({"display.buffer_target_seconds": 9.0})          # the mark is 3 now
    assert pacer.pace(4.0) == 1.0 and ctx.facts["stretch"] == 1.0
    assert pacer.pace(2.9) == 0.95
    ctx.set_knobs({"display.buffer_target_seconds": 9.0, "governor.enabled": False})
    assert pacer.pace(0.0) == 1.0 and changes == [0.95, 0.8, 1.0, 0.95, 1.0]
    ctx.set_knobs({})
    ctx.cfg.governor.stretch = False
    assert pacer.pace(0.0) == 1.0
    ctx.cfg.governor.stretch = True
    alone = Pacer(ctx)                         # before the daemon sets on_change
    assert alone.pace(0.0) == 0.8


def test_a_recorded_decision_names_the_speed_at_the_size_it_left(ctx):
    worker = GovernorWorker(ctx)
    worker.law.divisor = 2.0
    m = Measurements(fps=4.0, keyframe_seconds=1.23456, inbetween_ms={1.0: 300.0, 2.0: 90.04},
                     buffer_seconds=3.14159, buffer_target=30.0, trend=-0.123456)
    d = Decision(frames=8, divisor=2.0, reason="slow_keyframes", message="msg", load=0.7,
                 previous_frames=5, previous_divisor=1.0)
    ctx.facts["stretch"] = 0.95                 # the display's rate as it decides
    worker.record(d.reason, d.message, m, d)
    worker.record("stretch", "text", m, None, 0.9)
    with ctx.reader.connect() as conn:
        a, b = conn.execute(select(GD).order_by(GD.c.id)).all()
    assert (a.previous_frames, a.previous_divisor, a.inbetween_ms, a.load) == (5, 1.0, 300.0, 0.7)
    assert a.stretch == 0.95
    assert (a.keyframe_seconds, a.buffer_seconds, a.buffer_trend) == (1.235, 3.14, -0.123)
    assert (b.previous_frames, b.previous_divisor, b.inbetween_ms, b.stretch) == (
        4, 2.0, 90.0, 0.9)
    assert b.load == pytest.approx(round(worker.law.load(m, 4, 2.0), 3))
    assert json.loads(b.detail)["inbetween_ms_by_divisor"] == {"1": 300.0, "2": 90.0}
