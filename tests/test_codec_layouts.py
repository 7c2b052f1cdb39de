"""The same weights in every on-disk layout users have give identical codecs.

SD VAE: diffusers (new and old attention names, linear or 1x1-conv weights), a standalone
ldm VAE (.safetensors, and a .ckpt like ft-MSE's), a full checkpoint's first_stage_model.
TAESD: ComfyUI's vae_approx pair (.pth, .safetensors, the XL pair), diffusers' AutoencoderTiny,
and both halves in one file under ComfyUI's prefixes.
"""

from __future__ import annotations

import pytest
import torch

from dreamd.latent.choose import ModelCodec, choose_codec
from tests.conftest_codecs import (diffusers_kl, diffusers_tiny, old_attention_names, save,
                                   save_taesd_pair, taesd_halves, tensors)

import diffusers  # noqa: E402,F401 (the reference, a dev dependency: missing fails, never skips)


def _outputs(codec) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    z = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(4))
    return codec.encode(images), codec.decode(z)


def _load(path, kind="auto"):
    codec, reason = choose_codec(kind, path=path, device="cpu", precision="fp32")
    assert isinstance(codec, ModelCodec)
    return codec, reason


@pytest.fixture(scope="module")
def kl_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kl")
    ref = tensors(diffusers_kl(seed=5))
    files = {"diffusers": save(root / "diffusion_pytorch_model.safetensors", ref),
             "diffusers-old": save(root / "old.safetensors", old_attention_names(ref)),
             "diffusers-old-conv": save(root / "old_conv.bin", old_attention_names(ref, conv_shaped=True))}
    ldm = _load(files["diffusers"])[0].weights.state_dict
    extras = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840000)}
    files["ldm"] = save(root / "vae-ft-mse.safetensors", ldm)
    files["ldm-ckpt"] = save(root / "vae-ft-mse.ckpt", {**ldm, **extras}, wrap={"global_step": 840000})
    # A full SD checkpoint: the VAE beside UNet and text-encoder weights we must ignore.
    others = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
              "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(8)}
    full = {**{f"first_stage_model.{k}": v for k, v in ldm.items()}, **others}
    files["checkpoint"] = save(root / "dreamy-v1.safetensors", full)
    files["checkpoint-ckpt"] = save(root / "dreamy-v1.ckpt", full, wrap={"epoch": 3})
    return files


def test_every_sd_vae_layout_gives_the_same_codec(kl_files):
    want = _outputs(_load(kl_files["diffusers"])[0])
    for layout, path in kl_files.items():
        codec, reason = _load(path, "sd-vae")
        assert codec.name == "sd-vae", layout
        assert str(path) in reason
        got = _outputs(codec)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), layout


def test_a_checkpoint_keeps_only_its_vae(kl_files):
    codec, reason = _load(kl_files["checkpoint"])
    assert "first_stage_model" in reason
    assert not any(k.startswith(("model.", "cond_stage_model.")) for k in codec.weights.state_dict)


def test_sdxl_checkpoint_is_recognised_by_its_keys(kl_files, tmp_path):
    from safetensors.torch import load_file

    full = load_file(str(kl_files["checkpoint"]))
    full["conditioner.embedders.1.model.ln_final.weight"] = torch.ones(8)
    codec, _ = _load(save(tmp_path / "dreamy.safetensors", full))
    assert codec.name == "sdxl-vae"
    assert codec.weights.build().scaling_factor == pytest.approx(0.13025)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    ref = diffusers_tiny(seed=6)
    enc, dec = taesd_halves(ref)
    combined = {**{f"taesd_encoder.{k}": v for k, v in enc.items()},
                **{f"taesd_decoder.{k}": v for k, v in dec.items()}, "vae_scale": torch.tensor(0.18215)}
    return {
        "pth-pair": save_taesd_pair(root / "a", ref)[1],
        "pth-pair-by-encoder": save_taesd_pair(root / "b", ref)[0],
        "safetensors-pair": save_taesd_pair(root / "c", ref, suffix=".safetensors")[1],
        "xl-pair": save_taesd_pair(root / "d", ref, prefix="taesdxl")[1],
        "diffusers": save(root / "e" / "diffusion_pytorch_model.safetensors", tensors(ref)),
        "combined": save(root / "f" / "taesd.safetensors", combined),
    }


def test_every_taesd_layout_gives_the_same_codec(tiny_files):
    want = _outputs(_load(tiny_files["pth-pair"])[0])
    for layout, path in tiny_files.items():
        codec, reason = _load(path, "taesd")
        assert codec.name == ("taesdxl" if layout == "xl-pair" else "taesd"), layout
        got = _outputs(codec)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), layout


def test_a_taesd_pair_names_both_files(tiny_files):
    codec, reason = _load(tiny_files["pth-pair"])
    assert [p.name for p in codec.weights.sources] == ["taesd_encoder.pth", "taesd_decoder.pth"]
    assert codec.weights_id == "taesd_encoder.pth+taesd_decoder.pth"
    assert "taesd pair" in reason


def test_fp16_files_load_into_fp32_codecs(tiny_files, tmp_path):
    enc, dec = taesd_halves(diffusers_tiny(seed=6))
    save(tmp_path / "taesd_encoder.safetensors", {k: v.half() for k, v in enc.items()})
    save(tmp_path / "taesd_decoder.safetensors", {k: v.half() for k, v in dec.items()})
    half, _ = _load(tmp_path / "taesd_decoder.safetensors")
    full, _ = _load(tiny_files["pth-pair"])
    a, b = _outputs(half), _outputs(full)
    assert half.dtype == torch.float32 and a[1].dtype == torch.float32
    torch.testing.assert_close(a[1], b[1], atol=5e-3, rtol=0)
