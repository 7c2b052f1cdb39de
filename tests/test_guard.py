"""The game guard: a real process named like a game pauses the dream and frees ComfyUI
(a double on 127.0.0.1 sees the /free), its end resumes it after the grace period, and
a pause the user made outlives every game. The GPU watch against pynvml with no driver
(this machine) and against a simulated driver."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
from sqlalchemy import text

from dreamd import config
from dreamd.errors import ConfigError
from dreamd.guard.games import GameWatch, normalize
from dreamd.guard.gpu import GB, GpuWatch
from dreamd.ledger import controls as ledger_controls
from dreamd.workers import controls
from tests.comfyui_double import ComfyUIDouble
from tests.conftest import _STARTED, dreamd_cmd, wait_for, worker_context
from tests.test_comfyui_daemon import CKPT, comfy_config, rows, status
from tests.test_daemon import RUN_DEADLINE, stop

# What the test's stand-in game process calls itself: a name of this test process's own
# (another run of the guard's tests, by a person or a mutation run, must not see this
# one's games), at most 15 characters (Linux's comm).
GAME = f"dgame{os.getpid()}"
PLAYING = f"a game: {GAME}"       # the guard's words for it

_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None


def _die_with_the_test() -> None:
    """A game outlives nothing: killed with the test process, even one killed mid-test."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL))                  # PR_SET_PDEATHSIG


def start_game(path, name: str) -> subprocess.Popen:
    """A process called `name`: a copy of `sleep` under that name."""
    exe = path / name
    exe.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shutil.which("sleep"), exe)
    proc = subprocess.Popen([str(exe), "600"], preexec_fn=_die_with_the_test)
    _STARTED.append(proc)          # ended even when the test fails
    return proc


@pytest.fixture
def game(tmp_path):
    """Start processes named GAME; all ended after the test."""
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        procs.append(start_game(tmp_path / "bin", GAME))
        return procs[-1]

    yield start
    for p in procs:
        p.kill()
        p.wait()


# ---------------------------------------------------------------- detection

def test_a_known_name_matches_a_running_process_whatever_its_case_and_exe(game):
    watch = GameWatch(["EldenRing.exe", GAME.upper() + ".EXE"])
    assert watch.running() == []
    proc = game()
    assert wait_for(watch.running, timeout=60, what="the game process") == [GAME]
    proc.kill()
    proc.wait()
    assert watch.running() == []
    assert normalize(" Cs2.EXE ") == normalize("cs2") == "cs2"


def test_a_look_reads_only_new_processes_and_every_name_again_every_full_look(game,
                                                                            monkeypatch):
    """The names of processes seen before are not read again until the next full look
    (FULL_LOOK_EVERY): a pid given to a game after another process died under it is
    caught by that look at the latest."""
    from dreamd.guard import games

    now = [1000.0]
    watch = GameWatch([GAME], clock=lambda: now[0])
    reads = []
    real = games._name
    monkeypatch.setattr(games, "_name", lambda pid: reads.append(pid) or real(pid))
    assert watch.running() == [] and os.getpid() in reads
    reads.clear()
    proc = game()
    assert wait_for(watch.running, timeout=60, what="the game process") == [GAME]
    assert proc.pid in reads and os.getpid() not in reads   # the new ones, not all
    # the pid reused: what the watch remembers for it is another process's name
    watch._names[proc.pid] = "somethingelse"
    assert watch.running() == []
    now[0] += games.FULL_LOOK_EVERY
    reads.clear()
    assert watch.running() == [GAME] and os.getpid() in reads


def test_known_games_must_be_process_names():
    cfg = config.parse('[guard]\nknown_games = ["MyGame.exe"]\ngpu_vram_gb = 4\n')
    assert cfg.guard.known_games == ["MyGame.exe"] and cfg.guard.gpu_vram_gb == 4.0
    with pytest.raises(ConfigError, match=r"guard\.known_games .*not paths"):
        config.parse('[guard]\nknown_games = ["C:\\\\Games\\\\game.exe"]\n')
    with pytest.raises(ConfigError, match=r"guard\.gpu_utilization_percent = 150"):
        config.parse("[guard]\ngpu_utilization_percent = 150\n")


