"""Finding the in-process model and telling what it is, from files on disk (no torch): each
bad input is one ModelError that names the file and the fix (dreamd/backends/diffusion/
locate.py and load.plan)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dreamd import config as C
from dreamd.backends.diffusion import load, locate
from dreamd.errors import ModelError
from tests import model_files as mf

SDXL_LORA = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight":
        ("F16", [16, 2048]),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight":
        ("F16", [640, 16]),
}


def cfg_for(tmp_path: Path, **diffusion: str) -> C.Config:
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in diffusion.items())
    text = f'[generation]\nbackend = "diffusers"\n[diffusion]\n{lines}\n'
    (tmp_path / "dreamd.toml").write_text(text)
    return C.load(tmp_path / "dreamd.toml", data_dir=tmp_path / "data")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def snapshot(cache: Path, hub_id: str, files: dict[str, bytes]) -> Path:
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    commit = "f" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    for name, data in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(data)
    return snap


def test_a_checkpoint_file_is_found_and_its_family_read_from_the_header(tmp_path, hub_cache):
    ck = mf.write_safetensors(tmp_path / "m.safetensors", mf.SD15_CHECKPOINT)
    p = load.plan(cfg_for(tmp_path, model=str(ck), lora="none"))
    assert (p.model.kind, p.family, p.lora) == ("file", "sd15", None)
    xl = mf.write_safetensors(tmp_path / "xl.safetensors", mf.SDXL_CHECKPOINT)
    assert load.plan(cfg_for(tmp_path, model=str(xl), lora="none")).family == "sdxl"


def test_a_relative_path_is_relative_to_the_config_file(tmp_path, hub_cache, monkeypatch):
    mf.write_safetensors(tmp_path / "models" / "m.safetensors", mf.SD15_CHECKPOINT)
    monkeypatch.chdir("/")
    p = load.plan(cfg_for(tmp_path, model="models/m.safetensors", lora="none"))
    assert p.model.path == (tmp_path / "models" / "m.safetensors").resolve()


def test_a_name_in_comfyui_checkpoints_and_the_empty_default(tmp_path, hub_cache):
    models = tmp_path / "ComfyUI" / "models"
    mf.write_safetensors(models / "checkpoints" / "v1-5-pruned-emaonly.safetensors",
                         mf.SD15_CHECKPOINT)
    text = (f'[generation]\nbackend = "diffusers"\n[comfyui]\nmodels_dir = '
            f'"{tmp_path / "ComfyUI"}"\n[diffusion]\nlora = "none"\n')
    (tmp_path / "dreamd.toml").write_text(text)
    cfg = C.load(tmp_path / "dreamd.toml", data_dir=tmp_path / "data")
    # empty model: comfyui.checkpoint in the models dir (the ComfyUI folder itself given)
    p = load.plan(cfg)
    assert p.model.path.name == "v1-5-pruned-emaonly.safetensors"
    assert "comfyui.checkpoint" in p.model.where
    cfg.diffusion.model = "v1-5-pruned-emaonly"          # the suffix may be left out
    assert load.plan(cfg).model.path.name == "v1-5-pruned-emaonly.safetensors"


def test_a_hub_id_is_its_snapshot_in_the_hf_cache(tmp_path, hub_cache):
    files = {k: v for k, v in mf.sd15_pipeline_files().items()
             if k in mf.SD15_PULLED}
    snap = snapshot(hub_cache, "org/model", files)
    p = load.plan(cfg_for(tmp_path, model="org/model", lora="none"))
    assert (p.model.kind, p.model.path, p.model.hub_id, p.family) == \
        ("folder", snap, "org/model", "sd15")
    assert p.parameters > 0


def test_missing_model_says_the_pull_command(tmp_path, hub_cache):
    with pytest.raises(locate.ModelNotFoundError) as info:
        load.plan(cfg_for(tmp_path, model="org/absent"))
    assert "`dreamd models pull org/absent`" in str(info.value)
    assert str(hub_cache) in str(info.value)
    with pytest.raises(locate.ModelNotFoundError) as info:
        load.plan(cfg_for(tmp_path))        # empty: the default hub id
    assert f"`dreamd models pull {locate.DEFAULT_MODEL}`" in str(info.value)
    with pytest.raises(locate.ModelNotFoundError) as info:
        load.plan(cfg_for(tmp_path, model=str(tmp_path / "gone.safetensors")))
    message = str(info.value)
    assert "gone.safetensors" in message and "no such file" in message
    assert f"dreamd models pull {locate.DEFAULT_MODEL}" in message


def test_a_truncated_checkpoint_is_named_as_such(tmp_path, hub_cache):
    whole = mf.safetensors_bytes(mf.SD15_CHECKPOINT)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole[: len(whole) - 100])
    with pytest.raises(ModelError, match=r"cut\.safetensors: truncated: .*again"):
        load.plan(cfg_for(tmp_path, model=str(cut), lora="none"))


@pytest.mark.parametrize("content, words", [
    (b"", "empty or cut short"),
    (b"\xff" * 64, "not a safetensors file"),
    (b"<html>not a model</html>" * 10, "not a safetensors file"),
])
def test_garbage_is_not_a_checkpoint(tmp_path, hub_cache, content, words):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(ModelError, match=words):
        load.plan(cfg_for(tmp_path, model=str(bad), lora="none"))


def test_a_pickled_file_that_is_no_checkpoint(tmp_path, hub_cache):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK-not-a-zip" * 20)
    with pytest.raises(ModelError, match="neither a safetensors file nor a torch checkpoint"):
        load.plan(cfg_for(tmp_path, model=str(bad), lora="none"))
    good = tmp_path / "old.ckpt"
    with zipfile.ZipFile(good, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    assert load.plan(cfg_for(tmp_path, model=str(good), lora="none")).family is None


@pytest.mark.parametrize("tensors, words", [
    (mf.UNET_FP16, "looks like one diffusers component"),
    (mf.VAE_FP16, "looks like a VAE"),
    (mf.SD15_LORA, "looks like a LoRA; that goes in diffusion.lora"),
    ({"first_stage_model.decoder.conv_in.weight": ("F16", [8, 4, 3, 3])}, "looks like a VAE"),
])
def test_weights_that_are_not_a_checkpoint(tmp_path, hub_cache, tensors, words):
    f = mf.write_safetensors(tmp_path / "x.safetensors", tensors)
    with pytest.raises(ModelError) as info:
        load.plan(cfg_for(tmp_path, model=str(f), lora="none"))
    assert "not a Stable Diffusion checkpoint" in str(info.value)
    assert words in str(info.value) and "x.safetensors" in str(info.value)


def test_an_inpainting_unet_is_refused(tmp_path, hub_cache):
    tensors = dict(mf.SD15_CHECKPOINT)
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = ("F16", [320, 9, 3, 3])
    f = mf.write_safetensors(tmp_path / "inpaint.safetensors", tensors)
    with pytest.raises(ModelError, match="9 input channels"):
        load.plan(cfg_for(tmp_path, model=str(f), lora="none"))


def test_a_family_that_contradicts_the_weights(tmp_path, hub_cache):
    ck = mf.write_safetensors(tmp_path / "m.safetensors", mf.SD15_CHECKPOINT)
    with pytest.raises(ModelError, match='diffusion.family = .sdxl., but .* SD 1.x model: set '
                                         'diffusion.family = "auto"'):
        load.plan(cfg_for(tmp_path, model=str(ck), family="sdxl", lora="none"))


def test_an_incomplete_pull_says_to_pull_again(tmp_path, hub_cache):
    files = {k: v for k, v in mf.sd15_pipeline_files().items() if k in mf.SD15_PULLED
             and not k.startswith("unet/diffusion")}
    snapshot(hub_cache, "org/half", files)
    with pytest.raises(ModelError, match=r"incomplete model folder \(no weights for unet\): "
                                         r"`dreamd models pull org/half` again"):
        load.plan(cfg_for(tmp_path, model="org/half", lora="none"))


def test_lora_auto_is_the_lcm_lora_of_the_family(tmp_path, hub_cache):
    ck = mf.write_safetensors(tmp_path / "m.safetensors", mf.SD15_CHECKPOINT)
    with pytest.raises(locate.ModelNotFoundError,
                       match="`dreamd models pull latent-consistency/lcm-lora-sdv1-5`"):
        load.plan(cfg_for(tmp_path, model=str(ck)))
    snapshot(hub_cache, "latent-consistency/lcm-lora-sdv1-5",
             {"pytorch_lora_weights.safetensors": mf.safetensors_bytes(mf.SD15_LORA)})
    p = load.plan(cfg_for(tmp_path, model=str(ck)))
    assert p.lora.hub_id == "latent-consistency/lcm-lora-sdv1-5"
    assert load.choose_scheduler("auto", p) == "lcm"
    # a few-step model needs none
    turbo = mf.write_safetensors(tmp_path / "sd_turbo.safetensors", mf.SD15_CHECKPOINT)
    p = load.plan(cfg_for(tmp_path, model=str(turbo)))
    assert p.lora is None and p.few_step
    assert load.choose_scheduler("auto", p) == "euler_a"


def test_a_lora_for_another_family_is_refused_from_its_header(tmp_path, hub_cache):
    ck = mf.write_safetensors(tmp_path / "m.safetensors", mf.SD15_CHECKPOINT)
    lora = mf.write_safetensors(tmp_path / "xl-lora.safetensors", SDXL_LORA)
    with pytest.raises(ModelError) as info:
        load.plan(cfg_for(tmp_path, model=str(ck), lora=str(lora)))
    message = str(info.value)
    assert "xl-lora.safetensors was made for SDXL models" in message
    assert "SD 1.x" in message and 'diffusion.lora = "none"' in message
    notalora = mf.write_safetensors(tmp_path / "vae.safetensors", mf.VAE_FP16)
    with pytest.raises(ModelError, match="vae.safetensors: not a LoRA"):
        load.plan(cfg_for(tmp_path, model=str(ck), lora=str(notalora)))


def test_the_licence_notice_for_non_commercial_weights(tmp_path, hub_cache):
    for name, said in (("sd_turbo.safetensors", "SD-Turbo"),
                       ("sd_xl_turbo_1.0_fp16.safetensors", "SDXL-Turbo")):
        f = mf.write_safetensors(tmp_path / name, mf.SD15_CHECKPOINT)
        notice = load.plan(cfg_for(tmp_path, model=str(f), lora="none")).notice
        assert said in notice and "Non-Commercial" in notice and "\n" not in notice
    f = mf.write_safetensors(tmp_path / "v1-5.safetensors", mf.SD15_CHECKPOINT)
    assert load.plan(cfg_for(tmp_path, model=str(f), lora="none")).notice is None


def test_finding_a_model_never_imports_torch(tmp_path):
    ck = mf.write_safetensors(tmp_path / "m.safetensors", mf.SD15_CHECKPOINT)
    probe = ("import sys; from dreamd.backends.diffusion import locate; "
             f"print(locate.inspect_file(__import__('pathlib').Path({str(ck)!r})).family); "
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[:2] == ["sd15", "[]"]
