"""The embedder that needs no weights: colour plus structure, as one unit vector.

Colour is a hue/saturation/value histogram (square-rooted, so the cosine of two of
them is their Bhattacharyya coefficient); structure is a DCT perceptual hash (the
signs of the low frequencies of a small grey image, around their median). Each part
is normalised and weighted so the cosine of two descriptors is
`COLOUR_WEIGHT * colour overlap + (1 - COLOUR_WEIGHT) * hash agreement`, where the
agreement is 1 - 2 * (differing bits / bits): 1 for the same picture, about 0.4 for
unrelated pictures of one palette, lower across palettes.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

MODEL_ID = "descriptor-hsv-dct-v1"
HUE_BINS, SAT_BINS, VAL_BINS = 12, 4, 4
HASH_SIDE = 64          # the grey image the DCT runs on
HASH_KEEP = 12          # the kept low frequencies: 12 x 12 - the DC term = 143 bits
COLOUR_WEIGHT = 0.4     # share of the cosine that colour decides (the rest: structure)
DIM = HUE_BINS * SAT_BINS * VAL_BINS + HASH_KEEP * HASH_KEEP - 1


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: dct(x) = M @ x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m.astype(np.float64)


def colour_part(image: Image.Image) -> np.ndarray:
    """Unit vector: square roots of the HSV histogram's bin shares."""
    hsv = np.asarray(image.convert("RGB").resize((128, 64), Image.Resampling.BILINEAR)
                     .convert("HSV"), dtype=np.uint16)
    h = hsv[..., 0] * HUE_BINS // 256
    s = hsv[..., 1] * SAT_BINS // 256
    v = hsv[..., 2] * VAL_BINS // 256
    bins = (h * SAT_BINS + s) * VAL_BINS + v
    hist = np.bincount(bins.ravel(), minlength=HUE_BINS * SAT_BINS * VAL_BINS).astype(np.float64)
    root = np.sqrt(hist / max(hist.sum(), 1.0))
    return root / max(np.linalg.norm(root), 1e-12)


def structure_part(image: Image.Image) -> np.ndarray:
    """Unit vector of +-1: the perceptual hash bits of the low DCT frequencies."""
    grey = np.asarray(image.convert("L").resize((HASH_SIDE, HASH_SIDE),
                                                Image.Resampling.BOX), dtype=np.float64)
    m = _dct_matrix(HASH_SIDE)
    low = (m @ grey @ m.T)[:HASH_KEEP, :HASH_KEEP].ravel()[1:]   # drop the DC term
    bits = np.where(low > np.median(low), 1.0, -1.0)
    return bits / np.sqrt(bits.size)


def describe(image: Image.Image) -> np.ndarray:
    """The descriptor of one image: float32, unit norm, DIM long."""
    v = np.concatenate([np.sqrt(COLOUR_WEIGHT) * colour_part(image),
                        np.sqrt(1 - COLOUR_WEIGHT) * structure_part(image)])
    return v.astype(np.float32)


class DescriptorEmbedder:
    """The fallback embedder: deterministic, a few milliseconds per frame on a CPU."""

    model_id = MODEL_ID
    dim = DIM

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """(len(images), DIM) float32, each row unit norm."""
        return np.stack([describe(im) for im in images]) if images else \
            np.zeros((0, DIM), np.float32)

    def close(self) -> None:
        """Nothing to release."""
