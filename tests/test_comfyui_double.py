"""The ComfyUI test double answers the way the real server's transcript shows: if it drifts,
every other ComfyUI test would be testing against a server that does not exist."""

from __future__ import annotations

import io
import json
import re
import time
from typing import Any

import pytest
import requests
from PIL import Image

try:
    from tests.comfyui_double import ComfyUIDouble, shared_file
except ModuleNotFoundError:  # tests/ on sys.path instead of the repo root
    from comfyui_double import ComfyUIDouble, shared_file  # type: ignore[no-redef]

TRANSCRIPT = shared_file("api_transcript.md").read_text()


def section(number: int) -> str:
    match = re.search(rf"^## {number}\. .*?(?=^## |\Z)", TRANSCRIPT, re.S | re.M)
    assert match, f"transcript section {number} not found"
    return match.group(0)


def json_blocks(text: str) -> list[Any]:
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", text, re.S)]


def png(size: tuple[int, int] = (64, 32), colour: tuple[int, int, int] = (40, 80, 120)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def double():
    with ComfyUIDouble() as d:
        yield d


def example() -> dict[str, Any]:
    return json.loads(shared_file("example_img2img_api.json").read_text())


def upload(url: str, name: str, data: bytes, subfolder: str | None = "dream_window",
           overwrite: bool = False) -> requests.Response:
    fields = {"type": "input"}
    if subfolder is not None:
        fields["subfolder"] = subfolder
    if overwrite:
        fields["overwrite"] = "true"
    return requests.post(url + "/upload/image", files={"image": (name, data, "image/png")},
                         data=fields, timeout=5)


def test_idle_answers_match_the_transcript(double):
    assert requests.get(double.url + "/queue", timeout=5).json() == json_blocks(section(7))[0]
    assert requests.get(double.url + "/prompt", timeout=5).json() == json_blocks(section(6))[0]
    assert requests.get(double.url + "/features", timeout=5).json() == json_blocks(section(5))[0]
    assert requests.get(double.url + "/object_info/NoSuchNode", timeout=5).json() == {}
    assert requests.get(double.url + "/history/41640881-ec70-4e4b-8e73-d6328af8dbe7", timeout=5).json() == {}
    stats = requests.get(double.url + "/system_stats", timeout=5).json()
    assert stats["system"]["comfyui_version"] == "0.3.64" and stats["devices"][0]["name"] == "cpu"
    ksampler = requests.get(double.url + "/object_info/KSampler", timeout=5).json()
    assert list(ksampler) == ["KSampler"]
    assert ksampler["KSampler"]["input_order"] == json_blocks(section(3))[0]["KSampler"]["input_order"]


def test_every_route_is_also_under_the_api_prefix(double):
    for path in ("/queue", "/system_stats", "/object_info/KSampler", "/prompt"):
        plain = requests.get(double.url + path, timeout=5).json()
        assert requests.get(double.url + "/api" + path, timeout=5).json() == plain


def test_upload_dedupes_renames_overwrites_and_refuses_a_missing_part(double):
    a, b = png(colour=(1, 2, 3)), png(colour=(3, 2, 1))
    assert upload(double.url, "dw_input_a.png", a).json() == json_blocks(section(9))[0]
    assert upload(double.url, "dw_input_a.png", a).json() == json_blocks(section(10))[0]
    assert upload(double.url, "dw_input_a.png", b).json() == json_blocks(section(11))[0]
    assert upload(double.url, "dw_input_a.png", b, overwrite=True).json() == json_blocks(section(12))[0]
    assert upload(double.url, "dw_root.png", a, subfolder=None).json() == json_blocks(section(13))[0]
    missing = requests.post(double.url + "/upload/image", data={"type": "input"}, timeout=5)
    assert (missing.status_code, missing.content) == (400, b"")


@pytest.mark.parametrize("number", [16, 17, 18, 19, 20, 21, 22, 23, 24])
def test_invalid_prompts_are_refused_like_comfyui(double, number):
    upload(double.url, "dw_input_a.png", png())
    text = section(number)
    blocks = json_blocks(text)
    workflow = example()
    workflow["2"]["inputs"]["image"] = "dream_window/dw_input_a.png"
    removed = re.search(r"Removed node\(s\): \[(.*?)\]", text)
    if removed:
        for node in re.findall(r"'(\w+)'", removed.group(1)):
            del workflow[node]
    else:
        workflow.update(blocks[0])
    expected = blocks[-1]
    resp = requests.post(double.url + "/prompt", json={"prompt": workflow, "client_id": "t"}, timeout=5)
    assert resp.status_code == 400
    got = resp.json()
    assert got["error"] == expected["error"]
    assert set(got["node_errors"]) == set(expected["node_errors"])
    for node_id, node in expected["node_errors"].items():
        mine = got["node_errors"][node_id]
        assert (mine["class_type"], mine["dependent_outputs"]) == (node["class_type"], node["dependent_outputs"])
        key = (lambda e: (e["type"], e["message"], e["details"]))
        assert sorted(map(key, mine["errors"])) == sorted(map(key, node["errors"]))
    assert double.count("POST", "/prompt") == 1 and not double.pending and not double.history


def test_body_without_prompt(double):
    resp = requests.post(double.url + "/prompt", json={"client_id": "t"}, timeout=5)
    assert (resp.status_code, resp.json()) == (400, json_blocks(section(25))[-1])


def test_a_valid_prompt_runs_and_lands_in_history_and_view(double):
    upload(double.url, "dw_frame_1.png", png((64, 32)))
    workflow = example()
    workflow["2"]["inputs"]["image"] = "dream_window/dw_frame_1.png"
    pid = "3aadee30-82de-4eed-8778-1509797c3efa"
    resp = requests.post(double.url + "/prompt", json={"prompt": workflow, "client_id": "c", "prompt_id": pid},
                         timeout=5).json()
    assert resp == {"prompt_id": pid, "number": 0, "node_errors": {}}
    for _ in range(500):
        entry = requests.get(f"{double.url}/history/{pid}", timeout=5).json().get(pid)
        if entry:
            break
        time.sleep(0.01)
    real = json_blocks(section(30))[0]["4512a93a-8f20-443c-8088-6155d664e6d5"]
    assert set(entry) == set(real)
    assert entry["prompt"][1:4] == [pid, workflow, {"client_id": "c"}] and entry["prompt"][4] == ["8"]
    assert [m[0] for m in entry["status"]["messages"]] == [m[0] for m in real["status"]["messages"]]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    image = entry["outputs"]["8"]["images"][0]
    assert image == {"filename": "keyframe_00001_.png", "subfolder": "dream_window", "type": "output"}
    view = requests.get(double.url + "/view", params=image, timeout=5)
    assert view.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(view.content)).size == (64, 32)
    missing = requests.get(double.url + "/view", params={**image, "filename": "nope.png"}, timeout=5)
    assert (missing.status_code, missing.content) == (404, b"")


