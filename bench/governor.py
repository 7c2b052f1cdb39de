"""The governor, off and on, side by side: underruns, what it chose, frames shown per
second. Not a test.

    .venv/bin/python bench/governor.py [--seconds 180] [--only taesd-4fps ...]
    (or: make bench-governor)

Cases (each run twice, `governor.enabled = false` then `true`, as `dreamd run` at
512x256):
- taesd-4fps / taesd-8fps: TAESD of the real architecture (diffusers' AutoencoderTiny
  defaults, random weights: the same cost as the real ones), saved as ComfyUI's
  vae_approx/taesd_*.pth and found there, on this CPU;
- slow-keyframes: the procedural dreamer slowed to 10 s a keyframe (DREAMD_SLOW), 4 fps;
- procedural: the embedded default, untouched (the governor must leave it alone).

Underruns are read from the log's "underrun" lines, frames shown from `frames.shown_at`,
the choices from `governor_decisions` and `interpolations`.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    # name: (fps, codec, DREAMD_SLOW)
    "taesd-4fps": (4.0, "taesd", ""),
    "taesd-8fps": (8.0, "taesd", ""),
    "slow-keyframes": (4.0, "auto", "keyframe=10"),
    "procedural": (4.0, "auto", ""),
}
CONFIG = """
[generation]
codec = "{codec}"
codec_precision = "{precision}"
[comfyui]
models_dir = "{models}"
[display]
fps = {fps}
max_output_frames = 100000
[governor]
enabled = {enabled}
"""
SETTLE = 120.0   # seconds: "zero underruns after the first two minutes"


def taesd_models(folder: Path) -> Path:
    """vae_approx/taesd_{encoder,decoder}.pth of the real architecture, random weights."""
    sys.path.insert(0, str(REPO))
    from tests.conftest_codecs import diffusers_tiny, save_taesd_pair

    save_taesd_pair(folder / "vae_approx", diffusers_tiny(width=64))
    return folder


def run(case: str, enabled: bool, seconds: float, models: Path) -> dict:
    fps, codec, slow = CASES[case]
    with tempfile.TemporaryDirectory() as tmp:
        data, cfg = Path(tmp) / "data", Path(tmp) / "dreamd.toml"
        # bf16, as real TAESD weights get on this CPU: random ones miss the bf16 probe's
        # accuracy bound (1.1/255 against 1/255) and would run in fp32, 3x slower
        cfg.write_text(CONFIG.format(codec=codec, models=models if codec == "taesd" else "",
                                     precision="bf16" if codec == "taesd" else "auto",
                                     fps=fps, enabled="true" if enabled else "false"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("DREAMD_")}
        env.update(DREAMD_DATA_DIR=str(data), **({"DREAMD_SLOW": slow} if slow else {}))
        subprocess.run([sys.executable, "-m", "dreamd", "--config", str(cfg), "run",
                        "--duration", str(seconds)], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True, timeout=seconds + 600)
        log = (data / "logs" / "dreamd.log").read_text()
        db = sqlite3.connect(f"file:{data / 'dreamd.db'}?mode=ro", uri=True)
        started = datetime.fromisoformat(db.execute(
            "SELECT started_at FROM daemon_runs ORDER BY id LIMIT 1").fetchone()[0])
        shown = [datetime.fromisoformat(r[0]) for r in db.execute(
            "SELECT shown_at FROM frames WHERE shown_at IS NOT NULL")]
        decisions = db.execute("SELECT at, reason, interpolation_frames, resolution_divisor, "
                               "message FROM governor_decisions ORDER BY id").fetchall()
        batches = db.execute("SELECT n_frames, divisor, count(*), "
                             "round(avg(duration_ms / (n_frames + 1))) FROM interpolations "
                             "WHERE state = 'completed' GROUP BY n_frames, divisor "
                             "ORDER BY min(id)").fetchall()
        keyframe_s = db.execute("SELECT avg(generation_ms) / 1000 FROM keyframes "
                                "WHERE state = 'completed'").fetchone()[0]
        db.close()
    # the log's local times against the ledger's UTC: the offset of this machine
    offset = datetime.now() - datetime.utcnow()
    underruns = [datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f") - offset
                 for m in re.findall(r"^(\S+ \S+) INFO dreamd\.display: underrun", log, re.M)]
    settled = started + timedelta(seconds=SETTLE)
    end = started + timedelta(seconds=seconds)
    late = [s for s in shown if s >= settled]
    return {
        "case": case, "governor": "on" if enabled else "off", "fps": fps,
        "underruns": len(underruns), "underruns_after_2min": sum(u >= settled for u in underruns),
        "shown_per_s": len(shown) / seconds,
        "shown_per_s_after_2min": len(late) / max(1.0, (end - settled).total_seconds()),
        "keyframe_s": keyframe_s, "batches": batches,
        "decisions": [(round((datetime.fromisoformat(a) - started).total_seconds()), r, n, d, msg)
                      for a, r, n, d, msg in decisions],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=180.0, help="length of each run")
    ap.add_argument("--only", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--governor", choices=("off", "on", "both"), default="both",
                    help="which runs of each case")
    args = ap.parse_args()
    print(f"# {platform.node()}: {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.1f}, {args.seconds:g} s per run", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        models = taesd_models(Path(tmp)) if any(c.startswith("taesd") for c in args.only) else Path(tmp)
        for case in args.only:
            for enabled in {"off": (False,), "on": (True,), "both": (False, True)}[args.governor]:
                t0 = time.monotonic()
                r = run(case, enabled, args.seconds, models)
                results.append(r)
                print(f"# {case} governor {r['governor']}: {time.monotonic() - t0:.0f} s, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
                for d in r["decisions"]:
                    print(f"#   {d[0]:>4} s {d[1]}: N={d[2]} divisor={d[3]:g}: {d[4]}", flush=True)
    print("\n| case | governor | underruns | after 2 min | frames shown/s (after 2 min) "
          "| keyframe s | batches: N, divisor, count, ms/frame |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        batches = "; ".join(f"{n}, {d:g}, x{c}, {ms:.0f}" for n, d, c, ms in r["batches"])
        print(f"| {r['case']} ({r['fps']:g} fps) | {r['governor']} | {r['underruns']} "
              f"| {r['underruns_after_2min']} | {r['shown_per_s']:.2f} "
              f"({r['shown_per_s_after_2min']:.2f}) | {r['keyframe_s'] or 0:.2f} | {batches} |")


if __name__ == "__main__":
    main()
