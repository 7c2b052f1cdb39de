"""What `dreamd models pull` leaves is enough for img2img: a tiny Stable Diffusion pipeline of
the real architecture (random weights, built from configs as diffusers' own tests do) saved
as fp16-variant safetensors beside what a real repo also holds, served by the hub stand-in,
pulled, then loaded by diffusers from the cache by its hub id with the hub gone and
HF_HUB_OFFLINE=1, and run for two img2img steps."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dreamd.models.selection import folder_variant
from tests import model_files as mf
from tests.hub_double import Repo
from tests.test_models_pull import env, hub, run, snapshot  # noqa: F401

TINY = "tiny/stable-diffusion"


def tiny_pipeline(folder: Path) -> dict[str, bytes]:
    """The files of a saved tiny pipeline (diffusers' get_dummy_components sizes), and the
    parts of a real SD 1.5 repo that pull must leave on the hub."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4)
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000))
    # in-memory vocabulary and merges (transformers 5 ignores vocab_file=, research note 2.3)
    tokenizer = CLIPTokenizer(vocab={"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2,
                                     "a</w>": 3, "dream</w>": 4}, merges=[],
                              model_max_length=77)
    pipe = StableDiffusionImg2ImgPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, variant="fp16", safe_serialization=True)
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    # the model_index of the real repo names a safety checker and a feature extractor
    index = json.loads(files["model_index.json"])
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    files["model_index.json"] = json.dumps(index).encode()
    files["feature_extractor/preprocessor_config.json"] = json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, "size": 224,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]}).encode()
    files["safety_checker/config.json"] = b"{}"
    files["safety_checker/model.fp16.safetensors"] = mf.safetensors_bytes(mf.TEXT_FP16, 50)
    files["unet/diffusion_pytorch_model.bin"] = b"\x80\x02" + b"\0" * 4096
    return files


LOAD = textwrap.dedent("""
    import json, socket, sys
    import torch
    from PIL import Image
    from diffusers import StableDiffusionImg2ImgPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a socket was opened while loading offline")
    socket.socket.connect = refuse
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        sys.argv[1], variant=sys.argv[2], safety_checker=None, local_files_only=True)
    out = pipe(prompt="a dream", image=Image.new("RGB", (64, 64), (40, 90, 160)),
               num_inference_steps=2, strength=0.5, output_type="np",
               generator=torch.Generator().manual_seed(0))
    print("IMAGES=" + json.dumps({"shape": list(out.images.shape),
                                  "std": float(out.images.std())}))
""")


@pytest.mark.slow
def test_a_pulled_pipeline_loads_offline_and_makes_an_image(hub, env, tmp_path):
    files = tiny_pipeline(tmp_path / "saved")
    repo = hub.add(Repo(TINY, files))
    proc = run(env, "pull", TINY)
    assert proc.returncode == 0, proc.stderr
    snap = snapshot(env, repo)
    assert sorted(p.name for p in snap.iterdir()) == [
        "feature_extractor", "model_index.json", "scheduler", "text_encoder", "tokenizer",
        "unet", "vae"]
    assert not list(snap.rglob("*.bin"))
    assert folder_variant(snap) == "fp16"
    hub.stop()                                      # no hub at all while loading
    done = subprocess.run([sys.executable, "-c", LOAD, TINY, "fp16"],
                          env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    images = json.loads(done.stdout.rsplit("IMAGES=", 1)[1])
    assert images["shape"] == [1, 64, 64, 3] and images["std"] > 0
