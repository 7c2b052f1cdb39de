"""Presence rules, decided on recorded looks (the foreground window, the monitors, the
battery, the session as the platform layer reports them): which windows count as
full-screen on which monitor, the battery and lock states, how reasons combine, and the
platform layers themselves (Windows' ctypes calls against stand-in DLLs, logind's output,
the test hook's JSON file)."""

from __future__ import annotations

import ctypes
import json
import logging
import subprocess
from types import SimpleNamespace

import pytest

from dreamd import config
from dreamd.errors import ConfigError
from dreamd.guard import presence
from dreamd.guard.presence import Battery, Look, Rect, Window
from dreamd.guard.reasons import Reasons, Sensed
from dreamd.guard.senses import (FileSenses, LinuxSenses, for_platform, look_from_json,
                                 parse_logind, read_battery)

FHD = [0, 0, 1920, 1080]
# two monitors side by side: a 1440p one on the left, a 1080p one on its right
TWO = [[0, 0, 2560, 1440], [2560, 0, 4480, 1080]]

# Looks as the Windows layer records them (GetForegroundWindow, GetWindowRect,
# GetClassNameW, IsZoomed, EnumDisplayMonitors): name -> (look, the words, or None)
RECORDED = {
    "a borderless game": ({"foreground": {"process": "EldenRing.exe", "rect": FHD,
                                          "class_name": "ELDEN RING"}, "monitors": [FHD]},
                          "a full-screen window: EldenRing.exe"),
    "a full-screen video": ({"foreground": {"process": "vlc.exe", "rect": FHD,
                                            "class_name": "Qt5QWindowIcon"},
                             "monitors": [FHD]},
                            "a full-screen window: vlc.exe"),
    # a maximised window overhangs its monitor by its border and leaves the taskbar free
    "a maximised browser": ({"foreground": {"process": "firefox.exe",
                                            "rect": [-8, -8, 1928, 1040],
                                            "class_name": "MozillaWindowClass",
                                            "maximized": True}, "monitors": [FHD]},
                            "a full-screen window: firefox.exe"),
    # 1366x768 with a 40 px taskbar: 94.8 % of the monitor, but maximised
    "a maximised editor on a small screen": (
        {"foreground": {"process": "Code.exe", "rect": [-8, -8, 1374, 736],
                        "maximized": True}, "monitors": [[0, 0, 1366, 768]]},
        "a full-screen window: Code.exe"),
    "a window almost as big, not maximised": (
        {"foreground": {"process": "firefox.exe", "rect": [0, 0, 1920, 1020]},
         "monitors": [FHD]}, None),                       # 94.4 %
    "a window covering 95 %": (
        {"foreground": {"process": "mpv.exe", "rect": [0, 0, 1920, 1026]},
         "monitors": [FHD]}, "a full-screen window: mpv.exe"),
    "the taskbar": ({"foreground": {"process": "explorer.exe", "rect": [0, 1040, 1920, 1080],
                                    "class_name": "Shell_TrayWnd"}, "monitors": [FHD]}, None),
    "the desktop": ({"foreground": {"process": "explorer.exe", "rect": FHD,
                                    "class_name": "WorkerW"}, "monitors": [FHD]}, None),
    "the desktop, Progman": ({"foreground": {"process": "explorer.exe", "rect": FHD,
                                             "class_name": "Progman"}, "monitors": [FHD]},
                             None),
    "a maximised File Explorer": ({"foreground": {"process": "explorer.exe",
                                                  "rect": [-8, -8, 1928, 1040],
                                                  "class_name": "CabinetWClass",
                                                  "maximized": True}, "monitors": [FHD]},
                                  "a full-screen window: explorer.exe"),
    "Rainmeter's window": ({"foreground": {"process": "Rainmeter.exe", "rect": FHD,
                                           "class_name": "RainmeterMeterWindow"},
                            "monitors": [FHD]}, None),
    "a minimised game": ({"foreground": {"process": "bg3.exe", "rect": FHD,
                                         "minimized": True}, "monitors": [FHD]}, None),
    "a game on the second monitor": ({"foreground": {"process": "cs2.exe",
                                                     "rect": [2560, 0, 4480, 1080]},
                                      "monitors": TWO}, "a full-screen window: cs2.exe"),
    "1080p on the 1440p monitor": ({"foreground": {"process": "vlc.exe",
                                                   "rect": [0, 0, 1920, 1080]},
                                    "monitors": TWO}, None),            # 56 % of it
    "across both monitors, all of neither": (
        {"foreground": {"process": "vlc.exe", "rect": [1280, 0, 3520, 1080]},
         "monitors": TWO}, None),
    "the second monitor's window, maximised": (
        {"foreground": {"process": "chrome.exe", "rect": [2552, -8, 4488, 1040],
                        "maximized": True}, "monitors": TWO},
        "a full-screen window: chrome.exe"),
    "Direct3D exclusive full-screen": ({"foreground": {"process": "witcher3.exe",
                                                       "rect": [0, 0, 1280, 720]},
                                        "monitors": [FHD], "exclusive": True},
                                       "a full-screen window: witcher3.exe"),
    "no foreground window": ({"foreground": None, "monitors": [FHD]}, None),
}


