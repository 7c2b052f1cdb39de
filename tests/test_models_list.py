"""`dreamd models list`: what is usable here, from a Hugging Face cache filled by a real pull
(from the hub stand-in), a ComfyUI models folder of safetensors files written by the tests
(the real key names of SD 1.5 and SDXL, tiny tensors), and what [diffusion] points at."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests import model_files as mf
from tests.conftest import dreamd_cmd
from tests.hub_double import Repo
from tests.test_cli_imports import PROBE
from tests.test_models_pull import LORA, SD15, env, hub, run, snapshot  # noqa: F401


@pytest.fixture
def comfy(tmp_path) -> Path:
    """A ComfyUI folder: checkpoints of both families, a LoRA, and what is no model."""
    models = tmp_path / "ComfyUI" / "models"
    ck = models / "checkpoints"
    mf.write_safetensors(ck / "v1-5-mine.safetensors", mf.SD15_CHECKPOINT, 30)
    mf.write_safetensors(ck / "xl" / "sd_xl_base_1.0.safetensors", mf.SDXL_CHECKPOINT, 31)
    whole = mf.safetensors_bytes(mf.SD15_CHECKPOINT, 32)
    (ck / "cut-short.safetensors").write_bytes(whole[:len(whole) // 2])
    mf.write_safetensors(ck / "vae-only.safetensors", mf.VAE_FP16, 33)
    with zipfile.ZipFile(ck / "old.ckpt", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    mf.write_safetensors(models / "loras" / "lcm-lora-sdv1-5.safetensors", mf.SD15_LORA, 34)
    (models / "loras" / "notes.txt").write_text("not weights")
    return tmp_path / "ComfyUI"


def listing(env, config: Path) -> dict:
    proc = subprocess.run(dreamd_cmd("models", "list", "--json", "--config", str(config)),
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def by_path(found: dict) -> dict[str, dict]:
    return {Path(m["path"]).name if m["path"] else m["value"]: m for m in found["models"]}


def test_list_shows_the_cache_the_comfyui_folder_and_the_configured_model(hub, env, comfy,
                                                                          tmp_path):
    sd = hub.add(Repo(SD15, mf.sd15_pipeline_files()))
    hub.add(Repo(LORA, mf.lora_files()))
    for hub_id in (SD15, LORA):
        assert run(env, "pull", hub_id).returncode == 0
    config = tmp_path / "dreamd.toml"
    config.write_text(f'[comfyui]\nmodels_dir = "{comfy}"\n'
                      f'[diffusion]\nmodel = "xl/sd_xl_base_1.0.safetensors"\nlora = "auto"\n')
    found = listing(env, config)
    assert found["hub_cache"] == f"{env['HF_HOME']}/hub"
    assert found["comfyui_models_dir"] == str(comfy / "models")
    assert found["configured"] == {"model": "xl/sd_xl_base_1.0.safetensors", "lora": "auto"}
    models = by_path(found)
    ck = comfy / "models" / "checkpoints"

    pipeline = models[sd.commit]
    assert (pipeline["kind"], pipeline["family"], pipeline["value"], pipeline["source"]) == (
        "pipeline", "sd15", SD15, "hf-cache")
    assert pipeline["size"] == sum(len(sd.files[f]) for f in mf.SD15_PULLED)
    assert pipeline["usable"] and pipeline["configured"] is None
    lora = models["pytorch_lora_weights.safetensors"]
    assert (lora["kind"], lora["family"], lora["value"]) == ("lora", "sd15", LORA)

    xl = models["sd_xl_base_1.0.safetensors"]
    assert (xl["kind"], xl["family"], xl["family_label"], xl["configured"], xl["source"]) == (
        "checkpoint", "sdxl", "SDXL", "model", "comfyui")
    assert xl["size"] == (ck / "xl" / "sd_xl_base_1.0.safetensors").stat().st_size
    mine = models["v1-5-mine.safetensors"]
    assert (mine["kind"], mine["family"], mine["usable"]) == ("checkpoint", "sd15", True)
    assert models["old.ckpt"]["kind"] == "checkpoint" and models["old.ckpt"]["family"] is None
    cut = models["cut-short.safetensors"]
    assert not cut["usable"] and "truncated" in cut["note"]
    vae = models["vae-only.safetensors"]
    assert not vae["usable"] and "not a Stable Diffusion checkpoint" in vae["note"]
    comfy_lora = models["lcm-lora-sdv1-5.safetensors"]
    assert (comfy_lora["kind"], comfy_lora["family"]) == ("lora", "sd15")
    assert "notes.txt" not in models
    # lora = auto with an SDXL model: the SDXL LCM-LoRA, which is not here, and how to get it
    missing = models["latent-consistency/lcm-lora-sdxl"]
    assert (missing["kind"], missing["configured"], missing["usable"]) == ("missing", "lora",
                                                                           False)
    assert "`dreamd models pull latent-consistency/lcm-lora-sdxl`" in missing["note"]

    # the table says the same, the configured lines marked
    proc = subprocess.run(dreamd_cmd("models", "list", "--config", str(config)), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = proc.stdout.splitlines()
    (xl_row,) = [r for r in rows if r.endswith("sd_xl_base_1.0.safetensors")]
    assert xl_row.startswith("*") and " checkpoint " in xl_row and " SDXL " in xl_row
    (sd_row,) = [r for r in rows if r.endswith(" " + SD15)]
    assert not sd_row.startswith("*") and " pipeline " in sd_row and " SD 1.5 " in sd_row
    assert any("truncated" in r for r in rows)
    assert "* = what diffusion.model / diffusion.lora point at" in rows


def test_a_pulled_pipeline_and_lora_are_the_default_pair(hub, env, tmp_path):
    """diffusion.model = the hub id, lora = auto: both pulled entries are marked."""
    hub.add(Repo(SD15, mf.sd15_pipeline_files()))
    hub.add(Repo(LORA, mf.lora_files()))
    config = tmp_path / "dreamd.toml"
    config.write_text(f'[diffusion]\nmodel = "{SD15}"\n')
    assert run(env, "pull", SD15).returncode == 0
    found = listing(env, config)
    marks = {m["value"]: m["configured"] for m in found["models"]}
    # the LoRA of lora = auto is not pulled yet: listed as missing, with its pull command
    assert marks == {SD15: "model", LORA: "lora"}
    assert [m["kind"] for m in found["models"] if m["value"] == LORA] == ["missing"]
    assert run(env, "pull", LORA).returncode == 0
    found = listing(env, config)
    assert {m["value"]: (m["kind"], m["configured"]) for m in found["models"]} == {
        SD15: ("pipeline", "model"), LORA: ("lora", "lora")}


def test_a_model_elsewhere_on_disk_is_listed_and_an_empty_machine_says_what_to_do(env,
                                                                                   tmp_path):
    elsewhere = mf.write_safetensors(tmp_path / "mine" / "dream.safetensors",
                                     mf.SD15_CHECKPOINT, 40)
    config = tmp_path / "dreamd.toml"
    config.write_text('[diffusion]\nmodel = "mine/dream.safetensors"\nlora = "none"\n')
    found = listing(env, config)
    (entry,) = found["models"]
    assert (entry["kind"], entry["family"], entry["source"], entry["configured"]) == (
        "checkpoint", "sd15", "config", "model")
    assert entry["path"] == str(elsewhere)

    empty = tmp_path / "empty.toml"
    empty.write_text('[diffusion]\nlora = "none"\n')
    proc = subprocess.run(dreamd_cmd("models", "list", "--config", str(empty)), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert f"run `dreamd models pull {SD15}` to fetch it" in proc.stdout
    assert proc.stderr.strip().splitlines() == [(
        f"no model yet: `dreamd models pull {SD15}`, or set diffusion.model to a "
        f".safetensors checkpoint you have")]


def test_list_imports_neither_torch_nor_numpy(hub, env, comfy, tmp_path):
    hub.add(Repo(LORA, mf.lora_files()))
    assert run(env, "pull", LORA).returncode == 0
    config = tmp_path / "dreamd.toml"
    config.write_text(f'[comfyui]\nmodels_dir = "{comfy}"\n')
    for extra in ([], ["--json"]):
        proc = subprocess.run([sys.executable, "-c", PROBE, "models", "list", "--config",
                               str(config), *extra], env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        imported = json.loads(proc.stdout.rsplit("IMPORTED=", 1)[1])
        assert "torch" not in imported and "numpy" not in imported, imported
        assert "lcm-lora-sdv1-5" in proc.stdout
