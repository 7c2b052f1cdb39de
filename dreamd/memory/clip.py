"""The open_clip embedder, from weights already on this machine.

`pretrained` is a weights file, or a tag (`laion2b_s34b_b79k`) that is looked up in
open_clip's caches (Hugging Face hub cache, ~/.cache/clip) without touching the
network: HF_HUB_OFFLINE is set around every open_clip call unless downloads are
allowed. When the file is not there, EmbedderError says which file is needed and
where to put it, and the caller falls back to the descriptor. `model` is an
open_clip architecture name, or a path to a model config JSON (as in open_clip's
model_configs/), registered under its file stem.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from dreamd.errors import EmbedderError

log = logging.getLogger("dreamd.memory")
HF_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
BATCH = 8
_env_lock = threading.Lock()


@contextlib.contextmanager
def offline(allow_downloads: bool):
    """HF_HUB_OFFLINE=1 around open_clip calls, unless the user allowed downloads."""
    if allow_downloads:
        yield
        return
    with _env_lock:
        before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
        try:
            yield
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def file_fingerprint(path: Path) -> str:
    """Size plus a hash of the first and last MiB: tells weight files apart in a moment."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:12]


def register_model(model: str) -> str:
    """An architecture name open_clip knows; a JSON config path is registered first."""
    import open_clip

    p = Path(model).expanduser()
    if p.suffix == ".json":
        if not p.is_file():
            raise EmbedderError(f"cache.clip_model {model}: no such model config file")
        open_clip.add_model_config(p)
        return p.stem
    name = model.replace("/", "-")
    if name not in open_clip.list_models():
        raise EmbedderError(f"cache.clip_model {model!r} is not an open_clip architecture "
                              f"(e.g. ViT-B-32) nor a model config .json file")
    return name


def cached_weights(name: str, tag: str) -> tuple[Path | None, dict, str]:
    """(the cached file for a pretrained tag or None, the tag's config, where it belongs)."""
    from open_clip import pretrained as ocp

    cfg = ocp.get_pretrained_cfg(name, tag)
    if not cfg:
        known = ", ".join(ocp.list_pretrained_tags_by_model(name)) or "none"
        raise EmbedderError(f"cache.clip_pretrained {tag!r} is neither a weights file nor an "
                              f"open_clip tag of {name} (tags: {known})")
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        if hub.endswith("/"):     # a repo: open_clip's default file names
            repo, names = hub.rstrip("/"), list(HF_WEIGHT_NAMES)
        else:                     # "org/repo/file"
            repo, filename = os.path.split(hub)
            names = [filename]
        for n in names:
            found = try_to_load_from_cache(repo, n)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found), cfg, ""
        return None, cfg, f"https://huggingface.co/{repo}/resolve/main/{names[0]}"
    url = cfg.get("url", "")
    target = Path("~/.cache/clip").expanduser() / os.path.basename(url)
    return (target if target.is_file() else None), cfg, url


def load_open_clip(model: str, pretrained: str, *, allow_downloads: bool = False,
                   device: str = "cpu") -> "OpenClipEmbedder":
    """Build the embedder, or raise EmbedderError saying what is missing."""
    try:
        import open_clip  # noqa: F401
    except ImportError as exc:
        raise EmbedderError(f"open_clip is not installed ({exc})") from exc
    name = register_model(model)
    if not pretrained:
        raise EmbedderError("cache.clip_pretrained is empty: set a weights file or a tag")
    path = Path(pretrained).expanduser()
    extra: dict = {}
    if path.is_file():
        source, model_id = str(path), f"open_clip/{name}/{path.name}@{file_fingerprint(path)}"
    else:
        if os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors")):
            raise EmbedderError(f"cache.clip_pretrained {pretrained}: no such file")
        found, cfg, where = cached_weights(name, pretrained)
        model_id = f"open_clip/{name}/{pretrained}"
        # the tag's own preprocessing and activation, which a bare file path would lose
        extra = {"force_quick_gelu": bool(cfg.get("quick_gelu", False)),
                 "force_preprocess_cfg": {k: cfg[k] for k in ("mean", "std", "interpolation",
                                                              "resize_mode") if k in cfg}}
        if found is not None:
            source = str(found)
        elif allow_downloads:
            source, extra = pretrained, {}
        else:
            raise EmbedderError(
                f"open_clip {name} {pretrained!r} needs its weights, which are not on this "
                f"machine: download {where} yourself and set cache.clip_pretrained to the "
                f"file's path (or put it in the Hugging Face cache, or set "
                f"cache.allow_downloads = true)")
    try:
        import open_clip
        import torch
        with offline(allow_downloads):
            net, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=source, device=device, **extra)
    except EmbedderError:
        raise
    except Exception as exc:   # a corrupt or mismatched file: fall back, and say why
        raise EmbedderError(f"open_clip {name} from {source}: {type(exc).__name__}: "
                              f"{exc}") from exc
    net.eval()
    dim = int(getattr(net.visual, "output_dim", 0) or 0)
    if not dim:
        with torch.inference_mode():
            dim = int(net.encode_image(torch.zeros(1, 3, *_image_size(net))).shape[-1])
    return OpenClipEmbedder(net, preprocess, model_id, dim, device)


def _image_size(net) -> tuple[int, int]:
    size = getattr(net.visual, "image_size", 224)
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


class OpenClipEmbedder:
    """CLIP image embeddings, L2-normalised, float32."""

    def __init__(self, net, preprocess, model_id: str, dim: int, device: str) -> None:
        self.net, self.preprocess = net, preprocess
        self.model_id, self.dim, self.device = model_id, dim, device
        self._lock = threading.Lock()

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        out = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(images), BATCH):
                batch = torch.stack([self.preprocess(im.convert("RGB"))
                                     for im in images[i:i + BATCH]]).to(self.device)
                out.append(self.net.encode_image(batch, normalize=True).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(out).astype(np.float32)

    def close(self) -> None:
        with self._lock:
            self.net = None