@pytest.mark.parametrize("name", RECORDED)
def test_which_windows_count_as_full_screen(name):
    data, words = RECORDED[name]
    assert presence.fullscreen(look_from_json(data)) == words


def test_a_process_the_user_names_never_counts():
    look = look_from_json(RECORDED["a full-screen video"][0])
    assert presence.fullscreen(look, presence.ignore_list(["VLC.exe"])) is None
    assert presence.fullscreen(look, presence.ignore_list(["vlc"])) is None
    cfg = config.parse('[guard]\nfullscreen_ignore = ["MyOverlay.exe"]\n')
    assert cfg.guard.fullscreen_ignore == ["MyOverlay.exe"]
    with pytest.raises(ConfigError, match=r"guard\.on_battery = 'stop' is invalid: expected "
                                          r"one of 'keep', 'pause', 'free'"):
        config.parse('[guard]\non_battery = "stop"\n')


def test_a_window_is_measured_against_its_own_monitor():
    two = [Rect(*m) for m in TWO]
    assert presence.monitor_of(Rect(2600, 100, 2700, 200), two) == two[1]
    assert presence.monitor_of(Rect(1280, 0, 3520, 1080), two) == two[0]    # most of it
    assert presence.monitor_of(Rect(9000, 0, 9100, 10), two) is None         # off-screen
    assert not presence.counts(Window("x.exe", Rect(9000, 0, 10920, 1080)), two)


@pytest.mark.parametrize("battery, on, saver", [
    (None, None, None),                                     # a desktop: no battery
    (Battery(plugged=True, percent=80.0), None, None),
    (Battery(plugged=False, percent=42.0), "on battery", None),
    (Battery(plugged=None, percent=42.0), None, None),      # the system does not say
    (Battery(plugged=False, percent=15.0, saver=True), "on battery", "battery saver is on"),
    (Battery(plugged=True, percent=99.0, saver=True), None, "battery saver is on")])
def test_battery_states(battery, on, saver):
    look = Look(battery=battery)
    assert (presence.on_battery(look), presence.battery_saver(look)) == (on, saver)


@pytest.mark.parametrize("locked, asleep, words", [
    (None, None, None), (False, False, None), (True, False, "the screen is locked"),
    (False, True, "the display is asleep"), (True, True, "the screen is locked")])
def test_lock_states(locked, asleep, words):
    assert presence.locked(Look(locked=locked, asleep=asleep)) == words


# ---------------------------------------------------------------- how reasons combine

BATTERY = Sensed("on battery", "pause", 3.0)
GAME = Sensed("a game: bg3.exe", "free", 60.0)
FULL = Sensed("a full-screen window: vlc.exe", "pause", 3.0)


