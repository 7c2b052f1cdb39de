"""The guard's platform layer: one look at the foreground window, the monitors, the
battery and the session (a presence.Look), kept thin; what a look means is decided in
dreamd/guard/presence.py. Windows: ctypes (dreamd/guard/win32.py). Linux: psutil for the
battery, logind's LockedHint / IdleHint through `loginctl` (no foreground window: the
full-screen rule needs Windows). Elsewhere: the battery only.

Test hook: DREAMD_PRESENCE_FILE names a JSON file read instead of the platform at every
look (a fake battery, a fake full-screen window), never set in real use; its shape is
`look_from_json`'s.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from dreamd.guard.presence import Battery, Look, Rect, Window

log = logging.getLogger("dreamd.guard")
ENV = "DREAMD_PRESENCE_FILE"
LOGIND_EVERY = 5.0      # seconds between two `loginctl` runs (a process each: ~5 ms of CPU)
PARTS = frozenset({"fullscreen", "battery", "saver", "locked"})


class Senses:
    """What a platform can tell; `can` lists the parts it reads ("fullscreen", "battery",
    "saver", "locked"), `look(want)` reads only those asked for. `broken` says why a part
    it should read cannot be (logind unreachable), for `dreamd doctor`."""

    name = "none"
    can: frozenset[str] = frozenset()
    broken: str | None = None

    def look(self, want: frozenset[str]) -> Look:
        return Look()

    def close(self) -> None:
        pass


def read_battery(sensors: Callable[[], Any] = psutil.sensors_battery) -> Battery | None:
    """psutil's battery on every platform; None on a machine without one."""
    try:
        b = sensors()
    except Exception as exc:          # a broken ACPI table must not stop the guard
        log.debug("battery: %s", exc)
        return None
    if b is None:
        return None
    return Battery(plugged=b.power_plugged, percent=b.percent)


class LinuxSenses(Senses):
    """psutil's battery; logind's LockedHint and IdleHint for the session (a locked
    screen; a blanked, idle one) through `loginctl show-session`."""

    name = "linux"

    def __init__(self, run: Callable[..., Any] = subprocess.run,
                 environ: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        environ = os.environ if environ is None else environ
        self.session = environ.get("XDG_SESSION_ID") or "auto"
        self.run, self.clock = run, clock
        self.broken: str | None = None      # why logind cannot be asked (said once)
        self.last: tuple[bool | None, bool | None] = (None, None)
        self.asked = -LOGIND_EVERY
        self.can = frozenset({"battery", "locked"})

    def look(self, want: frozenset[str]) -> Look:
        out = Look()
        if "battery" in want:
            out.battery = read_battery()
        if "locked" in want:
            out.locked, out.asleep = self.session_state()
        return out

    def session_state(self) -> tuple[bool | None, bool | None]:
        if self.broken is not None:
            return None, None
        now = self.clock()
        if now - self.asked < LOGIND_EVERY:
            return self.last
        self.asked = now
        try:
            done = self.run(["loginctl", "show-session", self.session, "-p", "LockedHint",
                             "-p", "IdleHint"], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError) as exc:
            return self._broken(f"loginctl: {exc}")
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            return self._broken(f"loginctl show-session {self.session}: "
                                f"{said[0] if said else done.returncode}")
        self.last = parse_logind(done.stdout)
        return self.last

    def _broken(self, why: str) -> tuple[None, None]:
        self.broken = why
        log.info("presence: the session's lock state cannot be read (%s); the lock rule "
                 "is off", why)
        return None, None


def parse_logind(text: str) -> tuple[bool | None, bool | None]:
    """(locked, idle) from `loginctl show-session -p LockedHint -p IdleHint`."""
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def yes(key: str) -> bool | None:
        v = values.get(key)
        return None if v is None else v.strip() == "yes"
    return yes("LockedHint"), yes("IdleHint")


class FileSenses(Senses):
    """The test hook: every look reads the JSON file DREAMD_PRESENCE_FILE names. A file
    missing or half written reads as "nothing known", never as a cause."""

    name = "file"
    can = PARTS

    def __init__(self, path: Path) -> None:
        self.path = path

    def look(self, want: frozenset[str]) -> Look:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return Look()
        try:
            return look_from_json(data) if isinstance(data, dict) else Look()
        except (KeyError, TypeError, ValueError):    # a window without its rect, and such
            return Look()


def look_from_json(data: dict[str, Any]) -> Look:
    """{"foreground": {"process", "rect": [l, t, r, b], "class_name", "title",
    "maximized", "minimized"} | null, "monitors": [[l, t, r, b], ...], "exclusive": bool,
    "battery": {"plugged", "percent", "saver"} | null, "locked": bool, "asleep": bool}"""
    fg = data.get("foreground")
    window = None
    if isinstance(fg, dict):
        window = Window(process=str(fg.get("process", "")), rect=Rect(*fg["rect"]),
                        class_name=str(fg.get("class_name", "")), title=str(fg.get("title", "")),
                        maximized=bool(fg.get("maximized")), minimized=bool(fg.get("minimized")))
    b = data.get("battery")
    battery = Battery(b.get("plugged"), b.get("percent"), bool(b.get("saver"))) \
        if isinstance(b, dict) else None
    return Look(foreground=window, monitors=[Rect(*m) for m in data.get("monitors", [])],
                exclusive=bool(data.get("exclusive")), battery=battery,
                locked=data.get("locked"), asleep=data.get("asleep"))


class BatteryOnly(Senses):
    name = sys.platform
    can = frozenset({"battery"})

    def look(self, want: frozenset[str]) -> Look:
        return Look(battery=read_battery() if "battery" in want else None)


def for_platform(environ: dict[str, str] | None = None) -> Senses:
    environ = os.environ if environ is None else environ
    if environ.get(ENV):
        return FileSenses(Path(environ[ENV]))
    if sys.platform == "win32":
        from dreamd.guard.win32 import WindowsSenses
        return WindowsSenses(read_battery)
    if sys.platform.startswith("linux"):
        return LinuxSenses(environ=environ)
    return BatteryOnly()
