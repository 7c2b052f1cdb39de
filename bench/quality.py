"""The dream's quality measurements (dreamd/quality/) on a long embedded run: what they
cost against the interpolation they describe, and what they say about the dream. Not a
test.

    .venv/bin/python bench/quality.py [--seconds 600] [--plot docs/quality-health.png]
    .venv/bin/python bench/quality.py --data-dir DIR      (a ledger already made)

Runs `dreamd run` at the defaults (512x256, N=10 unless the governor changes it, the
procedural dreamer, the pixel codec) with DEBUG logs for `--seconds`, then reads the
ledger and the log:
- cost: each segment's `measure_ms` (small copies, the numbers, the look-up of the
  previous segment) against its batch's `duration_ms` (encode, slerp, decode, write);
  and the whole call from the `quality_ms` of the workers' timing lines (the row's
  write included), per segment and per keyframe;
- the dream: motion, flicker, pops; keyframe brightness and contrast (the RGB mean
  and standard deviation the issue quotes), CIELAB L, chroma and drift, change, per
  block of keyframes;
- a quiet micro-benchmark of the same work on 512x256 frames, in this process.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run(data: Path, seconds: float) -> None:
    cfg = data.parent / "dreamd.toml"
    cfg.write_text('[system]\nlog_level = "DEBUG"\n')
    env = {**os.environ, "DREAMD_DATA_DIR": str(data)}
    subprocess.run([sys.executable, "-m", "dreamd", "--config", str(cfg), "run", "--duration",
                    str(seconds)], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=seconds + 600)


def timing(log: str, kind: str, key: str) -> list[float]:
    return [float(m.group(1)) for m in re.finditer(
        rf"timing {kind} id=\d+ .*?\b{key}_ms=([\d.]+)", log)]


def micro() -> dict[str, float]:
    """The measurements alone on 11 random 512x256 frames (the default segment)."""
    import numpy as np
    from PIL import Image

    from dreamd.quality import metrics as m

    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (256, 512, 3), dtype=np.uint8))
              for _ in range(11)]

    def best(fn, n: int = 30) -> float:
        fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
        return min(times)

    smalls = [m.small_copy(f) for f in frames]
    return {"small_copies_ms": best(lambda: [m.small_copy(f) for f in frames]),
            "segment_numbers_ms": best(lambda: m.measure_segment(smalls, smalls[0], 1.0)),
            "keyframe_ms": best(lambda: m.measure_keyframe(m.small_copy(frames[0]), smalls[1]))}


def report(data: Path) -> None:
    db = sqlite3.connect(f"file:{data / 'dreamd.db'}?mode=ro", uri=True)
    log = (data / "logs" / "dreamd.log").read_text(errors="replace")
    seg = db.execute("SELECT q.measure_ms, i.duration_ms, i.n_frames FROM quality q JOIN "
                     "interpolations i ON i.id = q.interpolation_id "
                     "WHERE i.duration_ms IS NOT NULL ORDER BY q.chain_index").fetchall()
    kf = db.execute("SELECT q.measure_ms, k.generation_ms FROM quality q JOIN keyframes k "
                    "ON k.id = q.keyframe_id ORDER BY q.chain_index").fetchall()
    done = {t: db.execute(f"SELECT count(*) FROM {t} WHERE state = 'completed'").fetchone()[0]
            for t in ("keyframes", "interpolations")}
    rows = {e: db.execute("SELECT count(*) FROM quality WHERE entity = ?", (e,)).fetchone()[0]
            for e in ("keyframe", "segment")}
    ratios = [100 * m / d for m, d, _ in seg if d]
    call_seg, call_kf = timing(log, "interpolation", "quality"), timing(log, "keyframe",
                                                                          "quality")
    interp = [d for _, d, _ in seg]
    print(f"rows: {rows['segment']} segments of {done['interpolations']} batches, "
          f"{rows['keyframe']} keyframes of {done['keyframes']} completed")
    print("| cost | median | p95 | total share |")
    print("|---|---|---|---|")
    print(f"| interpolation batch ms (duration_ms; N+1 = "
          f"{statistics.median(n for *_, n in seg) + 1:.0f} frames median) | "
          f"{statistics.median(interp):.0f} | {pct(interp, 95):.0f} | |")
    m = [r[0] for r in seg]
    print(f"| segment measure_ms | {statistics.median(m):.1f} | {pct(m, 95):.1f} | "
          f"{100 * sum(m) / sum(interp):.2f} % of interpolation time |")
    print(f"| segment measure / its batch | {statistics.median(ratios):.2f} % | "
          f"{pct(ratios, 95):.2f} % | |")
    if call_seg:
        print(f"| whole call per segment, row written (quality_ms) | "
              f"{statistics.median(call_seg):.1f} | {pct(call_seg, 95):.1f} | "
              f"{100 * sum(call_seg) / sum(interp):.2f} % |")
    km, kg = [r[0] for r in kf[1:]], [r[1] for r in kf[1:] if r[1]]   # the first imports
    print(f"| keyframe measure_ms (after the first: {kf[0][0]:.0f} ms, the import of "
          f"scikit-image) | {statistics.median(km):.1f} | {pct(km, 95):.1f} | "
          f"{100 * sum(km) / sum(kg):.2f} % of generation time |")
    if call_kf:
        print(f"| whole call per keyframe (quality_ms) | {statistics.median(call_kf[1:]):.1f}"
              f" | {pct(call_kf[1:], 95):.1f} | |")

    q = db.execute("SELECT round(avg(motion), 2), round(max(motion), 2), "
                   "round(avg(flicker), 3), round(max(flicker), 3), "
                   "sum(pop >= 3.0), round(avg(pop), 2), round(max(pop), 2) "
                   "FROM quality WHERE entity = 'segment'").fetchone()
    print(f"\nsegments: motion mean {q[0]} max {q[1]}; flicker mean {q[2]} max {q[3]}; "
          f"pops {q[4]} (pop ratio mean {q[5]}, max {q[6]})")
    print("\n| keyframes | brightness (RGB mean) | contrast (RGB std) | L* | chroma | "
          "saturation | change dE | drift dE (max) | stagnant |")
    print("|---|---|---|---|---|---|---|---|---|")
    n = db.execute("SELECT max(chain_index) FROM quality WHERE entity = 'keyframe'"
                   ).fetchone()[0] or 0
    step = 16 if n < 400 else 64
    for lo in range(0, n + 1, step):
        r = db.execute(
            "SELECT round(avg(brightness), 1), round(min(brightness), 1), "
            "round(max(brightness), 1), round(avg(contrast), 1), round(min(contrast), 1), "
            "round(max(contrast), 1), round(avg(lab_l), 1), "
            "round(avg(sqrt(lab_a * lab_a + lab_b * lab_b)), 1), round(avg(saturation), 3), "
            "round(avg(change), 1), round(avg(drift), 1), round(max(drift), 1), "
            "sum(change < 2.3) FROM quality WHERE entity = 'keyframe' "
            "AND chain_index BETWEEN ? AND ?", (lo, lo + step - 1)).fetchone()
        print(f"| {lo}-{lo + step - 1} | {r[0]} ({r[1]}-{r[2]}) | {r[3]} ({r[4]}-{r[5]}) | "
              f"{r[6]} | {r[7]} | {r[8]} | {r[9]} | {r[10]} ({r[11]}) | {r[12]} |")
    themes = db.execute("SELECT k.theme, count(*), round(avg(q.brightness), 1), "
                        "round(avg(q.contrast), 1), round(avg(q.drift), 1) FROM quality q "
                        "JOIN keyframes k ON k.id = q.keyframe_id GROUP BY k.theme "
                        "ORDER BY k.theme").fetchall()
    print("\nby theme (keyframes, brightness, contrast, drift): "
          + "; ".join(f"{t} {c}, {b}, {s}, {d}" for t, c, b, s, d in themes))
    db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--data-dir", type=Path, help="report on this data dir instead of a run")
    ap.add_argument("--plot", type=Path, help="also write `dreamd stats --plot` here")
    args = ap.parse_args()
    print(f"# {platform.node()}: {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data_dir
        if data is None:
            data = Path(tmp) / "data"
            run(data, args.seconds)
        report(data)
        if args.plot:
            subprocess.run([sys.executable, "-m", "dreamd", "--data-dir", str(data), "stats",
                            "--plot", str(args.plot)], check=True, stdout=subprocess.DEVNULL)
            print(f"\nplot: {args.plot} ({args.plot.stat().st_size // 1024} KB)")
    print("\nquiet micro-benchmark (best of 30, this process):",
          ", ".join(f"{k} {v:.2f}" for k, v in micro().items()))


if __name__ == "__main__":
    main()
