"""Running the daemon at login (`dreamd service install|uninstall|show`): a systemd user
unit on Linux, a LaunchAgent on macOS, a .cmd in the Startup folder on Windows. The
files are pure text made here (tests read them); the one program run, systemctl or
launchctl, is passed in as `run` so tests never touch the real service manager.

The daemon runs as `<this python> -m dreamd --config FILE --data-dir DIR run`, pinned
to this install's config and data dir, as the Rainmeter skin does: a service starts in
another folder, where `./dreamd.toml` would not be found.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Callable, Mapping, Sequence

from dreamd import platform
from dreamd.errors import UsageError

NAME = "dreamd"
LABEL = "io.github.dreamd"           # the LaunchAgent's label (reverse-DNS, as launchd wants)
EXIT_USAGE = 2                       # a config error: restarting cannot help

Runner = Callable[[Sequence[str]], int]


@dataclass(frozen=True)
class Service:
    """What `install` writes and runs on one system."""
    system: str                          # "systemd", "launchd" or "startup"
    path: Path | PureWindowsPath         # the file the service manager reads
    text: str                            # its content
    enable: list[list[str]]              # commands that make it start now and at login
    disable: list[list[str]]             # commands that stop it and forget it
    logs: str                            # where its output can be read


def daemon_argv(cfg, python: str | None = None) -> list[str]:
    """The daemon's command line, pinned to this config file and data dir."""
    args = [python or sys.executable, "-m", "dreamd"]
    if cfg.file is not None:
        args += ["--config", str(Path(cfg.file).resolve())]
    args += ["--data-dir", str(Path(cfg.data_dir).resolve()), "run"]
    return args


# ---------------------------------------------------------------- Linux: systemd

def _systemd_quote(arg: str) -> str:
    """One ExecStart word: systemd expands % specifiers and $ variables, and splits on
    blanks outside double quotes (in which \\ and " are escaped C-style)."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not any(c in arg for c in ' \t"\'\\;'):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(argv: list[str]) -> str:
    return "\n".join([
        "# written by `dreamd service install`; `dreamd service uninstall` removes it",
        "[Unit]",
        "Description=Dream Window (dreamd): a living AI dream on the desktop",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(_systemd_quote(a) for a in argv),
        # a crash or a kill is restarted; exit 2 is a config error, which a restart
        # cannot fix (the journal names the key), and exit 0 is a stop someone asked for
        "Restart=on-failure",
        "RestartSec=10",
        f"RestartPreventExitStatus={EXIT_USAGE}",
        # SIGTERM is a clean stop: in-flight work gets 5 s, then the stop is recorded
        "TimeoutStopSec=30",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ])


def systemd_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where systemd looks for a user's own units: $XDG_CONFIG_HOME/systemd/user."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".config")
    return Path(base) / "systemd" / "user"


# ---------------------------------------------------------------- macOS: launchd

def launchd_plist(argv: list[str], log: Path) -> str:
    plist = {
        "Label": LABEL,
        "ProgramArguments": argv,
        "RunAtLoad": True,
        # restarted when it did not exit 0 (launchd cannot spare exit 2: a config error
        # restarts every ThrottleInterval seconds until fixed; the log says which key)
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 30,
        "StandardOutPath": str(log),
        "StandardErrorPath": str(log),
    }
    return plistlib.dumps(plist).decode("utf-8")


# ---------------------------------------------------------------- Windows: Startup folder

def startup_dir(environ: Mapping[str, str] | None = None) -> PureWindowsPath:
    """The user's Startup folder: what is in it runs at login, no admin rights needed."""
    environ = os.environ if environ is None else environ
    appdata = environ.get("APPDATA") or str(PureWindowsPath(environ.get("USERPROFILE", "C:\\"))
                                            / "AppData" / "Roaming")
    return platform.WinPath(appdata) / "Microsoft" / "Windows" / "Start Menu" / "Programs" / "Startup"


def startup_cmd(argv: list[str]) -> str:
    """A .cmd that starts the daemon with pythonw (no console window; the log is in
    <data dir>\\logs\\dreamd.log) and returns at once. `start` takes the window title
    first, hence the empty "". % is doubled: cmd expands %NAME% in a batch file."""
    _, pythonw = platform.python_for_windows(argv[0])
    line = subprocess.list2cmdline([pythonw, *argv[1:]]).replace("%", "%%")
    return "\r\n".join([
        "@echo off",
        "rem written by `dreamd service install`; `dreamd service uninstall` removes it",
        f'start "dreamd" {line}',
        "",
    ])


# ---------------------------------------------------------------- one of the three

def system_kind(sys_platform: str | None = None) -> str:
    sys_platform = sys_platform or sys.platform
    if sys_platform.startswith("win"):
        return "startup"
    if sys_platform == "darwin":
        return "launchd"
    return "systemd"


