"""The resolution divisor: interpolate at 1/divisor size, upscale after decoding.

Wraps any LatentCodec: encode shrinks the images first (to a size the codec accepts),
decode grows the result back to the size the images had. Half size makes every
in-between about 4x cheaper; the upscale is bicubic, so the frames are softer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dreamd.latent.codec import LatentCodec


class DivisorCodec:
    """A LatentCodec that works at 1/divisor of the image size."""

    def __init__(self, inner: LatentCodec, divisor: float) -> None:
        if not divisor >= 1.0:
            raise ValueError(f"resolution divisor must be >= 1, got {divisor}")
        self.inner = inner
        self.divisor = float(divisor)
        self.name = inner.name
        # The codec's own spatial factor (8 for the VAEs): the small size must be a multiple.
        self.multiple = int(getattr(inner, "downscale", 1))
        self._full_size: dict[tuple[int, int], tuple[int, int]] = {}

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def weights_id(self) -> str | None:
        return getattr(self.inner, "weights_id", None)

    def small_size(self, height: int, width: int) -> tuple[int, int]:
        m = self.multiple
        return (max(m, round(height / self.divisor / m) * m), max(m, round(width / self.divisor / m) * m))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        small = self.small_size(h, w)
        if small != (h, w):
            # antialias: a plain bilinear shrink by 2 aliases fine detail into moiré.
            images = F.interpolate(images.float(), size=small, mode="bilinear", antialias=True,
                                   align_corners=False).clamp(0.0, 1.0)
        latents = self.inner.encode(images)
        # Remembered per latent size, so decode knows the size to return without being told.
        self._full_size[tuple(latents.shape[-2:])] = (h, w)
        return latents

    def decode(self, latents: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """`size` (H, W) wins; else the size encode saw for latents of this shape; else x divisor."""
        images = self.inner.decode(latents)
        h, w = images.shape[-2:]
        target = size or self._full_size.get(tuple(latents.shape[-2:])) or (
            round(h * self.divisor), round(w * self.divisor))
        if tuple(target) == (h, w):
            return images
        out = F.interpolate(images.float(), size=tuple(target), mode="bicubic", align_corners=False)
        return out.clamp(0.0, 1.0)

    def release(self) -> None:
        self.inner.release()

    def __repr__(self) -> str:
        return f"DivisorCodec({self.inner!r}, divisor={self.divisor:g})"
