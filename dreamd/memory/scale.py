"""Where an embedder's similarities fall: the thresholds the config leaves at 0.

Pure Python (no numpy), so `dreamd stats` can read it. Vectors of different models
are never compared, and neither are their thresholds: CLIP and the descriptor put
the same pair of pictures at different similarities.
"""

from __future__ import annotations

from dataclasses import dataclass


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
