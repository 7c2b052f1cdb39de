"""Our SD VAE and TAESD against diffusers' (the reference): same weights, same outputs.

Weights go through a file and `choose_codec`, the path users take; float32, tight tolerance.
"""

from __future__ import annotations

import pytest
import torch

from dreamd.latent.choose import choose_codec
from tests.conftest_codecs import (SMALL_KL, SMALL_TAESD, diffusers_kl, diffusers_tiny, save,
                                   save_taesd_pair, tensors)

import diffusers  # noqa: E402,F401 (the reference, a dev dependency: missing fails, never skips)

TOL = dict(rtol=1e-4, atol=2e-5)


def _images(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


def _check_kl(tmp_path, channels, h, w, scaling=0.18215, name="vae.safetensors"):
    ref = diffusers_kl(channels)
    path = save(tmp_path / name, tensors(ref))
    codec, _ = choose_codec("sd-vae", path=path, device="cpu", precision="fp32")
    images = _images(2, h, w)
    with torch.no_grad():
        want_z = ref.encode(images * 2 - 1).latent_dist.mean * scaling
        got_z = codec.encode(images)
        torch.testing.assert_close(got_z, want_z, **TOL)
        z = torch.randn(2, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(2))
        want = ((ref.decode(z / scaling).sample + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(codec.decode(z), want, **TOL)
    assert want.std() > 0.01  # the comparison is not between two flat images


def _check_tiny(tmp_path, width, h, w):
    ref = diffusers_tiny(width)
    save_taesd_pair(tmp_path / "vae_approx", ref)
    codec, _ = choose_codec("taesd", models_dir=tmp_path, device="cpu", precision="fp32")
    images = _images(2, h, w)
    with torch.no_grad():
        torch.testing.assert_close(codec.encode(images), ref.encode(images * 2 - 1).latents, **TOL)
        z = torch.randn(2, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(2)) * 2
        want = ((ref.decode(z).sample + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(codec.decode(z), want, **TOL)
    assert want.std() > 0.01


def test_sd_vae_matches_diffusers(tmp_path):
    _check_kl(tmp_path, SMALL_KL, 64, 96)


def test_sdxl_vae_uses_its_scaling_factor(tmp_path):
    _check_kl(tmp_path, SMALL_KL, 32, 48, scaling=0.13025, name="sdxl_vae.safetensors")


def test_taesd_matches_diffusers(tmp_path):
    _check_tiny(tmp_path, SMALL_TAESD, 64, 96)


@pytest.mark.slow
def test_full_size_sd_vae_matches_diffusers(tmp_path):
    _check_kl(tmp_path, (128, 256, 512, 512), 64, 64)


@pytest.mark.slow
def test_full_size_taesd_matches_diffusers(tmp_path):
    _check_tiny(tmp_path, 64, 128, 256)
