"""choose_codec over a fake ComfyUI models dir, the divisor wrapper, precision and release.

The pixel fallback is tested last in this file (it is the end of every search)."""

from __future__ import annotations

import logging

import pytest
import torch

from dreamd.errors import CodecError
from dreamd.latent.choose import ModelCodec, choose_codec, resolve_device
from dreamd.latent.divisor import DivisorCodec
from dreamd.latent.weights import load_weights
from tests.conftest_codecs import diffusers_kl, diffusers_tiny, save, save_taesd_pair, tensors

import diffusers  # noqa: E402,F401 (the reference, a dev dependency: missing fails, never skips)


@pytest.fixture(scope="module")
def tiny():
    return diffusers_tiny(seed=10)


@pytest.fixture(scope="module")
def kl_sd():
    return tensors(diffusers_kl(seed=11))


def _comfy(root, tiny=None, vae=None, checkpoint=None, xl_tiny=None):
    models = root / "ComfyUI" / "models"
    for folder in ("vae_approx", "vae", "checkpoints"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    if tiny is not None:
        save_taesd_pair(models / "vae_approx", tiny)
    if xl_tiny is not None:
        save_taesd_pair(models / "vae_approx", xl_tiny, prefix="taesdxl")
    if vae is not None:
        save(models / "vae" / "vae-ft-mse-840000-ema-pruned.safetensors", vae)
    if checkpoint is not None:
        full = {f"first_stage_model.{k}": v for k, v in load_weights(
            save(root / "tmp.safetensors", checkpoint)).state_dict.items()}
        save(models / "checkpoints" / "dream.safetensors", full)
    return models


def _choose(**kwargs):
    return choose_codec(device="cpu", precision="fp32", **kwargs)


def test_auto_prefers_taesd_in_vae_approx(tmp_path, tiny, kl_sd, caplog):
    models = _comfy(tmp_path, tiny=tiny, vae=kl_sd)
    with caplog.at_level(logging.INFO, logger="dreamd.latent.choose"):
        codec, reason = _choose(models_dir=models, checkpoint="dream.safetensors")
    assert codec.name == "taesd"
    assert reason.startswith(f"taesd from {models / 'vae_approx' / 'taesd_decoder.pth'}")
    assert reason in caplog.text


def test_the_comfyui_folder_itself_is_accepted(tmp_path, tiny):
    _comfy(tmp_path, tiny=tiny)
    codec, _ = _choose(models_dir=tmp_path / "ComfyUI")
    assert codec.name == "taesd"


def test_an_xl_checkpoint_prefers_taesdxl(tmp_path, tiny):
    _comfy(tmp_path, tiny=tiny, xl_tiny=diffusers_tiny(seed=12))
    codec, _ = _choose(models_dir=tmp_path / "ComfyUI", checkpoint="sd_xl_base_1.0.safetensors")
    assert codec.name == "taesdxl"


def test_sd_vae_kind_takes_the_vae_folder_then_the_checkpoint(tmp_path, tiny, kl_sd):
    models = _comfy(tmp_path, tiny=tiny, vae=kl_sd)
    codec, reason = _choose(kind="sd-vae", models_dir=models, checkpoint="dream.safetensors")
    assert codec.name == "sd-vae" and "ComfyUI vae" in reason
    (models / "vae" / "vae-ft-mse-840000-ema-pruned.safetensors").unlink()
    save(models / "checkpoints" / "dream.safetensors",
         {f"first_stage_model.{k}": v for k, v in codec.weights.state_dict.items()})
    codec2, reason2 = _choose(kind="sd-vae", models_dir=models, checkpoint="dream.safetensors")
    assert "VAE inside the checkpoint" in reason2
    z = torch.randn(1, 4, 4, 4)
    assert torch.equal(codec.decode(z), codec2.decode(z))


def test_a_broken_discovered_file_is_skipped_with_a_warning(tmp_path, tiny, kl_sd, caplog):
    models = _comfy(tmp_path, vae=kl_sd)
    (models / "vae_approx" / "taesd_decoder.pth").write_text("not weights")
    with caplog.at_level(logging.WARNING, logger="dreamd.latent.choose"):
        codec, _ = _choose(models_dir=models)
    assert codec.name == "sd-vae"
    assert "taesd_decoder.pth" in caplog.text


def test_an_explicit_kind_without_weights_is_an_error(tmp_path, kl_sd):
    models = _comfy(tmp_path, vae=kl_sd)
    with pytest.raises(CodecError, match=r"codec taesd: no usable weights .*vae_approx"):
        _choose(kind="taesd", models_dir=models)


def test_an_unknown_kind_is_an_error():
    with pytest.raises(CodecError, match="unknown codec kind 'vqgan'"):
        choose_codec("vqgan")


def test_shapes_dtypes_and_range(tmp_path, tiny, kl_sd):
    for path in (save_taesd_pair(tmp_path / "t", tiny)[1], save(tmp_path / "vae.safetensors", kl_sd)):
        codec, _ = _choose(path=path)
        images = torch.rand(3, 3, 64, 128)
        z = codec.encode(images)
        assert z.shape == (3, 4, 8, 16) and z.dtype == torch.float32
        out = codec.decode(z)
        assert out.shape == images.shape and out.dtype == torch.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        assert torch.equal(codec.encode(images), z)  # the mean: deterministic, no sampling


def test_images_must_fit_the_codec(tmp_path, tiny):
    codec, _ = _choose(path=save_taesd_pair(tmp_path, tiny)[1])
    with pytest.raises(ValueError, match="not a multiple of 8"):
        codec.encode(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, h, w\)"):
        codec.decode(torch.rand(1, 3, 8, 8))


def test_release_frees_the_model_and_it_comes_back(tmp_path, tiny):
    codec, _ = _choose(path=save_taesd_pair(tmp_path, tiny)[1])
    z = torch.randn(1, 4, 8, 8)
    before = codec.decode(z)
    assert codec._module is not None
    codec.release()
    assert codec._module is None
    assert torch.equal(codec.decode(z), before)
    assert codec._module is not None


@pytest.mark.parametrize("divisor, small", [(2.0, (32, 64)), (4 / 3, (48, 96))])
def test_divisor_encodes_small_and_decodes_full_size(tmp_path, tiny, divisor, small):
    codec, reason = _choose(path=save_taesd_pair(tmp_path, tiny)[1], divisor=divisor)
    assert isinstance(codec, DivisorCodec) and codec.name == "taesd" and f"1/{divisor:g}" in reason
    images = torch.rand(2, 3, 64, 128)
    z = codec.encode(images)
    assert z.shape[-2:] == (small[0] // 8, small[1] // 8)
    assert codec.decode(z).shape == images.shape
    assert codec.decode(z, size=(72, 136)).shape[-2:] == (72, 136)


def test_divisor_without_a_prior_encode_scales_by_the_divisor(tmp_path, tiny):
    codec, _ = _choose(path=save_taesd_pair(tmp_path, tiny)[1], divisor=2.0)
    assert codec.decode(torch.randn(1, 4, 16, 32)).shape[-2:] == (256, 512)


def test_auto_precision_on_cpu_is_measured_and_close_to_fp32(tmp_path, tiny):
    path = save_taesd_pair(tmp_path, tiny)[1]
    auto, reason = choose_codec(path=path, device="cpu")
    fp32, _ = _choose(path=path)
    assert auto.dtype in (torch.float32, torch.bfloat16)
    assert "bf16" in reason and "fp32" in reason and "ms" in reason  # the measurement is reported
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert auto.decode(z).dtype == torch.float32
    assert (auto.decode(z) - fp32.decode(z)).abs().mean() < 2 / 255


def test_configured_bf16_runs_channels_last(tmp_path, tiny):
    codec, reason = choose_codec(path=save_taesd_pair(tmp_path, tiny)[1], device="cpu", precision="bf16")
    assert codec.dtype == torch.bfloat16 and codec.channels_last and "as configured" in reason
    assert codec.encode(torch.rand(1, 3, 32, 32)).dtype == torch.float32


def test_cuda_policy_without_touching_a_gpu(tmp_path, tiny, kl_sd):
    # The module moves to the device lazily, so the policy is visible on a CPU-only machine.
    taesd = ModelCodec(load_weights(save_taesd_pair(tmp_path, tiny)[1]), "cuda:1")
    assert taesd.device == torch.device("cuda", 1) and taesd.dtype == torch.float16
    xl = ModelCodec(load_weights(save(tmp_path / "sdxl_vae.safetensors", kl_sd)), "cuda:0")
    assert xl.name == "sdxl-vae" and xl.dtype != torch.float16  # the SDXL VAE overflows fp16


def test_resolve_device_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None, 3) == torch.device("cpu")
    assert resolve_device("cuda:2") == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None, 1) == torch.device("cuda", 1)
    assert resolve_device(None, 5) == torch.device("cpu")
    assert resolve_device("cuda", 1) == torch.device("cuda", 1)    # system.gpu's
    assert resolve_device("cuda", 5) == torch.device("cpu")
    assert resolve_device("cuda:0", 1) == torch.device("cuda", 0)  # named in full: wins
    assert resolve_device("cpu", 1) == torch.device("cpu")


