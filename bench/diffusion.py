"""Keyframe time of the in-process diffusion backend with the full SD 1.5 architecture, and
the memory it holds while dreaming and after `free` (dreamd/backends/diffusion/).

    .venv/bin/python bench/diffusion.py                         # 256x128 and 512x256, 1-4 steps
    .venv/bin/python bench/diffusion.py --dtypes fp32,bf16 --threads 2
    .venv/bin/python bench/diffusion.py --checkpoint ~/ComfyUI/models/checkpoints/x.safetensors

Without --checkpoint a child process writes SD 1.5 with random weights (the released
architecture, built on the meta device) as an fp16 original-layout single file, as a
ComfyUI checkpoint is; speed does not depend on the values. The model is loaded through the
backend's own path (the shipped skeleton, offline) and each keyframe runs as the daemon
runs it: the input is the previous keyframe's latent (no VAE encode), `steps` UNet passes
(denoise 1, so int(steps x denoise) = steps), the VAE decodes. The peak RSS is the measuring
process's own (the checkpoint was written by the child).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_checkpoint(path: Path) -> None:
    import torch

    from tests import diffusion_tiny as tiny
    tiny.save_ldm(path, tiny.full_sd15_parts(seed=0), dtype=torch.float16)


def rss_mib() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    """Wall time inside a module's forward (summed per keyframe)."""

    def __init__(self, module, name: str) -> None:
        self.total = 0.0
        original = getattr(module, name)
        # the wrapper holds the module: undone before `free`, or the bench keeps the model
        self.restore = lambda: delattr(module, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                self.total += time.perf_counter() - t0
        setattr(module, name, timed)


def run(args) -> dict:
    from PIL import Image

    from dreamd import config as C
    from dreamd.backends import KeyframeRequest
    from dreamd.backends.diffusion.backend import DiffusionBackend
    from dreamd.torch_threads import configure_torch_threads

    threads = configure_torch_threads(args.threads or None)
    out: dict = {"threads": threads, "rows": [], "memory": {}}
    baseline = rss_mib()
    for dtype in args.dtypes.split(","):
        tmp = Path(tempfile.mkdtemp())
        (tmp / "dreamd.toml").write_text(
            '[generation]\nbackend = "diffusers"\n[diffusion]\n'
            f'model = {json.dumps(str(args.checkpoint))}\nlora = "none"\nsteps = 1\n'
            f'device = "{args.device}"\ndtype = "{dtype}"\nscheduler = "euler_a"\n')
        cfg = C.load(tmp / "dreamd.toml", data_dir=tmp / "data")
        backend = DiffusionBackend(cfg).start()
        t0 = time.perf_counter()
        assert backend._ready(), backend._problem
        load_s = time.perf_counter() - t0
        loaded = rss_mib()
        pipe = backend._pipe
        unet, decode = Timer(pipe.unet, "forward"), Timer(pipe.vae, "decode")
        encode = Timer(pipe.vae, "encode")
        k = 0
        for size in args.sizes.split(","):
            w, h = (int(v) for v in size.split("x"))
            image = Image.new("RGB", (w, h), (40, 90, 160))
            for steps in (int(s) for s in args.steps.split(",")):
                cfg.diffusion.steps = steps
                times, unet_s, decode_s = [], [], []
                for i in range(args.repeat + 1):
                    k += 1
                    request = KeyframeRequest(
                        chain_index=k, width=w, height=h, seed=k, theme="t",
                        prompt="ethereal digital angel, dissolving particles",
                        negative_prompt="", denoise=1.0, image=image,
                        input_sha256=f"{k - 1:064x}")
                    unet.total = decode.total = 0.0
                    t0 = time.perf_counter()
                    result = backend.generate(request)
                    elapsed = time.perf_counter() - t0
                    backend.keyframe_written(k, f"{k:064x}")
                    image = result.image
                    if i == 0:
                        continue        # the first at a size builds kernels: not timed
                    assert result.info["input"] == "latent", result.info
                    times.append(elapsed)
                    unet_s.append(unet.total)
                    decode_s.append(decode.total)
                out["rows"].append({
                    "dtype": dtype, "size": size, "steps": steps,
                    "keyframe_s": statistics.median(times), "min_s": min(times),
                    "max_s": max(times), "unet_s": statistics.median(unet_s),
                    "decode_s": statistics.median(decode_s)})
                print(json.dumps(out["rows"][-1]), flush=True)
            # what an input that is not the previous keyframe costs more: one VAE encode
            encode.total = 0.0
            k += 1
            backend.generate(KeyframeRequest(
                chain_index=k, width=w, height=h, seed=k, theme="t", prompt="x",
                negative_prompt="", denoise=1.0, image=image))
            out["rows"][-1]["encode_s"] = encode.total
        dreaming = rss_mib()
        for timer in (unet, decode, encode):
            timer.restore()
        del pipe, unet, decode, encode
        backend.free()
        gc.collect()
        out["memory"][dtype] = {"baseline_mib": baseline, "loaded_mib": loaded,
                                "dreaming_mib": dreaming, "after_free_mib": rss_mib(),
                                "peak_mib": peak_mib(), "load_s": load_s}
        print(json.dumps({dtype: out["memory"][dtype]}), flush=True)
        del backend
        gc.collect()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, help="an SD 1.5 single file (default: random)")
    p.add_argument("--sizes", default="256x128,512x256")
    p.add_argument("--steps", default="1,2,3,4")
    p.add_argument("--dtypes", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = the daemon's")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.write_checkpoint:
        write_checkpoint(args.write_checkpoint)
        return
    made = None
    if args.checkpoint is None:
        made = Path(tempfile.mkdtemp()) / "sd15-random.safetensors"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--write-checkpoint", str(made)], check=True)
        print(f"random SD 1.5 written in {time.perf_counter() - t0:.0f} s "
              f"({made.stat().st_size / 2**30:.2f} GiB)", flush=True)
        args.checkpoint = made
    import torch
    print(f"{platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    try:
        result = run(args)
    finally:
        if made is not None:
            made.unlink(missing_ok=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
