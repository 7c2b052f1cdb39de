"""The ComfyUI supervisor with a real child process: the test double run as a server; the
command split as Windows splits it; the child's life tied to the daemon's (a SIGKILLed
parent takes it along on Linux; an orphan is stopped with its process tree)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from dreamd.backends.comfyui.supervisor import ComfyUISupervisor, split_command, stop_process_tree
from dreamd.errors import ConfigError
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX signals")


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


# -- the command: Windows splitting, the list form ------------------------------------------------

@pytest.mark.parametrize("line, argv", [
    (r'"C:\Users\John Doe\ComfyUI\python_embeded\python.exe" -s ComfyUI\main.py --port 8188',
     [r"C:\Users\John Doe\ComfyUI\python_embeded\python.exe", "-s", r"ComfyUI\main.py", "--port", "8188"]),
    (r'C:\ComfyUI\python.exe main.py --output-directory "D:\dream out\\"',
     [r"C:\ComfyUI\python.exe", "main.py", "--output-directory", "D:\\dream out\\"]),
    (r'python.exe main.py --extra-model-paths-config "C:\a b\extra.yaml" --x a\\\"b "" c',
     ["python.exe", "main.py", "--extra-model-paths-config", r"C:\a b\extra.yaml", "--x", 'a\\"b', "", "c"]),
    (r'python.exe -c "say ""hi"" now"', ["python.exe", "-c", 'say "hi" now']),
    ('  python.exe\tmain.py  ', ["python.exe", "main.py"]),
])
def test_windows_splitting_keeps_a_quoted_path_with_spaces_whole(line, argv):
    assert split_command(line, windows=True) == argv


def test_posix_splitting_and_the_list_form():
    assert split_command("python main.py --listen '127.0.0.1'", windows=False) == [
        "python", "main.py", "--listen", "127.0.0.1"]
    listed = [r"C:\Users\John Doe\python.exe", "main.py"]
    assert split_command(listed, windows=True) == listed == split_command(listed, windows=False)
    with pytest.raises(ConfigError, match="cannot be split"):
        ComfyUISupervisor("python 'main.py")


def test_an_explicit_cuda_visible_devices_wins_over_system_gpu(tmp_path):
    port = free_port()
    sup = ComfyUISupervisor([sys.executable, "-m", "tests.comfyui_double", "--port", str(port)],
                            cwd=REPO, env={"CUDA_VISIBLE_DEVICES": "1"}, gpu_index=0,
                            log_path=tmp_path / "c.log", health_url=f"http://127.0.0.1:{port}",
                            check_interval=0.05)
    try:
        assert sup.start()
    finally:
        sup.stop()
    assert "CUDA_VISIBLE_DEVICES=1" in (tmp_path / "c.log").read_text()


# -- the child's life is tied to the daemon's ------------------------------------------------------

def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


PARENT = """
import sys, time
sys.path.insert(0, {repo!r})
from dreamd.backends.comfyui.supervisor import ComfyUISupervisor
sup = ComfyUISupervisor([sys.executable, "-m", "tests.comfyui_double", "--port", "{port}"],
                        cwd={repo!r}, log_path={log!r}, health_url="http://127.0.0.1:{port}")
