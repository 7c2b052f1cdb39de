"""The quality controls measured (dreamd/quality/coherence.py, breaker.py,
dreamd/latent/ease.py): colour drift with coherence off and on, stagnation breaks, the
pop ratio with and without easing, and what coherence costs a keyframe. Not a test.
(bench/quality.py measures the measurements themselves.)

    .venv/bin/python bench/quality_controls.py [--keyframes 300] [--embedded 400]
                                               [--pops 80] [--only drift breaks pops cost]

Every chain runs in-process through the real planner and keyframe worker (and, for the
pops, the real interpolation worker with the pixel codec) on a fresh ledger, as
tests/quality_doubles.py's run_chain does; every number is read back from the ledger
(`quality`, `breaks`), as the recorder measured it.

- drift: the drifting double (a colour cast and a contrast gain added at every keyframe)
  at 256x128 for --keyframes keyframes, coherence off, histogram and mean at strengths 0.5
  and 1; the drift is the recorder's (delta E of the keyframe's mean CIELAB from its run's
  reference);
- breaks: the converging double for 200 keyframes, and the embedded procedural dreamer
  (512x256, themes rotating every 20) for --embedded keyframes, coherence off and on,
  with the default breaker;
- pops: three crafted segments (slow, fast turn, slow; slerped in pixels) and an embedded
  run with in-betweens (512x256, N = 10, pixel codec, --pops keyframes), `quality.ease`
  linear then smooth;
- cost: coherence.match_image on a 512x256 keyframe (histogram, mean), the keyframe
  worker's whole call (coherence.steer: the ledger look-up and the cached palette
  included), and match_latent on a 4x32x64 latent, against a procedural keyframe.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from sqlalchemy import text  # noqa: E402

from dreamd.ledger import database  # noqa: E402
from tests.conftest import close_worker_context, open_worker_context, with_keys  # noqa: E402
from tests.quality_doubles import (CHAIN_CONFIG, ConvergingBackend, DriftingBackend,  # noqa: E402
                                   run_chain)


def context(root: Path, name: str, config: str):
    path = root / name / "dreamd.db"
    path.parent.mkdir(parents=True)
    database.upgrade(path)
    return open_worker_context(path, config)


def config(resolution=(256, 128), rotation: int | None = None, quality: str = "") -> str:
    cfg = CHAIN_CONFIG.replace("resolution = [128, 64]",
                               f"resolution = [{resolution[0]}, {resolution[1]}]")
    if rotation is not None:
        cfg = cfg.replace("rotation_interval = 1000000", f"rotation_interval = {rotation}")
    return with_keys(cfg, "quality", quality) if quality else cfg


def rows(ctx, q: str, **params):
    with ctx.reader.connect() as conn:
        return conn.execute(text(q), params).all()


def keyframe_quality(ctx):
    return rows(ctx, "SELECT chain_index, drift, change, contrast, brightness FROM quality "
                     "WHERE entity = 'keyframe' ORDER BY chain_index")


# ---------------------------------------------------------------- drift

def bench_drift(root: Path, n: int) -> list[str]:
    cases = [("off", 'coherence = "off"'),
             ("histogram 0.5 (default)", 'coherence = "histogram"'),
             ("histogram 1.0", 'coherence = "histogram"\ncoherence_strength = 1.0'),
             ("mean 0.5", 'coherence = "mean"'),
             ("mean 1.0", 'coherence = "mean"\ncoherence_strength = 1.0')]
    marks = [k for k in (10, 30, 100, 200, 300, 500) if k <= n]
    out = ["| coherence | " + " | ".join(f"drift @{k}" for k in marks)
           + " | max drift | mean change | contrast @0 → @end | s |",
           "|---|" + "---|" * (len(marks) + 4)]
    print("\n".join(out), flush=True)
    for i, (name, q) in enumerate(cases):
        ctx = context(root, f"drift{i}", config(quality=q + "\nstagnation_keyframes = 0"))
        started = time.perf_counter()
        run_chain(ctx, DriftingBackend(), n)
        took = time.perf_counter() - started
        qs = keyframe_quality(ctx)
        close_worker_context(ctx)
        drift = [r.drift for r in qs]
        change = [r.change for r in qs if r.change is not None]
        out.append(f"| {name} | " + " | ".join(f"{drift[k - 1]:.1f}" for k in marks)
                   + f" | {max(drift):.1f} | {statistics.mean(change):.2f} | "
                   f"{qs[0].contrast:.0f} → {qs[-1].contrast:.0f} | {took:.0f} |")
        print(out[-1], flush=True)
    return out


# ---------------------------------------------------------------- breaks

def bench_breaks(root: Path, n_embedded: int) -> list[str]:
    from dreamd.backends.procedural import ProceduralBackend

    out = ["| chain | keyframes | stagnant (change < floor) | breaks | keyframes boosted | "
           "mean change: the 4 before each break / in breaks | drift mean / max | s |",
           "|---|---|---|---|---|---|---|---|"]
    print("\n".join(out), flush=True)
    cases = [("converging double, 256x128", ConvergingBackend(), 200,
              config(quality='coherence = "off"')),
             ("embedded procedural, 512x256, coherence off", ProceduralBackend(), n_embedded,
              config(resolution=(512, 256), rotation=20, quality='coherence = "off"')),
             ("embedded procedural, 512x256, defaults", ProceduralBackend(), n_embedded,
              config(resolution=(512, 256), rotation=20))]
    for i, (name, backend, n, cfg) in enumerate(cases):
        ctx = context(root, f"breaks{i}", cfg)
        started = time.perf_counter()
        run_chain(ctx, backend, n)
        took = time.perf_counter() - started
        qs = keyframe_quality(ctx)
        breaks = rows(ctx, "SELECT chain_index, keyframes, stagnant FROM breaks ORDER BY id")
        floor = ctx.cfg.quality.stagnation_floor
        close_worker_context(ctx)
        boosted = {c for b in breaks for c in range(b.chain_index, b.chain_index + b.keyframes)}
        before = {b.chain_index - 1 - j for b in breaks for j in range(b.stagnant)}
        ch = {r.chain_index: r.change for r in qs if r.change is not None}

        def mean(keys):
            values = [ch[k] for k in keys if k in ch]
            return f"{statistics.mean(values):.2f}" if values else "n/a"
        drift = [r.drift for r in qs]
        out.append(f"| {name} | {n} | {sum(1 for v in ch.values() if v < floor)} | "
                   f"{len(breaks)} | {len(boosted)} | {mean(before)} / {mean(boosted)} | "
                   f"{statistics.mean(drift):.1f} / {max(drift):.1f} | {took:.0f} |")
        print(out[-1], flush=True)
    return out


# ---------------------------------------------------------------- pops

def crafted_pops(ease: str) -> tuple[list[float], float]:
    import torch

    from dreamd.latent.ease import eased
    from dreamd.latent.slerp import slerp
    from dreamd.quality import metrics
    from tests.quality_doubles import start_image

    a, c = start_image(256, 128, 1), start_image(256, 128, 2)
    keys = [a, a * 0.92 + 8, c, c * 0.92 + 8]
    ts = [i / 11 for i in range(11)]
    segs = [[f.numpy() for f in slerp(torch.tensor(x), torch.tensor(y), eased(ts, ease))]
            for x, y in zip(keys, keys[1:])]
    pops = [metrics.measure_segment(s, p[-1], metrics.motion(p)).pop
            for p, s in zip(segs, segs[1:])]
    return pops, statistics.mean(metrics.flicker(s) for s in segs)


def run_with_inbetweens(ctx, backend, n: int) -> None:
    from dreamd.workers import interpolation, keyframe, planner

    codecs = interpolation.Codecs(ctx)
    for _ in range(n):
        assert planner.tick(ctx) is not None
        assert keyframe.tick(ctx, backend) == 1
        while interpolation.tick(ctx, codecs):
            pass


def bench_pops(root: Path, n: int) -> list[str]:
    from dreamd.backends.procedural import ProceduralBackend

    out = ["| segments | ease | pop ratio: mean | p95 | max | pops (>= 3) | motion | "
           "flicker |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(out), flush=True)
    for ease in ("linear", "smooth"):
        pops, flick = crafted_pops(ease)
        out.append(f"| crafted: slow, fast turn, slow (N = 10) | {ease} | "
                   f"{statistics.mean(pops):.2f} | | {max(pops):.2f} | "
                   f"{sum(p >= 3 for p in pops)} | | {flick:.2f} |")
        print(out[-1], flush=True)
    for ease in ("linear", "smooth"):
        cfg = config(resolution=(512, 256), rotation=20, quality=f'ease = "{ease}"'
                     ).replace("interpolation_frames = 0", "interpolation_frames = 10")
        cfg = with_keys(cfg, "generation", 'codec = "pixel"')
        ctx = context(root, f"pops-{ease}", cfg)
        run_with_inbetweens(ctx, ProceduralBackend(), n)
        seg = rows(ctx, "SELECT pop, motion, flicker FROM quality WHERE entity = 'segment' "
                        "AND pop IS NOT NULL ORDER BY chain_index")
        close_worker_context(ctx)
        pops = [r.pop for r in seg]
        out.append(f"| embedded procedural, {len(seg)} segments (512x256, N = 10, pixel "
                   f"codec) | {ease} | {statistics.mean(pops):.2f} | "
                   f"{np.percentile(pops, 95):.2f} | {max(pops):.2f} | "
                   f"{sum(p >= 3 for p in pops)} | {statistics.mean(r.motion for r in seg):.2f} | "
                   f"{statistics.mean(r.flicker for r in seg):.2f} |")
        print(out[-1], flush=True)
    return out


# ---------------------------------------------------------------- cost

def _median_ms(fn, repeat: int) -> float:
    fn()                    # imports, caches
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def bench_cost(root: Path) -> list[str]:
    import torch
    from PIL import Image

    from dreamd.backends import KeyframeRequest
    from dreamd.backends.procedural import ProceduralBackend
    from dreamd.quality import coherence, metrics
    from tests.quality_doubles import start_image

    ref_lab = metrics.lab(start_image(256, 128, 3))
    image = Image.fromarray(np.clip(start_image(512, 256, 4) * 1.1 + 10, 0, 255)
                            .astype(np.uint8))
    out = ["| what | median ms |", "|---|---|"]
    print("\n".join(out), flush=True)
    for method in ("histogram", "mean"):
        ms = _median_ms(lambda: coherence.match_image(image, ref_lab, method, 0.5), 20)
        out.append(f"| match_image, {method}, 512x256 against a 256x128 palette | {ms:.1f} |")
        print(out[-1], flush=True)
    # the keyframe worker's whole call, on a real chain's ledger (its fourth keyframe)
    ctx = context(root, "cost", config(resolution=(512, 256)))
    run_chain(ctx, ProceduralBackend(), 3)
    head = rows(ctx, "SELECT * FROM keyframes ORDER BY chain_index DESC LIMIT 1")[0]

    class Row:
        chain_index, theme, parent_id, input_path, source = (
            head.chain_index + 1, head.theme, head.id, head.path, "img2img")
    with Image.open(ctx.cfg.data_dir / head.path) as im:
        current = im.convert("RGB")
    ms = _median_ms(lambda: coherence.steer(ctx, Row, current), 20)
    out.append(f"| coherence.steer (the keyframe worker's call), histogram, 512x256 | {ms:.1f} |")
    print(out[-1], flush=True)
    request = KeyframeRequest(chain_index=4, width=512, height=256, seed=4, theme=head.theme,
                              prompt=head.prompt, negative_prompt="", denoise=0.3,
                              image=current)
    backend = ProceduralBackend()
    ms = _median_ms(lambda: backend.generate(request), 10)
    out.append(f"| a procedural keyframe (generate), 512x256, for scale | {ms:.1f} |")
    print(out[-1], flush=True)
    close_worker_context(ctx)
    lat, lref = torch.randn(1, 4, 32, 64), torch.randn(4, 16, 32)
    ms = _median_ms(lambda: coherence.match_latent(lat, lref, 0.5), 50)
    out.append(f"| match_latent, 4x32x64 latent (512x256 image), CPU | {ms:.2f} |")
    print(out[-1], flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--keyframes", type=int, default=300, help="the drifting double's chain")
    ap.add_argument("--embedded", type=int, default=400, help="embedded chains, for breaks")
    ap.add_argument("--pops", type=int, default=80, help="keyframes of the pops runs")
    ap.add_argument("--only", nargs="*", choices=("drift", "breaks", "pops", "cost"))
    args = ap.parse_args()
    only = args.only or ["drift", "breaks", "pops", "cost"]
    print(f"{time.strftime('%Y-%m-%d')}, {platform.system()} {platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="dreamd-bench-controls-"))
    benches = {"drift": lambda: bench_drift(root, args.keyframes),
               "breaks": lambda: bench_breaks(root, args.embedded),
               "pops": lambda: bench_pops(root, args.pops), "cost": lambda: bench_cost(root)}
    try:
        for name in only:
            print(f"\n{name}")
            benches[name]()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
