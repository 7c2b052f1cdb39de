"""The real SD 1.5 architecture, once: random weights (built on the meta device, given
storage, filled with noise) written as an fp16 single file in the original layout, as a
ComfyUI checkpoint is, then loaded through the config skeleton dreamd ships, offline, and
made into one keyframe at 256x128 in one step on the CPU."""

from __future__ import annotations

import gc
import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from dreamd import config as C
from dreamd.backends import KeyframeRequest
from dreamd.backends.diffusion.backend import DiffusionBackend
from tests import diffusion_tiny as tiny


@pytest.mark.slow
def test_the_full_sd15_architecture_from_a_single_file_makes_a_keyframe(tmp_path, monkeypatch):
    parts = tiny.full_sd15_parts(seed=0)
    ckpt = tiny.save_ldm(tmp_path / "v1-5-random.safetensors", parts, dtype=torch.float16)
    probes = {"conv_in.weight": parts["unet"].state_dict()["conv_in.weight"].half(),
              "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight":
                  parts["unet"].state_dict()[
                      "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"].half()}
    del parts
    gc.collect()

    def refuse(self, address):
        raise AssertionError(f"a socket was opened: {address}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    (tmp_path / "dreamd.toml").write_text(
        '[generation]\nbackend = "diffusers"\n[diffusion]\n'
        f'model = {json.dumps(str(ckpt))}\nlora = "none"\nsteps = 1\ndevice = "cpu"\n')
    cfg = C.load(tmp_path / "dreamd.toml", data_dir=tmp_path / "data")
    backend = DiffusionBackend(cfg).start()
    assert backend._plan.family == "sd15" and backend._plan.parameters == 1_066_235_307
    image = Image.new("RGB", (256, 128), (30, 60, 120))
    result = backend.generate(KeyframeRequest(
        chain_index=1, width=256, height=128, seed=5, theme="t", prompt="a dream",
        negative_prompt="", denoise=1.0, image=image))
    assert result.info["backend"] == "diffusers" and result.info["steps"] == 1
    assert result.image.size == (256, 128)
    assert np.isfinite(np.asarray(result.image, dtype=np.float32)).all()
    unet = backend._pipe.unet.state_dict()
    for name, expected in probes.items():
        assert torch.equal(unet[name].half(), expected), name
    backend.close()