def test_reasons_end_after_their_own_delay_and_one_ending_keeps_the_others():
    r = Reasons()
    c = r.update({"battery": BATTERY}, 0.0)
    assert [h.rule for h in c.added] == ["battery"] and not c.frees
    c = r.update({"battery": BATTERY, "game": GAME}, 1.0)
    assert [h.rule for h in c.added] == ["game"] and c.frees
    assert c.words == "a game: bg3.exe; on battery"          # the game named first
    c = r.update({"battery": BATTERY}, 2.0)                  # the game ends...
    assert not c.ended and c.words == c.before                 # ...within its grace
    c = r.update({"battery": BATTERY}, 61.0)
    assert [h.ended() for h in c.ended] == ["a game: bg3.exe: over for 60 s"]
    assert c.words == "on battery"
    c = r.update({}, 62.0)                                   # back on mains...
    assert not c.ended and c.words == "on battery"             # ...for less than 3 s
    c = r.update({}, 65.0)
    assert [h.rule for h in c.ended] == ["battery"] and c.words is None


def test_a_click_on_the_taskbar_does_not_flap_it():
    r = Reasons()
    r.update({"fullscreen": FULL}, 0.0)
    for t, seen in ((2.0, False), (2.5, False), (3.0, True), (5.9, False), (6.0, True)):
        c = r.update({"fullscreen": FULL} if seen else {}, t)
        assert not c.added and not c.ended and c.words == FULL.text, t


def test_a_cause_in_other_words_is_the_same_reason():
    r = Reasons()
    r.update({"game": GAME}, 0.0)
    c = r.update({"game": Sensed("a game: bg3.exe, cs2.exe", "free", 60.0)}, 1.0)
    assert not c.added and c.words == "a game: bg3.exe, cs2.exe" != c.before
    assert r.clear().ended[0].rule == "game" and r.words() is None


# ---------------------------------------------------------------- the platform layers

def test_the_test_hook_reads_a_json_file_and_nothing_known_when_it_is_not_one(tmp_path):
    path = tmp_path / "presence.json"
    senses = for_platform({"DREAMD_PRESENCE_FILE": str(path)})
    assert isinstance(senses, FileSenses)
    assert senses.look(senses.can) == Look()                 # no file yet
    path.write_text('{"battery": {"plugged": fal')           # half written
    assert senses.look(senses.can) == Look()
    path.write_text('{"foreground": {"process": "vlc.exe"}}')  # a window without its rect
    assert senses.look(senses.can) == Look()
    path.write_text(json.dumps({"battery": {"plugged": False, "percent": 50}, "locked": True}))
    look = senses.look(senses.can)
    assert look.battery == Battery(False, 50, False) and look.locked is True


def test_the_battery_is_psutils():
    assert read_battery(lambda: None) is None
    b = read_battery(lambda: SimpleNamespace(percent=77.0, secsleft=3600, power_plugged=False))
    assert b == Battery(False, 77.0)

    def broken():
        raise OSError("ACPI table")
    assert read_battery(broken) is None


def test_logind_says_locked_and_idle_and_a_machine_without_it_turns_the_rule_off(caplog):
    assert parse_logind("LockedHint=yes\nIdleHint=no\n") == (True, False)
    assert parse_logind("IdleHint=yes\n") == (None, True)
    calls = []
    now = [0.0]

    def run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "LockedHint=yes\nIdleHint=no\n", "")
    senses = LinuxSenses(run=run, environ={"XDG_SESSION_ID": "c2"}, clock=lambda: now[0])
    assert senses.look(frozenset({"locked"})).locked is True
    assert calls == [["loginctl", "show-session", "c2", "-p", "LockedHint", "-p", "IdleHint"]]
    senses.look(frozenset({"locked"}))                  # read again only every 5 s
    assert len(calls) == 1
    now[0] += 5.0
    senses.look(frozenset({"locked"}))
    assert len(calls) == 2

    def no_logind(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "System has not been booted with "
                                                       "systemd as init system (PID 1).")
    senses = LinuxSenses(run=no_logind, environ={})
    assert senses.session == "auto"
    with caplog.at_level(logging.INFO, logger="dreamd.guard"):
        assert senses.look(frozenset({"locked"})).locked is None
    assert "the lock rule is off" in caplog.text and "systemd" in caplog.text
    assert senses.broken and senses.look(frozenset({"locked"})).locked is None


