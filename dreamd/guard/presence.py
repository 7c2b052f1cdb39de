"""Presence: whether anyone can see the dream and whether the machine needs its power,
decided from one look at the screen, the battery and the session (dreamd/guard/senses.py
takes the look, per platform). Pure: the geometry, which windows count and the words a
user reads are decided here, so they are tested on recorded window lists on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from dreamd.guard.games import normalize

COVERS = 0.95           # share of its monitor a foreground window must cover to count

# Windows that are the desktop itself, never an application in front of it: the
# wallpaper layer (Progman, WorkerW: where Lively and Wallpaper Engine put the dream),
# the taskbars, the Start menu and the task switcher
SHELL_CLASSES = frozenset({
    "progman", "workerw", "shell_traywnd", "shell_secondarytraywnd",
    "windows.ui.core.corewindow", "multitaskingviewframe", "xamlexplorerhostislandwindow",
    "foregroundstaging", "notifyiconoverflowwindow"})
# Processes whose windows show the dream or sit on it, never an app in front of it:
# Rainmeter (the skin), the wallpaper hosts that show the web viewer, the shell's
# experience hosts. guard.fullscreen_ignore adds the user's own.
SHELL_PROCESSES = frozenset(normalize(n) for n in (
    "rainmeter.exe", "lively.exe", "livelywpf.exe", "livelycefsharp.exe",
    "wallpaper32.exe", "wallpaper64.exe", "webwallpaper32.exe",
    "shellexperiencehost.exe", "startmenuexperiencehost.exe", "searchhost.exe",
    "lockapp.exe"))


@dataclass(frozen=True)
class Rect:
    """Screen pixels, right and bottom exclusive (Win32's RECT)."""
    left: int
    top: int
    right: int
    bottom: int

    @property
    def area(self) -> int:
        return max(0, self.right - self.left) * max(0, self.bottom - self.top)

    def overlap(self, other: "Rect") -> int:
        return Rect(max(self.left, other.left), max(self.top, other.top),
                    min(self.right, other.right), min(self.bottom, other.bottom)).area


@dataclass(frozen=True)
class Window:
    """The foreground window as the platform reports it."""
    process: str                    # "vlc.exe"; "" when the process could not be read
    rect: Rect
    class_name: str = ""            # Win32 window class ("Shell_TrayWnd", "Chrome_WidgetWin_1")
    title: str = ""
    maximized: bool = False         # IsZoomed: maximised, whatever the taskbar leaves free
    minimized: bool = False


@dataclass(frozen=True)
class Battery:
    plugged: bool | None            # None: the system does not say
    percent: float | None = None
    saver: bool = False             # battery saver (Windows: SystemStatusFlag)


@dataclass
class Look:
    """One look at what decides presence; None where the platform cannot tell."""
    foreground: Window | None = None
    monitors: list[Rect] = field(default_factory=list)
    exclusive: bool = False         # Direct3D exclusive full-screen (SHQueryUserNotificationState)
    battery: Battery | None = None  # None: no battery (a desktop) or unknown
    locked: bool | None = None
    asleep: bool | None = None      # the display is off / the session idle


def normal(name: str) -> str:
    return name.strip().lower()


def ignore_list(names: Iterable[str]) -> frozenset[str]:
    """guard.fullscreen_ignore as compared: like known_games, any case, ".exe" optional."""
    return frozenset(normalize(n) for n in names if n.strip())


def monitor_of(window: Rect, monitors: list[Rect]) -> Rect | None:
    """The monitor the window is on: the one it overlaps most (MonitorFromWindow's
    MONITOR_DEFAULTTONEAREST, for a window on a monitor)."""
    best = max(monitors, key=window.overlap, default=None)
    return best if best is not None and window.overlap(best) > 0 else None


def counts(window: Window | None, monitors: list[Rect], ignore: frozenset[str] = frozenset()
           ) -> bool:
    """Whether this foreground window hides the dream: maximised, or covering at least
    COVERS of its own monitor (a borderless game or a full-screen video); never the
    desktop, a taskbar, Rainmeter, a wallpaper host or a process the user named."""
    if window is None or window.minimized:
        return False
    if normal(window.class_name) in SHELL_CLASSES:
        return False
    process = normalize(window.process)
    if process in SHELL_PROCESSES or process in ignore:
        return False
    if window.maximized:
        return True
    monitor = monitor_of(window.rect, monitors)
    if monitor is None or monitor.area == 0:
        return False
    # a maximised window overhangs its monitor by its border: only what is on it counts
    return window.rect.overlap(monitor) >= COVERS * monitor.area


def fullscreen(look: Look, ignore: frozenset[str] = frozenset()) -> str | None:
    """Words for the full-screen window in front, or None."""
    window = look.foreground
    name = (window.process or window.title or "an application") if window else None
    if look.exclusive and not (window and (normalize(window.process) in SHELL_PROCESSES
                                           or normalize(window.process) in ignore)):
        return f"a full-screen window: {name or 'a Direct3D game'}"
    if counts(window, look.monitors, ignore):
        return f"a full-screen window: {name}"
    return None


def on_battery(look: Look) -> str | None:
    b = look.battery
    if b is None or b.plugged is not False:
        return None
    # no percentage in the words: a pause's reason changes only when its causes do
    return "on battery"


def battery_saver(look: Look) -> str | None:
    return "battery saver is on" if look.battery is not None and look.battery.saver else None


def locked(look: Look) -> str | None:
    if look.locked:
        return "the screen is locked"
    if look.asleep:
        return "the display is asleep"
    return None
