"""dreamd/platform.py: what differs on Windows, with Windows' pieces simulated (a
kernel32 that registers console handlers, a registry, pythonw's missing streams) and
real processes for the psutil parts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import PureWindowsPath

import pytest

from dreamd import platform
from tests.conftest import FAST_CONFIG, _STARTED, wait_for


# ---------------------------------------------------------------- processes

def test_pid_alive_asks_psutil_never_a_signal(monkeypatch):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    _STARTED.append(proc)

    def no_signals(*_):                  # on Windows os.kill(pid, 0) ends the process
        raise AssertionError("os.kill called")

    monkeypatch.setattr(os, "kill", no_signals)
    from dreamd.ledger import read_model
    assert platform.pid_alive(os.getpid()) and read_model.pid_alive(proc.pid)
    monkeypatch.undo()
    proc.kill()
    wait_for(lambda: not platform.pid_alive(proc.pid), timeout=10,
             what="an exited child (a zombie until reaped) to count as gone")
    proc.wait()
    assert not platform.pid_alive(proc.pid)
    assert not platform.pid_alive(0) and not platform.pid_alive(None)


CHILD = """
import signal, subprocess, sys, time
stubborn = sys.argv[1] == "stubborn"
if stubborn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
kid = subprocess.Popen(["sleep", "600"])
print(kid.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("kind", ["polite", "stubborn"])
def test_a_process_tree_ends_without_posix_signals_of_our_own(kind):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, kind], stdout=subprocess.PIPE,
                            text=True)
    _STARTED.append(proc)
    grandchild = int(proc.stdout.readline())
    killed = platform.end_process_tree(proc.pid, timeout=2.0)
    proc.wait(timeout=10)
    # SIG_IGN is inherited across exec: the stubborn one's `sleep` ignores SIGTERM too
    assert sorted(killed) == ([proc.pid, grandchild] if kind == "stubborn" else [])
    wait_for(lambda: not platform.pid_alive(grandchild), timeout=10, what="the grandchild")
    assert platform.end_process_tree(proc.pid) == []       # gone: nothing to do


def test_stop_signals_add_ctrl_break_on_windows(monkeypatch):
    assert platform.stop_signals()[:2] == (signal.SIGINT, signal.SIGTERM)
    monkeypatch.setattr(signal, "SIGBREAK", 21, raising=False)    # what Windows has
    monkeypatch.delattr(signal, "SIGHUP", raising=False)          # and what it has not
    assert platform.stop_signals() == (signal.SIGINT, signal.SIGTERM, 21)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX: a closed terminal's SIGHUP")
def test_a_closed_terminal_s_sighup_is_a_stop_signal():
    assert signal.SIGHUP in platform.stop_signals()


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX: a closed terminal's SIGHUP")
def test_under_nohup_sighup_stays_ignored():
    """`nohup dreamd run` starts it with SIGHUP ignored, asking to outlive the terminal:
    the daemon keeps that instead of stopping."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert signal.SIGHUP not in platform.stop_signals()
        assert platform.stop_signals()[:2] == (signal.SIGINT, signal.SIGTERM)
    finally:
        signal.signal(signal.SIGHUP, before)


# ---------------------------------------------------------------- the console

class Kernel32:
    """SetConsoleCtrlHandler as Windows keeps it: a list of registered handlers."""

    def __init__(self):
        self.handlers: list = []

    def SetConsoleCtrlHandler(self, handler, add):
        (self.handlers.append if add else self.handlers.remove)(handler)
        return 1


def test_closing_the_console_stops_the_daemon_and_waits_for_the_stop():
    kernel32, finished, reasons = Kernel32(), threading.Event(), []
    close = platform.ConsoleClose(reasons.append, finished, kernel32=kernel32, grace=30)
    assert close.installed and len(kernel32.handlers) == 1
    handler = kernel32.handlers[0]          # called by Windows, through ctypes
    assert handler(platform.CTRL_C_EVENT) == 0 and reasons == []    # Python's SIGINT
    threading.Timer(0.2, finished.set).start()     # the daemon records its stop
    assert handler(platform.CTRL_CLOSE_EVENT) == 1 and finished.is_set()
    assert reasons == ["console closed"]
    assert handler(platform.CTRL_SHUTDOWN_EVENT) == 1
    assert reasons[-1] == "system shutting down"
    close.remove()
    assert kernel32.handlers == []


def test_without_windows_there_is_no_console_handler():
    if platform.WINDOWS:
        pytest.skip("this is Windows")
    assert not platform.ConsoleClose(lambda why: None, threading.Event()).installed


@pytest.mark.slow        # a whole daemon run: about 30 s on the loaded test machine
def test_the_daemon_runs_without_any_console_like_pythonw(tmp_path, dreamd_env):
    """The skin starts `pythonw -m dreamd run`: no console, sys.stdout and sys.stderr
    are None. The daemon must run and stop cleanly all the same."""
    config = tmp_path / "dreamd.toml"
    config.write_text(FAST_CONFIG)
    code = ("import sys; sys.stdout = sys.stderr = None; from dreamd.cli import main; "
            f"raise SystemExit(main(['--config', {str(config)!r}, 'run', '--duration', '4']))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=dreamd_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _STARTED.append(proc)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    log = (tmp_path / "data" / "logs" / "dreamd.log").read_text()
    assert "stopped (duration 4 s elapsed)" in log
    assert (tmp_path / "data" / "output" / "current_frame.png").exists()


# ---------------------------------------------------------------- user folders

class Registry:
    """The HKCU keys documents_dir reads."""
    HKEY_CURRENT_USER = "HKCU"

    def __init__(self, values):
        self.values = values

    def OpenKey(self, root, path):
        if (root, path) not in self.values:
            raise FileNotFoundError(path)
        values = self.values[(root, path)]

        class Key:
            def __enter__(self):
                return values

            def __exit__(self, *exc):
                return False
        return Key()

    def QueryValueEx(self, values, name):
        if name not in values:
            raise FileNotFoundError(name)
        return values[name], 2


SHELL = r"Software\Microsoft\Windows\CurrentVersion\Explorer\User Shell Folders"


def test_documents_follow_the_registry_then_the_profile():
    env = {"USERPROFILE": r"C:\Users\Zoë Q", "OneDrive": r"C:\Users\Zoë Q\OneDrive"}
    moved = Registry({("HKCU", SHELL): {"Personal": r"%onedrive%\Documents"}})
    assert platform.documents_dir(winreg=moved, environ=env) == \
        PureWindowsPath(r"C:\Users\Zoë Q\OneDrive\Documents")
    assert platform.documents_dir(winreg=Registry({}), environ=env) == \
        PureWindowsPath(r"C:\Users\Zoë Q\Documents")
    assert platform.expand_windows_vars(r"%NOPE%\x", env) == r"%NOPE%\x"


def test_python_and_pythonw_of_a_windows_venv():
    exe = r"C:\Program Files\dream window\.venv\Scripts\python.exe"
    assert platform.python_for_windows(exe) == (
        exe, r"C:\Program Files\dream window\.venv\Scripts\pythonw.exe")
    assert platform.python_for_windows("/usr/bin/python3") == ("/usr/bin/python3",) * 2


class FakeLibc:
    def __init__(self):
        self.calls: list[int] = []

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(pad)
        return 1


def test_the_heap_is_trimmed_with_no_padding_kept():
    libc = FakeLibc()
    assert platform.give_heap_back(libc) is True and libc.calls == [0]
    assert platform.give_heap_back(object()) is False        # a libc without malloc_trim


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_the_real_trim_runs_here():
    assert platform.give_heap_back() in (True, False)       # ran, whatever it released
