"""The game guard's worker in-process on a real ledger, with real processes named like
a game (a copy of `sleep`): what it pauses, frees and resumes (README "Game guard"), the
pause a user made or lifted during a game, a guard pause left by an earlier run, the
wait for local work in flight before the models leave the GPU, and a GPU watch that
sees another process (a simulated NVML driver: no NVIDIA driver here)."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

import pytest
from sqlalchemy import text

from dreamd.guard.games import GameWatch
from dreamd.guard.gpu import GB, GpuWatch
from dreamd.ledger import controls as ledger_controls
from dreamd.workers import controls
from dreamd.workers import guard as guard_module
from tests.conftest import wait_for
from tests.test_guard import GAME, FakeNvml, game, start_game  # noqa: F401 (a fixture)

# the stand-in games (tests/test_guard.py): GAME, a name of this test process's own, and
# OTHER, a second one
OTHER = f"dwother{os.getpid()}"
PLAYING = f"a game: {GAME}"


class Clock:
    """The guard's clock, set by the test: a grace passes without waiting for it."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def Guard(ctx, **kw) -> guard_module.Guard:
    """The guard on a clock of the test's (guard.clock.t += 31: 31 s later)."""
    return guard_module.Guard(ctx, clock=Clock(), **kw)

CONFIG = f"""
[guard]
known_games = ["{GAME.capitalize()}.exe", "{OTHER.upper()}"]
check_interval_seconds = 0.5
resume_after_seconds = {{grace}}
"""


@pytest.fixture
def make(contexts):
    """A context whose controls worker applies every control the guard makes at once,
    noting which rows were in hand each time it was woken."""

    def _make(grace: float = 0.0, extra: str = ""):
        ctx = contexts(CONFIG.format(grace=grace) + extra)
        ctx.woken = []

        def wake(name):
            ctx.woken.append((name, sorted(ctx.in_hand)))
            if name == "controls":
                controls.tick(ctx)
        ctx.wake = wake
        return ctx
    return _make


def controls_rows(ctx) -> list[tuple[str, str, dict, str]]:
    with ctx.reader.connect() as conn:
        got = conn.execute(text(
            "SELECT c.command, c.state, c.args, t.worker FROM controls c JOIN transitions t "
            "ON t.entity = 'control' AND t.entity_id = c.id AND t.event = 'created' "
            "ORDER BY c.id")).all()
    return [(c, s, json.loads(a), w) for c, s, a, w in got]


def see(guard: Guard, ctx) -> None:
    """Tick until the guard has seen the game (the process list can lag its start)."""
    wait_for(lambda: guard.tick() or ctx.facts["guard"]["engaged"], timeout=10,
             what="the guard seeing the game")


def said(caplog) -> list[str]:
    """The guard's log lines, whole (dreamd.log is what a user reads)."""
    return [r.getMessage() for r in caplog.records if r.name == "dreamd.guard"]


def user(ctx, command: str, **args) -> None:
    with ctx.engine.begin() as conn:
        ledger_controls.request(conn, command, args)
    controls.tick(ctx)


def test_before_a_game_it_says_what_it_watches_and_does_nothing(make, caplog):
    ctx = make()
    guard = Guard(ctx)
    assert ctx.facts["guard"] == {"enabled": True, "engaged": None, "reasons": {},
                                  "games": 2, "gpu": "off",
                                  "presence": "file: battery, fullscreen, locked, saver"}
    with caplog.at_level(logging.INFO, logger="dreamd.guard"):
        guard.tick()
        guard.tick()
    assert [r.getMessage() for r in caplog.records] == [
        "guard: on; watching 2 process names, GPU off, presence file: battery, fullscreen, "
        "locked, saver"]
    assert controls_rows(ctx) == [] and not ctx.paused()
    guard.close()


@pytest.mark.parametrize("index, state", [
    (0, "watching GPU 0 (NVIDIA GeForce RTX 4090)"),
    (1, "unavailable: Invalid Argument")])          # the simulated driver has one GPU
def test_it_watches_the_gpu_system_gpu_names(make, monkeypatch, index, state):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())       # no NVIDIA driver here
    ctx = make(extra=f"gpu_vram_gb = 2.0\n[system]\ngpu = {index}\n")
    guard = Guard(ctx)
    assert ctx.facts["guard"]["gpu"] == state
    guard.close()


