"""PIL images <-> image tensors, for the interpolation worker at the codec's edges.

Tensors follow dreamd.latent.codec: (B, 3, H, W), RGB, float in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_tensor(images: list[Image.Image] | Image.Image, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One image or a list of same-sized images -> (B, 3, H, W) in [0, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    if not images:
        raise ValueError("to_tensor: no images")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ValueError(f"to_tensor: images differ in size {sorted(sizes)}; resize them first")
    batch = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    # uint8 crosses to the device (4x less to copy than float), then scales there.
    t = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)
    return t.to(dtype).div_(255.0).contiguous()


def to_images(tensor: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) or (3, H, W) in [0, 1] -> RGB images; values are clamped, then rounded."""
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 4 or tensor.shape[1] != 3:
        raise ValueError(f"to_images: expected (B, 3, H, W), got {tuple(tensor.shape)}")
    data = (tensor.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
            .permute(0, 2, 3, 1).cpu().numpy())
    return [Image.fromarray(frame, "RGB") for frame in data]


def resize_batch(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W); antialiased when shrinking so detail does not alias."""
    if tuple(tensor.shape[-2:]) == (height, width):
        return tensor
    shrinking = height < tensor.shape[-2] or width < tensor.shape[-1]
    dtype = tensor.dtype
    # Half precision interpolation is not implemented on every CPU build; compute in float32.
    work = tensor.float() if dtype in (torch.float16, torch.bfloat16) else tensor
    out = F.interpolate(work, size=(height, width), mode="bilinear", align_corners=False,
                        antialias=shrinking)
    return out.to(dtype)
