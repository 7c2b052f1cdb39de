"""The game guard, measured (bench/RESULTS.md, "Game guard"):

1. seconds from a game process starting to ComfyUI's POST /free arriving (a daemon on
   the comfyui backend against tests/comfyui_double.py, the default check interval);
2. seconds from the game ending to the guard's resume and to the first new keyframe
   (the grace period `guard.resume_after_seconds` is part of it: set here with --grace);
3. the guard's CPU cost while watching: one process-list scan, on this machine's
   process list and with extra processes (a desktop runs a few hundred).

    .venv/bin/python bench/guard.py [--cycles 5] [--grace 10] [--extra 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform as stdlib_platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dreamd.guard.games import GameWatch  # noqa: E402
from tests.comfyui_double import ComfyUIDouble  # noqa: E402

GAME = "benchgame"


def scan_cost(watch: GameWatch, seconds: float = 3.0) -> tuple[float, int]:
    """CPU milliseconds per look at the process list (after the first, the names of new
    processes only: GameWatch), and the processes there."""
    import psutil
    watch.running()                               # the first look reads every name
    calls, start = 0, time.process_time()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        watch.running()
        calls += 1
    return (time.process_time() - start) * 1000 / calls, len(psutil.pids())


def ledger(data: Path, sql: str, *params):
    import sqlite3
    try:
        conn = sqlite3.connect(f"file:{data / 'dreamd.db'}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return []
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def utc(text_time: str) -> float:
    return datetime.fromisoformat(text_time).replace(tzinfo=timezone.utc).timestamp()


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.005)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--grace", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--extra", type=int, default=300)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dreamd-guard-bench-"))
    game_exe = tmp / GAME
    shutil.copy(shutil.which("sleep"), game_exe)
    results: dict = {"machine": f"{stdlib_platform.platform()}, {os.cpu_count()} cores, "
                                f"Python {stdlib_platform.python_version()}"}

    # ---- 3. CPU cost of a scan
    watch = GameWatch(["eldenring.exe", "cs2.exe", GAME])
    per_scan, n = scan_cost(watch)
    extra = [subprocess.Popen(["sleep", "600"]) for _ in range(args.extra)]
    try:
        per_scan_more, n_more = scan_cost(watch)
    finally:
        for p in extra:
            p.kill()
            p.wait()
    results["scan"] = {"processes": n, "cpu_ms": round(per_scan, 2),
                       "processes_more": n_more, "cpu_ms_more": round(per_scan_more, 2),
                       "share_of_a_core_at_interval_more":
                           round(per_scan_more / 1000 / args.interval * 100, 3)}

    # ---- 1 and 2. the daemon against the ComfyUI double
    data = tmp / "data"
    with ComfyUIDouble(checkpoints=["random-sd15.safetensors"]) as double:
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
resume_after_seconds = {args.grace}
""")
        env = {**os.environ, "DREAMD_DATA_DIR": str(data)}
        log = (tmp / "daemon.out").open("w")
        daemon = subprocess.Popen([sys.executable, "-m", "dreamd", "--config", str(cfg), "run"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        status = data / "output" / "status.json"

        def state() -> dict:
            try:
                return json.loads(status.read_text())
            except (OSError, ValueError):
                return {}

        freed_at: list[float] = []
        stop = threading.Event()

        def watch_free() -> None:           # when each POST /free arrived
            seen = 0
            while not stop.is_set():
                if double.freed > seen:
                    seen = double.freed
                    freed_at.append(time.time())
                time.sleep(0.002)

        threading.Thread(target=watch_free, daemon=True).start()
        to_free, to_pause, to_resume, to_keyframe = [], [], [], []
        try:
            wait(lambda: state().get("status") == "playing", 180, "playback")
            for _ in range(args.cycles):
                time.sleep(1.0 + (len(to_free) * 0.37) % args.interval)   # phases vary
                before = len(freed_at)
                started = time.time()
                game = subprocess.Popen([str(game_exe), "600"])
                wait(lambda: state().get("paused") is True, 60, "the pause")
                to_pause.append(time.time() - started)
                wait(lambda: len(freed_at) > before, 120, "/free")
                to_free.append(freed_at[before] - started)
                time.sleep(0.5)
                ended = time.time()
                game.kill()
                game.wait()
                resumed = wait(lambda: ledger(data, "SELECT applied_at FROM controls WHERE "
                                                    "command = 'resume' AND applied_at > ? "
                                                    "ORDER BY id LIMIT 1",
                                              datetime.fromtimestamp(ended, timezone.utc)
                                              .strftime("%Y-%m-%d %H:%M:%S.%f")),
                               args.grace + 60, "the resume")
                to_resume.append(utc(resumed[0][0]) - ended)
                made = wait(lambda: ledger(data, "SELECT completed_at FROM keyframes WHERE "
                                                 "state = 'completed' AND created_at > ? "
                                                 "ORDER BY id LIMIT 1", resumed[0][0]),
                            120, "a new keyframe")
                to_keyframe.append(utc(made[0][0]) - ended)
        finally:
            stop.set()
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)

    def summary(xs: list[float]) -> dict:
        return {"median": round(statistics.median(xs), 2), "min": round(min(xs), 2),
                "max": round(max(xs), 2)}

    results.update(cycles=args.cycles, interval=args.interval, grace=args.grace,
                   start_to_pause=summary(to_pause), start_to_free=summary(to_free),
                   end_to_resume=summary(to_resume), end_to_keyframe=summary(to_keyframe))
    logged = (data / "logs" / "dreamd.log").read_text()
    results["free_waited_for_work_in_flight"] = [
        line.split("waited ")[1].split(" s")[0] for line in logged.splitlines()
        if "waited" in line and "before freeing" in line]
    print(json.dumps(results, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
