"""The guard's presence rules, measured (bench/RESULTS.md, "Presence rules"):

1. seconds from an event to the pause (`status.json` says paused) and to the GPU freed
   (the ComfyUI double's POST /free arriving; its POST /interrupt too, when a keyframe
   was in flight), for three events: a fake battery unplugged and a fake full-screen
   window (the platform layer's test hook, DREAMD_PRESENCE_FILE), and a game process
   starting. Each rule is set to `free` here so the GPU path is measured for each (the
   defaults free for a game only);
2. the CPU cost of one look at the platform on this machine (psutil's battery; a
   `loginctl` run, which the Linux layer makes at most every 5 s).

A daemon on the comfyui backend against tests/comfyui_double.py, whose prompts take
--delay seconds so a keyframe is often in flight when the event comes.

    .venv/bin/python bench/presence.py [--cycles 5] [--interval 2] [--delay 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform as stdlib_platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dreamd.guard.senses import LinuxSenses, read_battery  # noqa: E402
from tests.comfyui_double import ComfyUIDouble  # noqa: E402

GAME = "benchpgame"
PLUGGED = {"battery": {"plugged": True, "percent": 80}, "monitors": [[0, 0, 1920, 1080]],
           "foreground": {"process": "explorer.exe", "rect": [0, 1040, 1920, 1080],
                          "class_name": "Shell_TrayWnd"}}


def look_cost(seconds: float = 2.0) -> dict:
    """CPU ms per battery read and per loginctl run (whatever it answers here)."""
    out = {}
    calls, start = 0, time.process_time()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        read_battery()
        calls += 1
    out["battery_cpu_ms"] = round((time.process_time() - start) * 1000 / calls, 3)
    # the Linux layer's look at the session: one loginctl process (what it answers here
    # does not matter for its cost: a process started, run and read)
    linux = LinuxSenses()
    linux.session_state()
    out["loginctl"] = linux.broken or "answered"
    cmd = ["loginctl", "show-session", linux.session, "-p", "LockedHint", "-p", "IdleHint"]
    calls, wall = 0, time.monotonic()
    usage = os.times()
    while time.monotonic() - wall < seconds:
        subprocess.run(cmd, capture_output=True, text=True, timeout=5)
        calls += 1
    after = os.times()
    # a child's CPU counts too: loginctl is a process of its own
    cpu = (after.user + after.system + after.children_user + after.children_system
           - usage.user - usage.system - usage.children_user - usage.children_system)
    out["loginctl_cpu_ms"] = round(cpu * 1000 / calls, 2)
    out["loginctl_share_of_a_core_at_5s"] = round(cpu / calls / 5.0 * 100, 3)
    return out


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.005)
    raise SystemExit(f"timed out waiting for {what}")


def write_look(path: Path, look: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(look))
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--delay", type=float, default=3.0)
    ap.add_argument("--look-only", action="store_true", help="the CPU of a look, no daemon")
    args = ap.parse_args()
    if args.look_only:
        print(json.dumps(look_cost(), indent=2))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="dreamd-presence-bench-"))
    game_exe = tmp / GAME
    shutil.copy(shutil.which("sleep"), game_exe)
    presence = tmp / "presence.json"
    write_look(presence, PLUGGED)
    results: dict = {"machine": f"{stdlib_platform.platform()}, {os.cpu_count()} cores, "
                                f"Python {stdlib_platform.python_version()}, load "
                                f"{os.getloadavg()[0]:.1f}",
                     "look": look_cost()}
    data = tmp / "data"
    with ComfyUIDouble(checkpoints=["random-sd15.safetensors"], delay=args.delay) as double:
        cfg = tmp / "dreamd.toml"
        cfg.write_text(f"""
