"""Bad weight files: each gives a CodecError naming the file and what is wrong, never a
half-loaded model; a pickle that would run code is refused without running it."""

from __future__ import annotations

import re

import pytest
import torch

from dreamd.errors import CodecError
from dreamd.latent.choose import choose_codec
from dreamd.latent.weights import load_weights
from tests.conftest_codecs import (CodeRunner, diffusers_kl, diffusers_tiny, save, save_taesd_pair,
                                   taesd_halves, tensors, truncate)

import diffusers  # noqa: E402,F401 (the reference, a dev dependency: missing fails, never skips)


@pytest.fixture(scope="module")
def kl_sd():
    return tensors(diffusers_kl(seed=7))


@pytest.fixture(scope="module")
def tiny():
    return diffusers_tiny(seed=8)


def _refused(path, *fragments: str, **kwargs) -> str:
    with pytest.raises(CodecError) as info:
        choose_codec(path=path, device="cpu", precision="fp32", **kwargs)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert re.search(fragment, message), (fragment, message)
    return message


def test_missing_key(tmp_path, kl_sd):
    sd = dict(kl_sd)
    del sd["decoder.up_blocks.1.resnets.2.conv2.weight"]
    _refused(save(tmp_path / "vae.safetensors", sd), "missing key 'decoder.up.2.block.2.conv2.weight'")


def test_missing_anchor_key(tmp_path, kl_sd):
    sd = {k: v for k, v in kl_sd.items() if k != "post_quant_conv.weight"}
    _refused(save(tmp_path / "vae.safetensors", sd), "missing key 'post_quant_conv.weight'")


def test_unexpected_key(tmp_path, kl_sd):
    sd = {**kl_sd, "encoder.mid_block.resnets.0.extra.weight": torch.zeros(3)}
    _refused(save(tmp_path / "vae.safetensors", sd), "unexpected key 'encoder.mid.block_1.extra.weight'")


def test_wrong_shape(tmp_path, kl_sd):
    sd = {**kl_sd, "decoder.conv_out.weight": torch.zeros(3, 32, 1, 1)}
    _refused(save(tmp_path / "vae.safetensors", sd), r"wrong shape for 'decoder.conv_out.weight': "
             r"\(3, 32, 1, 1\), expected \(3, 32, 3, 3\)")


def test_channels_that_do_not_fit_the_norm_groups(tmp_path, kl_sd):
    sd = dict(kl_sd)
    sd["encoder.conv_in.weight"] = torch.zeros(48, 3, 3, 3)
    _refused(save(tmp_path / "vae.safetensors", sd), "32 norm groups")


def test_truncated_safetensors(tmp_path, kl_sd):
    _refused(truncate(save(tmp_path / "vae.safetensors", kl_sd)), "truncated or not a safetensors file")


def test_truncated_ckpt(tmp_path, kl_sd):
    _refused(truncate(save(tmp_path / "vae.ckpt", kl_sd, wrap={})), "truncated")


def test_truncated_legacy_pickle(tmp_path, kl_sd):
    path = tmp_path / "vae.pt"
    torch.save(kl_sd, path, _use_new_zipfile_serialization=False)
    _refused(truncate(path), "truncated")


def test_text_file_named_safetensors(tmp_path):
    path = tmp_path / "vae.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 334643268\n")
    _refused(path, "not a safetensors file")


def test_empty_file(tmp_path):
    path = tmp_path / "vae.safetensors"
    path.write_bytes(b"")
    _refused(path, "empty")


def test_missing_file(tmp_path):
    _refused(tmp_path / "nowhere.safetensors", "cannot read")


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, kl_sd):
    marker = tmp_path / "ran"
    path = save(tmp_path / "vae.ckpt", kl_sd, wrap={"callbacks": CodeRunner(marker)})
    _refused(path, "refused", "weights_only=True", "system")
    assert not marker.exists()


def test_unknown_layout(tmp_path):
    _refused(save(tmp_path / "lora.safetensors", {"lora_unet_down.alpha": torch.ones(1)}),
             "not a VAE or TAESD weight file", "lora_unet_down.alpha")


def test_taesd_half_without_its_pair(tmp_path, tiny):
    enc, dec = save_taesd_pair(tmp_path, tiny)
    enc.unlink()
    _refused(dec, "TAESD decoder", "taesd_encoder.pth")


def test_taesd_error_names_the_half_that_is_wrong(tmp_path, tiny):
    enc, dec = taesd_halves(tiny)
    enc["5.conv.0.weight"] = torch.zeros(2, 2, 3, 3)
    save(tmp_path / "taesd_encoder.pth", enc)
    dec_path = save(tmp_path / "taesd_decoder.pth", dec)
    with pytest.raises(CodecError, match=re.escape(str(tmp_path / "taesd_encoder.pth")) + ".*wrong shape"):
        choose_codec(path=dec_path, device="cpu", precision="fp32")


def test_taesd_pair_with_a_decoder_where_the_encoder_should_be(tmp_path, tiny):
    enc, dec = taesd_halves(tiny)
    save(tmp_path / "taesd_encoder.pth", dec)
    dec_path = save(tmp_path / "taesd_decoder.pth", dec)
    with pytest.raises(CodecError, match="expected the TAESD encoder"):
        load_weights(dec_path)


def test_integer_weights_are_refused(tmp_path, kl_sd):
    sd = {**kl_sd, "quant_conv.bias": torch.zeros(8, dtype=torch.int64)}
    _refused(save(tmp_path / "vae.safetensors", sd), "not floating-point")


def test_explicit_kind_must_match_the_file(tmp_path, tiny):
    _, dec = save_taesd_pair(tmp_path, tiny)
    _refused(dec, "holds taesd weights, but the codec is set to sd-vae", kind="sd-vae")


def test_malformed_level_index(tmp_path, kl_sd):
    from dreamd.latent.weights import diffusers_vae_to_ldm

    sd = {**diffusers_vae_to_ldm(kl_sd), "encoder.down.x.block.0.conv1.weight": torch.zeros(1)}
    _refused(save(tmp_path / "vae.safetensors", sd), "unexpected shape for an SD VAE")
