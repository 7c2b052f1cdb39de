"""A ComfyUI process the daemon was told to start (`[comfyui] start_command`): start it,
wait for /system_stats, restart it with backoff when it dies, stop it on the way out.

The command is split like a shell would split it but never run by one (on Windows by the
rules of CommandLineToArgvW, so a quoted path with spaces is one argument), or given as a
list and not split at all. The child gets its own process group, so stopping it (SIGTERM,
then SIGKILL after a timeout) reaches whatever it started and nothing else. Its output goes
to `log_path`, appended, one header per start.

The child's life is tied to the daemon's: on Linux it asks the kernel for SIGKILL when its
parent dies (prctl PR_SET_PDEATHSIG, through ctypes), and on Windows it joins a job object
that kills it when the daemon's handle closes (untested here: no Windows machine), so a
killed dreamd leaves no ComfyUI holding GPU memory. Where neither took, a ComfyUI left
behind is found by the pid file at the next start: one that answers is re-adopted
(`adopt()`: kept, watched, stopped at the end, its prompt finishes) instead of being killed
mid-prompt; one that does not is stopped with its whole process tree (psutil). The parent-death signal follows the *thread* that started the child: the
first start runs on the daemon's main thread, restarts on the watcher, which lives until
stop().

`CUDA_VISIBLE_DEVICES` comes from system.gpu unless start_env sets it: the explicit setting
wins (logged at start when the two differ).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil
import requests

from dreamd.errors import ConfigError

log = logging.getLogger(__name__)


LOG_MAX_BYTES = 20_000_000   # ComfyUI's log: past it, moved (at start) or copied (running) to .1
PR_SET_PDEATHSIG = 1         # linux/prctl.h


def split_command(command: str | Sequence[str], *, windows: bool = os.name == "nt") -> list[str]:
    """`start_command` as argv: a list is taken as it is; a string is split like a POSIX
    shell would, or on Windows like CommandLineToArgvW (what a Windows program itself does
    with its command line), so `"C:\\Users\\John Doe\\python.exe" main.py` is two
    arguments, quotes gone, backslashes kept."""
    if not isinstance(command, str):
        return [str(a) for a in command]
    return _split_windows(command) if windows else shlex.split(command)


def _split_windows(line: str) -> list[str]:
    """The Microsoft C runtime's rules: whitespace separates; "..." groups; 2n backslashes
    before a quote are n backslashes and the quote toggles grouping, 2n+1 are n and a
    literal quote; other backslashes are literal; "" inside a group is a literal quote. The
    program name (first argument) knows no escapes: quotes only group."""
    args: list[str] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in " \t":
            i += 1
        if i >= n:
            return args
        buf: list[str] = []
        quoted = False
        if not args:          # argv[0]
            while i < n and (quoted or line[i] not in " \t"):
                if line[i] == '"':
                    quoted = not quoted
                else:
                    buf.append(line[i])
                i += 1
            args.append("".join(buf))
            continue
        while i < n and (quoted or line[i] not in " \t"):
            c = line[i]
            if c == "\\":
                j = i
                while j < n and line[j] == "\\":
                    j += 1
                if j < n and line[j] == '"':
                    buf.append("\\" * ((j - i) // 2))
                    if (j - i) % 2:
                        buf.append('"')
                        i = j + 1
                    else:
                        i = j            # the quote is handled below
                    continue
                buf.append("\\" * (j - i))
                i = j
                continue
            if c == '"':
                if quoted and i + 1 < n and line[i + 1] == '"':
                    buf.append('"')      # "" inside a group
                    i += 2
                    continue
                quoted = not quoted
                i += 1
                continue
            buf.append(c)
            i += 1
        args.append("".join(buf))


def _parent_death_hook() -> Callable[[], None] | None:
    """Linux: a preexec_fn asking for SIGKILL when the parent dies; None elsewhere. libc is
    loaded here, in the parent: the child between fork and exec only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:    # the parent died before the prctl: follow it now
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_on_close_job(proc: subprocess.Popen[bytes]) -> object | None:
    """Windows: put the child in a job object that kills it (and what it starts) when the
    last handle to the job closes, i.e. when the daemon dies however it dies. The handle is
    kept by the supervisor and never closed by hand. Failing here only loses the tie (the
    next start then finds the orphan by its pid file), so it warns and goes on."""
    try:
        from ctypes import wintypes
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]

        class IoCounters(ctypes.Structure):
            _fields_ = [(n, ctypes.c_ulonglong) for n in (
                "ReadOperationCount", "WriteOperationCount", "OtherOperationCount",
                "ReadTransferCount", "WriteTransferCount", "OtherTransferCount")]

        class BasicLimits(ctypes.Structure):
            _fields_ = [("PerProcessUserTimeLimit", ctypes.c_int64),
                        ("PerJobUserTimeLimit", ctypes.c_int64), ("LimitFlags", wintypes.DWORD),
                        ("MinimumWorkingSetSize", ctypes.c_size_t),
                        ("MaximumWorkingSetSize", ctypes.c_size_t),
                        ("ActiveProcessLimit", wintypes.DWORD), ("Affinity", ctypes.c_size_t),
                        ("PriorityClass", wintypes.DWORD), ("SchedulingClass", wintypes.DWORD)]

        class ExtendedLimits(ctypes.Structure):
            _fields_ = [("BasicLimitInformation", BasicLimits), ("IoInfo", IoCounters),
                        ("ProcessMemoryLimit", ctypes.c_size_t), ("JobMemoryLimit", ctypes.c_size_t),
                        ("PeakProcessMemoryUsed", ctypes.c_size_t),
                        ("PeakJobMemoryUsed", ctypes.c_size_t)]

        kernel32.CreateJobObjectW.restype = wintypes.HANDLE
        job = kernel32.CreateJobObjectW(None, None)
        if not job:
            raise OSError(ctypes.get_last_error(), "CreateJobObjectW")
        info = ExtendedLimits()
        info.BasicLimitInformation.LimitFlags = 0x2000   # JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
        if not kernel32.SetInformationJobObject(wintypes.HANDLE(job), 9,  # ExtendedLimitInformation
                                                ctypes.byref(info), ctypes.sizeof(info)):
            raise OSError(ctypes.get_last_error(), "SetInformationJobObject")
        handle = wintypes.HANDLE(int(proc._handle))  # type: ignore[attr-defined]
        if not kernel32.AssignProcessToJobObject(wintypes.HANDLE(job), handle):
            raise OSError(ctypes.get_last_error(), "AssignProcessToJobObject")
        return job
    except Exception as exc:
        log.warning("could not tie ComfyUI (pid %s) to dreamd's life with a job object (%s); "
                    "a killed dreamd leaves it running until the next start", proc.pid, exc)
        return None


