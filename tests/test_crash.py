"""Crash safety, proven: SIGKILL `dreamd run` mid keyframe, mid interpolation, mid
display write and at a random moment; restart it each time; nothing is lost, nothing
is produced twice, playback continues after the last shown frame."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests import invariants
from tests.conftest import wait_for


def kill_at(daemon, point: str) -> None:
    marker = daemon.data_dir / f"paused-at-{point}"
    proc = daemon.start(extra_env={"DREAMD_PAUSE_AT": point})
    try:
        wait_for(marker.exists, timeout=90, what=f"the daemon to reach {point}:\n"
                 f"{daemon.output()[-2000:]}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    marker.unlink()


def playhead(daemon):
    status = json.loads((daemon.data_dir / "output" / "status.json").read_text())
    return status


@pytest.mark.slow
def test_sigkill_at_every_stage_then_resume(daemon):
    assert daemon.run(6).returncode == 0, daemon.output()
    first = invariants.check(daemon.data_dir)
    assert first["shown"], "the first run showed nothing"

    before = first
    for point in ("keyframe-written", "frames-written", "frame-displayed"):
        kill_at(daemon, point)
        # the dead daemon's leases are still 'executing' here: a restart must rescue them
        result = daemon.run(4)
        assert result.returncode == 0, result.stdout
        after = invariants.check(daemon.data_dir)
        # playback continued after the last frame shown before the kill
        assert after["shown"][:len(before["shown"])] == before["shown"]
        assert len(after["shown"]) > len(before["shown"]), f"nothing shown after {point}"
        assert after["shown"][len(before["shown"])] > before["shown"][-1]
        before = after

    # and a kill at an arbitrary moment, with no pause point
    proc = daemon.start()
    wait_for(lambda: "interpolation" in daemon.output() and "ready" in daemon.output(),
             timeout=60, what="some work")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert daemon.run(4).returncode == 0
    final = invariants.check(daemon.data_dir)
    assert final["shown"][:len(before["shown"])] == before["shown"]
    assert len(final["shown"]) > len(before["shown"])
    assert "rescued" in daemon.output() or "abandoned" in "".join(
        log.read_text() for log in daemon.logs)