assert sup.start()
print(sup.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_sigkilled_daemon_takes_its_comfyui_with_it(tmp_path):
    port = free_port()
    script = PARENT.format(repo=str(REPO), port=port, log=str(tmp_path / "c.log"))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert not gone(child)
    finally:
        parent.kill()
        parent.wait(timeout=30)
    assert until(lambda: gone(child), timeout=30)


def test_stop_process_tree_stops_the_child_and_its_children():
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(600)']); print(p.pid, flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    grandchild = int(proc.stdout.readline())
    try:
        assert stop_process_tree(proc.pid, expect=lambda p: False) is False   # not ours: untouched
        assert not gone(proc.pid) and not gone(grandchild)
        assert stop_process_tree(proc.pid, timeout=10) is True
        assert gone(proc.pid) and until(lambda: gone(grandchild), timeout=10)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_an_orphan_from_a_previous_daemon_is_stopped_by_its_pid_file(tmp_path):
    from dreamd.backends.comfyui.daemon_backend import stop_orphan
    argv = [sys.executable, "-m", "tests.comfyui_double", "--port", str(free_port())]
    orphan = subprocess.Popen(argv, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL)
    pid_path = tmp_path / "comfyui.pid"
    try:
        pid_path.write_text(f"{orphan.pid}\n")
        stop_orphan(pid_path, argv[:-1] + ["1"])     # another command line: a reused pid, left alone
        assert not gone(orphan.pid) and not pid_path.exists()   # the stale file is gone
        pid_path.write_text(f"{orphan.pid}\n")
        stop_orphan(pid_path, argv)
        assert gone(orphan.pid) and not pid_path.exists()
    finally:
        orphan.kill()
        orphan.wait(timeout=10)


def test_a_healthy_orphan_is_re_adopted_not_killed(tmp_path):
    """Where no parent-death signal tied it to the daemon (not Linux), a killed dreamd
    leaves its ComfyUI running: the next start keeps it if it answers, watches it, and
    stops its tree at the end; nothing is started twice."""
    from dreamd import config
    from dreamd.backends.comfyui.daemon_backend import build_backend
    port = free_port()
    argv = [sys.executable, "-m", "tests.comfyui_double", "--port", str(port),
            "--checkpoint", "random-sd15.safetensors"]
    orphan = subprocess.Popen(argv, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL)
    data = tmp_path / "data"
    data.mkdir()
    (data / "comfyui.pid").write_text(f"{orphan.pid}\n")
    cfg = config.parse(
        f'[generation]\nbackend = "comfyui"\n[system]\ndata_dir = "{data}"\n'
        f'[comfyui]\nurls = ["http://127.0.0.1:{port}"]\ncheckpoint = "random-sd15.safetensors"\n'
        f"start_argv = {json.dumps(argv)}\nstart_cwd = {json.dumps(str(REPO))}\n")
    try:
        assert until(lambda: ComfyUISupervisor(argv, health_url=f"http://127.0.0.1:{port}")
                     .healthy(), timeout=30)
        backend = build_backend(cfg)
        try:
            assert backend.supervisor.pid == orphan.pid
            assert backend.supervisor.status().state == "running"
            assert backend.health()["supervisor"]["pid"] == orphan.pid
        finally:
            backend.close()
        assert orphan.wait(timeout=30) is not None      # stopped with the daemon
        log = (data / "logs" / "comfyui.log").read_text() if (data / "logs" / "comfyui.log").exists() else ""
        assert "dreamd starts ComfyUI" not in log       # never started a second one
    finally:
        orphan.kill()
        orphan.wait(timeout=10)


def test_a_log_past_its_limit_is_cut_in_place_and_the_child_writes_on(tmp_path):
    """copytruncate: the writer keeps its handle, opened for appending as the
    supervisor opens it, and goes on at the new end (no hole of zeros before it)."""
    from dreamd.backends.comfyui.supervisor import trim_log
    path, go = tmp_path / "comfyui.log", tmp_path / "go"
    child = ("import os, sys, time\n"
             "sys.stdout.write('before ' * 2000 + '\\n'); sys.stdout.flush()\n"
             f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
             "sys.stdout.write('after\\n'); sys.stdout.flush()\n")
    with open(path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=log)
    assert until(lambda: path.stat().st_size > 10_000, timeout=60)
    assert trim_log(path, limit=10_000) is True
    go.touch()
    assert proc.wait(timeout=60) == 0
    assert path.read_bytes() == b"after\n"
    assert path.with_name("comfyui.log.1").read_text().startswith("before before")
    assert trim_log(path, limit=10_000) is False           # under the limit: left alone


def test_the_supervisor_trims_the_log_of_a_running_comfyui(supervise, monkeypatch):
    from dreamd.backends.comfyui import supervisor
    monkeypatch.setattr(supervisor, "LOG_MAX_BYTES", 10)   # the start's header alone is more
    sup = supervise()
    assert sup.start() is True
    old = sup.log_path.with_name("comfyui.log.1")
    # the header, then the child's own first line: each cut as soon as it is past the limit
    assert until(lambda: old.exists() and "listening on" in old.read_text(), timeout=60)
    assert "listening on" not in sup.log_path.read_text()
    assert sup.stop() == 0
