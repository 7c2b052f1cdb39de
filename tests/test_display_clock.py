"""The display's own clock (dreamd/display/clock.py): a real thread, judged by what it
did, never by how fast it did it."""
from __future__ import annotations

import threading

import pytest

from dreamd.display.clock import DisplayClock, next_due
from tests.conftest import wait_for


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.threads: set[str] = set()

    def __call__(self) -> None:
        self.n += 1
        self.threads.add(threading.current_thread().name)


def test_it_ticks_at_once_then_at_the_period_and_does_its_duties_between():
    ticks, beats = Counter(), Counter()
    period = [3600.0]
    clock = DisplayClock(ticks, lambda: period[0], [(0.05, beats)])
    clock.start()
    try:
        wait_for(lambda: ticks.n == 1, 30, what="the first frame, at once")
        wait_for(lambda: beats.n >= 3, 30, what="duties while no frame is due")
        assert ticks.n == 1                   # the next frame is an hour away
        period[0] = 0.01
        clock.retime()                        # a new rate: from the last frame on
        wait_for(lambda: ticks.n >= 5, 30, what="frames at the new rate")
    finally:
        assert clock.stop(timeout=30)
    assert ticks.threads == beats.threads == {"display"}


def test_after_stop_no_tick_starts_and_one_in_progress_is_waited_for():
    entered, release = threading.Event(), threading.Event()
    done = []

    def tick() -> None:
        entered.set()
        release.wait(30)
        done.append(1)

    clock = DisplayClock(tick, lambda: 0.001, [(1.0, lambda: None)])
    clock.start()
    assert entered.wait(30)
    threading.Timer(0.05, release.set).start()
    assert clock.stop(timeout=30)             # returned once the tick in progress ended
    assert done == [1] and not clock.is_alive()


def test_frame_times_keep_to_their_grid_and_a_whole_missed_period_is_not_replayed():
    # a tick that ends late, within its period: the next frame keeps to the grid
    assert next_due(10.0, 0.1, now=10.07) == pytest.approx((10.0, 10.1))
    # one that overran whole periods: the next frame one period from now, not a burst of
    # the frames it missed (as APScheduler's `coalesce` did for the display before)
    assert next_due(10.0, 0.1, now=11.03) == pytest.approx((11.03, 11.13))
    assert next_due(10.0, 0.1, now=10.1) == pytest.approx((10.1, 10.2))