def stop_process_tree(pid: int, timeout: float = 10.0, *,
                      expect: Callable[[psutil.Process], bool] | None = None) -> bool:
    """Terminate a process and every descendant (psutil: Linux, macOS and Windows alike),
    then kill what is left after `timeout`. `expect` may refuse a pid reused by something
    else. Returns whether anything was stopped. A zombie counts as gone: its parent died,
    and whoever reaps it is not us."""
    try:
        root = psutil.Process(pid)
        if expect is not None and not expect(root):
            return False
        tree = [root, *root.children(recursive=True)]
    except (psutil.Error, OSError):
        return False

    def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
        out = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
            except psutil.Error:
                pass
        return out
    for kill in (False, True):
        for proc in alive(tree):
            try:
                proc.kill() if kill else proc.terminate()
            except psutil.Error:
                pass
        end = time.monotonic() + timeout
        while alive(tree) and time.monotonic() < end:
            time.sleep(0.05)
        if not alive(tree):
            break
    return True


def rotate_log(path: Path) -> None:
    """Keep ComfyUI's log bounded: the child writes straight to the file (so it outlives
    a killed daemon), so it is rotated when the supervisor starts, one old copy kept."""
    try:
        if path.stat().st_size > LOG_MAX_BYTES:
            os.replace(path, path.with_name(path.name + ".1"))
    except OSError:
        pass


def trim_log(path: Path, limit: int | None = None) -> bool:
    """Keep the log of a ComfyUI that runs for months bounded while it runs: past the
    limit its text is copied to .1 and the file cut to nothing in place. The child keeps
    its handle (opened for appending, so it goes on at the new end); a line written
    between the copy and the cut is lost, as with logrotate's copytruncate."""
    try:
        if path.stat().st_size <= (LOG_MAX_BYTES if limit is None else limit):
            return False
        shutil.copyfile(path, path.with_name(path.name + ".1"))
        os.truncate(path, 0)
        return True
    except OSError:              # gone, or held by another process (Windows): next pass
        return False