# ---------------------------------------------------------------- the pixel fallback, last

def test_nothing_found_falls_back_to_pixel(tmp_path):
    models = _comfy(tmp_path)
    codec, reason = choose_codec(models_dir=models, checkpoint="dream.safetensors")
    assert codec.name == "pixel"
    assert "no VAE or TAESD weights found" in reason and "dream.safetensors (missing)" in reason


def test_pixel_honours_the_divisor(tmp_path):
    images = torch.rand(1, 3, 64, 96)
    for divisor in (2.0, 4 / 3):
        codec, reason = choose_codec("pixel", divisor=divisor)
        assert codec.name == "pixel" and f"1/{divisor:g}" in reason
        z = codec.encode(images)
        assert z.shape[-1] < 96
        assert codec.decode(z).shape == images.shape


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: nothing falls back")
def test_doctor_warns_when_the_codec_asked_for_cuda_runs_on_the_cpu(tmp_path, tiny):
    from dreamd import config, doctor

    decoder = save_taesd_pair(tmp_path, tiny)[1]
    cfg = config.parse(f'[generation]\ncodec = "taesd"\ncodec_path = "{decoder}"\n'
                       f'codec_device = "cuda"\ncodec_precision = "fp32"\n')
    assert doctor._codec(cfg) == (
        "warning", f"taesd from {decoder} (taesd pair), fp32 as configured; codec_device is "
                   f"cuda but CUDA has no GPU 0 here (0 found): on the CPU")
    cfg.generation.codec_device = "auto"      # the CPU is what auto means here: no warning
    assert doctor._codec(cfg) == ("ok", f"taesd from {decoder} (taesd pair), fp32 as configured")
