"""Choosing the embedder the memory works with.

`choose_embedder` takes open_clip when its weights are on this machine (a file, or a
tag already in open_clip's cache) and otherwise the descriptor, which needs no
weights; it never starts a download unless `cache.allow_downloads` says so. Vectors
carry the embedder's `model_id`; vectors of different models are never compared,
and so every threshold is read on the scale of the model in use (`scale.py`).
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

import numpy as np
from PIL import Image

log = logging.getLogger("dreamd.memory")


class Embedder(Protocol):
    model_id: str           # stored with every vector: "descriptor-hsv-dct-v1", "open_clip/…"
    dim: int

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """(len(images), dim) float32, each row of unit norm."""
        ...

    def close(self) -> None:
        ...


def choose_embedder(cache) -> tuple[Embedder, str]:
    """The embedder for the `[cache]` config, and a sentence saying which and why."""
    from dreamd.memory.descriptor import DescriptorEmbedder

    if cache.embedder == "descriptor":
        return DescriptorEmbedder(), "descriptor (colour + structure) as configured"
    from dreamd.memory.clip import EmbedderError, load_open_clip
    try:
        emb = load_open_clip(cache.clip_model, cache.clip_pretrained,
                             allow_downloads=cache.allow_downloads)
        return emb, f"open_clip {emb.model_id}"
    except EmbedderError as exc:
        if cache.embedder == "open_clip":
            log.error("cache.embedder = open_clip, but %s; using the descriptor instead", exc)
        return DescriptorEmbedder(), f"descriptor (colour + structure): {exc}"


class Embedders:
    """The embedder, built on first use in the worker's thread (loading CLIP weights
    takes seconds) and shared with the planner, which scores seed images with it."""

    def __init__(self, cache) -> None:
        self.cache = cache
        self._embedder: Embedder | None = None
        self._lock = threading.Lock()
        self.reason = ""

    def get(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                self._embedder, self.reason = choose_embedder(self.cache)
                log.info("embedder: %s", self.reason)
            return self._embedder

    def loaded(self) -> Embedder | None:
        """The embedder if it is built (never builds it: the planner must not wait)."""
        return self._embedder

    def release(self) -> None:
        with self._lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None
