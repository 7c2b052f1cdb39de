"""Torch intra-op threads, 1 vs 2 (or --threads ...), for the workloads dreamd runs on a CPU.

Picks the default of dreamd.torch_threads. Runs are interleaved across thread counts so
load from other processes hits every setting alike; reports median and min in ms.

    .venv/bin/python bench/threads.py [--repeat 15] [--threads 1 2] [--busy]

--busy runs procedural keyframes in a second process meanwhile, as the keyframe worker
does while the interpolation worker slerps and decodes: the daemon's usual state.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from dreamd.backends import KeyframeRequest
from dreamd.backends.procedural import ProceduralBackend
from dreamd.latent.pixel import PixelCodec
from dreamd.latent.slerp import slerp
from dreamd.seeding import make_seed


def workloads() -> dict[str, callable]:
    g = torch.Generator().manual_seed(0)
    small = [torch.randn(4, 64, 32, generator=g) for _ in range(2)]
    large = [torch.rand(3, 256, 512, generator=g) * 2 - 1 for _ in range(2)]
    ts = torch.linspace(0, 1, 12)[1:-1]                    # N = 10 in-betweens
    latents = torch.rand(10, 3, 256, 512, generator=g) * 2 - 1
    latents8 = torch.rand(10, 3, 32, 64, generator=g) * 2 - 1
    pixel, pixel8 = PixelCodec(), PixelCodec(divisor=8)
    conv = nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())]).eval()
    feat = torch.randn(1, 64, 128, 256, generator=g)
    backend = ProceduralBackend()
    source = make_seed(0)
    request = KeyframeRequest(chain_index=1, width=512, height=256, seed=7, theme="ethereal",
                              prompt="", negative_prompt="", denoise=0.3, image=source)
    return {
        "procedural keyframe 512x256 (numpy)": lambda: backend.generate(request),
        "slerp N=10, 4x64x32": lambda: slerp(*small, ts),
        "slerp N=10, 3x256x512": lambda: slerp(*large, ts),
        "pixel decode 10x 512x256 (divisor 1)": lambda: pixel.decode(latents),
        "pixel decode 10x 512x256 (divisor 8)": lambda: pixel8.decode(latents8),
        "conv 4x Conv2d(64,64,3x3) at 256x128, batch 1": lambda: conv(feat),
    }


_BUSY = """
from dreamd.backends import KeyframeRequest
from dreamd.backends.procedural import ProceduralBackend
from dreamd.seeding import make_seed
b, img = ProceduralBackend(), make_seed(1)
for i in range(10**9):
    img = b.generate(KeyframeRequest(i, 512, 256, i, "ethereal", "", "", 0.3, image=img)).image
"""


def _measure(jobs, args) -> dict[tuple[str, int], list[float]]:
    times: dict[tuple[str, int], list[float]] = {(name, n): [] for name in jobs for n in args.threads}
    with torch.inference_mode():
        for name, job in jobs.items():
            for n in args.threads:                          # warm up caches and allocators
                torch.set_num_threads(n)
                job(); job()
            for _ in range(args.repeat):
                for n in args.threads:
                    torch.set_num_threads(n)
                    start = time.perf_counter()
                    job()
                    times[(name, n)].append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--busy", action="store_true", help="keep one core busy with keyframes")
    args = parser.parse_args()
    jobs = workloads()
    load_before = os.getloadavg()[0]
    busy = subprocess.Popen([sys.executable, "-c", _BUSY]) if args.busy else None
    try:
        times = _measure(jobs, args)
    finally:
        if busy:
            busy.terminate()
            busy.wait()
    load = os.getloadavg()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores "
          f"(affinity {len(os.sched_getaffinity(0))}), no GPU; torch {torch.__version__}; "
          f"python {platform.python_version()}; repeat {args.repeat}, interleaved; "
          f"{'a keyframe loop busy in another process; ' if args.busy else ''}"
          f"load average (1 min) {load_before:.2f} before, {load:.2f} after\n")
    head = " | ".join(f"{n} thr median (min) ms" for n in args.threads)
    print(f"| workload | {head} | best |")
    print("|---" * (len(args.threads) + 2) + "|")
    for name in jobs:
        cells = [times[(name, n)] for n in args.threads]
        medians = [statistics.median(c) for c in cells]
        best = args.threads[medians.index(min(medians))]
        row = " | ".join(f"{m:.1f} ({min(c):.1f})" for m, c in zip(medians, cells))
        print(f"| {name} | {row} | {best} |")


if __name__ == "__main__":
    main()
