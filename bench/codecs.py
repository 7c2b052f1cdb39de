"""Latent codec speed and bf16 accuracy on this machine (the codecs live in dreamd/latent/).

    .venv/bin/python bench/codecs.py                     # speed: pixel, taesd, sd-vae
    .venv/bin/python bench/codecs.py --accuracy          # + bf16 vs fp32 with trained weights

Speed uses full-size models with random weights, saved in their real layouts and loaded
through choose_codec (speed does not depend on the values). Accuracy needs weights that
are not random: it trains TAESD and the SD VAE briefly, distilling onto a fixed latent
(the 8x8 block mean of the image), the way TAESD was distilled from the SD VAE's latents.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamd.latent import autoencoder_kl as kl  # noqa: E402
from dreamd.latent import taesd  # noqa: E402
from dreamd.latent.choose import choose_codec  # noqa: E402

PRECISIONS = {"fp32": "fp32", "bf16+cl": "bf16"}


# ---------------------------------------------------------------- inputs and files

def procedural_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Keyframe-like images: the procedural dreamer's seeds when present, else sinusoids."""
    try:
        from dreamd.backends.procedural import DEFAULT_PROMPT, look_for, paint_seed

        look = look_for(DEFAULT_PROMPT)
        arrays = [torch.from_numpy(paint_seed(look, seed + i, w, h)) for i in range(n)]
        return torch.stack(arrays).permute(0, 3, 1, 2).float().clamp(0, 1).contiguous()
    except ImportError:
        return sinusoids(n, h, w, torch.Generator().manual_seed(seed))


def sinusoids(n: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    y = torch.linspace(0, 1, h).view(1, 1, h, 1)
    x = torch.linspace(0, 1, w).view(1, 1, 1, w)
    out = torch.zeros(n, 3, h, w)
    for _ in range(3):
        f = torch.rand(n, 3, 1, 1, generator=g) * 4 + 0.5
        phase = torch.rand(n, 3, 1, 1, generator=g) * 6.28
        d = torch.rand(n, 1, 1, 1, generator=g) * 6.28
        out += torch.sin(f * (x * torch.cos(d) + y * torch.sin(d)) * 6.28 + phase)
    out = torch.sigmoid(out)
    for _ in range(2):  # hard edges, the hard case for an 8x autoencoder
        cx, cy, r = torch.rand(3, n, 1, 1, 1, generator=g)
        disc = (((x - cx) ** 2 + (y - cy) ** 2) < (r * 0.3) ** 2).float()
        out = out * (1 - disc) + torch.rand(n, 3, 1, 1, generator=g) * disc
    return out


def save_files(folder: Path, tiny: taesd.TinyAutoencoder, vae: kl.AutoencoderKL) -> tuple[Path, Path]:
    """TAESD as ComfyUI's vae_approx pair, the SD VAE as a standalone ldm .safetensors."""
    from safetensors.torch import save_file

    sd = tiny.state_dict()
    for half in ("encoder", "decoder"):
        prefix = f"taesd_{half}."
        torch.save({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)},
                   folder / f"taesd_{half}.pth")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / "vae.safetensors"))
    return folder / "taesd_decoder.pth", folder / "vae.safetensors"


# ---------------------------------------------------------------- speed

def timed(fn, reps: int) -> float:
    fn()  # warm-up: oneDNN builds its kernels on the first call of a shape
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(kind: str, path: Path | None, precision: str, divisor: float, h: int, w: int,
          batch: int, reps: int) -> dict:
    codec, reason = choose_codec(kind, path=path, divisor=divisor, device="cpu", precision=precision)
    images = procedural_images(batch, h, w)
    z = codec.encode(images)
    enc = timed(lambda: codec.encode(images[:1]), reps)
    dec = timed(lambda: codec.decode(z), reps) / batch
    return {"codec": codec.name, "precision": precision if kind != "pixel" else "fp32",
            "divisor": divisor, "latent": "x".join(map(str, z.shape[1:])), "enc_ms": enc * 1e3,
            "dec_ms": dec * 1e3, "fps": 1.0 / dec, "reason": reason}


