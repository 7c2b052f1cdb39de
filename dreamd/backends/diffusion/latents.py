"""Keyframe latents kept for the next img2img and for the in-betweens.

The backend's output latent (scaled, the UNet's own space) is stored by the keyframe's PNG
sha256 under <data_dir>/latents/, beside the codec's latents and pruned by the same rule
(retention keeps a file while its keyframe is the chain's head or a pending batch's end):

    <sha>-diffusion-<model>.safetensors   the next keyframe's img2img input after a restart
    latent_file(<sha>, codec)             the same tensor under the interpolation codec's
                                          own name, when that codec decodes this latent
                                          space (shares_space): the in-betweens then start
                                          from the keyframe's true latent, no VAE encode
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from dreamd.errors import CodecError
from dreamd.latent.storage import latent_file, latent_meta, load_latent, save_latent

log = logging.getLogger("dreamd.diffusion")

# The interpolation codecs that decode the UNet's latents as they are: TAESD was trained
# on the SD VAE's scaled latents (TAESDXL on SDXL's); the SD VAE when it is the model's own
# (the same weight file).
TAESD_OF = {"sd15": "taesd", "sd21": "taesd", "sdxl": "taesdxl"}
VAE_OF = {"sd15": "sd-vae", "sd21": "sd-vae", "sdxl": "sdxl-vae"}


def model_key(model_id: str, fingerprint: tuple, family: str) -> str:
    """Names the latent space of one model's VAE (a replaced file is another space)."""
    text = json.dumps([model_id, list(fingerprint), family], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def feedback_path(data_dir: Path, sha256: str, key: str) -> Path:
    return Path(data_dir) / "latents" / f"{sha256}-diffusion-{key}.safetensors"


def save_feedback(data_dir: Path, sha256: str, key: str, latent, width: int,
                  height: int) -> Path:
    path = feedback_path(data_dir, sha256, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_latent(path, latent, {"codec": "diffusion", "model": key, "image_sha256": sha256,
                               "width": width, "height": height})
    return path


def load_feedback(data_dir: Path, sha256: str, key: str):
    """The stored latent of keyframe `sha256` from this model, or None."""
    path = feedback_path(data_dir, sha256, key)
    if not path.exists():
        return None
    try:
        latent, meta = load_latent(path)
    except (CodecError, OSError) as exc:
        log.warning("ignoring stored latent %s: %s", path, exc)
        return None
    if meta.get("model") != key or meta.get("image_sha256") != sha256:
        return None
    return latent


def shares_space(codec: Any, family: str, model_files: tuple[Path, ...]) -> bool:
    """True when `codec` (at divisor 1) decodes this model's latents as they are."""
    if codec is None or float(getattr(codec, "divisor", 1.0)) != 1.0:
        return False
    if codec.name == TAESD_OF.get(family):
        return True
    if codec.name == VAE_OF.get(family):
        weights = getattr(codec, "weights", None)
        sources = {Path(p).resolve() for p in getattr(weights, "sources", ())}
        return any(Path(f).resolve() in sources for f in model_files)
    return False


def save_for_codec(data_dir: Path, sha256: str, codec: Any, latent, width: int,
                   height: int) -> Path:
    """The keyframe's latent where the interpolation worker looks for it first."""
    path = latent_file(data_dir, sha256, codec)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_latent(path, latent, latent_meta(codec, width=width, height=height,
                                          image_sha256=sha256, source="diffusion"))
    return path
