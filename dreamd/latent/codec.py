"""The latent codec interface: images in, latents out, and back.

Implementations live beside it in `dreamd/latent/`: `pixel` (embedded, no weights), and the
real VAEs (`sd-vae`, `taesd`). The interpolation worker encodes two keyframes,
slerps between their latents (`dreamd.latent.slerp`), and decodes all in-betweens
as one batch.

Images cross this interface as float tensors shaped (B, 3, H, W), RGB, values in
[0, 1], on the codec's device. Latents are whatever the codec defines, shaped
(B, C, h, w); slerp treats each latent as one flat vector.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LatentCodec(Protocol):
    name: str                   # "pixel" | "taesd" | "taesdxl" | "sd-vae" | "sdxl-vae"
    device: torch.device
    dtype: torch.dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, h, w) latents. Deterministic (the latent mean)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) in [0, 1], clamped."""
        ...

    def release(self) -> None:
        """Free device memory (the guard asks when a game starts); reload lazily on next use."""
        ...