@dataclass(frozen=True)
class SupervisorStatus:
    state: str                 # stopped | starting | running | restarting | gave_up
    pid: int | None
    restarts: int              # restarts in the last hour
    last_exit: int | None      # the child's last exit code (negative = killed by that signal)
    last_error: str | None


class ComfyUISupervisor:
    """One supervised ComfyUI process. `start()`, then `stop()`; `status()` for the TUI."""

    def __init__(self, command: str | Sequence[str], cwd: str | Path | None = None,
                 env: Mapping[str, str] | None = None, gpu_index: int | None = None,
                 log_path: str | Path = "comfyui.log", health_url: str = "http://127.0.0.1:8188",
                 *, start_timeout: float = 180.0, stop_timeout: float = 10.0,
                 max_restarts_per_hour: int = 10, backoff_base: float = 2.0,
                 backoff_cap: float = 120.0, check_interval: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        try:
            self.argv = split_command(command)
        except ValueError as exc:    # shlex: an unclosed quote
            raise ConfigError(f"[comfyui] start_command = {command!r} cannot be split: {exc}") from None
        if not self.argv:
            raise ConfigError("[comfyui] start_command is empty")
        self.command = command if isinstance(command, str) else shlex.join(self.argv)
        self.cwd = Path(cwd) if cwd else None
        self.env = dict(env or {})
        self.gpu_index = gpu_index
        explicit = self.env.get("CUDA_VISIBLE_DEVICES")
        if explicit is not None and gpu_index is not None and explicit != str(gpu_index):
            log.info("ComfyUI gets CUDA_VISIBLE_DEVICES=%s from [comfyui] start_env; it wins "
                     "over system.gpu = %s", explicit, gpu_index)
        self.log_path = Path(log_path)
        self.health_url = health_url.rstrip("/")
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.max_restarts_per_hour = max_restarts_per_hour
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.check_interval = check_interval
        self._clock = clock
        self._proc: subprocess.Popen[bytes] | None = None
        self._adopted: psutil.Process | None = None   # a previous daemon's child, kept
        self._job: object | None = None               # Windows: the job object's handle
        self._log: IO[bytes] | None = None
        self._restarts: collections.deque[float] = collections.deque()
        self._state, self._last_exit, self._last_error = "stopped", None, None
        self._stopping = threading.Event()
        self._terminated = threading.Event()   # stop() has ended the child: the watcher may go
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- surface -----------------------------------------------------------------------------

    def adopt(self, proc: psutil.Process) -> None:
        """Take over a ComfyUI a previous daemon started (same command line, answering):
        watch it like a child, restart it when it dies, stop its tree at the end."""
        if self._watcher is not None:
            raise RuntimeError("supervisor already started")
        self._stopping.clear()
        self._terminated.clear()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._adopted, self._state = proc, "running"
        log.info("re-adopted the ComfyUI (pid %s) a previous dreamd started: it answers, so "
                 "it is kept, not restarted", proc.pid)
        self._watcher = threading.Thread(target=self._watch, name="comfyui-supervisor", daemon=True)
        self._watcher.start()

    def start(self, wait: bool = True) -> bool:
        """Start the child and its watcher; with `wait`, block until /system_stats answers
        (up to start_timeout). Returns whether it is healthy. A command that cannot be run
        at all is a ConfigError."""
        if self._watcher is not None:
            raise RuntimeError("supervisor already started")
        self._stopping.clear()
        self._terminated.clear()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        rotate_log(self.log_path)
        self._log = open(self.log_path, "ab")
        self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="comfyui-supervisor", daemon=True)
        self._watcher.start()
        return self.wait_healthy(self.start_timeout) if wait else False

    def wait_healthy(self, timeout: float) -> bool:
        end = self._clock() + timeout
        while self._clock() < end and not self._stopping.is_set():
            if self._state == "gave_up":
                return False
            if self.healthy():
                return True
            self._stopping.wait(self.check_interval)
        return False

    def healthy(self) -> bool:
        try:
            return requests.get(self.health_url + "/system_stats", timeout=2.0).status_code == 200
        except requests.RequestException:
            return False

    @property
    def pid(self) -> int | None:
        if self._adopted is not None:
            return self._adopted.pid if _running(self._adopted) else None
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def status(self) -> SupervisorStatus:
        self._prune()
        return SupervisorStatus(self._state, self.pid, len(self._restarts), self._last_exit,
                                self._last_error)

    def stop(self) -> int | None:
        """SIGTERM the child's process group, SIGKILL it after stop_timeout. Returns its exit code."""
        self._stopping.set()
        # The child first, the watcher after: a child the watcher started (a restart) gets
        # its parent-death signal when the watcher thread ends, which would SIGKILL it; the
        # watcher waits for _terminated before it returns.
        with self._lock:
            code = self._terminate()
        self._terminated.set()
        if self._watcher is not None:
            self._watcher.join(timeout=self.stop_timeout + 5)
            self._watcher = None
        with self._lock:
            self._state = "stopped"
            if self._log is not None:
                self._log.close()
                self._log = None
        return code

    # -- the child ---------------------------------------------------------------------------

    def _spawn(self) -> None:
        env = dict(os.environ)
        env.update(self.env)
        if self.gpu_index is not None and "CUDA_VISIBLE_DEVICES" not in self.env:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu_index)
        assert self._log is not None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"--- {stamp} dreamd starts ComfyUI: {self.command}\n".encode())
        self._log.flush()
        group: dict = ({"start_new_session": True} if os.name != "nt"
                       else {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP})  # type: ignore[attr-defined]
        hook = _parent_death_hook()
        if hook is not None:
            group["preexec_fn"] = hook
        try:
            self._proc = subprocess.Popen(self.argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                                          stdout=self._log, stderr=subprocess.STDOUT, **group)
        except OSError as exc:
            self._state, self._last_error = "gave_up", f"cannot run {self.argv[0]!r}: {exc}"
            raise ConfigError(f"[comfyui] start_command: cannot run {self.argv[0]!r} "
                              f"(cwd {self.cwd or os.getcwd()}): {exc}") from exc
        self._state = "starting"
        if os.name == "nt":
            self._job = _kill_on_close_job(self._proc)
        log.info("started ComfyUI (pid %s): %s", self._proc.pid, self.command)

    def _watch(self) -> None:
        try:
            self._watch_loop()
        finally:
            if self._stopping.is_set():   # stay alive until stop() has ended the child
                self._terminated.wait(2 * self.stop_timeout + 5)

    def _watch_loop(self) -> None:
        while not self._stopping.is_set():
            proc = self._proc
            if self._adopted is not None:    # not our child: no exit code to read
                code = None if _running(self._adopted) else -1
                if code is not None:
                    self._adopted = None
            else:
                code = proc.poll() if proc is not None else None
            if code is None:
                if self._state == "starting" and self.healthy():
                    self._state = "running"
                trim_log(self.log_path)
                self._stopping.wait(self.check_interval)
                continue
            with self._lock:
                if self._stopping.is_set():
                    return
                self._last_exit = code
                self._last_error = f"exited with code {code}"
                self._prune()
                if len(self._restarts) >= self.max_restarts_per_hour:
                    self._state = "gave_up"
                    log.error("ComfyUI died (code %s) %d times within an hour; not restarting it",
                              code, len(self._restarts))
                    return
                delay = min(self.backoff_cap, self.backoff_base * 2 ** len(self._restarts))
                self._state = "restarting"
            log.warning("ComfyUI exited with code %s; restarting in %.1fs", code, delay)
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self._restarts.append(self._clock())
                try:
                    self._spawn()
                except ConfigError as exc:
                    log.error("%s", exc)
                    return

    def _prune(self) -> None:
        hour_ago = self._clock() - 3600
        while self._restarts and self._restarts[0] < hour_ago:
            self._restarts.popleft()

    def _terminate(self) -> int | None:
        if self._adopted is not None:
            stop_process_tree(self._adopted.pid, self.stop_timeout)
            self._adopted = None
            return None
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._signal(proc, graceful=True)
            try:
                return proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("ComfyUI (pid %s) ignored SIGTERM for %.0fs; killing it",
                            proc.pid, self.stop_timeout)
                self._signal(proc, graceful=False)
        return proc.wait(timeout=self.stop_timeout)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], *, graceful: bool) -> None:
        if os.name == "nt":   # no process groups to signal: the tree, through psutil
            stop_process_tree(proc.pid, timeout=0.0)
            return
        try:  # the group we created at spawn: the child and what it started
            os.killpg(proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        except ProcessLookupError:
            pass