[generation]
backend = "comfyui"
resolution = [128, 64]
interpolation_frames = 4
[display]
fps = 10.0
buffer_target_seconds = 3.0
min_buffer_seconds = 1.0
[comfyui]
urls = ["{double.url}"]
checkpoint = "random-sd15.safetensors"
[guard]
known_games = ["{GAME}.exe"]
check_interval_seconds = {args.interval}
resume_after_seconds = 1.0
presence_resume_seconds = 1.0
on_battery = "free"
on_fullscreen = "free"
""")
        env = {**os.environ, "DREAMD_DATA_DIR": str(data),
               "DREAMD_PRESENCE_FILE": str(presence)}
        log = (tmp / "daemon.out").open("w")
        daemon = subprocess.Popen([sys.executable, "-m", "dreamd", "--config", str(cfg), "run"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        status = data / "output" / "status.json"

        def state() -> dict:
            try:
                return json.loads(status.read_text())
            except (OSError, ValueError):
                return {}

        arrived: dict[str, list[float]] = {"/free": [], "/interrupt": []}
        stop = threading.Event()

        def watch() -> None:            # when each POST /free and /interrupt arrived
            seen = 0
            while not stop.is_set():
                new = double.requests[seen:]
                seen += len(new)
                for r in new:
                    if r.method == "POST" and r.path in arrived:
                        arrived[r.path].append(time.time())
                time.sleep(0.002)

        threading.Thread(target=watch, daemon=True).start()
        game: list[subprocess.Popen] = []

        def start(kind: str) -> None:
            if kind == "battery unplugged":
                write_look(presence, {**PLUGGED, "battery": {"plugged": False, "percent": 79}})
            elif kind == "a full-screen window":
                write_look(presence, {**PLUGGED, "foreground": {
                    "process": "vlc.exe", "rect": [0, 0, 1920, 1080]}})
            else:
                game.append(subprocess.Popen([str(game_exe), "600"]))

        def end() -> None:
            write_look(presence, PLUGGED)
            while game:
                proc = game.pop()
                proc.kill()
                proc.wait()             # a zombie still has its name in the process list

        phases = random.Random(24)
        events = ("battery unplugged", "a full-screen window", "a game starting")
        timings = {e: {"pause": [], "free": [], "interrupt": [], "in_flight": 0}
                   for e in events}
        try:
            wait(lambda: state().get("status") == "playing", 180, "playback")
            for cycle in range(args.cycles):
                for kind in events:
                    # a keyframe in flight when the event comes, at random phases of the
                    # guard's clock (a resume happens at a tick: without the random sleep
                    # every event would come at the same phase)
                    wait(lambda: double.running is not None, 60, "a prompt")
                    time.sleep(phases.uniform(0.0, args.interval))
                    in_flight = double.running is not None
                    frees = len(arrived["/free"])
                    interrupts = len(arrived["/interrupt"])
                    t0 = time.time()
                    start(kind)
                    wait(lambda: state().get("paused") is True, 60, "the pause")
                    timings[kind]["pause"].append(time.time() - t0)
                    wait(lambda: len(arrived["/free"]) > frees, 60, "/free")
                    timings[kind]["free"].append(arrived["/free"][frees] - t0)
                    if len(arrived["/interrupt"]) > interrupts:
                        timings[kind]["interrupt"].append(arrived["/interrupt"][interrupts]
                                                          - t0)
                    timings[kind]["in_flight"] += int(in_flight)
                    end()
                    wait(lambda: state().get("paused") is False, 60, f"the resume ({kind})")
                    print(f"cycle {cycle + 1}, {kind}: pause {timings[kind]['pause'][-1]:.2f} s,"
                          f" /free {timings[kind]['free'][-1]:.2f} s", file=sys.stderr)
        finally:
            stop.set()
            end()
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)

    def summary(xs: list[float]) -> dict | None:
        if not xs:
            return None
        return {"median": round(statistics.median(xs), 2), "min": round(min(xs), 2),
                "max": round(max(xs), 2), "n": len(xs)}

    results.update(cycles=args.cycles, interval=args.interval, delay=args.delay,
                   events={k: {"to_pause": summary(v["pause"]), "to_free": summary(v["free"]),
                               "to_interrupt": summary(v["interrupt"]),
                               "keyframe_in_flight": v["in_flight"]}
                           for k, v in timings.items()})
    discarded = subprocess.run(
        [sys.executable, "-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); print("
         "c.execute(\"SELECT count(*) FROM keyframes WHERE state='discarded'\").fetchone()"
         "[0], c.execute(\"SELECT count(*) FROM transitions WHERE event='postponed' AND "
         "detail LIKE '%paused%'\").fetchone()[0])", str(data / "dreamd.db")],
        capture_output=True, text=True).stdout.split()
    results["keyframes_discarded"], results["keyframes_postponed_for_a_pause"] = discarded
    print(json.dumps(results, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
