"""The Stable Diffusion VAE (AutoencoderKL), in our own torch code, for the `sd-vae` codec.

Module names follow the original CompVis/ldm layout (`encoder.down.0.block.1.conv1`…),
the layout of full checkpoints and of most standalone VAE files; `weights.py` converts
the diffusers layout to it. SD 1.x, 2.x and SDXL share this architecture and differ
only in the latent scaling factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SD_SCALING = 0.18215
SDXL_SCALING = 0.13025

# GroupNorm's group count is not stored in any weight file: every SD-family VAE uses 32.
GROUPS = 32


@dataclass(frozen=True)
class KLConfig:
    """Channel sizes; the defaults are the real SD VAE (83 M parameters)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (the VAE's only attention, mid-block)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # (B, 1, HW, C): one head; SDPA picks a fused kernel and never builds HW x HW in fp32 by hand.
        q, k, v = (t(n).reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right and bottom only), as the weights were trained with.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(c, c)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution: `block` (ResnetBlocks) then an optional `downsample`/`upsample`."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, resample: nn.Module | None, up: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(n_blocks))
        self._resample_name = "upsample" if up else "downsample"
        if resample is not None:
            self.add_module(self._resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self._resample_name, None)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: KLConfig) -> None:
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_prev = cfg.ch
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            self.down.append(_Level(c_prev, c, cfg.num_res_blocks, None if last else Downsample(c), up=False))
            c_prev = c
        self.mid = _Mid(c_prev)
        self.norm_out = _norm(c_prev)
        self.conv_out = nn.Conv2d(c_prev, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: KLConfig) -> None:
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, chans[-1], 3, padding=1)
        self.mid = _Mid(chans[-1])
        # `up[i]` is resolution i, so up[-1] runs first: the ldm index order the files use.
        levels: list[nn.Module] = []
        c_prev = chans[-1]
        for i in reversed(range(len(chans))):
            c = chans[i]
            levels.insert(0, _Level(c_prev, c, cfg.num_res_blocks + 1, Upsample(c) if i else None, up=True))
            c_prev = c
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(chans[0])
        self.conv_out = nn.Conv2d(chans[0], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class AutoencoderKL(nn.Module):
    """encode: images in [0, 1] -> scaled latent mean; decode: scaled latents -> images in [0, 1]."""

    downscale = 8

    def __init__(self, cfg: KLConfig = KLConfig(), scaling_factor: float = SD_SCALING) -> None:
        super().__init__()
        self.cfg = cfg
        self.scaling_factor = scaling_factor
        self.downscale = 2 ** (len(cfg.ch_mult) - 1)
        self.latent_channels = cfg.z_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        moments = self.quant_conv(self.encoder(images * 2.0 - 1.0))
        # The mean half of (mean, logvar): deterministic, so a keyframe always maps to one latent.
        mean = moments[:, : self.cfg.z_channels]
        return mean * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.decoder(self.post_quant_conv(latents / self.scaling_factor))
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> KLConfig:
    """Channel sizes read off ldm-layout weight shapes (KeyError names the missing anchor key)."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
    mult = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels)
    n_blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    z = sd["post_quant_conv.weight"].shape[0]
    return KLConfig(ch=ch, ch_mult=mult, num_res_blocks=n_blocks, z_channels=z,
                    in_channels=sd["encoder.conv_in.weight"].shape[1])
