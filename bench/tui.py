"""The dashboard, `dreamd status` and `dreamd export`, measured. Not a test.

    .venv/bin/python bench/tui.py [--seconds 30] [--fps 4 15] [--old-checkout DIR]

For each display rate it starts `dreamd run` (512x256, N=10) on a fresh data dir, waits
until frames play, then:
- first paint: a fresh `python` process that runs the dashboard (Textual's headless
  driver, half-block preview) prints the wall time at which its first snapshot and
  the preview are drawn; measured from just before the process was started;
- CPU while watching: that dashboard process's CPU time over `--seconds` of idle
  watching / wall time (psutil), after the first paint;
- key to applied: the dashboard presses `t` (next theme) 10 times, 1.5 s apart; the
  time from each press to the control's `applied_at` in the ledger (same clock);
- `dreamd status` with the daemon running: wall time of 7 runs each, this checkout
  against `--old-checkout` (a worktree of the commit before, run from /tmp so that its
  code is imported), interleaved;
- export: `dreamd export --last 20` to .mp4, .webp and .gif at 512x256, frames written
  a second (the frames are files on disk; nothing made again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CONFIG = """
[generation]
resolution = [512, 256]
interpolation_frames = 10
[display]
fps = {fps}
buffer_target_seconds = 20.0
min_buffer_seconds = 2.0
[governor]
enabled = false
"""

CHILD = r"""
import asyncio, json, sqlite3, sys, time
from datetime import datetime, timezone
from dreamd import config
from dreamd.tui.app import DreamApp

cfg_file, data_dir, watch, presses = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
out = {}

def utc():
    return datetime.now(timezone.utc).replace(tzinfo=None)

async def main():
    app = DreamApp(config.load(cfg_file, data_dir), graphics="halfcell")
    async with app.run_test(size=(160, 48)) as pilot:
        while app.snapshot is None or app.query_one("#preview").image is None:
            await pilot.pause(0.01)
        await pilot.pause(0)
        out["first_paint_wall"] = time.time()
        print("PAINTED", flush=True)
        await asyncio.sleep(watch)              # idle watching: the parent reads our CPU
        print("WATCHED", flush=True)
        db = sqlite3.connect(f"file:{data_dir}/dreamd.db?mode=ro", uri=True)

        async def press(key):
            n = len(app.outcomes)
            pressed = utc()
            await pilot.press(key)
            while len(app.outcomes) == n:
                await pilot.pause(0.005)
            cid = max(app.outcomes)
            while True:
                row = db.execute("SELECT created_at, applied_at FROM controls WHERE id = ?",
                                 (cid,)).fetchone()
                if row and row[1]:
                    break
                await asyncio.sleep(0.005)
            created, applied = (datetime.fromisoformat(v) for v in row)
            return ((applied - pressed).total_seconds() * 1000,
                    (created - pressed).total_seconds() * 1000)

        for label in ("generating", "paused"):
            lat = []
            if label == "paused":
                await press("p")
                await asyncio.sleep(3)
            for i in range(presses):
                lat.append(await press("t"))
                await asyncio.sleep(1.5)
            out[f"key_to_applied_ms_{label}"] = lat
        await press("p")
        await app.action_quit()

asyncio.run(main())
print("RESULT " + json.dumps(out), flush=True)
"""


def wait_for(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def shown(db: Path) -> int:
    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        return c.execute("SELECT frames_shown FROM runtime_state").fetchone()[0] or 0
    except (sqlite3.Error, TypeError):
        return 0


def dashboard(cfg: Path, data: Path, seconds: float) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(cfg), str(data), str(seconds),
                             "10"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    ps = psutil.Process(proc.pid)
    line = proc.stdout.readline()
    assert line.startswith("PAINTED"), (line, proc.stderr.read())
    t0, c0 = time.monotonic(), sum(ps.cpu_times()[:2])
    line = proc.stdout.readline()
    cpu = (sum(ps.cpu_times()[:2]) - c0) / (time.monotonic() - t0)
    rest, err = proc.communicate(timeout=300)
    result = json.loads(rest.split("RESULT ", 1)[1])
    return {"first_paint_s": result["first_paint_wall"] - start, "cpu_watching": cpu,
            "key_ms": {k[len("key_to_applied_ms_"):]: v for k, v in result.items()
                       if k.startswith("key_to_applied_ms_")}}


def status_times(data: Path, cfg: Path, old: Path | None, runs: int = 7) -> dict:
    env = {**os.environ, "DREAMD_DATA_DIR": str(data)}
    cmds = {"new": ([sys.executable, "-m", "dreamd", "status"], env)}
    if old:
        cmds["old"] = (cmds["new"][0], {**env, "PYTHONPATH": str(old)})
    out = {k: [] for k in cmds}
    for _ in range(runs):
        for k, (cmd, e) in cmds.items():
            t = time.perf_counter()
            subprocess.run(cmd, env=e, cwd="/tmp", stdout=subprocess.DEVNULL, check=True)
            out[k].append(time.perf_counter() - t)
    return out


def export_speed(data: Path, cfg: Path, tmp: Path) -> dict:
    env = {**os.environ, "DREAMD_DATA_DIR": str(data)}
    out = {}
    for ext in (".mp4", ".webp", ".gif"):
        target = tmp / f"x{ext}"
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "dreamd", "--config", str(cfg), "export",
                               "--last", "20", "--size", "512x256", "-o", str(target)],
                              env=env, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t
        n = int(done.stdout.split(": ", 1)[1].split(" frames")[0])
        out[ext] = (n, wall, target.stat().st_size)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--fps", type=float, nargs="+", default=[4.0, 15.0])
    ap.add_argument("--old-checkout", type=Path)
    args = ap.parse_args()
    print(f"# {platform.node()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    for fps in args.fps:
        with tempfile.TemporaryDirectory() as tmp_:
            tmp = Path(tmp_)
            data, cfg = tmp / "data", tmp / "dreamd.toml"
            cfg.write_text(CONFIG.format(fps=fps))
            daemon = subprocess.Popen([sys.executable, "-m", "dreamd", "--config", str(cfg),
                                       "--data-dir", str(data), "run"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            try:
                wait_for(lambda: shown(data / "dreamd.db") > 3 * fps, 300, "playback")
                d = dashboard(cfg, data, args.seconds)
                print(f"fps {fps:g}: first paint {d['first_paint_s']:.2f} s; CPU watching "
                      f"{100 * d['cpu_watching']:.1f} % of a core; load "
                      f"{os.getloadavg()[0]:.1f}")
                for label, pairs in d["key_ms"].items():
                    total = sorted(p[0] for p in pairs)
                    write = sorted(p[1] for p in pairs)
                    print(f"  key to applied, daemon {label}: median "
                          f"{statistics.median(total):.0f} ms, min {total[0]:.0f}, max "
                          f"{total[-1]:.0f} (n={len(total)}); of which key to row written: "
                          f"median {statistics.median(write):.0f} ms")
                st = status_times(data, cfg, args.old_checkout)
                for k, v in st.items():
                    print(f"  dreamd status ({k}): median {statistics.median(v):.2f} s, "
                          f"min {min(v):.2f}, max {max(v):.2f}")
                for ext, (n, wall, size) in export_speed(data, cfg, tmp).items():
                    print(f"  export {ext}: {n} frames in {wall:.2f} s = {n / wall:.1f} "
                          f"frames/s (whole command), {size / 1024:.0f} KiB")
            finally:
                daemon.terminate()
                daemon.wait(timeout=60)


if __name__ == "__main__":
    main()
