"""Helpers for the codec tests: small random models of the real architectures, saved in
the layouts users have on disk (diffusers builds the reference models; it is test-only)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

# Small but of the real layout: 4 levels (8x downscale), 2 ResNet blocks per level, and
# channel counts that are multiples of the 32 norm groups every SD VAE uses.
SMALL_KL = (32, 32, 64, 64)
SMALL_TAESD = 16


def diffusers_kl(channels=SMALL_KL, seed: int = 0, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(channels)
    model = AutoencoderKL(block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * n,
                          up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=2,
                          norm_num_groups=32, latent_channels=latent_channels)
    _perturb(model)
    return model.eval()


def diffusers_tiny(width: int = SMALL_TAESD, seed: int = 0):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(encoder_block_out_channels=(width,) * 4, decoder_block_out_channels=(width,) * 4)
    _perturb(model)
    return model.eval()


def _perturb(model: torch.nn.Module) -> None:
    # Default init leaves GroupNorm at 1/0 and outputs nearly flat; noise makes every weight count.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def old_attention_names(sd: dict[str, torch.Tensor], conv_shaped: bool = False) -> dict[str, torch.Tensor]:
    """diffusers < 0.14 names (query/key/value/proj_attn), optionally as 1x1 conv weights."""
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn", "group_norm": "group_norm"}
    out = {}
    for k, v in sd.items():
        if ".attentions.0." in k:
            head, tail = k.split(".attentions.0.")
            part, kind = tail.rsplit(".", 1)
            k = f"{head}.attentions.0.{names[part]}.{kind}"
            if conv_shaped and kind == "weight" and v.ndim == 2:
                v = v[:, :, None, None].contiguous()
        out[k] = v
    return out


def taesd_halves(tiny) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """diffusers AutoencoderTiny -> the original taesd_encoder / taesd_decoder keys.

    The original decoder's Sequential starts with a parameterless Clamp, so its indices are
    one more than diffusers' `decoder.layers` indices."""
    enc, dec = {}, {}
    for k, v in tensors(tiny).items():
        if k.startswith("encoder.layers."):
            enc[k[len("encoder.layers."):]] = v
        elif k.startswith("decoder.layers."):
            index, rest = k[len("decoder.layers."):].split(".", 1)
            dec[f"{int(index) + 1}.{rest}"] = v
    return enc, dec


def save(path: Path, sd: dict[str, torch.Tensor], wrap: dict | None = None) -> Path:
    """By suffix: .safetensors, or torch.save (optionally wrapped, like a Lightning .ckpt)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({**wrap, "state_dict": sd} if wrap is not None else sd, path)
    return path


def save_taesd_pair(folder: Path, tiny, prefix: str = "taesd", suffix: str = ".pth") -> tuple[Path, Path]:
    enc, dec = taesd_halves(tiny)
    return (save(folder / f"{prefix}_encoder{suffix}", enc), save(folder / f"{prefix}_decoder{suffix}", dec))


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


class CodeRunner:
    """Pickles as a call to os.system: what a malicious .ckpt carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
