"""The display's own clock: a thread that ticks the display writer at every frame time,
and does the daemon's other small, frequent duties between frames (status.json's
heartbeat, the look for new controls).

The display was an APScheduler interval job. Each run of one costs ~0.3 ms of CPU (the
scheduler's loop wakes, works out the next run time in datetimes, hands the job to a pool
thread and is told when it is done): at 15 fps more than the display's own work, and the
largest part of a daemon that has nothing to make. This thread sleeps until the next
frame time instead. The times lie on a fixed grid (a tick that runs late does not move
the ones after it); one that overruns a whole period is not caught up with a burst of
frames (nor was it with APScheduler's `coalesce`). A change of rate (a knob, the
governor's stretch) takes effect from the frame after the last one shown. Duties run
on the frames' wake-ups where one comes before they are due by half their interval:
a wake-up alone costs ~0.1 ms of CPU here.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


def next_due(due: float, period: float, now: float) -> tuple[float, float]:
    """After the frame that was due at `due`, ticked until `now`: (the time the frame
    counts from, when the next one is due). On the grid while ticks keep up; a whole
    period late, the next frame one period from now, with no burst to catch up."""
    if due + period <= now:
        return now, now + period
    return due, due + period


class DisplayClock(threading.Thread):
    def __init__(self, tick: Callable[[], None], period: Callable[[], float],
                 duties: list[tuple[float, Callable[[], None]]] = ()) -> None:
        """`tick` at every `period()` seconds, and each duty (seconds, fn) that often;
        none may raise (the daemon wraps them as it wraps every worker), and a duty must
        be quick: it runs on the display's time."""
        super().__init__(name="display", daemon=True)
        self.tick, self.period, self.duties = tick, period, list(duties)
        self._wake = threading.Event()
        self._halt = False

    def retime(self) -> None:
        """The rate changed: the next frame comes one new period after the last one."""
        self._wake.set()

    def stop(self, timeout: float) -> bool:
        """No tick starts after this; waits up to `timeout` for one in progress. True
        when the thread has ended."""
        self._halt = True
        self._wake.set()
        if self.is_alive():
            self.join(timeout)
        return not self.is_alive()

    def run(self) -> None:
        last = time.monotonic()          # when the last frame was due
        due = last                       # the first frame at once
        beats = [last + every for every, _fn in self.duties]
        while not self._halt:
            now = time.monotonic()
            period = self.period()
            if now >= due:
                self.tick()
                now = time.monotonic()
                last, due = next_due(due, period, now)
            for i, (every, duty) in enumerate(self.duties):
                # due, or due before the thread would wake for the next frame anyway: a
                # wake-up costs ~0.1 ms of CPU on its own, so duties ride on the frames'
                if now >= beats[i] - min(every / 2, period):
                    duty()
                    beats[i] = now + every
            if self._wake.wait(max(0.0, min(due, *beats) - time.monotonic())):
                self._wake.clear()
                due = last + self.period()
