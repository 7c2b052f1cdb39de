"""The guard's presence rules in-process on a real ledger, through a fake platform layer
and a set clock: every pause and resume a control row with the reason in words, a
battery pause and a user's pause, a game ending while on battery, a full-screen window
that frees only when told to, a rule set to keep, the resume delay against flapping."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from sqlalchemy import text

from dreamd.guard.presence import Battery, Look, Rect, Window
from dreamd.guard.senses import Senses
from dreamd.ledger import controls as ledger_controls
from dreamd.workers import controls
from dreamd.workers.guard import Guard

ON_BATTERY = Battery(plugged=False, percent=50.0)
ON_AC = Battery(plugged=True, percent=50.0)
VLC = Window("vlc.exe", Rect(0, 0, 1920, 1080))
FHD = [Rect(0, 0, 1920, 1080)]


class FakeSenses(Senses):
    """The platform layer, reporting what the test sets."""

    name = "fake"
    can = frozenset({"fullscreen", "battery", "saver", "locked"})

    def __init__(self) -> None:
        self.now = Look(monitors=FHD, battery=ON_AC)
        self.asked: list[frozenset[str]] = []

    def look(self, want):
        self.asked.append(want)
        return self.now


class FakeGames:
    known = {"bg3": "bg3.exe"}

    def __init__(self) -> None:
        self.playing: list[str] = []

    def running(self) -> list[str]:
        return list(self.playing)


@pytest.fixture
def make(contexts):
    def _make(extra: str = ""):
        ctx = contexts("[guard]\nresume_after_seconds = 60.0\npresence_resume_seconds = 3.0\n"
                       + extra)
        ctx.wake = lambda name: controls.tick(ctx) if name == "controls" else None
        senses, games, now = FakeSenses(), FakeGames(), [0.0]
        guard = Guard(ctx, senses=senses, games=games, clock=lambda: now[0])
        return ctx, guard, senses, games, now
    return _make


def rows(ctx) -> list[tuple[str, str, str | None, str | None]]:
    """(command, state, reason, source) of every control row."""
    with ctx.reader.connect() as conn:
        got = conn.execute(text("SELECT command, state, args FROM controls ORDER BY id")).all()
    return [(c, s, json.loads(a).get("reason"), json.loads(a).get("source"))
            for c, s, a in got]


def user(ctx, command: str, **args) -> None:
    with ctx.engine.begin() as conn:
        ledger_controls.request(conn, command, args)
    controls.tick(ctx)


def test_on_battery_pauses_and_back_on_mains_resumes_after_the_delay(make):
    ctx, guard, senses, _, now = make()
    guard.tick()
    assert not ctx.paused() and rows(ctx) == []
    senses.now.battery = ON_BATTERY
    guard.tick()
    assert ctx.paused() and (ctx.facts["pause_reason"], ctx.facts["paused_by"]) == (
        "on battery", "guard")
    senses.now.battery = ON_AC
    now[0] += 2.0
    guard.tick()
    assert ctx.paused()                                     # not 3 s yet
    now[0] += 1.0
    guard.tick()
    assert not ctx.paused()
    assert rows(ctx) == [("pause", "applied", "on battery", "guard"),
                         ("resume", "applied", "on battery: over for 3 s", "guard")]


def test_a_battery_pause_never_lifts_a_users_pause_nor_the_other_way(make):
    ctx, guard, senses, _, now = make()
    senses.now.battery = ON_BATTERY
    guard.tick()
    user(ctx, "pause", reason="mine")                       # the user pauses on top
    assert ctx.facts["paused_by"] == "user"
    senses.now.battery = ON_AC
    now[0] += 10.0
    guard.tick()
    assert ctx.paused() and ctx.facts["pause_reason"] == "mine"
    assert [r[0] for r in rows(ctx)] == ["pause", "pause"]  # no resume sent
    # the user resumes; unplugged again: the guard pauses; the user's resume lifts it
    user(ctx, "resume")
    senses.now.battery = ON_BATTERY
    now[0] += 1.0
    guard.tick()
    assert ctx.paused() and ctx.facts["paused_by"] == "guard"
    user(ctx, "resume")
    for _ in range(3):                                      # not paused again for it
        now[0] += 1.0
        guard.tick()
    assert not ctx.paused()
    # ...but a new reason pauses again, naming both
    senses.now.locked = True
    guard.tick()
    assert ctx.paused() and ctx.facts["pause_reason"] == "on battery; the screen is locked"


def test_a_game_ending_while_on_battery_keeps_the_pause_for_the_battery(make):
    ctx, guard, senses, games, now = make()
    senses.now.battery = ON_BATTERY
    games.playing = ["bg3.exe"]
    guard.tick()
    assert ctx.facts["pause_reason"] == "a game: bg3.exe; on battery"
    assert ctx.facts["guard"]["reasons"] == {"game": "free", "battery": "pause"}
    games.playing = []
    now[0] += 59.0
    guard.tick()
    assert ctx.facts["pause_reason"] == "a game: bg3.exe; on battery"    # the game's grace
    now[0] += 1.0
    guard.tick()
    assert ctx.paused() and ctx.facts["pause_reason"] == "on battery"
    senses.now.battery = ON_AC
    now[0] += 3.0
    guard.tick()
    assert not ctx.paused()
    assert rows(ctx) == [
        ("pause", "applied", "a game: bg3.exe; on battery", "guard"),
        ("free", "applied", "a game: bg3.exe; on battery", "guard"),
        ("pause", "applied", "on battery", "guard"),
        ("resume", "applied", "on battery: over for 3 s", "guard")]


def test_a_game_starting_during_a_battery_pause_frees_the_gpu(make):
    ctx, guard, senses, games, now = make()
    senses.now.battery = ON_BATTERY
    guard.tick()
    games.playing = ["bg3.exe"]
    now[0] += 1.0
    guard.tick()
    assert rows(ctx)[1:] == [("pause", "applied", "a game: bg3.exe; on battery", "guard"),
                             ("free", "applied", "a game: bg3.exe", "guard")]


@pytest.mark.parametrize("action, commands", [
    ("pause", ["pause"]), ("free", ["pause", "free"]), ("keep", [])])
def test_a_full_screen_window_does_what_its_rule_says(make, action, commands):
    ctx, guard, senses, _, now = make(f"on_fullscreen = \"{action}\"\n")
    senses.now.foreground = VLC
    guard.tick()
    assert [r[0] for r in rows(ctx)] == commands
    if commands:
        assert rows(ctx)[0][2] == "a full-screen window: vlc.exe"
    if action == "keep":            # a rule set to keep is not even asked for
        assert "fullscreen" not in senses.asked[-1]


def test_a_click_on_the_taskbar_does_not_flap_the_pause(make):
    ctx, guard, senses, _, now = make()
    senses.now.foreground = VLC
    guard.tick()
    taskbar = Window("explorer.exe", Rect(0, 1040, 1920, 1080), "Shell_TrayWnd")
    for step, window in enumerate([taskbar, VLC, taskbar, taskbar, VLC]):
        senses.now.foreground = window
        now[0] += 1.0
        guard.tick()
        assert ctx.paused(), step
    assert [r[0] for r in rows(ctx)] == ["pause"]
    senses.now.foreground = taskbar
    for _ in range(4):
        now[0] += 1.0
        guard.tick()
    assert not ctx.paused() and [r[0] for r in rows(ctx)] == ["pause", "resume"]


def test_locked_then_asleep_is_one_reason_in_new_words(make):
    ctx, guard, senses, _, now = make()
    senses.now.locked = True
    guard.tick()
    assert ctx.facts["pause_reason"] == "the screen is locked"
    senses.now.locked, senses.now.asleep = False, True
    now[0] += 1.0
    guard.tick()
    assert ctx.facts["pause_reason"] == "the display is asleep"
    assert [r[2] for r in rows(ctx)] == ["the screen is locked", "the display is asleep"]


def test_turned_off_the_guard_asks_the_platform_nothing(make):
    ctx, guard, senses, games, _ = make("enabled = false\n")
    senses.now.battery, senses.now.locked, games.playing = ON_BATTERY, True, ["bg3.exe"]
    guard.tick()
    assert not ctx.paused() and rows(ctx) == [] and senses.asked == []


# ---------------------------------------------------------------- a real daemon

def write_look(path, look: dict) -> None:
    """What the platform layer reads next (atomically, as a test hook's file must be)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(look))
    os.replace(tmp, path)


@pytest.mark.slow        # a daemon's start, a pause and a resume: about 10 s here
def test_a_daemon_on_a_fake_battery_pauses_unplugged_and_resumes_plugged_in(daemon, tmp_path):
    from tests.conftest import FAST_CONFIG, dreamd_cmd, with_keys
    from tests.test_comfyui_daemon import rows as daemon_rows, status
    from tests.test_daemon import RUN_DEADLINE, stop, wait_in

    look = tmp_path / "presence.json"
    write_look(look, {"battery": {"plugged": True, "percent": 90}})
    daemon.config.write_text(with_keys(FAST_CONFIG, "guard", "check_interval_seconds = 0.5\n"
                                       "presence_resume_seconds = 2.0\n"))
    proc = daemon.start(extra_env={"DREAMD_PRESENCE_FILE": str(look)})
    try:
        wait_in(daemon, lambda: status(daemon).get("status") == "playing", "playback",
                RUN_DEADLINE)
        write_look(look, {"battery": {"plugged": False, "percent": 89}})       # unplugged
        wait_in(daemon, lambda: status(daemon).get("paused") is True, "the pause", 60)
        st = status(daemon)
        assert (st["status"], st["pause_reason"], st["paused_by"]) == (
            "paused", "on battery", "guard")
        report = json.loads(subprocess.run(
            dreamd_cmd("--config", str(daemon.config), "status", "--json"), env=daemon.env,
            capture_output=True, text=True, timeout=60, check=True).stdout)
        assert (report["pause_reason"], report["paused_by"]) == ("on battery", "guard")
        made = daemon_rows(daemon, "SELECT count(*) FROM keyframes")[0][0]
        write_look(look, {"battery": {"plugged": True, "percent": 89}})        # plugged in
        wait_in(daemon, lambda: status(daemon).get("paused") is False, "the resume", 60)
        wait_in(daemon, lambda: daemon_rows(daemon, "SELECT count(*) FROM keyframes")[0][0]
                > made, "a keyframe after the resume", 60)
    finally:
        stop(daemon, proc)
    got = [(c, s, json.loads(a), w) for c, s, a, w in daemon_rows(
        daemon, "SELECT c.command, c.state, c.args, t.worker FROM controls c JOIN "
                "transitions t ON t.entity = 'control' AND t.entity_id = c.id AND "
                "t.event = 'created' ORDER BY c.id")]
    assert got == [
        ("pause", "applied", {"reason": "on battery", "source": "guard"}, "guard"),
        ("resume", "applied", {"reason": "on battery: over for 2 s", "source": "guard"},
         "guard")]
    log = (daemon.data_dir / "logs" / "dreamd.log").read_text()
    assert "guard: on battery: pausing the dream" in log
    assert "guard: on battery: over for 2 s: resuming" in log


def test_battery_saver_pauses_on_mains_too(make):
    ctx, guard, senses, _, now = make()
    senses.now.battery = Battery(plugged=True, percent=30.0, saver=True)
    guard.tick()
    assert ctx.facts["pause_reason"] == "battery saver is on"
    senses.now.battery = Battery(plugged=False, percent=30.0, saver=True)
    now[0] += 1.0
    guard.tick()
    assert ctx.facts["pause_reason"] == "on battery; battery saver is on"


def test_a_restart_during_a_battery_pause_goes_on_with_it(make):
    """The daemon restarts while the guard's pause for the battery is in force: still on
    battery, the pause is simply the battery's (no new row); plugged in, it resumes
    after the presence delay, not a game's grace."""
    ctx, guard, senses, _, now = make()
    senses.now.battery = ON_BATTERY
    guard.tick()
    ctx.facts.clear()
    controls.restore(ctx)                           # a restart, as the daemon does
    guard = Guard(ctx, senses=senses, games=FakeGames(), clock=lambda: now[0])
    guard.tick()
    assert ctx.paused() and ctx.facts["guard"]["reasons"] == {"battery": "pause"}
    senses.now.battery = ON_AC
    now[0] += 3.0
    guard.tick()
    assert not ctx.paused()
    assert [(c, r) for c, _, r, _ in rows(ctx)] == [
        ("pause", "on battery"), ("resume", "on battery: over for 3 s")]