def service_for(cfg, *, kind: str | None = None, python: str | None = None,
                environ: Mapping[str, str] | None = None) -> Service:
    kind = kind or system_kind()
    argv = daemon_argv(cfg, python)
    if kind == "systemd":
        path = systemd_dir(environ) / f"{NAME}.service"
        return Service(kind, path, systemd_unit(argv),
                       enable=[["systemctl", "--user", "daemon-reload"],
                               ["systemctl", "--user", "enable", "--now", f"{NAME}.service"]],
                       disable=[["systemctl", "--user", "disable", "--now", f"{NAME}.service"],
                                ["systemctl", "--user", "daemon-reload"]],
                       logs=f"journalctl --user -u {NAME}  (and {Path(cfg.data_dir) / 'logs' / 'dreamd.log'})")
    if kind == "launchd":
        home = Path((environ or os.environ).get("HOME") or Path.home())
        path = home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        log = Path(cfg.data_dir) / "logs" / "launchd.log"
        return Service(kind, path, launchd_plist(argv, log),
                       enable=[["launchctl", "load", "-w", str(path)]],
                       disable=[["launchctl", "unload", "-w", str(path)]],
                       logs=f"{Path(cfg.data_dir) / 'logs' / 'dreamd.log'} (and {log})")
    if kind == "startup":
        path = startup_dir(environ) / f"{NAME}.cmd"
        return Service(kind, path, startup_cmd(argv), enable=[], disable=[],
                       logs=str(Path(cfg.data_dir) / "logs" / "dreamd.log"))
    raise UsageError(f"unknown service kind {kind!r}: systemd, launchd or startup")


def _runs(commands: list[list[str]], run: Runner | None) -> list[str]:
    """Run each command (stopping at the first that fails) and return what to say;
    without a runner only say what to run."""
    lines = []
    for i, command in enumerate(commands):
        shown = " ".join(command)
        if run is None:
            lines += [f"  run: {' '.join(c)}" for c in commands[i:]]
            break
        code = run(command)
        if code != 0:
            lines.append(f"  {shown}: exit {code}; run it yourself to see why")
            lines += [f"  then: {' '.join(c)}" for c in commands[i + 1:]]
            break
        lines.append(f"  ran: {shown}")
    return lines


def install(service: Service, run: Runner | None) -> list[str]:
    """Write the service file and enable it; returns the lines to print."""
    try:
        service.path.parent.mkdir(parents=True, exist_ok=True)        # type: ignore[union-attr]
        newline = "\r\n" if service.system == "startup" else "\n"
        Path(service.path).write_bytes(service.text.replace("\r\n", "\n")
                                       .replace("\n", newline).encode("utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot write {service.path}: {exc.strerror or exc}") from None
    lines = [f"wrote {service.path}", *_runs(service.enable, run)]
    if service.system == "startup":
        lines.append("  it starts at your next login (no restart on failure: the Rainmeter "
                     "skin, when loaded, also starts a daemon that is not running)")
    lines.append(f"logs: {service.logs}")
    lines.append("stop it with `dreamd stop`; remove it with `dreamd service uninstall`")
    return lines


def uninstall(service: Service, run: Runner | None) -> list[str]:
    """Disable and stop it (with a runner), remove its file (and systemd's `enable`
    link, so nothing dangles when no runner could disable it), reload the manager."""
    path = Path(service.path)
    if not path.exists():
        return [f"no service file at {path}: nothing to remove"]
    lines: list[str] = []
    can_run = run is not None and bool(service.disable)
    if can_run:
        lines += _runs(service.disable[:1], run)
    wants = path.parent / "default.target.wants" / path.name
    for p in (path, wants) if service.system == "systemd" else (path,):
        try:
            if p.is_symlink() or p.exists():
                p.unlink()
                lines.append(f"removed {p}")
        except OSError as exc:
            raise UsageError(f"cannot remove {p}: {exc.strerror or exc}") from None
    if can_run:
        lines += _runs(service.disable[1:], run)
    elif service.system == "systemd":
        lines += _runs([["systemctl", "--user", "stop", path.name],
                        ["systemctl", "--user", "daemon-reload"]], None)
    elif service.system == "launchd":
        lines += _runs([["launchctl", "remove", LABEL]], None)
    else:
        lines.append("  a daemon it started runs on until `dreamd stop`")
    return lines


def show(service: Service) -> list[str]:
    lines = [f"# {service.system}: {service.path}", service.text.replace("\r\n", "\n").rstrip("\n")]
    if service.enable:
        lines += ["# then:", *(" ".join(c) for c in service.enable)]
    lines.append(f"# logs: {service.logs}")
    return lines


def runner_for(service: Service) -> Runner | None:
    """The real runner when this system has the service manager, else None (the
    commands are printed instead)."""
    commands = service.enable or service.disable
    if commands and shutil.which(commands[0][0]):
        return run_command
    return None


def run_command(command: Sequence[str]) -> int:
    """The real runner: the service manager's own messages go to the terminal."""
    return subprocess.run(list(command), check=False).returncode
