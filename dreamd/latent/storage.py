"""A keyframe's latent stored beside its frame (`.safetensors`), so a restart reuses it.

The metadata records which codec (and divisor) made the latent: a latent from another
codec is a different space, so `reusable` refuses it and the keyframe is encoded again.
Files are written to a temporary name, fsynced and renamed, like frames.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from dreamd.latent.codec import LatentCodec
from dreamd.errors import CodecError

_TENSOR = "latent"
_META = "dreamd"  # safetensors metadata is str -> str: ours travels as one JSON value


def save_latent(path: str | Path, tensor: torch.Tensor, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({_TENSOR: tensor.detach().to("cpu").contiguous()}, str(tmp),
              metadata={_META: json.dumps(meta, sort_keys=True)})
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_latent(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {}).get(_META, "{}"))
            tensor = f.get_tensor(_TENSOR)
    except FileNotFoundError:
        raise
    except Exception as e:  # SafetensorError, a missing tensor, bad JSON
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CodecError(f"{path}: not a stored latent ({why})") from e
    return tensor, meta


def latent_file(data_dir: str | Path, image_sha256: str, codec: LatentCodec) -> Path:
    """Where the latent of the image with this content hash, in this codec's space, lives:
    named by what it is the latent of (the image's hash and the codec's identity: name,
    divisor, weights), so it can never stand for another image, whatever became of row
    ids. The interpolation worker reads it; an in-process diffusion backend writes its
    keyframes' latents here when the codec decodes them as they are."""
    space = hashlib.sha256(json.dumps(latent_meta(codec), sort_keys=True).encode())
    return Path(data_dir) / "latents" / f"{image_sha256}-{space.hexdigest()[:12]}.safetensors"


def latent_meta(codec: LatentCodec, **extra: Any) -> dict[str, Any]:
    """What `reusable` checks (codec name, divisor, weight files), plus what the caller adds
    (the image size, so a restarted decode can return frames at the size they had)."""
    meta = {"codec": codec.name, "divisor": float(getattr(codec, "divisor", 1.0))}
    weights = getattr(codec, "weights_id", None)
    if weights:
        meta["weights"] = weights
    return {**meta, **extra}


def reusable(meta: dict[str, Any], codec: LatentCodec) -> bool:
    """True when a stored latent was made by a codec of this name, at this divisor, and
    (when both say) from the same weight files: anything else is another latent space."""
    if meta.get("codec") != codec.name:
        return False
    try:
        if float(meta.get("divisor", 1.0)) != float(getattr(codec, "divisor", 1.0)):
            return False
    except (TypeError, ValueError):
        return False
    ours, theirs = getattr(codec, "weights_id", None), meta.get("weights")
    return not (ours and theirs and ours != theirs)
