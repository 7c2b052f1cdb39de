"""What differs on Windows, in one place: whether a process lives (psutil: on Windows
`os.kill(pid, 0)` does not probe, it terminates the process), ending a process tree
without POSIX signals, the signals a stop listens to, the console's close button,
and the user folders Rainmeter lives in. Everything else in dreamd is written once.

Each function takes the platform's pieces as optional arguments (`kernel32`, `winreg`,
`environ`) so tests simulate Windows on any machine. Replacing a file Rainmeter holds
open is retried in dreamd/storage/files.py (`replace_retrying`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from pathlib import Path, PureWindowsPath
from typing import Any, Callable, Mapping

import psutil

WINDOWS = os.name == "nt"
# Windows paths: the real kind on Windows, a pure one where tests simulate Windows
WinPath = Path if WINDOWS else PureWindowsPath

# SetConsoleCtrlHandler's events (wincon.h). Ctrl-C and Ctrl-Break arrive as the
# SIGINT and SIGBREAK signals Python already handles; the other three end the process
# once the handler returns (or after about 5 s), so the handler waits for the stop.
CTRL_C_EVENT, CTRL_BREAK_EVENT = 0, 1
CTRL_CLOSE_EVENT, CTRL_LOGOFF_EVENT, CTRL_SHUTDOWN_EVENT = 2, 5, 6
CLOSE_EVENTS = {CTRL_CLOSE_EVENT: "console closed", CTRL_LOGOFF_EVENT: "user logged off",
                CTRL_SHUTDOWN_EVENT: "system shutting down"}
CLOSE_GRACE = 4.5     # seconds: Windows ends a process 5 s after a close event


# ---------------------------------------------------------------- processes

def pid_alive(pid: int | None) -> bool:
    """Does a process with this pid exist (and is it not a zombie)? psutil, never a
    signal: on Windows os.kill(pid, 0) would end the process it asks about."""
    if not pid or pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:       # another user's process: it exists
        return True


def end_process_tree(pid: int, timeout: float = 5.0) -> list[int]:
    """Ask a process and its descendants to end (terminate: SIGTERM on POSIX,
    TerminateProcess on Windows), wait up to `timeout`, then kill what is left.
    Returns the pids that had to be killed. A pid that is gone is nothing to do."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return [p.pid for p in alive]


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop the daemon cleanly here: SIGINT and SIGTERM everywhere,
    SIGHUP on POSIX (a closed terminal sends it: unhandled, it killed the daemon with
    its stop unrecorded) unless it is ignored already (`nohup dreamd run` asks to
    outlive the terminal), and SIGBREAK (Ctrl-Break) on Windows."""
    extra = tuple(getattr(signal, name) for name in ("SIGHUP", "SIGBREAK")
                  if hasattr(signal, name))
    extra = tuple(s for s in extra if not (s == getattr(signal, "SIGHUP", None)
                                           and signal.getsignal(s) == signal.SIG_IGN))
    return (signal.SIGINT, signal.SIGTERM, *extra)


# ---------------------------------------------------------------- the console

class ConsoleClose:
    """The console's close button, a logoff or a shutdown, on Windows: `on_close(why)`
    is called (the daemon starts its clean stop), then the handler holds Windows off
    until `finished` is set or CLOSE_GRACE passes, so the stop is recorded in the
    ledger. Elsewhere (or with no console) it does nothing."""

    def __init__(self, on_close: Callable[[str], None], finished: threading.Event, *,
                 kernel32: Any = None, grace: float = CLOSE_GRACE) -> None:
        self.on_close, self.finished, self.grace = on_close, finished, grace
        self.kernel32 = kernel32
        self.installed = False
        if self.kernel32 is None:
            if not WINDOWS:
                return
            self.kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        prototype = getattr(ctypes, "WINFUNCTYPE", ctypes.CFUNCTYPE)
        # kept on self: ctypes callbacks must outlive their registration
        self.callback = prototype(ctypes.c_int, ctypes.c_uint)(self.handle)
        self.installed = bool(self.kernel32.SetConsoleCtrlHandler(self.callback, True))

    def handle(self, event: int) -> int:
        why = CLOSE_EVENTS.get(event)
        if why is None:
            return 0                  # Ctrl-C, Ctrl-Break: Python's signal handlers
        self.on_close(why)
        self.finished.wait(self.grace)
        return 1

    def remove(self) -> None:
        if self.installed:
            self.kernel32.SetConsoleCtrlHandler(self.callback, False)
            self.installed = False


# ---------------------------------------------------------------- user folders

def documents_dir(*, winreg: Any = None, environ: Mapping[str, str] | None = None) -> PureWindowsPath:
    """The user's Documents folder on Windows: the shell's "Personal" folder from the
    registry (it moves with OneDrive or a folder redirection), else %USERPROFILE%."""
    environ = os.environ if environ is None else environ
    if winreg is None and WINDOWS:
        import winreg as winreg_module
        winreg = winreg_module
    if winreg is not None:
        key = r"Software\Microsoft\Windows\CurrentVersion\Explorer\User Shell Folders"
        try:
            with winreg.OpenKey(winreg.HKEY_CURRENT_USER, key) as k:
                value, _ = winreg.QueryValueEx(k, "Personal")
            return WinPath(expand_windows_vars(value, environ))
        except OSError:
            pass
    return WinPath(environ.get("USERPROFILE") or Path.home()) / "Documents"


def expand_windows_vars(text: str, environ: Mapping[str, str]) -> str:
    """%NAME% expanded from `environ` (case-insensitive, like Windows); unknown ones stay."""
    upper = {k.upper(): v for k, v in environ.items()}
    parts = text.split("%")
    out = [parts[0]]
    i = 1
    while i < len(parts):
        name = parts[i]
        if i + 1 < len(parts) and name.upper() in upper:
            out.append(upper[name.upper()] + parts[i + 1])
            i += 2
        else:
            out.append("%" + name)
            i += 1
    return "".join(out)


def python_for_windows(executable: str | None = None) -> tuple[str, str]:
    """(python.exe, pythonw.exe) of the environment dreamd runs in: commands the skin's
    buttons run (a console hidden by Rainmeter) and the daemon it starts (no console
    at all). On another platform the same executable twice."""
    exe = executable or sys.executable
    if PureWindowsPath(exe).name.lower() == "python.exe":
        return exe, str(PureWindowsPath(exe).with_name("pythonw.exe"))
    return exe, exe


def give_heap_back(libc: Any = None) -> bool:
    """Return freed heap to the system (glibc's malloc_trim). Freeing a model's tensors
    leaves most of their pages in the allocator: measured on SD 1.5 on the CPU, 2.4 of
    4.5 GB stayed in the daemon's RSS after `free` until a trim. No-op elsewhere."""
    if libc is None:
        if not sys.platform.startswith("linux"):
            return False
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:                  # musl and the like: nothing to trim with
            return False
    trim = getattr(libc, "malloc_trim", None)
    return bool(trim(0)) if trim is not None else False
