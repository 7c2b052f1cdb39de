"""The procedural dreamer: deterministic, img2img-like, steered by the prompt, stable over a chain."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from dreamd.backends import KeyframeBackend, KeyframeRequest
from dreamd.backends.procedural import (
    COLOURS, DEFAULT_PROMPT, ProceduralBackend, look_for, stable_hash,
)
from dreamd.errors import PermanentBackendError
from dreamd.seeding import make_seed

W, H = 512, 256


def request(image=None, *, seed=7, prompt=DEFAULT_PROMPT, denoise=0.3, width=W, height=H,
            theme="ethereal") -> KeyframeRequest:
    return KeyframeRequest(chain_index=1, width=width, height=height, seed=seed, theme=theme,
                           prompt=prompt, negative_prompt="blurry", denoise=denoise, image=image)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255.0


@pytest.fixture(scope="module")
def backend():
    b = ProceduralBackend()
    yield b
    b.close()


@pytest.fixture(scope="module")
def source() -> Image.Image:
    return make_seed(3)


def test_is_a_keyframe_backend(backend):
    assert isinstance(backend, KeyframeBackend)
    assert backend.name == "procedural"


def test_same_request_gives_identical_bytes(backend, source):
    first = backend.generate(request(source)).image.tobytes()
    again = ProceduralBackend().generate(request(source.copy())).image.tobytes()
    assert first == again


@pytest.mark.parametrize("change", [{"seed": 8}, {"prompt": "deep ocean"}, {"denoise": 0.31}])
def test_any_input_change_changes_the_output(backend, source, change):
    base = backend.generate(request(source)).image.tobytes()
    assert backend.generate(request(source, **change)).image.tobytes() != base


def test_output_is_rgb_at_the_requested_size_even_from_other_sizes_and_modes(backend, source):
    small_grey = source.resize((300, 200)).convert("L")
    out = backend.generate(request(small_grey, width=320, height=160)).image
    assert out.mode == "RGB" and out.size == (320, 160)
    rgba = source.convert("RGBA")
    assert backend.generate(request(rgba)).image.size == (W, H)


def test_distance_from_the_input_grows_with_denoise(backend, source):
    x = pixels(source)
    levels = [0.05, 0.1, 0.2, 0.3, 0.45, 0.6]
    dist = [np.abs(pixels(backend.generate(request(source, denoise=d)).image) - x).mean()
            for d in levels]
    assert all(b > a for a, b in zip(dist, dist[1:])), dist
    assert dist[0] < 0.02                       # 0.05 barely moves
    assert dist[-1] > 4 * dist[0]               # 0.6 transforms


def test_prompts_steer_the_colours(backend, source):
    ocean = pixels(backend.generate(request(source, prompt="deep ocean", denoise=0.5)).image)
    fire = pixels(backend.generate(request(source, prompt="fire and embers", denoise=0.5)).image)
    mean_o, mean_f = ocean.mean((0, 1)), fire.mean((0, 1))
    assert mean_o[2] - mean_o[0] > 0.04         # ocean leans blue
    assert mean_f[0] - mean_f[2] > 0.04         # fire leans red
    assert _histogram_overlap(ocean, fire) < 0.6


def test_cold_start_prompts_differ_too(backend):
    ocean = pixels(backend.generate(request(None, prompt="deep ocean")).image)
    forest = pixels(backend.generate(request(None, prompt="forest")).image)
    assert _histogram_overlap(ocean, forest) < 0.7


def _histogram_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection of 8x8x8 colour histograms: 1 = same colours, 0 = disjoint."""
    def hist(x):
        q = np.minimum((x * 8).astype(int), 7)
        return np.bincount((q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).ravel(), minlength=512) / q[..., 0].size
    return float(np.minimum(hist(a), hist(b)).sum())


def test_default_look_is_monochrome_with_cyan_and_red_accents():
    look = look_for(None)
    assert look.mono and look.ink == COLOURS["white"]
    assert look.accents == (COLOURS["cyan"], COLOURS["red"])
    assert {"wings", "particles", "solid"} <= set(look.motifs)
    assert look_for("") == look


def test_unknown_words_pick_a_stable_palette_and_different_prompts_spread():
    assert look_for("banana spaceship") == look_for("banana spaceship")
    prompts = ["banana spaceship", "quiet library", "tax return", "old piano", "train station",
               "grandmother kitchen", "paper boat", "broken clock", "velvet chair", "salt"]
    inks = {look_for(p).ink for p in prompts}
    assert len(inks) >= 4


def test_stable_hash_is_the_same_in_every_process():
    # A constant, not hash(): PYTHONHASHSEED would change the look of a prompt per run.
    assert stable_hash("banana") == 5612803881853817780


def test_cold_start_makes_a_dark_image_with_light_in_it(backend):
    out = backend.generate(request(None, seed=1))
    x = pixels(out.image)
    assert out.image.size == (W, H) and out.info["cold_start"] is True
    assert 0.03 < x.mean() < 0.3
    assert x.std() > 0.05
    assert (x.max(axis=2) > 0.6).mean() > 0.002          # luminous lines, not just haze


def test_fifty_chained_keyframes_keep_contrast_and_structure(backend):
    image = backend.generate(request(None, seed=100)).image
    stds, means, detail, clipped = [], [], [], []
    for k in range(50):
        image = backend.generate(request(image, seed=200 + k, denoise=0.3)).image
        x = pixels(image)
        lum = x @ [0.2126, 0.7152, 0.0722]
        stds.append(lum.std())
        means.append(lum.mean())
        # Mean gradient magnitude: what mush (everything blurred smooth) loses first.
        detail.append(np.abs(np.diff(lum, axis=1)).mean() + np.abs(np.diff(lum, axis=0)).mean())
        clipped.append((x >= 0.995).mean())
    assert 0.05 < min(stds) and max(stds) < 0.25, (min(stds), max(stds))
    assert 0.04 < min(means) and max(means) < 0.3
    # Seeds are busier than a chain's steady state, so compare the tail loosely to the start;
    # mush would sit near 0.005.
    assert min(detail) > 0.015 and np.median(detail[-10:]) > 0.5 * detail[0], detail
    assert max(clipped) < 0.02                            # never saturating


def test_invalid_requests_are_permanent_errors(backend, source):
    with pytest.raises(PermanentBackendError):
        backend.generate(request(source, width=0))
    with pytest.raises(PermanentBackendError):
        backend.generate(request(source, denoise=float("nan")))


def test_info_names_the_backend(backend, source):
    info = backend.generate(dataclasses.replace(request(source), steps=5)).info
    assert info["backend"] == "procedural" and info["seed"] == 7 and info["cold_start"] is False
