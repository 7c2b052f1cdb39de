"""The embedded latent codec: pixels are the latent. No weights, works everywhere.

Latent = image mapped to [-1, 1] (optionally box-downsampled by `divisor`), so slerp
between two keyframes is a smooth, norm-preserving blend; decode upsamples bilinearly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dreamd.errors import CodecError


class PixelCodec:
    """LatentCodec whose latent is the image itself, centred on zero: (B, 3, H/d, W/d)."""

    name = "pixel"

    def __init__(self, divisor: int = 1, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(divisor, int) or divisor < 1:
            raise CodecError(f"pixel codec: divisor must be a positive integer, got {divisor!r}")
        if not dtype.is_floating_point:
            raise CodecError(f"pixel codec: dtype must be floating point, got {dtype}")
        self.divisor = divisor
        self.device = torch.device(device)
        self.dtype = dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, H/divisor, W/divisor) in [-1, 1]."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"pixel codec: expected (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.divisor or w % self.divisor:
            raise ValueError(f"pixel codec: {w}x{h} is not divisible by divisor {self.divisor}")
        x = images.to(self.device, self.dtype)
        if self.divisor > 1:
            # Area averaging: the mean of each block, so the latent is the image at rest, not aliased.
            x = F.avg_pool2d(x.float(), self.divisor).to(self.dtype)
        return x * 2 - 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) -> (B, 3, h*divisor, w*divisor) in [0, 1], clamped."""
        if latents.dim() != 4 or latents.shape[1] != 3:
            raise ValueError(f"pixel codec: expected (B, 3, h, w) latents, got {tuple(latents.shape)}")
        x = latents.to(self.device, self.dtype)
        if self.divisor > 1:
            h, w = x.shape[-2:]
            x = F.interpolate(x.float(), size=(h * self.divisor, w * self.divisor), mode="bilinear",
                              align_corners=False).to(self.dtype)
        return ((x + 1) * 0.5).clamp_(0, 1)

    def release(self) -> None:
        """Nothing to free: the pixel codec holds no weights or device memory."""