def test_a_game_pauses_then_frees_and_its_end_resumes_after_the_grace(make, game, caplog):
    ctx = make(grace=30.0)
    guard = Guard(ctx)
    proc = game()
    with caplog.at_level(logging.INFO, logger="dreamd.guard"):
        see(guard, ctx)
    assert ctx.paused() and ctx.facts["paused_by"] == "guard"
    assert ctx.facts["guard"]["engaged"] == PLAYING
    assert ctx.facts["guard"]["reasons"] == {"game": "free"}
    assert controls_rows(ctx) == [
        ("pause", "applied", {"reason": PLAYING, "source": "guard"}, "guard"),
        ("free", "applied", {"reason": PLAYING, "source": "guard", "interrupt": True},
         "guard")]
    assert [n for n, _ in ctx.woken] == ["controls", "controls"]
    assert (f"guard: {PLAYING}: pausing the dream and freeing the GPU"
            in said(caplog))
    proc.kill()
    proc.wait()
    guard.tick()
    assert ctx.paused()                          # gone for less than the grace
    guard.clock.t += 31.0                        # …and now for longer
    with caplog.at_level(logging.INFO, logger="dreamd.guard"):
        guard.tick()
    assert not ctx.paused() and ctx.facts["guard"]["engaged"] is None
    assert controls_rows(ctx)[2:] == [
        ("resume", "applied", {"reason": f"{PLAYING}: over for 30 s", "source": "guard"},
         "guard")]
    assert f"guard: {PLAYING}: over for 30 s: resuming" in said(caplog)


def test_a_game_still_running_keeps_the_pause_however_long(make, game):
    ctx = make(grace=0.0)
    guard = Guard(ctx)
    game()
    see(guard, ctx)
    guard.clock.t += 1000.0
    guard.tick()                                # seen again: still engaged
    assert ctx.paused() and [c for c, *_ in controls_rows(ctx)] == ["pause", "free"]


def test_a_pause_the_user_made_is_kept_but_the_gpu_is_still_freed(make, game, caplog):
    ctx = make(grace=0.0)
    user(ctx, "pause", reason="mine")
    guard = Guard(ctx)
    proc = game()
    with caplog.at_level(logging.INFO, logger="dreamd.guard"):
        see(guard, ctx)
        assert [(c, a) for c, _, a, _ in controls_rows(ctx)] == [
            ("pause", {"reason": "mine"}),
            ("free", {"reason": PLAYING, "source": "guard", "interrupt": True})]
        proc.kill()
        proc.wait()
        guard.tick()
    assert ctx.paused() and ctx.facts["paused_by"] == "user"
    assert ctx.facts["guard"]["engaged"] is None
    assert [c for c, *_ in controls_rows(ctx)] == ["pause", "free"]      # no resume
    assert f"guard: {PLAYING}; the dream is already paused (mine)" in said(caplog)
    assert (f"guard: {PLAYING}: over for 0 s; the dream stays as the user left it"
            in said(caplog))


def test_a_user_who_resumes_during_a_game_is_not_paused_again_for_it(make, game):
    ctx = make(grace=0.0)
    guard = Guard(ctx)
    proc = game()
    see(guard, ctx)
    user(ctx, "resume")
    for _ in range(3):
        guard.tick()
    assert not ctx.paused()
    proc.kill()
    proc.wait()
    guard.tick()
    assert [c for c, *_ in controls_rows(ctx)] == ["pause", "free", "resume"]
    assert controls_rows(ctx)[2][3] == "surface"


def test_turned_off_it_ignores_games(make, game, caplog):
    ctx = make(extra="enabled = false\n")
    guard = Guard(ctx)
    assert ctx.facts["guard"]["enabled"] is False
    proc = game()
    wait_for(lambda: GameWatch([GAME]).running(), timeout=10, what="the game process")
    with caplog.at_level(logging.INFO, logger="dreamd.guard"):
        guard.tick()
    assert said(caplog) == ["guard: off; watching 2 process names, GPU off, presence file: "
                            "battery, fullscreen, locked, saver"]
    assert controls_rows(ctx) == [] and ctx.facts["guard"]["engaged"] is None
    proc.kill()
    proc.wait()


def earlier_guard_pause(ctx, reason: str = "Cyberpunk2077") -> None:
    with ctx.engine.begin() as conn:
        ledger_controls.request(conn, "pause", {"reason": reason, "source": "guard"}, worker="guard")
    controls.tick(ctx)
    ctx.facts.clear()
    controls.restore(ctx)                       # a restart, as the daemon does


def test_a_pause_an_earlier_runs_guard_made_is_lifted_after_the_grace(make):
    ctx = make(grace=60.0)
    earlier_guard_pause(ctx)
    guard = Guard(ctx)
    guard.tick()
    assert ctx.paused() and ctx.facts["guard"]["engaged"] == "Cyberpunk2077"
    guard.clock.t += 61.0
    guard.tick()
    assert not ctx.paused()
    assert controls_rows(ctx)[-1][:3] == (
        "resume", "applied", {"reason": "Cyberpunk2077: over for 60 s", "source": "guard"})