# ---------------------------------------------------------------- the GPU

def test_without_an_nvidia_driver_the_gpu_watch_says_unavailable():
    pytest.importorskip("pynvml")
    watch = GpuWatch(0, vram_gb=2.0, utilization_percent=0.0)
    if not watch.state.startswith("unavailable"):
        pytest.skip(f"this machine has an NVIDIA driver: {watch.state}")
    assert watch.contention() is None          # and process detection is unaffected
    assert GpuWatch(0, 0.0, 0.0).state == "off"


class FakeNvml:
    """The NVML calls the watch makes, answering like a driver with these processes."""

    def __init__(self, compute=(), graphics=(), samples=()):
        self.compute, self.graphics, self.samples = compute, graphics, samples
        self.asked_since: list[int] = []

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        if index != 0:
            raise RuntimeError("Invalid Argument")
        return "gpu0"

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA GeForce RTX 4090"

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.compute]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.graphics]

    def nvmlDeviceGetProcessUtilization(self, handle, since):
        self.asked_since.append(since)
        return [SimpleNamespace(pid=p, smUtil=u, timeStamp=t) for p, u, t in self.samples]


def test_gpu_contention_counts_other_processes_only():
    ours = {1000, 1001}
    nvml = FakeNvml(compute=[(1000, 9 * GB)],                    # ComfyUI: ours
                    graphics=[(2000, 3 * GB), (3000, None)])     # a game; WDDM: unknown
    watch = GpuWatch(0, 2.0, 0.0, nvml=nvml, ours=ours.__contains__)
    assert watch.state == "watching GPU 0 (NVIDIA GeForce RTX 4090)"
    assert watch.contention() == "GPU busy: pid 2000 uses 3.0 GB"
    nvml.graphics = [(2000, 1 * GB)]
    assert watch.contention() is None
    assert GpuWatch(3, 2.0, 0.0, nvml=nvml).state == "unavailable: Invalid Argument"


def test_gpu_utilization_samples_are_read_since_the_last_one():
    nvml = FakeNvml(samples=[(1000, 99, 5), (2000, 80, 7)])
    watch = GpuWatch(0, 0.0, 50.0, nvml=nvml, ours={1000}.__contains__)
    assert watch.contention() == "GPU busy: pid 2000 at 80 %"
    nvml.samples = [(2000, 10, 9)]
    assert watch.contention() is None
    assert nvml.asked_since == [0, 7]


# ---------------------------------------------------------------- controls

def test_a_guard_resume_never_lifts_a_pause_the_user_made(db_path):
    for ctx in worker_context(db_path, ""):
        with ctx.engine.begin() as conn:
            ledger_controls.request(conn, "pause", {"reason": "mine"})
            ledger_controls.request(conn, "resume", {"source": "guard"}, worker="guard")
        controls.tick(ctx)
        assert ctx.paused() and ctx.facts["paused_by"] == "user"
        with ctx.engine.begin() as conn:
            ledger_controls.request(conn, "pause", {"reason": GAME, "source": "guard"},
                             worker="guard")
        controls.tick(ctx)
        with ctx.reader.connect() as conn:
            got = conn.execute(text("SELECT command, state, error FROM controls "
                                    "ORDER BY id")).all()
            assert ledger_controls.pause_source(conn) == "guard"
            created_by = conn.execute(text(
                "SELECT worker FROM transitions WHERE entity = 'control' "
                "AND event = 'created' ORDER BY id")).scalars().all()
        assert [(c, s) for c, s, _ in got] == [("pause", "applied"), ("resume", "rejected"),
                                               ("pause", "applied")]
        assert "paused by the user" in got[1].error
        assert created_by == ["surface", "guard", "guard"]
        # a restart knows whose pause is in force
        ctx.facts.clear()
        controls.restore(ctx)
        assert ctx.facts["paused_by"] == "guard" and ctx.facts["pause_reason"] == GAME


