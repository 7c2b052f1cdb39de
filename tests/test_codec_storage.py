"""Stored keyframe latents: a round trip, and the check that refuses another codec's latent."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dreamd.errors import CodecError
from dreamd.latent.storage import latent_meta, load_latent, reusable, save_latent


def _codec(name="taesd", divisor=None, weights_id=None):
    codec = SimpleNamespace(name=name, device=torch.device("cpu"), dtype=torch.float32)
    if divisor is not None:
        codec.divisor = divisor
    if weights_id is not None:
        codec.weights_id = weights_id
    return codec


def test_round_trip_keeps_values_and_meta(tmp_path):
    latent = torch.randn(4, 32, 64)
    codec = _codec("sd-vae", 2.0, "vae-ft-mse.safetensors")
    meta = latent_meta(codec, width=512, height=256)
    save_latent(tmp_path / "k1.safetensors", latent, meta)
    back, got = load_latent(tmp_path / "k1.safetensors")
    assert torch.equal(back, latent) and back.dtype == torch.float32
    assert got == {"codec": "sd-vae", "divisor": 2.0, "weights": "vae-ft-mse.safetensors",
                   "width": 512, "height": 256}
    assert reusable(got, codec)
    assert [p.name for p in tmp_path.iterdir()] == ["k1.safetensors"]  # no temporary left


def test_bf16_and_non_contiguous_latents_are_stored(tmp_path):
    latent = torch.randn(4, 8, 16).transpose(1, 2).to(torch.bfloat16)
    save_latent(tmp_path / "k.safetensors", latent, {"codec": "taesd"})
    back, _ = load_latent(tmp_path / "k.safetensors")
    assert torch.equal(back, latent)


@pytest.mark.parametrize("stored, current, ok", [
    (("taesd", 1.0, None), ("taesd", None, None), True),
    (("taesd", 1.0, None), ("sd-vae", None, None), False),          # another latent space
    (("taesd", 1.0, None), ("taesdxl", None, None), False),
    (("taesd", 2.0, None), ("taesd", 1.0, None), False),            # another size
    (("sd-vae", 1.0, "a.safetensors"), ("sd-vae", 1.0, "b.safetensors"), False),
    (("sd-vae", 1.0, None), ("sd-vae", 1.0, "b.safetensors"), True),  # older meta: name is enough
    (("pixel", 2, None), ("pixel", 2, None), True),
])
def test_reusable(stored, current, ok):
    meta = latent_meta(_codec(*stored))
    assert reusable(meta, _codec(*current)) is ok


def test_meta_with_a_bad_divisor_is_not_reusable():
    assert not reusable({"codec": "taesd", "divisor": "half"}, _codec("taesd"))
    assert not reusable({}, _codec("taesd"))


def test_a_damaged_latent_file_is_a_codec_error(tmp_path):
    path = tmp_path / "k.safetensors"
    save_latent(path, torch.randn(4, 8, 8), {"codec": "taesd"})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CodecError, match="k.safetensors: not a stored latent"):
        load_latent(path)


def test_a_weight_file_is_not_a_stored_latent(tmp_path):
    from safetensors.torch import save_file

    save_file({"encoder.conv_in.weight": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(CodecError, match="not a stored latent"):
        load_latent(tmp_path / "w.safetensors")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_latent(tmp_path / "nope.safetensors")