def test_queue_delete_and_targeted_interrupt(double):
    double.delay = 30.0
    upload(double.url, "dw_input_a.png", png())
    workflow = example()
    workflow["2"]["inputs"]["image"] = "dream_window/dw_input_a.png"
    for pid in ("run", "wait"):
        requests.post(double.url + "/prompt", json={"prompt": workflow, "prompt_id": pid}, timeout=5)
    assert double.wait_running("run")
    queue = requests.get(double.url + "/queue", timeout=5).json()
    assert [i[1] for i in queue["queue_running"]] == ["run"] and [i[1] for i in queue["queue_pending"]] == ["wait"]
    requests.post(double.url + "/queue", json={"delete": ["wait"]}, timeout=5)
    assert requests.get(double.url + "/queue", timeout=5).json()["queue_pending"] == []
    requests.post(double.url + "/interrupt", json={"prompt_id": "someone-else"}, timeout=5)
    assert double.running is not None
    resp = requests.post(double.url + "/interrupt", json={"prompt_id": "run"}, timeout=5)
    assert (resp.status_code, resp.content) == (200, b"")
    for _ in range(500):
        entry = requests.get(double.url + "/history/run", timeout=5).json().get("run")
        if entry:
            break
        time.sleep(0.01)
    assert entry["status"]["status_str"] == "error" and entry["outputs"] == {}
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert requests.get(double.url + "/history/wait", timeout=5).json() == {}


def test_free_answers_empty(double):
    resp = requests.post(double.url + "/free", json={"unload_models": True, "free_memory": True}, timeout=5)
    assert (resp.status_code, resp.content, double.freed) == (200, b"", 1)