# ---------------------------------------------------------------- the worker, in-process

def test_the_guard_pauses_frees_then_resumes_after_the_grace(db_path, game):
    from dreamd.workers.guard import Guard

    # a grace no loaded machine outlasts between two ticks; the guard's clock is then set
    # past it (as in tests/test_worker_guard.py), so nothing waits on the wall clock
    for ctx in worker_context(db_path, GUARD_CONFIG.replace("2.0", "600.0")):
        ctx.wake = lambda name: controls.tick(ctx) if name == "controls" else None
        now = [0.0]
        guard = Guard(ctx, clock=lambda: now[0])
        guard.tick()
        assert not ctx.paused() and ctx.facts["guard"]["gpu"] == "off"
        running = game()
        wait_for(lambda: guard.tick() or ctx.paused(), timeout=60, what="the pause")
        assert (ctx.facts["pause_reason"], ctx.facts["paused_by"]) == (PLAYING, "guard")
        assert ctx.facts["guard"]["engaged"] == PLAYING
        running.kill()
        running.wait()
        guard.tick()
        assert ctx.paused()                    # the grace period has not passed yet
        now[0] += 601.0                        # ...and now it has
        guard.tick()
        assert not ctx.paused() and ctx.facts["guard"]["engaged"] is None
        with ctx.reader.connect() as conn:
            got = conn.execute(text("SELECT command, state, args FROM controls "
                                    "ORDER BY id")).all()
        assert [(c, st) for c, st, _ in got] == [("pause", "applied"), ("free", "applied"),
                                                 ("resume", "applied")]
        assert json.loads(got[0].args) == {"reason": PLAYING, "source": "guard"}
        assert json.loads(got[2].args) == {"reason": f"{PLAYING}: over for 600 s",
                                           "source": "guard"}


# ---------------------------------------------------------------- the daemon

GUARD_CONFIG = f"""
[guard]
known_games = ["{GAME.capitalize()}.exe"]
check_interval_seconds = 0.5
resume_after_seconds = 2.0
"""


def guard_rows(daemon) -> list:
    return rows(daemon, "SELECT c.command, c.state, c.args, t.worker FROM controls c "
                        "JOIN transitions t ON t.entity = 'control' AND t.entity_id = c.id "
                        "AND t.event = 'created' ORDER BY c.id")


def stays_count(daemon) -> int:
    """How many times the guard saw a game end and left the dream as the user left it."""
    log = daemon.data_dir / "logs" / "dreamd.log"
    return log.read_text().count("; the dream stays as the user left it")


def keyframes(daemon) -> int:
    found = rows(daemon, "SELECT count(*) FROM keyframes")
    return found[0][0] if found else 0


