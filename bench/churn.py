"""Churn: run the embedded default fast until more than --keyframes keyframes have gone
through, sampling the data dir's size by part and the ledger's size; the size must
plateau under the budget. Not a test.

    .venv/bin/python bench/churn.py [--keyframes 10000] [--minutes 20]   (or: make bench-churn)

The daemon runs as a subprocess at 64x64, N = 1, 60 fps (about 30 keyframes a second
at most, a thousand times the default rate), with the horizons scaled down so that
steady state arrives within minutes: keyframe images 36 s, frame rows and transitions
72 s, keyframe rows 3 min, a 64 MB budget. It reports, every --every seconds, the size
by part, and at the end the plateau (the mean of the last quarter of samples), the
growth over the last half (bytes per keyframe), the daemon's CPU and the share of it
the retention passes took (from the janitor's DEBUG `timing` lines).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dreamd.storage import space  # noqa: E402

CONFIG = """
[system]
log_level = "DEBUG"
[generation]
resolution = [64, 64]
interpolation_frames = 1
[display]
fps = 60.0
buffer_target_seconds = 2.0
min_buffer_seconds = 0.5
max_output_frames = 200
[storage]
budget_gb = {budget}
keyframe_hours = 0.01
frame_history_hours = 0.02
history_days = 0.002
"""


def keyframes_made(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT coalesce(max(chain_index), 0) FROM keyframes").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keyframes", type=int, default=10_000)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--every", type=float, default=10.0)
    ap.add_argument("--budget-gb", type=float, default=0.0625)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dreamd-churn-"))
    data = work / "data"
    cfg = work / "dreamd.toml"
    cfg.write_text(CONFIG.format(budget=args.budget_gb))
    log = (work / "daemon.out").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "dreamd", "--config", str(cfg),
                             "--data-dir", str(data), "run"], stdout=log,
                            stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    started = time.monotonic()
    samples = []
    print(f"data dir {data}; budget {args.budget_gb * 1024:.0f} MB")
    print(f"{'s':>6} {'keyframes':>9} {'total MB':>9}  parts (MB)")
    try:
        while time.monotonic() - started < args.minutes * 60:
            time.sleep(args.every)
            if proc.poll() is not None:
                print("the daemon exited early; see", work / "daemon.out")
                return 1
            u = space.measure(data)
            k = keyframes_made(data / "dreamd.db")
            parts = {p: round(v / space.MB, 2) for p, v in sorted(u.parts.items())}
            samples.append({"s": round(time.monotonic() - started), "keyframes": k,
                            "total": u.total - u.parts.get("logs", 0), "parts": parts})
            print(f"{samples[-1]['s']:>6} {k:>9} {samples[-1]['total'] / space.MB:>9.1f}  "
                  f"{json.dumps(parts)}", flush=True)
            if k >= args.keyframes:
                break
        cpu = ps.cpu_times()
        cpu_s = cpu.user + cpu.system
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    wall = time.monotonic() - started
    text = (data / "logs" / "dreamd.log").read_text(errors="replace")
    for old in sorted((data / "logs").glob("dreamd.log.*")):
        text += old.read_text(errors="replace")
    storage_ms = [float(m) for m in re.findall(r"timing janitor id=0 storage_ms=([\d.]+)", text)]
    tail = samples[len(samples) * 3 // 4:] or samples
    half = samples[len(samples) // 2:] or samples
    plateau = statistics.mean(s["total"] for s in tail)
    growth = ((half[-1]["total"] - half[0]["total"])
              / max(1, half[-1]["keyframes"] - half[0]["keyframes"]))
    print()
    print(f"machine: {platform.platform()}, {psutil.cpu_count()} cores, Python "
          f"{platform.python_version()}")
    print(f"keyframes: {samples[-1]['keyframes']} in {wall:.0f} s")
    print(f"plateau (mean of the last quarter): {plateau / space.MB:.1f} MB; peak "
          f"{max(s['total'] for s in samples) / space.MB:.1f} MB; budget "
          f"{args.budget_gb * 1024:.0f} MB")
    print(f"growth over the last half: {growth:.0f} bytes per keyframe "
          f"({growth * 31_400 / space.MB:.1f} MB per 24 h at the default 31,400 keyframes)")
    print(f"daemon CPU: {cpu_s:.0f} s in {wall:.0f} s ({100 * cpu_s / wall:.0f} % of a core)")
    if storage_ms:
        print(f"retention passes: {len(storage_ms)}, median {statistics.median(storage_ms):.1f} "
              f"ms, p95 {sorted(storage_ms)[int(len(storage_ms) * 0.95)]:.1f} ms, total "
              f"{sum(storage_ms) / 1000:.1f} s ({100 * sum(storage_ms) / 1000 / cpu_s:.1f} % "
              f"of the daemon's CPU)")
    (work / "churn.json").write_text(json.dumps(samples, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
