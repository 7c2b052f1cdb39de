"""The guard's senses on Windows, through ctypes and nothing else: the foreground window
(its rect, class, process, maximised or not), the monitors, Direct3D exclusive
full-screen (SHQueryUserNotificationState), battery saver (GetSystemPowerStatus) and a
locked session (the input desktop is not "Default" while the lock screen or a UAC
prompt has it). Each call is one line of Win32; what it means is dreamd/guard/presence.py.

The DLLs are arguments so tests drive this module with stand-ins on any machine.
"""

from __future__ import annotations

import ctypes
import logging
from ctypes import wintypes
from typing import Any, Callable

import psutil

from dreamd.guard.presence import Battery, Look, Rect, Window

log = logging.getLogger("dreamd.guard")

QUNS_RUNNING_D3D_FULL_SCREEN = 3
DESKTOP_READOBJECTS = 0x0001
UOI_NAME = 2


class SYSTEM_POWER_STATUS(ctypes.Structure):
    _fields_ = [("ACLineStatus", wintypes.BYTE), ("BatteryFlag", wintypes.BYTE),
                ("BatteryLifePercent", wintypes.BYTE), ("SystemStatusFlag", wintypes.BYTE),
                ("BatteryLifeTime", wintypes.DWORD), ("BatteryFullLifeTime", wintypes.DWORD)]


MONITORENUMPROC = ctypes.WINFUNCTYPE(wintypes.BOOL, wintypes.HMONITOR, wintypes.HDC,
                                     ctypes.POINTER(wintypes.RECT), wintypes.LPARAM) \
    if hasattr(ctypes, "WINFUNCTYPE") else ctypes.CFUNCTYPE(
        wintypes.BOOL, wintypes.HMONITOR, wintypes.HDC, ctypes.POINTER(wintypes.RECT),
        wintypes.LPARAM)


def declare(user32: Any, kernel32: Any, shell32: Any) -> None:
    """Argument and result types of every call made, so a 64-bit handle is never cut to
    a C int (ctypes' default)."""
    HWND, DWORD, BOOL, HANDLE = wintypes.HWND, wintypes.DWORD, wintypes.BOOL, wintypes.HANDLE
    for name, res, args in (
            ("GetForegroundWindow", HWND, []),
            ("GetWindowRect", BOOL, [HWND, ctypes.POINTER(wintypes.RECT)]),
            ("GetClassNameW", ctypes.c_int, [HWND, wintypes.LPWSTR, ctypes.c_int]),
            ("GetWindowTextW", ctypes.c_int, [HWND, wintypes.LPWSTR, ctypes.c_int]),
            ("GetWindowThreadProcessId", DWORD, [HWND, ctypes.POINTER(DWORD)]),
            ("IsZoomed", BOOL, [HWND]), ("IsIconic", BOOL, [HWND]),
            ("EnumDisplayMonitors", BOOL, [wintypes.HDC, ctypes.c_void_p, MONITORENUMPROC,
                                           wintypes.LPARAM]),
            ("OpenInputDesktop", HANDLE, [DWORD, BOOL, DWORD]),
            ("GetUserObjectInformationW", BOOL, [HANDLE, ctypes.c_int, ctypes.c_void_p, DWORD,
                                                 ctypes.POINTER(DWORD)]),
            ("CloseDesktop", BOOL, [HANDLE])):
        fn = getattr(user32, name)
        fn.restype, fn.argtypes = res, args
    kernel32.GetSystemPowerStatus.restype = BOOL
    kernel32.GetSystemPowerStatus.argtypes = [ctypes.POINTER(SYSTEM_POWER_STATUS)]
    shell32.SHQueryUserNotificationState.restype = ctypes.c_long       # HRESULT
    shell32.SHQueryUserNotificationState.argtypes = [ctypes.POINTER(ctypes.c_int)]


def _rect(r: wintypes.RECT) -> Rect:
    return Rect(r.left, r.top, r.right, r.bottom)


def process_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return ""


class WindowsSenses:
    """A senses.Senses (by shape: senses.py imports this module, not the other way)."""

    name = "windows"
    can = frozenset({"fullscreen", "battery", "saver", "locked"})
    broken: str | None = None

    def __init__(self, battery: Callable[[], Battery | None], user32: Any = None,
                 kernel32: Any = None, shell32: Any = None,
                 name_of: Callable[[int], str] = process_name) -> None:
        windll = getattr(ctypes, "windll", None)
        self.user32 = user32 or windll.user32
        self.kernel32 = kernel32 or windll.kernel32
        self.shell32 = shell32 or windll.shell32
        self.name_of, self.battery = name_of, battery
        if user32 is None:      # the real DLLs: handles are pointers, not 32-bit ints
            declare(self.user32, self.kernel32, self.shell32)

    def look(self, want: frozenset[str]) -> Look:
        out = Look()
        if "fullscreen" in want:
            out.foreground = self.foreground()
            out.monitors = self.monitors() if out.foreground is not None else []
            out.exclusive = self.exclusive()
        if want & {"battery", "saver"}:
            out.battery = self.battery()
            if out.battery is not None and "saver" in want:
                out.battery = Battery(out.battery.plugged, out.battery.percent,
                                      self.saver())
        if "locked" in want:
            out.locked = self.locked()
        return out

    def close(self) -> None:
        pass

    def foreground(self) -> Window | None:
        u = self.user32
        hwnd = u.GetForegroundWindow()
        if not hwnd:
            return None         # no window has the focus (the lock screen, a switch)
        r = wintypes.RECT()
        if not u.GetWindowRect(hwnd, ctypes.byref(r)):
            return None
        cls = ctypes.create_unicode_buffer(256)
        u.GetClassNameW(hwnd, cls, 256)
        title = ctypes.create_unicode_buffer(256)
        u.GetWindowTextW(hwnd, title, 256)
        pid = wintypes.DWORD()
        u.GetWindowThreadProcessId(hwnd, ctypes.byref(pid))
        return Window(process=self.name_of(pid.value), rect=_rect(r), class_name=cls.value,
                      title=title.value, maximized=bool(u.IsZoomed(hwnd)),
                      minimized=bool(u.IsIconic(hwnd)))

    def monitors(self) -> list[Rect]:
        found: list[Rect] = []

        def each(_monitor, _dc, rect, _data):
            found.append(_rect(rect.contents))
            return True
        self.user32.EnumDisplayMonitors(None, None, MONITORENUMPROC(each), 0)
        return found

    def exclusive(self) -> bool:
        state = ctypes.c_int(0)
        if self.shell32.SHQueryUserNotificationState(ctypes.byref(state)) != 0:
            return False        # an HRESULT error: say nothing rather than guess
        return state.value == QUNS_RUNNING_D3D_FULL_SCREEN

    def saver(self) -> bool:
        status = SYSTEM_POWER_STATUS()
        if not self.kernel32.GetSystemPowerStatus(ctypes.byref(status)):
            return False
        return status.SystemStatusFlag == 1

    def locked(self) -> bool:
        """The input desktop is the secure one (Winlogon) or cannot even be opened: the
        lock screen (or a UAC prompt, for as long as it is up)."""
        u = self.user32
        desk = u.OpenInputDesktop(0, False, DESKTOP_READOBJECTS)
        if not desk:
            return True
        try:
            name = ctypes.create_unicode_buffer(64)
            needed = wintypes.DWORD()
            if not u.GetUserObjectInformationW(desk, UOI_NAME, name, ctypes.sizeof(name),
                                               ctypes.byref(needed)):
                return False
            return name.value.lower() != "default"
        finally:
            u.CloseDesktop(desk)
