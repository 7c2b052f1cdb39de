"""Doubles of img2img backends that fail the way real feedback loops do, and a driver that
runs them through the real planner and keyframe worker in-process (tests and
bench/quality.py):

- DriftingBackend: each keyframe adds a colour cast and a contrast gain to its input, as
  loopback img2img creeps towards magenta and over-saturation (sygil-webui #457, A1111
  #6858, InvokeAI #552), plus a little new structure so the chain keeps moving;
- ConvergingBackend: at a low denoise the picture settles on the model's attractor and
  then comes back unchanged (Animator #10); at a high denoise it paints new structure.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from dreamd.backends import KeyframeRequest, KeyframeResult


def start_image(width: int, height: int, seed: int) -> np.ndarray:
    """A colourful, mid-toned start: smooth gradients of three hues plus soft blobs."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xs / max(width - 1, 1), ys / max(height - 1, 1)
    img = np.stack([90 + 80 * u, 70 + 90 * v, 150 - 60 * u * v], axis=-1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, width / 4)
        colour = rng.uniform(-60, 60, 3)
        img += np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * r * r))[..., None] * colour
    return np.clip(img, 0, 255)


def _blobs(width: int, height: int, seed: int, amount: float) -> np.ndarray:
    """Seeded new structure: a few soft blobs of signed colour, `amount` levels strong."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.zeros((height, width, 3), np.float32)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(3, width / 5)
        out += (np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * r * r))[..., None]
                * rng.uniform(-1, 1, 3) * amount)
    return out


def _result(img: np.ndarray, name: str) -> KeyframeResult:
    return KeyframeResult(Image.fromarray(np.round(np.clip(img, 0, 255)).astype(np.uint8)),
                          {"backend": name})


class DriftingBackend:
    """img2img that drifts: out = mean + gain * (in - mean) + cast + new structure."""

    name = "drifting"

    def __init__(self, cast=(0.3, -0.2, 0.25), gain: float = 1.006, structure: float = 40.0):
        self.cast = np.asarray(cast, np.float32)        # RGB levels added per keyframe
        self.gain = gain                                # contrast gain per keyframe
        self.structure = structure

    def generate(self, request: KeyframeRequest) -> KeyframeResult:
        w, h = request.width, request.height
        if request.image is None:
            return _result(start_image(w, h, request.seed), self.name)
        img = np.asarray(request.image.convert("RGB"), np.float32)
        mean = img.mean(axis=(0, 1))
        img = mean + self.gain * (img - mean) + self.cast
        img += _blobs(w, h, request.seed, self.structure * request.denoise)
        return _result(img, self.name)

    def close(self) -> None:
        pass


class ConvergingBackend:
    """img2img with an attractor: at a denoise up to `threshold` the output moves halfway
    to the model's fixed picture each keyframe (so within a few it comes back as it went
    in); above it, new structure grows with the denoise."""

    name = "converging"

    def __init__(self, threshold: float = 0.45, pull: float = 0.5, structure: float = 400.0):
        self.threshold, self.pull, self.structure = threshold, pull, structure
        self.denoises: list[float] = []

    def generate(self, request: KeyframeRequest) -> KeyframeResult:
        w, h = request.width, request.height
        self.denoises.append(request.denoise)
        attractor = start_image(w, h, 12345)
        if request.image is None:
            return _result(start_image(w, h, request.seed), self.name)
        img = np.asarray(request.image.convert("RGB"), np.float32)
        img = img + (attractor - img) * self.pull
        if request.denoise > self.threshold:
            img += _blobs(w, h, request.seed, self.structure * (request.denoise - self.threshold))
        return _result(img, self.name)

    def close(self) -> None:
        pass


def run_chain(ctx, backend, n: int) -> list[int]:
    """Make `n` keyframes with the real planner and keyframe worker, one after the
    other; the keyframe ids made. The config must let the planner plan that far ahead
    (CHAIN_CONFIG)."""
    from dreamd.workers import keyframe, planner

    made = []
    for i in range(n):
        kid = planner.tick(ctx)
        assert kid is not None, f"the planner planned no keyframe {i}"
        assert keyframe.tick(ctx, backend) == 1, f"keyframe {i} (row {kid}) was not made"
        made.append(kid)
    return made


# In-process chains: no injections (the memory would blend in other pictures), one theme
# unless a test rotates them, a buffer target far beyond the chain (the planner plans
# while the frames ahead are fewer), no in-betweens to wait for.
CHAIN_CONFIG = """
[generation]
resolution = [128, 64]
interpolation_frames = 0
denoise = 0.3
[display]
fps = 60.0
buffer_target_seconds = 3600.0
[cache]
enabled = false
[governor]
enabled = false
[prompts]
rotation_interval = 1000000
"""
