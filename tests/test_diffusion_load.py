"""Building the pipeline offline (dreamd/backends/diffusion/load.py, tokenizer.py,
device.py): the shipped config skeletons are the real architectures, a single file in the
original layout loads with no socket opened, folders and hub ids load from disk, the
tokenizer needs no download, and a GPU this torch cannot run is named with its fix."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
import torch

from dreamd import config as C
from dreamd.backends.diffusion import device, load, tokenizer
from tests import diffusion_tiny as tiny

# Parameters of the released models (UNet, VAE, text encoder(s)), counted from their configs
REAL = {"sd15": (859_520_964, 83_653_863, [123_060_480]),
        "sd21": (865_910_724, 83_653_863, [340_387_840]),
        "sdxl": (2_567_463_684, 83_653_863, [123_060_480, 694_659_840])}


@pytest.mark.parametrize("family", sorted(REAL))
def test_the_shipped_skeletons_are_the_real_architectures(family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    skel = load.skeleton_dir(family)
    count = lambda m: sum(p.numel() for p in m.parameters())   # noqa: E731
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(skel / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(skel / "vae"))
        texts = [cls(CLIPTextConfig.from_pretrained(skel / name)) for name, cls in
                 (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection))
                 if (skel / name).is_dir()]
    assert (count(unet), count(vae), [count(t) for t in texts]) == REAL[family]
    index = json.loads((skel / "model_index.json").read_text())
    assert index.get("safety_checker", [None])[0] is None      # never downloaded


def test_the_tokenizer_is_clips_without_a_download():
    from open_clip.tokenizer import SimpleTokenizer

    tok = tokenizer.clip_tokenizer("sd15")
    assert len(tok.get_vocab()) == 49408 and tok.model_max_length == 77
    reference = SimpleTokenizer()
    for text in ("a photo of a cat", "ethereal digital angel, dissolving particles",
                 "wireframe cathedral of light, monochrome, cyan glow!", "Glitch 42 x"):
        assert tok(text).input_ids == [49406, *reference.encode(text), 49407], text
    padded = tok("a cat", padding="max_length", max_length=8).input_ids
    assert padded[-1] == 49407                          # SD 1.x pads with <|endoftext|>
    assert tokenizer.clip_tokenizer("sd21")("a cat", padding="max_length",
                                            max_length=8).input_ids[-1] == 0   # "!"


def refuse_sockets(monkeypatch) -> list:
    tried: list = []

    def connect(self, address):
        tried.append(address)
        raise AssertionError(f"a socket was opened while loading: {address}")
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return tried


def plan_for(tmp_path: Path, **keys) -> load.Plan:
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {"lora": "none", **keys}.items())
    (tmp_path / "dreamd.toml").write_text(f"[diffusion]\n{lines}\n")
    return load.plan(C.load(tmp_path / "dreamd.toml", data_dir=tmp_path / "data"))


def same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> bool:
    ref = reference.state_dict()
    got = model.state_dict()
    return set(ref) <= set(got) and all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_single_file_in_the_original_layout_loads_with_no_network(tmp_path, monkeypatch):
    parts = tiny.tiny_parts(seed=3)
    ckpt = tiny.save_ldm(tmp_path / "mine.safetensors", parts)
    skeleton = tiny.save_skeleton(tmp_path / "skeleton", parts)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    tried = refuse_sockets(monkeypatch)
    p = plan_for(tmp_path, model=str(ckpt), config_dir=str(skeleton))
    pipe, family, scheduler = load.build(p)
    assert tried == [] and (family, scheduler) == ("sd15", "euler_a")
    for name in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(pipe, name), parts[name]), name
    assert pipe.tokenizer.model_max_length == 77
    import os
    assert "HF_HUB_OFFLINE" not in os.environ        # set while loading only


def test_an_fp16_single_file_loads_in_the_asked_dtype(tmp_path, monkeypatch):
    parts = tiny.tiny_parts(seed=4)
    ckpt = tiny.save_ldm(tmp_path / "half.safetensors", parts, dtype=torch.float16)
    skeleton = tiny.save_skeleton(tmp_path / "skeleton", parts)
    refuse_sockets(monkeypatch)
    pipe, _, _ = load.build(plan_for(tmp_path, model=str(ckpt), config_dir=str(skeleton)),
                            dtype="fp32")
    assert pipe.unet.dtype == torch.float32
    ref = parts["unet"].state_dict()["conv_in.weight"].half().float()
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], ref)


def test_a_diffusers_folder_without_a_tokenizer_and_a_hub_id(tmp_path, monkeypatch):
    parts = tiny.tiny_parts(seed=5)
    folder = tiny.save_folder(tmp_path / "folder", parts, tokenizer=False)
    refuse_sockets(monkeypatch)
    pipe, family, _ = load.build(plan_for(tmp_path, model=str(folder)))
    assert family == "sd15" and same_weights(pipe.unet, parts["unet"])
    assert len(pipe.tokenizer.get_vocab()) == 49408       # ours, built from the BPE
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    tiny.save_hub_snapshot(cache, "someone/tiny-sd", parts)
    p = plan_for(tmp_path, model="someone/tiny-sd")
    assert p.model.hub_id == "someone/tiny-sd"
    pipe, _, _ = load.build(p)
    assert same_weights(pipe.vae, parts["vae"])


def test_a_pulled_folder_of_fp16_weights_only(tmp_path, monkeypatch):
    from diffusers import StableDiffusionImg2ImgPipeline

    parts = tiny.tiny_parts(seed=6)
    folder = tiny.save_folder(tmp_path / "folder", parts)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder)
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    for f in (tmp_path / "fp16").rglob("*.safetensors"):
        assert ".fp16." in f.name
    refuse_sockets(monkeypatch)
    loaded, _, _ = load.build(plan_for(tmp_path, model=str(tmp_path / "fp16")))
    assert same_weights(loaded.text_encoder, parts["text_encoder"])


# ---------------------------------------------------------------- the device

@pytest.mark.parametrize("capability, arches, ok", [
    ((5, 2), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], False),  # Maxwell, cu130
    ((6, 1), ["sm_75", "sm_80", "sm_90"], False),                                 # Pascal
    ((6, 1), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80"], True),                # cu126
    ((8, 9), ["sm_75", "sm_80", "sm_86", "sm_90"], True),                         # Ada on sm_86
    ((9, 0), ["sm_80", "compute_80"], True),                                      # PTX JIT
    ((7, 0), ["sm_75", "compute_75"], False),
])
def test_which_cards_a_build_can_run(capability, arches, ok):
    assert device.arch_supported(capability, arches) is ok


def test_a_gpu_this_torch_cannot_run_is_named_with_the_fix(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (5, 2))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA GeForce GTX TITAN X")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    caplog.set_level(logging.WARNING, logger="dreamd.diffusion")
    placed = device.place("auto", 0, "auto")
    assert (placed.device, placed.dtype) == ("cpu", "fp32")
    (line,) = [r.getMessage() for r in caplog.records]
    assert "GTX TITAN X" in line and "compute capability 5.2" in line
    assert "cu126" in line and "on the CPU" in line
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 6))
    placed = device.place("auto", 0, "auto")
    assert (placed.device, placed.dtype) == ("cuda:0", "fp16")
    assert device.place("cpu", 0, "auto").device == "cpu"


def test_cuda_asked_for_without_a_gpu_warns_and_uses_the_cpu(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.set_level(logging.WARNING, logger="dreamd.diffusion")
    placed = device.place("cuda", 0, "fp16")
    assert (placed.device, placed.dtype) == ("cpu", "fp32")
    assert any("diffusion.device = cuda" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- dreamd doctor

def test_doctor_loads_the_model_without_running_it_and_counts_its_memory(tmp_path,
                                                                         monkeypatch):
    from dreamd.backends.diffusion import doctor

    parts = tiny.tiny_parts(seed=8)
    ckpt = tiny.save_ldm(tmp_path / "mine.safetensors", parts)
    skeleton = tiny.save_skeleton(tmp_path / "skeleton", parts)
    lora = tiny.save_lora(tmp_path / "lcm-lora-mine.safetensors", parts["unet"])
    refuse_sockets(monkeypatch)
    plan_for(tmp_path, model=str(ckpt), config_dir=str(skeleton), lora=str(lora))
    cfg = C.load(tmp_path / "dreamd.toml", data_dir=tmp_path / "data")
    ran = []
    monkeypatch.setattr(torch.nn.Module, "__call__", lambda *a, **kw: ran.append(a))
    verdict, detail = doctor.check(cfg)
    assert verdict == "ok" and ran == [], detail
    params = sum(p.numel() for name in ("unet", "vae", "text_encoder")
                 for p in parts[name].parameters())
    assert f"{params / 1e6:,.1f} M parameters" in detail
    for words in ("mine.safetensors", "loads", "LoRA lcm-lora-mine.safetensors fused",
                  "tokenizer 49,408 tokens", "runs on cpu, fp32", "scheduler lcm"):
        assert words in detail, (words, detail)


def test_doctor_names_a_missing_model_and_its_pull_command(tmp_path, monkeypatch):
    from dreamd.backends.diffusion import doctor

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "dreamd.toml").write_text('[diffusion]\nmodel = "someone/nothing-here"\n')
    verdict, detail = doctor.check(C.load(tmp_path / "dreamd.toml", data_dir=tmp_path / "d"))
    assert verdict == "problem"
    assert "`dreamd models pull someone/nothing-here`" in detail
    assert "procedural backend" in detail
