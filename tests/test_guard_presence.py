"""The guard's presence rules in-process on a real ledger, through a fake platform layer
and a set clock: every pause and resume a control row with the reason in words, a
battery pause and a user's pause, a game ending while on battery, a full-screen window
that frees only when told to, a rule set to keep, the resume delay against flapping."""

from __future__ import annotations

import json

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
    can = frozenset({"fullscreen", "battery", "locked"})

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
