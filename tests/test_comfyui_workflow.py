"""Workflow templates: loading, the default mapping found by walking the graph, explicit
overrides, and the check against a real server's /object_info."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from dreamd.backends.comfyui.workflow import (KEYS, WorkflowError, check_against, default_mapping,
                                              fill, load_workflow, output_node, resolve_mapping)

try:
    from tests.comfyui_double import shared_file
except ModuleNotFoundError:
    from comfyui_double import shared_file  # type: ignore[no-redef]

OBJECT_INFO = json.loads(shared_file("object_info.json").read_text())
SERVER = "http://127.0.0.1:8188"


def paths(mapping) -> dict[str, str]:
    return {k: str(v) for k, v in mapping.items()}


def shipped(name: str, checkpoint: str = "random-sd15.safetensors") -> dict:
    wf, _ = load_workflow(name)
    return fill(wf, resolve_mapping(wf), {"checkpoint": checkpoint})


def test_shipped_img2img_mapping():
    wf, path = load_workflow("sd15_img2img")
    assert path.name == "sd15_img2img.json"
    assert paths(default_mapping(wf)) == {
        "image": "2.inputs.image", "prompt": "4.inputs.text", "negative_prompt": "5.inputs.text",
        "seed": "6.inputs.seed", "steps": "6.inputs.steps", "cfg": "6.inputs.cfg",
        "sampler": "6.inputs.sampler_name", "scheduler": "6.inputs.scheduler",
        "denoise": "6.inputs.denoise", "checkpoint": "1.inputs.ckpt_name"}
    # PreviewImage: the result goes to ComfyUI's temp/, never piling up in its output/
    assert wf["8"]["class_type"] == "PreviewImage" and output_node(wf, default_mapping(wf)) == "8"


def test_shipped_txt2img_mapping_has_size_and_no_denoise():
    wf, _ = load_workflow("sd15_txt2img.json")
    mapping = paths(default_mapping(wf))
    assert mapping["width"] == "3.inputs.width" and mapping["height"] == "3.inputs.height"
    assert "denoise" not in mapping and "image" not in mapping
    assert wf["6"]["inputs"]["denoise"] == 1.0


def test_transcript_examples_map_the_same_way():
    for name, image in (("example_img2img_api.json", True), ("example_txt2img_api.json", False)):
        wf = json.loads(shared_file(name).read_text())
        mapping = paths(default_mapping(wf))
        assert mapping["prompt"] == "4.inputs.text" and mapping["negative_prompt"] == "5.inputs.text"
        assert ("image" in mapping) is image


def test_walk_finds_slots_through_other_nodes_and_advanced_samplers():
    # A positive prompt behind a combine node, a LoRA between checkpoint and sampler,
    # KSamplerAdvanced's noise_seed, prompts on unusual node ids.
    wf = {
        "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
        "11": {"class_type": "LoraLoader", "inputs": {"model": ["10", 0], "clip": ["10", 1], "lora_name": "l"}},
        "20": {"class_type": "CLIPTextEncode", "inputs": {"text": "pos", "clip": ["11", 1]}},
        "21": {"class_type": "CLIPTextEncode", "inputs": {"text": "style", "clip": ["11", 1]}},
        "22": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["20", 0], "conditioning_2": ["21", 0]}},
        "23": {"class_type": "CLIPTextEncode", "inputs": {"text": "neg", "clip": ["11", 1]}},
        "30": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "40": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["11", 0], "positive": ["22", 0], "negative": ["23", 0], "latent_image": ["30", 0],
            "noise_seed": 1, "steps": 4, "cfg": 1.0, "sampler_name": "lcm", "scheduler": "sgm_uniform",
            "add_noise": "enable", "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
        "50": {"class_type": "VAEDecode", "inputs": {"samples": ["40", 0], "vae": ["10", 2]}},
        "60": {"class_type": "SaveImage", "inputs": {"images": ["50", 0], "filename_prefix": "x"}},
    }
    mapping = paths(default_mapping(wf))
    assert mapping["seed"] == "40.inputs.noise_seed"
    assert mapping["prompt"] in ("20.inputs.text", "21.inputs.text")
    assert mapping["negative_prompt"] == "23.inputs.text"
    assert mapping["checkpoint"] == "10.inputs.ckpt_name"
    assert mapping["width"] == "30.inputs.width"


def test_overrides_win_and_empty_string_unsets():
    wf, _ = load_workflow("sd15_img2img")
    mapping = paths(resolve_mapping(wf, {"prompt": "5.inputs.text", "steps": ""}))
    assert mapping["prompt"] == "5.inputs.text" and "steps" not in mapping


@pytest.mark.parametrize("overrides, message", [
    ({"seed": "99.inputs.seed"}, r"no node '99' \(it has 1, 2, 3, 4, 5, 6, 7, 8\)"),
    ({"seed": "6.inputs.noise_seed"}, r"node 6 \(KSampler\) has no input 'noise_seed' \(it has model, .*denoise\)"),
    ({"seed": "6.seed"}, r"'<node id>.inputs.<input name>'"),
    ({"seed": "6.inputs.model"}, r"is a link"),
    ({"sed": "6.inputs.seed"}, r"mapping key 'sed' is unknown"),
])
def test_bad_overrides_say_what_is_wrong(overrides, message):
    wf, _ = load_workflow("sd15_img2img")
    with pytest.raises(WorkflowError, match=message):
        resolve_mapping(wf, overrides)


def test_fill_sets_values_and_leaves_the_template_alone():
    wf, _ = load_workflow("sd15_img2img")
    before = copy.deepcopy(wf)
    mapping = resolve_mapping(wf)
    filled = fill(wf, mapping, {"seed": 42, "prompt": "a", "width": 64, "checkpoint": None})
    assert filled["6"]["inputs"]["seed"] == 42 and filled["4"]["inputs"]["text"] == "a"
    assert filled["1"]["inputs"]["ckpt_name"] == wf["1"]["inputs"]["ckpt_name"]  # None = keep
    assert wf == before
    assert output_node(wf, mapping) == "8"


def test_loader_accepts_a_path_and_refuses_ui_format_and_junk(tmp_path: Path):
    own = tmp_path / "mine.json"
    own.write_text(shared_file("example_txt2img_api.json").read_text())
    assert load_workflow(str(own))[1] == own
    with pytest.raises(WorkflowError, match="not found.*sd15_img2img, sd15_txt2img"):
        load_workflow("no_such_workflow")
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(WorkflowError, match="UI format"):
        load_workflow(ui)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(WorkflowError, match="cannot be read as JSON"):
        load_workflow(broken)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"inputs": {}}}))
    with pytest.raises(WorkflowError, match="node '1' needs a class_type"):
        load_workflow(bad)


@pytest.mark.parametrize("name", ["sd15_img2img", "sd15_txt2img"])
def test_shipped_workflows_fit_the_real_object_info(name):
    check_against(shipped(name), OBJECT_INFO, source=name, server=SERVER)


def test_unknown_node_type_is_named():
    wf = shipped("sd15_img2img")
    wf["9"] = {"class_type": "ETN_LoadImageBase64", "inputs": {"image": ""}}
    with pytest.raises(WorkflowError, match=r"node 9: class_type 'ETN_LoadImageBase64' is not installed on http"):
        check_against(wf, OBJECT_INFO, source="x", server=SERVER)


def test_wrong_checkpoint_lists_the_ones_the_server_has():
    wf = shipped("sd15_img2img", checkpoint="v1-5-pruned-emaonly.safetensors")
    with pytest.raises(WorkflowError, match=r"checkpoint 'v1-5-pruned-emaonly.safetensors' is not on "
                                            r"http://127.0.0.1:8188; it has: random-sd15.safetensors"):
        check_against(wf, OBJECT_INFO, source="x", server=SERVER)


@pytest.mark.parametrize("field, value, message", [
    ("sampler_name", "euler_magic", r"sampler 'euler_magic' is not one .* knows; valid: euler, euler_cfg_pp"),
    ("scheduler", "linear", r"scheduler 'linear' is not one .* valid: simple, sgm_uniform"),
    ("steps", 0, r"input 'steps': 0 is below the minimum 1"),
    ("denoise", 1.5, r"input 'denoise': 1.5 is above the maximum 1.0"),
    ("cfg", "six", r"input 'cfg': 'six' is not a number"),
])
def test_bad_values_are_named(field, value, message):
    wf = shipped("sd15_img2img")
    wf["6"]["inputs"][field] = value
    with pytest.raises(WorkflowError, match=message):
        check_against(wf, OBJECT_INFO, source="x", server=SERVER)


def test_structure_problems_are_named():
    wf = shipped("sd15_img2img")
    del wf["6"]["inputs"]["model"]
    wf["7"]["inputs"]["samples"] = ["99", 0]
    del wf["8"]
    with pytest.raises(WorkflowError) as err:
        check_against(wf, OBJECT_INFO, source="x", server=SERVER)
    message = str(err.value)
    assert "node 6 (KSampler): required input 'model' is missing" in message
    assert "node 7 (VAEDecode) input 'samples' links to node '99'" in message
    assert "no output node" in message


def test_keys_are_documented_in_the_module():
    import re

    import dreamd.backends.comfyui.workflow as module
    table = module.__doc__.split("The default mapping")[0]
    for key in KEYS:
        assert re.search(rf"^    (\w+, )*{key}\b", table, re.M), key
