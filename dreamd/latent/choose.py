"""Choosing the latent codec the interpolation worker uses, and running the weighted ones.

`choose_codec` looks at an explicit weight file, then ComfyUI's models dir, then falls
back to the embedded pixel codec. `ModelCodec` runs a loaded VAE or TAESD: fp16 on
CUDA; on the CPU whichever of fp32 and bf16 + channels_last it measures faster, as long
as bf16 stays within BF16_TOLERANCE of fp32 on the user's own weights.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from pathlib import Path

import torch

from dreamd.latent.codec import LatentCodec
from dreamd.errors import CodecError
from dreamd.latent.divisor import DivisorCodec
from dreamd.latent.weights import LoadedWeights, load_weights

log = logging.getLogger(__name__)

KINDS = ("auto", "taesd", "sd-vae", "pixel")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt")
# Mean absolute difference, on [0, 1] pixels, that bf16 may add to an fp32 decode: one 8-bit
# level, a tenth of what the VAEs themselves lose in a round trip. Measured (bench/RESULTS.md,
# "Latent codecs"): 0.2-0.3/255 at 512x256, 0.6/255 on the probe's random latent.
BF16_TOLERANCE = 1.0 / 255
_FAMILY = {"taesd": "taesd", "taesdxl": "taesd", "sd-vae": "sd-vae", "sdxl-vae": "sd-vae"}


class ModelCodec:
    """A LatentCodec around loaded weights; the module leaves the device on `release()`."""

    def __init__(self, weights: LoadedWeights, device: torch.device | str = "cpu",
                 precision: str = "auto") -> None:
        if precision not in PRECISIONS:
            raise CodecError(f"unknown codec precision {precision!r} (one of {', '.join(PRECISIONS)})")
        self.weights = weights
        self.name = weights.name
        self.device = torch.device(device)
        self.weights_id = "+".join(p.name for p in weights.sources)
        self._lock = threading.Lock()
        fp32 = weights.build().float()
        self.downscale: int = fp32.downscale
        self.latent_channels: int = fp32.latent_channels
        self._module: torch.nn.Module | None = None  # the device copy; the CPU probe keeps its winner
        self.dtype, self.channels_last, self.precision_reason = self._precision(fp32, precision)
        log.info("codec %s on %s: %s", self.name, self.device, self.precision_reason)

    # ------------------------------------------------------------ LatentCodec

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.downscale or w % self.downscale:
            raise ValueError(f"{self.name}: image size {w}x{h} is not a multiple of {self.downscale}")
        with self._lock, torch.inference_mode():
            return self._model().encode(self._input(images)).float().contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"{self.name}: latents must be (B, {self.latent_channels}, h, w), "
                             f"got {tuple(latents.shape)}")
        with self._lock, torch.inference_mode():
            return self._model().decode(self._input(latents)).float().clamp(0.0, 1.0).contiguous()

    def release(self) -> None:
        """Drop the device copy (the CPU master weights stay); the next call rebuilds it."""
        with self._lock:
            if self._module is None:
                return
            self._module = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        log.info("codec %s released its %s memory", self.name, self.device)

    # ------------------------------------------------------------ internals

    def _model(self) -> torch.nn.Module:
        if self._module is None:
            self._module = self._place(self.weights.build(), self.dtype, self.channels_last)
        return self._module

    def _place(self, module: torch.nn.Module, dtype: torch.dtype, channels_last: bool) -> torch.nn.Module:
        module = module.to(self.device, dtype)
        return module.to(memory_format=torch.channels_last) if channels_last else module

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _precision(self, fp32: torch.nn.Module, requested: str) -> tuple[torch.dtype, bool, str]:
        fixed = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if requested != "auto":
            return fixed[requested], requested == "bf16", f"{requested} as configured"
        if self.device.type == "cuda":
            if self.name == "sdxl-vae":
                # The SDXL VAE overflows in fp16 (NaN frames); bf16 has fp32's range.
                if torch.cuda.is_bf16_supported():
                    return torch.bfloat16, False, "bf16 on CUDA (SDXL VAE overflows fp16)"
                return torch.float32, False, "fp32 on CUDA (SDXL VAE overflows fp16, no bf16 here)"
            return torch.float16, False, "fp16 on CUDA"
        if self.device.type != "cpu":
            return torch.float32, False, f"fp32 on {self.device.type}"
        return self._probe_cpu(fp32)

    def _probe_cpu(self, fp32: torch.nn.Module) -> tuple[torch.dtype, bool, str]:
        """Time one small decode in fp32 and in bf16 + channels_last, and compare the pixels."""
        # Small, so the probe costs about a second: the SD VAE in fp32 is ~20x slower than TAESD.
        side = 16 if self.name.startswith("taesd") else 8
        z = torch.randn(1, self.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
        results, modules = {}, {}
        for dtype, cl in ((torch.float32, False), (torch.bfloat16, True)):
            module = fp32 if dtype == torch.float32 else self._place(self.weights.build(), dtype, cl)
            modules[dtype] = module
            x = z.to(dtype).contiguous(memory_format=torch.channels_last) if cl else z
            with torch.inference_mode():
                out = module.decode(x)  # the first call also builds oneDNN kernels: not timed
                best = float("inf")
                for _ in range(2):
                    t0 = time.perf_counter()
                    module.decode(x)
                    best = min(best, time.perf_counter() - t0)
            results[dtype] = (best, out.float())
        (t32, ref), (t16, out) = results[torch.float32], results[torch.bfloat16]
        err = (out - ref).abs().mean().item()
        timing = f"bf16 {t16 * 1e3:.0f} ms vs fp32 {t32 * 1e3:.0f} ms, bf16 error {err * 255:.2f}/255"
        if err <= BF16_TOLERANCE and t16 < 0.9 * t32:
            self._module = modules[torch.bfloat16]
            return torch.bfloat16, True, f"bf16 + channels_last on CPU ({timing})"
        self._module = fp32
        return torch.float32, False, f"fp32 on CPU ({timing})"

    def __repr__(self) -> str:
        return f"ModelCodec({self.name}, {self.device}, {self.dtype}, from {self.weights_id})"


# the reason's words when codec_device = cuda found no GPU (`dreamd doctor` warns on them)
NO_CUDA = "codec_device is cuda but CUDA has no GPU"


def resolve_device(device: str | None, gpu_index: int = 0) -> torch.device:
    """The configured GPU (`gpu_index`, system.gpu) when CUDA has it, else the CPU, for
    "auto" (None) and "cuda" alike; any other device named in full ("cpu", "cuda:2") wins."""
    if device and device != "cuda":
        return torch.device(device)
    if torch.cuda.is_available() and gpu_index < torch.cuda.device_count():
        return torch.device("cuda", gpu_index)
    return torch.device("cpu")


def choose_codec(kind: str = "auto", path: str | Path | None = None, models_dir: str | Path | None = None,
                 checkpoint: str | None = None, divisor: float = 1.0, device: str | None = None,
                 gpu_index: int = 0, precision: str = "auto",
                 variant: str = "auto") -> tuple[LatentCodec, str]:
    """The codec to interpolate with, and a sentence saying which one and why (logged).

    kind: "auto" takes the first that loads of: `path`; TAESD in `models_dir/vae_approx`;
    a VAE in `models_dir/vae`; `models_dir/checkpoints/<checkpoint>`'s VAE; the pixel codec.
    "taesd" and "sd-vae" take only their own family and raise CodecError when none loads;
    a weight file named explicitly (`path`) that does not load is always an error.
    """
    if kind not in KINDS:
        raise CodecError(f"unknown codec kind {kind!r} (one of {', '.join(KINDS)})")
    level = logging.INFO
    if kind == "pixel":
        codec, reason = _pixel(divisor, "pixel codec as configured")
    else:
        dev = resolve_device(device, gpu_index)
        codec, reason = _weights(kind, path, models_dir, checkpoint, divisor, dev, precision,
                                 variant)
        if device == "cuda" and dev.type != "cuda":
            # a driver gone after an update, a card moved: the dream goes on, on the CPU,
            # and the reason (the log, `dreamd doctor`) says why
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            reason = f"{reason}; {NO_CUDA} {gpu_index} here ({found} found): on the CPU"
            level = logging.WARNING
    log.log(level, "codec chosen: %s", reason)
    return codec, reason


def codec_for(cfg) -> tuple[LatentCodec, str]:
    """The codec a config asks for (`generation.codec*`, `comfyui.models_dir` and
    `checkpoint`, `system.gpu`): what the interpolation worker and `dreamd doctor` build."""
    g = cfg.generation
    return choose_codec(
        g.codec, path=g.codec_path or None, models_dir=cfg.comfyui.models_dir or None,
        checkpoint=cfg.comfyui.checkpoint, divisor=g.resolution_divisor,
        device=None if g.codec_device == "auto" else g.codec_device,
        gpu_index=cfg.system.gpu, precision=g.codec_precision, variant=g.codec_variant)


def _weights(kind: str, path: str | Path | None, models_dir: str | Path | None,
             checkpoint: str | None, divisor: float, dev: torch.device, precision: str,
             variant: str) -> tuple[LatentCodec, str]:
    family = None if kind == "auto" else kind
    if path:
        weights = load_weights(path, variant)
        if family and _FAMILY[weights.name] != family:
            raise CodecError(f"{path}: holds {weights.name} weights, but the codec is set to {kind}")
        return _model(weights, dev, precision, divisor, f"{weights.name} from {path} ({weights.layout})")
    looked: list[str] = []
    for candidate, why in _candidates(models_dir, checkpoint, family, looked):
        try:
            weights = load_weights(candidate, variant)
        except CodecError as e:
            log.warning("codec: skipping %s: %s", candidate, e)
            looked.append(f"{candidate} (unusable: {e})")
            continue
        if family and _FAMILY[weights.name] != family:
            looked.append(f"{candidate} (holds {weights.name})")
            continue
        return _model(weights, dev, precision, divisor, f"{weights.name} from {candidate} ({why})")
    where = "; ".join(looked) or "no models dir configured"
    if family:
        raise CodecError(f"codec {kind}: no usable weights (looked at: {where})")
    return _pixel(divisor, f"pixel codec: no VAE or TAESD weights found (looked at: {where})")


def _candidates(models_dir: str | Path | None, checkpoint: str | None, family: str | None,
                looked: list[str]):
    """(file, why) in the order `auto` tries them; `looked` collects the places that were empty."""
    if not models_dir:
        return
    root = Path(models_dir)
    if not (root / "vae_approx").is_dir() and (root / "models").is_dir():
        root = root / "models"  # the ComfyUI folder itself was given
    xl = "xl" in (checkpoint or "").lower()
    if family in (None, "taesd"):
        folder = root / "vae_approx"
        # One file of the pair is enough: the loader finds the other beside it.
        names = ["taesdxl_decoder", "taesd_decoder"] if xl else ["taesd_decoder", "taesdxl_decoder"]
        found = [f for n in names for f in _files(folder, n)]
        if not found:
            looked.append(f"{folder} (no taesd_decoder.*)")
        for f in found[:1] + found[1:]:
            yield f, "ComfyUI vae_approx"
    if family in (None, "sd-vae"):
        folder = root / "vae"
        found = sorted(_files(folder), key=lambda p: (("xl" in p.name.lower()) != xl, p.name.lower()))
        if not found:
            looked.append(f"{folder} (no weight files)")
        for f in found:
            yield f, "ComfyUI vae"
        if checkpoint:
            ckpt = root / "checkpoints" / checkpoint
            if ckpt.is_file():
                yield ckpt, "VAE inside the checkpoint"
            else:
                looked.append(f"{ckpt} (missing)")


def _files(folder: Path, stem: str | None = None) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES
                  and (stem is None or p.stem == stem))


def _model(weights: LoadedWeights, device: torch.device, precision: str, divisor: float,
           reason: str) -> tuple[LatentCodec, str]:
    codec: LatentCodec = ModelCodec(weights, device, precision)
    reason = f"{reason}, {codec.precision_reason}"
    return _divided(codec, divisor, reason)


def _pixel(divisor: float, reason: str) -> tuple[LatentCodec, str]:
    try:
        from dreamd.latent.pixel import PixelCodec  # lazy: written alongside, needs no weights
    except ImportError as e:
        raise CodecError(f"the pixel codec is not available ({e})") from e
    if float(divisor).is_integer():
        # Its own divisor averages whole pixel blocks: the right shrink when the latent is pixels.
        codec = PixelCodec(divisor=int(divisor))
        reason = reason if divisor == 1 else f"{reason}, at 1/{divisor:g} size"
        return codec, reason
    return _divided(PixelCodec(), divisor, reason)


def at_divisor(codec: LatentCodec, divisor: float) -> LatentCodec:
    """The same codec (same weights, device, precision) working at 1/divisor size, built
    the way `choose_codec` builds it for that divisor (the governor changes the size per
    batch; a latent's identity names its divisor, so sizes never mix)."""
    base = getattr(codec, "inner", codec)            # a DivisorCodec's own codec
    if base.name == "pixel":
        from dreamd.latent.pixel import PixelCodec

        if float(divisor).is_integer():
            return PixelCodec(divisor=int(divisor), device=base.device, dtype=base.dtype)
        return DivisorCodec(PixelCodec(device=base.device, dtype=base.dtype), divisor)
    return base if divisor == 1.0 else DivisorCodec(base, divisor)


def _divided(codec: LatentCodec, divisor: float, reason: str) -> tuple[LatentCodec, str]:
    if divisor != 1.0:
        codec = DivisorCodec(codec, divisor)
        reason = f"{reason}, at 1/{divisor:g} size"
    return codec, reason