@pytest.mark.slow        # about 40 s here: one daemon, a game started three times
def test_a_game_pauses_and_frees_its_end_resumes_and_a_user_pause_outlives_it(
        daemon, game):
    with ComfyUIDouble(checkpoints=[CKPT]) as double:
        daemon.config.write_text(comfy_config([double.url]) + GUARD_CONFIG)
        proc = daemon.start()
        cli = ["--config", str(daemon.config)]
        try:
            wait_for(lambda: status(daemon).get("status") == "playing", timeout=RUN_DEADLINE,
                     what=f"playback:\n{daemon.output()[-3000:]}")
            # a game starts: paused (by the guard, with the game's name), then /free
            running = game()
            wait_for(lambda: status(daemon).get("paused") is True, timeout=60,
                     what="the guard's pause")
            st = status(daemon)
            assert (st["status"], st["pause_reason"], st["paused_by"]) == \
                ("paused", PLAYING, "guard")
            wait_for(lambda: double.freed >= 1, timeout=60, what="POST /free")
            report = json.loads(subprocess.run(
                dreamd_cmd(*cli, "status", "--json"), env=daemon.env, capture_output=True,
                text=True, timeout=60, check=True).stdout)
            assert (report["pause_reason"], report["paused_by"]) == (PLAYING, "guard")
            made = keyframes(daemon)
            # the game ends: after the grace period the dream goes on by itself
            running.kill()
            running.wait()
            wait_for(lambda: status(daemon).get("paused") is False, timeout=60,
                     what="the guard's resume")
            wait_for(lambda: keyframes(daemon) > made, timeout=60,
                     what="a new keyframe after the resume")

            # the user pauses; a game comes and goes: still paused, as the user left it
            subprocess.run(dreamd_cmd(*cli, "pause", "--reason", "mine"), env=daemon.env,
                           check=True, capture_output=True, timeout=60)
            wait_for(lambda: status(daemon).get("pause_reason") == "mine", timeout=60,
                     what="the user's pause")
            running = game()
            wait_for(lambda: double.freed >= 2, timeout=60, what="a second /free")
            running.kill()
            running.wait()
            # (a game that comes back within the grace is the same session: wait until
            # the guard has seen this one gone)
            wait_for(lambda: stays_count(daemon) >= 1, timeout=60,
                     what="the guard seeing the game gone")
            # a pause the user makes during a game also outlives it
            subprocess.run(dreamd_cmd(*cli, "resume"), env=daemon.env, check=True,
                           capture_output=True, timeout=60)
            wait_for(lambda: status(daemon).get("paused") is False, timeout=60,
                     what="the user's resume")
            running = game()
            wait_for(lambda: status(daemon).get("paused_by") == "guard", timeout=60,
                     what="the guard's second pause")
            # the guard frees only after work in flight is done: its free row must exist
            # before the user's pause does (the order the ledger is checked in below)
            wait_for(lambda: double.freed >= 3, timeout=60, what="a third /free")
            subprocess.run(dreamd_cmd(*cli, "pause", "--reason", "mine again"),
                           env=daemon.env, check=True, capture_output=True, timeout=60)
            wait_for(lambda: status(daemon).get("paused_by") == "user", timeout=60,
                     what="the user's pause during the game")
            running.kill()
            running.wait()
            wait_for(lambda: stays_count(daemon) >= 2, timeout=60,
                     what="the guard seeing the game gone")
            st = status(daemon)
            assert (st["paused"], st["pause_reason"]) == (True, "mine again")
        finally:
            stop(daemon, proc)
    done = [(c, s, json.loads(a).get("source"), w) for c, s, a, w in guard_rows(daemon)]
    assert done == [
        ("pause", "applied", "guard", "guard"), ("free", "applied", "guard", "guard"),
        ("resume", "applied", "guard", "guard"),
        ("pause", "applied", None, "surface"), ("free", "applied", "guard", "guard"),
        ("resume", "applied", None, "surface"),
        ("pause", "applied", "guard", "guard"), ("free", "applied", "guard", "guard"),
        ("pause", "applied", None, "surface"),
    ]
    # the guard paused before it freed: the pause was applied first
    applied = rows(daemon, "SELECT command, applied_at FROM controls ORDER BY id LIMIT 2")
    assert applied[0].applied_at <= applied[1].applied_at


def test_doctor_says_what_the_guard_watches_and_whether_it_can_read_the_gpu(game):
    from dreamd.doctor import _guard

    cfg = config.parse(GUARD_CONFIG)
    verdict, detail = _guard(cfg)
    assert verdict == "ok" and "1 game names every 0.5 s" in detail and "GPU thresholds off" in detail
    game()
    assert f"running now: {GAME}" in wait_for(lambda: GAME in _guard(cfg)[1] and _guard(cfg)[1],
                                              timeout=60, what="the game in doctor's line")
    cfg.guard.gpu_vram_gb = 2.0
    verdict, detail = _guard(cfg)
    if "unavailable" in detail:          # no NVIDIA driver here: names only, said plainly
        assert verdict == "warning"
    cfg.guard.enabled = False
    assert _guard(cfg) == ("ok", "off (guard.enabled = false)")