# Windows, through stand-ins for user32, kernel32 and shell32 that answer the ctypes calls
# the way the real DLLs do (filling the structures passed by reference)

class User32:
    def __init__(self, hwnd=0x10, rect=(0, 0, 1920, 1080), cls="ELDEN RING",
                 monitors=((0, 0, 1920, 1080),), zoomed=0, desktop="Default", pid=4242):
        self.hwnd, self.rect, self.cls, self.monitors = hwnd, rect, cls, monitors
        self.zoomed, self.desktop, self.pid = zoomed, desktop, pid
        self.closed = []

    def GetForegroundWindow(self):
        return self.hwnd

    def GetWindowRect(self, hwnd, ref):
        r = ref._obj
        r.left, r.top, r.right, r.bottom = self.rect
        return 1

    def GetClassNameW(self, hwnd, buf, n):
        buf.value = self.cls
        return len(self.cls)

    def GetWindowTextW(self, hwnd, buf, n):
        buf.value = "title"
        return 5

    def GetWindowThreadProcessId(self, hwnd, ref):
        ref._obj.value = self.pid
        return 1

    def IsZoomed(self, hwnd):
        return self.zoomed

    def IsIconic(self, hwnd):
        return 0

    def EnumDisplayMonitors(self, dc, clip, callback, data):
        from ctypes import wintypes
        for m in self.monitors:
            r = wintypes.RECT(*m)
            callback(1, None, ctypes.pointer(r), data)
        return 1

    def OpenInputDesktop(self, flags, inherit, access):
        return 0 if self.desktop is None else 0x99

    def GetUserObjectInformationW(self, handle, index, buf, size, needed):
        buf.value = self.desktop
        return 1

    def CloseDesktop(self, handle):
        self.closed.append(handle)
        return 1


class Kernel32:
    def __init__(self, saver=0):
        self.saver = saver

    def GetSystemPowerStatus(self, ref):
        ref._obj.SystemStatusFlag = self.saver
        ref._obj.ACLineStatus = 0
        return 1


class Shell32:
    def __init__(self, state=1):
        self.state = state

    def SHQueryUserNotificationState(self, ref):
        ref._obj.value = self.state
        return 0


def windows(user32=None, saver=0, quns=1, battery=Battery(False, 60.0)):
    from dreamd.guard.win32 import WindowsSenses
    return WindowsSenses(user32=user32 or User32(), kernel32=Kernel32(saver),
                         shell32=Shell32(quns), name_of={4242: "EldenRing.exe"}.get,
                         battery=lambda: battery)


def test_windows_reads_the_foreground_window_and_the_monitors():
    look = windows().look(frozenset({"fullscreen", "battery", "locked"}))     # no saver asked
    assert look.foreground == Window("EldenRing.exe", Rect(0, 0, 1920, 1080), "ELDEN RING",
                                     "title", False, False)
    assert look.monitors == [Rect(0, 0, 1920, 1080)] and look.exclusive is False
    assert look.battery == Battery(False, 60.0, False) and look.locked is False
    assert presence.fullscreen(look) == "a full-screen window: EldenRing.exe"
    two = User32(rect=(2552, -8, 4488, 1040), zoomed=1, cls="Chrome_WidgetWin_1",
                 monitors=[tuple(m) for m in TWO])
    look = windows(two).look(frozenset({"fullscreen"}))
    assert look.monitors == [Rect(*m) for m in TWO] and look.foreground.maximized
    assert look.battery is None and look.locked is None         # not asked for


