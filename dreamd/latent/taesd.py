"""TAESD / TAESDXL, the tiny autoencoder (about 1.2 M parameters per side), for the `taesd` codec.

Both halves are plain `nn.Sequential`s indexed exactly like `taesd_encoder.pth` and
`taesd_decoder.pth` (ComfyUI's `models/vae_approx/`), so those files load as they are.
Its latents already live in the scaled SD (or SDXL) latent space: no scaling factor.
"""

from __future__ import annotations

import torch
from torch import nn

WIDTH = 64  # the released models' channel count; tests build narrower ones


def _conv(n_in: int, n_out: int, **kwargs: object) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of the latents to about [-3, 3], the range the decoder was trained on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def make_encoder(width: int = WIDTH, latent_channels: int = 4) -> nn.Sequential:
    """[0, 1] images -> latents, 8x smaller."""
    w = width
    return nn.Sequential(
        _conv(3, w), Block(w, w),
        _conv(w, w, stride=2, bias=False), Block(w, w), Block(w, w), Block(w, w),
        _conv(w, w, stride=2, bias=False), Block(w, w), Block(w, w), Block(w, w),
        _conv(w, w, stride=2, bias=False), Block(w, w), Block(w, w), Block(w, w),
        _conv(w, latent_channels),
    )


def make_decoder(width: int = WIDTH, latent_channels: int = 4) -> nn.Sequential:
    """Latents -> images in about [0, 1] (not clamped here)."""
    w = width
    return nn.Sequential(
        Clamp(), _conv(latent_channels, w), nn.ReLU(),
        Block(w, w), Block(w, w), Block(w, w), nn.Upsample(scale_factor=2), _conv(w, w, bias=False),
        Block(w, w), Block(w, w), Block(w, w), nn.Upsample(scale_factor=2), _conv(w, w, bias=False),
        Block(w, w), Block(w, w), Block(w, w), nn.Upsample(scale_factor=2), _conv(w, w, bias=False),
        Block(w, w), _conv(w, 3),
    )


class TinyAutoencoder(nn.Module):
    """Both halves under the prefixes ComfyUI uses when it holds them together."""

    downscale = 8
    scaling_factor = 1.0

    def __init__(self, width: int = WIDTH, latent_channels: int = 4) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.taesd_encoder = make_encoder(width, latent_channels)
        self.taesd_decoder = make_decoder(width, latent_channels)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.taesd_encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.taesd_decoder(latents).clamp(0.0, 1.0)


def shape_from_state_dict(sd: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(width, latent_channels) from combined-layout weights (KeyError names a missing anchor)."""
    width = sd["taesd_encoder.0.weight"].shape[0]
    latent_channels = sd["taesd_decoder.1.weight"].shape[1]
    return width, latent_channels