def test_turned_off_since_an_earlier_runs_guard_pause_it_resumes_at_once(make):
    ctx = make(grace=600.0, extra="enabled = false\n")
    earlier_guard_pause(ctx)
    ctx.facts["pause_reason"] = None            # an old row without a reason
    guard = Guard(ctx)
    guard.tick()
    assert not ctx.paused()
    assert controls_rows(ctx)[-1][2] == {"reason": "a reason of the last run: over for 600 s",
                                         "source": "guard"}


def test_a_users_pause_from_an_earlier_run_is_not_the_guards(make):
    ctx = make(grace=0.0)
    user(ctx, "pause", reason="mine")
    ctx.facts.clear()
    controls.restore(ctx)
    guard = Guard(ctx)
    guard.tick()
    assert ctx.paused() and ctx.facts["guard"]["engaged"] is None
    assert [c for c, *_ in controls_rows(ctx)] == ["pause"]


class Holder:
    """A local model holder (the codecs, the embedders): notes what was in hand when it
    was released."""

    def __init__(self, ctx) -> None:
        self.ctx, self.released = ctx, []

    def release(self) -> None:
        self.released.append(sorted(self.ctx.in_hand))


@pytest.mark.parametrize("local, keyframe", [("interpolation", True), ("embedding", True),
                                             ("interpolation", False)])
def test_the_backend_is_freed_at_once_the_local_models_after_local_work(make, game, local,
                                                                        keyframe):
    """The free (the keyframe in flight interrupted, ComfyUI's memory) goes at once; the
    codec and the embedder leave the device only once the batch using them is done."""
    ctx = make()
    ctx.codecs, ctx.embedders = Holder(ctx), Holder(ctx)
    ctx.in_hand.update({(local, 7), ("keyframe", 3)} if keyframe else {(local, 7)})
    guard = Guard(ctx)
    done = threading.Event()

    def finish():
        wait_for(lambda: len(ctx.woken) >= 2, timeout=10, what="the free")
        time.sleep(0.3)
        ctx.in_hand.discard((local, 7))
        done.set()
    threading.Thread(target=finish, daemon=True).start()
    game()
    see(guard, ctx)
    assert done.is_set()
    in_hand = sorted([("keyframe", 3), (local, 7)] if keyframe else [(local, 7)])
    pause, free = ctx.woken
    assert pause == free == ("controls", in_hand)
    left = [("keyframe", 3)] if keyframe else []
    assert ctx.codecs.released == ctx.embedders.released == [left]


def test_stopping_the_daemon_does_not_wait_for_the_pause_or_the_work(make, game, monkeypatch):
    import types

    from dreamd.workers import guard as guard_module

    def no_wait(seconds):
        raise AssertionError(f"the guard waited {seconds} s while the daemon was stopping")

    ctx = make()
    ctx.wake = lambda name: None                # nobody applies controls any more
    ctx.in_hand.add(("interpolation", 1))
    ctx.stopping.set()
    monkeypatch.setattr(guard_module, "time",
                        types.SimpleNamespace(monotonic=time.monotonic, sleep=no_wait))
    guard = Guard(ctx)
    game()
    see(guard, ctx)
    assert [c for c, s, *_ in controls_rows(ctx)] == ["pause", "free"]
    assert not ctx.paused()


def test_another_process_busy_on_the_gpu_pauses_like_a_game(make, game):
    nvml = FakeNvml(graphics=[(2000, 3 * GB)])
    ctx = make(extra="gpu_vram_gb = 2.0\n")
    watch = GpuWatch(0, 2.0, 0.0, nvml=nvml, ours=lambda pid: False)
    guard = Guard(ctx, gpu=watch)
    assert ctx.facts["guard"]["gpu"] == "watching GPU 0 (NVIDIA GeForce RTX 4090)"
    guard.tick()
    assert ctx.paused() and ctx.facts["pause_reason"] == "GPU busy: pid 2000 uses 3.0 GB"
    # a known game running is named first
    nvml.graphics = []
    guard.tick()
    assert not ctx.paused()
    nvml.graphics = [(2000, 3 * GB)]
    game()
    see(guard, ctx)
    assert ctx.facts["pause_reason"] == PLAYING
    guard.close()
    assert watch.handle is None


def test_two_games_are_named_together(make, game, tmp_path):
    ctx = make()
    proc = start_game(tmp_path / "bin2", OTHER)
    try:
        game()
        guard = Guard(ctx)
        wait_for(lambda: len(guard.games.running()) == 2, timeout=10, what="both games")
        guard.tick()
        assert ctx.facts["pause_reason"] == f"a game: {GAME}, {OTHER}"
    finally:
        proc.kill()
        proc.wait()