def test_windows_reads_d3d_exclusive_battery_saver_and_the_lock():
    from dreamd.guard.win32 import QUNS_RUNNING_D3D_FULL_SCREEN

    look = windows(User32(rect=(0, 0, 640, 480)), saver=1,
                   quns=QUNS_RUNNING_D3D_FULL_SCREEN).look(frozenset({"fullscreen", "battery",
                                                                      "saver"}))
    assert look.exclusive and look.battery.saver
    assert presence.fullscreen(look) == "a full-screen window: EldenRing.exe"
    assert presence.battery_saver(look) == "battery saver is on"
    user32 = User32(desktop="Winlogon")
    assert windows(user32).look(frozenset({"locked"})).locked is True
    assert user32.closed == [0x99]
    assert windows(User32(desktop=None)).look(frozenset({"locked"})).locked is True
    assert windows(User32(hwnd=0)).look(frozenset({"fullscreen"})).foreground is None


def test_doctor_says_each_rule_whether_it_can_tell_and_what_would_pause_now(tmp_path,
                                                                            monkeypatch):
    from dreamd.doctor import _guard

    path = tmp_path / "presence.json"
    path.write_text(json.dumps({"battery": {"plugged": False, "percent": 40}}))
    monkeypatch.setenv("DREAMD_PRESENCE_FILE", str(path))
    cfg = config.parse('[guard]\nknown_games = []\non_locked = "keep"\non_battery = "free"\n')
    verdict, detail = _guard(cfg)
    assert verdict == "ok"
    assert ("presence: full-screen pause, battery free, battery saver pause, locked off; "
            "now: on battery (a daemon would pause)") in detail
    # a full-screen window of a program the user ignores is not what "would pause"
    path.write_text(json.dumps({"foreground": {"process": "vlc.exe", "rect": [0, 0, 1920, 1080]},
                                "monitors": [[0, 0, 1920, 1080]]}))
    assert "now: a full-screen window: vlc.exe" in _guard(cfg)[1]
    ignoring = config.parse('[guard]\nknown_games = []\nfullscreen_ignore = ["VLC"]\n')
    assert "now:" not in _guard(ignoring)[1]
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.delenv("DREAMD_PRESENCE_FILE")
    monkeypatch.setenv("XDG_SESSION_ID", "no-such-session-for-dreamd")
    detail = _guard(cfg)[1]
    assert "full-screen pause (not readable on linux)" in detail
    assert "battery saver pause (not readable on linux)" in detail


def test_every_windows_call_is_declared_with_its_types():
    """Undeclared, ctypes passes a handle as a C int: a 64-bit HWND would be cut. The
    declarations are set on stand-ins that record them (no Windows here)."""
    from ctypes import wintypes

    from dreamd.guard.win32 import SYSTEM_POWER_STATUS, WindowsSenses, declare

    class Dll:
        def __init__(self):
            self.fns = {}

        def __getattr__(self, name):
            return self.fns.setdefault(name, SimpleNamespace())

    user32, kernel32, shell32 = Dll(), Dll(), Dll()
    declare(user32, kernel32, shell32)
    called = {name for name in vars(User32) if name[0].isupper()}
    assert set(user32.fns) == called
    assert all(hasattr(f, "argtypes") and hasattr(f, "restype") for f in user32.fns.values())
    assert user32.fns["GetForegroundWindow"].restype is wintypes.HWND        # a pointer
    assert user32.fns["GetWindowRect"].argtypes[0] is wintypes.HWND
    assert kernel32.fns["GetSystemPowerStatus"].argtypes[0]._type_ is SYSTEM_POWER_STATUS
    assert set(shell32.fns) == {"SHQueryUserNotificationState"}
    assert WindowsSenses.can == frozenset({"fullscreen", "battery", "saver", "locked"})
