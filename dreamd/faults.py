"""Crash-test hooks: stop at a named point so a test can SIGKILL the daemon there.

`DREAMD_PAUSE_AT=keyframe-written,frames-written` makes the daemon, on reaching such a
point, create `<data_dir>/paused-at-<point>` and sleep. Unset (always, in real use)
this costs one dict lookup. Points: keyframe-written (file on disk, row not yet
completed), frames-written (a batch's files on disk, rows not yet created),
frame-displayed (current_frame.png replaced, frame not yet marked shown).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "DREAMD_PAUSE_AT"


def pause_point(name: str, data_dir: Path) -> None:
    points = os.environ.get(ENV)
    if not points or name not in points.split(","):
        return
    (Path(data_dir) / f"paused-at-{name}").write_text(str(os.getpid()))
    time.sleep(3600)
