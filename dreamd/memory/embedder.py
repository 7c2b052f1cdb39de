"""Choosing the embedder the memory works with, and where its similarities fall.

`choose_embedder` takes open_clip when its weights are on this machine (a file, or a
tag already in open_clip's cache) and otherwise the descriptor, which needs no
weights; it never starts a download unless `cache.allow_downloads` says so. Vectors
carry the embedder's `model_id`; vectors of different models are never compared,
and so every threshold is read on the scale of the model in use (`Scale`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Scale:
    """Where one embedder's cosine similarities fall, as the thresholds the config
    leaves at 0 ("auto"). Measured for the descriptor on the procedural chain
    (bench/RESULTS.md, "Aesthetic memory"); for CLIP the usual image-image ranges."""

    admission: float        # a frame joins the cache when its nearest member is below this
    collapse: float         # the last W keyframes' mean pairwise similarity that means collapse
    band_min: float         # an injected cached frame is at least this similar (related)…
    band_max: float         # …and at most this similar (different) to the current keyframe


DESCRIPTOR_SCALE = Scale(admission=0.55, collapse=0.6, band_min=0.25, band_max=0.55)
OPEN_CLIP_SCALE = Scale(admission=0.88, collapse=0.92, band_min=0.6, band_max=0.85)


def scale_for(model_id: str, cache) -> Scale:
    """The thresholds for vectors of `model_id`: the config's where set, else the model's."""
    base = OPEN_CLIP_SCALE if model_id.startswith("open_clip/") else DESCRIPTOR_SCALE
    return Scale(admission=cache.similarity_threshold or base.admission,
                 collapse=cache.collapse_threshold or base.collapse,
                 band_min=cache.band_min or base.band_min,
                 band_max=cache.band_max or base.band_max)


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
