"""The ComfyUI supervisor with a real child process: the test double run as a server."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from dreamd.backends.comfyui.supervisor import ComfyUISupervisor
from dreamd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX signals")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(condition, timeout: float = 20.0) -> bool:
    """Poll a condition, bounded; the assertion is on the outcome, never on the time taken."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def supervise(tmp_path):
    made = []

    def build(args: str = "", **kw) -> ComfyUISupervisor:
        port = free_port()
        kw.setdefault("backoff_base", 0.05)
        kw.setdefault("check_interval", 0.05)
        kw.setdefault("start_timeout", 30.0)
        sup = ComfyUISupervisor(f"{sys.executable} -m tests.comfyui_double --port {port} {args}",
                                cwd=REPO, env={"DREAMD_TEST": "1"}, gpu_index=kw.pop("gpu_index", None),
                                log_path=tmp_path / "logs" / "comfyui.log",
                                health_url=f"http://127.0.0.1:{port}", **kw)
        made.append(sup)
        return sup
    yield build
    for sup in made:
        sup.stop()


def test_starts_waits_for_health_and_stops_gracefully(supervise):
    sup = supervise(gpu_index=3)
    assert sup.start() is True
    assert sup.status().state in ("starting", "running") and sup.pid is not None
    assert sup.stop() == 0
    log = sup.log_path.read_text()
    assert "CUDA_VISIBLE_DEVICES=3" in log and "stopped cleanly" in log
    assert sup.status().state == "stopped" and sup.pid is None and not sup.healthy()


def test_a_killed_child_is_restarted(supervise):
    sup = supervise()
    assert sup.start()
    first = sup.pid
    os.kill(first, signal.SIGKILL)
    assert until(lambda: sup.pid not in (None, first) and sup.healthy())
    status = sup.status()
    assert status.restarts == 1 and status.last_exit == -signal.SIGKILL


def test_a_crash_loop_ends_at_the_restart_cap(supervise):
    sup = supervise("--exit-after 0.2", max_restarts_per_hour=2)
    sup.start(wait=False)
    assert until(lambda: sup.status().state == "gave_up")
    assert sup.status().restarts == 2 and sup.status().last_exit == 3
    log = sup.log_path.read_text()
    assert log.count("dreamd starts ComfyUI") == 3 and log.count("crashing on purpose") == 3


def test_a_child_ignoring_sigterm_is_killed(supervise):
    sup = supervise("--ignore-sigterm", stop_timeout=0.5)
    assert sup.start()
    assert sup.stop() == -signal.SIGKILL


def test_the_command_is_never_run_by_a_shell(tmp_path):
    sup = ComfyUISupervisor(f"{sys.executable} -c \"import sys; print('ARG=' + sys.argv[1])\" '$HOME;echo'",
                            log_path=tmp_path / "c.log", health_url=f"http://127.0.0.1:{free_port()}",
                            max_restarts_per_hour=0, check_interval=0.02)
    try:
        sup.start(wait=False)
        assert until(lambda: sup.status().state == "gave_up")
    finally:
        sup.stop()
    assert "ARG=$HOME;echo" in (tmp_path / "c.log").read_text()


def test_a_command_that_cannot_run_is_a_config_error(tmp_path):
    sup = ComfyUISupervisor("/no/such/comfyui --listen", log_path=tmp_path / "c.log")
    with pytest.raises(ConfigError, match="start_command: cannot run '/no/such/comfyui'"):
        sup.start()
    sup.stop()
    with pytest.raises(ConfigError, match="empty"):
        ComfyUISupervisor("  ")