def run_speed(args, folder: Path) -> list[dict]:
    torch.manual_seed(0)
    taesd_path, vae_path = save_files(folder, taesd.TinyAutoencoder(), kl.AutoencoderKL())
    rows = []
    for divisor in (1.0, 2.0):
        rows.append(speed("pixel", None, "auto", divisor, args.height, args.width, args.batch, args.reps))
        for precision in args.precisions:
            rows.append(speed("taesd", taesd_path, precision, divisor, args.height, args.width,
                              args.batch, args.reps))
        for precision in args.precisions:
            rows.append(speed("sd-vae", vae_path, precision, divisor, args.height, args.width,
                              args.batch, 1 if precision == "fp32" else args.vae_reps))
        for row in rows[-1 - 2 * len(args.precisions):]:
            print(f"  {row['codec']:7} {row['precision']:5} /{row['divisor']:g}: encode {row['enc_ms']:8.1f} ms"
                  f"  decode {row['dec_ms']:8.1f} ms/frame  {row['fps']:6.2f} frames/s", flush=True)
    auto_taesd = choose_codec("taesd", path=taesd_path, device="cpu")[1]
    auto_vae = choose_codec("sd-vae", path=vae_path, device="cpu")[1]
    print(f"  auto picks: {auto_taesd}\n  auto picks: {auto_vae}")
    return rows


# ---------------------------------------------------------------- accuracy

def raw_decode(model, z):
    if isinstance(model, taesd.TinyAutoencoder):
        return model.taesd_decoder(z)
    return (model.decoder(model.post_quant_conv(z / model.scaling_factor)) + 1) / 2


def target_latent(x: torch.Tensor) -> torch.Tensor:
    """A fixed, image-like latent: 8x8 block means (and their grey), at about unit scale."""
    p = F.avg_pool2d(x, 8) * 2 - 1
    return torch.cat([p, p.mean(1, keepdim=True)], 1) * 2


def train(model, steps: int, batch: int, size: int, lr: float, label: str):
    opt = torch.optim.Adam(model.parameters(), lr)
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for step in range(steps):
        x = sinusoids(batch, size, size, g)
        target = target_latent(x)
        loss = (raw_decode(model, target) - x).abs().mean() + (model.encode(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  train {label}: step {step} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return model.eval().requires_grad_(False)


def error(model, h: int, w: int) -> dict:
    images = torch.cat([procedural_images(2, h, w, seed=100), sinusoids(2, h, w, torch.Generator().manual_seed(7))])
    low = copy.deepcopy(model).to(torch.bfloat16).to(memory_format=torch.channels_last)
    cl = lambda t: t.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)  # noqa: E731
    with torch.inference_mode():
        z = model.encode(images)
        z16 = low.encode(cl(images)).float()
        out = model.decode(z)
        out16 = low.decode(cl(z)).float()
    d = (out16 - out).abs()
    return {"latent_rel": ((z16 - z).abs().mean() / z.abs().mean()).item(),
            "mean": d.mean().item(), "p99": torch.quantile(d.flatten()[::7], 0.99).item(),
            "max": d.max().item(), "psnr": (10 * torch.log10(1 / (d ** 2).mean())).item(),
            "recon": (out - images).abs().mean().item()}


def run_accuracy(args) -> None:
    torch.manual_seed(0)
    # The SD VAE is 70x TAESD's size: fewer, smaller steps, and a gentler rate for its depth.
    for label, model, steps, size, lr in (("taesd", taesd.TinyAutoencoder(), args.taesd_steps, 48, 1e-3),
                                          ("sd-vae", kl.AutoencoderKL(), args.vae_steps, 32, 3e-4)):
        model = train(model, steps, 4, size, lr, label)
        e = error(model, args.height, args.width)
        print(f"  {label} bf16+cl vs fp32 at {args.width}x{args.height}: decode mean {e['mean'] * 255:.3f}/255, "
              f"p99 {e['p99'] * 255:.2f}/255, max {e['max'] * 255:.1f}/255, PSNR {e['psnr']:.1f} dB; "
              f"encode latent rel. error {e['latent_rel'] * 100:.2f}%; "
              f"(fp32 reconstruction L1 {e['recon'] * 255:.1f}/255 after {steps} steps)", flush=True)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}, load average {load:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2, help="frames per decode call")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vae-reps", type=int, default=2, help="timed runs of the SD VAE in bf16")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--accuracy", action="store_true", help="also train briefly and measure bf16 error")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--taesd-steps", type=int, default=400)
    ap.add_argument("--vae-steps", type=int, default=150)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {' '.join(sys.argv)}\n# {machine()}", flush=True)
    if not args.no_speed:
        with tempfile.TemporaryDirectory() as folder:
            run_speed(args, Path(folder))
    if args.accuracy:
        run_accuracy(args)
    print(f"# done, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
