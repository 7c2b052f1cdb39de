"""Crash-test hooks: stop at a named point so a test can SIGKILL the daemon there.

`DREAMD_PAUSE_AT=keyframe-written,frames-written` makes the daemon, on reaching such a
point, create `<data_dir>/paused-at-<point>` and sleep. Unset (always, in real use)
this costs one dict lookup. Points: keyframe-denoising (the in-process diffusion
backend's first step of a keyframe), keyframe-written (file on disk, row not yet
completed), frames-written (a batch's files on disk, rows not yet created),
frame-displayed (current_frame.png replaced, frame not yet marked shown),
retention-frames-evicted, retention-images-pruned, retention-rows-pruned (a retention
pass's rows committed, its files not yet deleted).

`DREAMD_HOLD_AT=keyframe-written` lets a test line up a fault with that moment: when
the test has created `<data_dir>/arm-<point>`, the next daemon to reach the point
renames it `held-at-<point>` and waits until the test deletes that, then carries on.

`DREAMD_SLOW=keyframe=2.5,inbetween=0.08` makes a stage slower on purpose (the governor's
tests and bench/governor.py): every keyframe takes 2.5 s more, every in-between frame
0.08 s more at full interpolation size (scaled by area: a quarter of it at half size,
as a real decoder's cost is).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "DREAMD_PAUSE_AT"
HOLD_ENV = "DREAMD_HOLD_AT"
SLOW_ENV = "DREAMD_SLOW"


def slow_down(stage: str, units: float = 1.0) -> None:
    """Sleep `units` times the delay DREAMD_SLOW gives `stage` (nothing when unset)."""
    spec = os.environ.get(SLOW_ENV)
    if not spec:
        return
    for part in spec.split(","):
        name, _, seconds = part.partition("=")
        if name.strip() == stage:
            time.sleep(max(0.0, float(seconds)) * units)


def armed() -> bool:
    """Is any pause or hold point asked for? (A caller at every frame asks once.)"""
    return bool(os.environ.get(ENV) or os.environ.get(HOLD_ENV))


def pause_point(name: str, data_dir: Path) -> None:
    held = os.environ.get(HOLD_ENV)
    if held and name in held.split(","):
        armed, marker = Path(data_dir) / f"arm-{name}", Path(data_dir) / f"held-at-{name}"
        try:
            armed.rename(marker)
        except OSError:
            pass                          # not armed: carry on
        else:
            deadline = time.monotonic() + 3600
            while marker.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
    points = os.environ.get(ENV)
    if not points or name not in points.split(","):
        return
    (Path(data_dir) / f"paused-at-{name}").write_text(str(os.getpid()))
    time.sleep(3600)
