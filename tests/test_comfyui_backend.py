"""ComfyUIBackend against real test doubles on 127.0.0.1: the happy path, re-attach instead of
re-post, one resubmission after a forget, deadlines, failures classified, failover."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pytest
from PIL import Image

from dreamd.backends import KeyframeBackend, KeyframeRequest
from dreamd.backends.comfyui import ComfyUIBackend, ComfyUIClient, UnsafeOutputError
from dreamd.errors import PermanentBackendError, TransientBackendError

try:
    from tests.comfyui_double import ComfyUIDouble, shared_file
except ModuleNotFoundError:
    from comfyui_double import ComfyUIDouble, shared_file  # type: ignore[no-redef]

CKPT = "random-sd15.safetensors"


@pytest.fixture
def double():
    with ComfyUIDouble(checkpoints=[CKPT]) as d:
        yield d


@pytest.fixture
def make(tmp_path):
    made = []

    def build(urls, **kw) -> ComfyUIBackend:
        kw.setdefault("checkpoint", CKPT)
        kw.setdefault("poll_interval", 0.01)
        kw.setdefault("queue_check_interval", 0.02)
        kw.setdefault("deadline", 20.0)
        kw.setdefault("data_dir", tmp_path / "data")
        kw.setdefault("sleep", _fast_sleep)
        backend = ComfyUIBackend(urls, **kw)
        made.append(backend)
        return backend
    yield build
    for backend in made:
        backend.close()


def _fast_sleep(seconds: float) -> None:
    # Real sleeps (the double runs in real time) but retry backoff shrunk for the tests.
    import time
    time.sleep(min(seconds, 0.02))


def request(prompt_id: str | None = None, *, image: bool = True, seed: int = 7, **kw) -> KeyframeRequest:
    img = Image.new("RGB", (64, 32), (200, 100, 50)) if image else None
    fields = dict(chain_index=3, width=64, height=32, seed=seed, theme="ethereal", prompt="a window",
                  negative_prompt="blurry", denoise=0.3, steps=4, cfg=6.0, sampler="euler",
                  scheduler="karras", image=img, prompt_id=prompt_id or str(uuid.uuid4()))
    fields.update(kw)
    return KeyframeRequest(**fields)


def submit_directly(double: ComfyUIDouble, backend: ComfyUIBackend, req: KeyframeRequest) -> None:
    """What an earlier daemon process left behind: the same prompt, posted before a crash."""
    client = ComfyUIClient(double.url, client_id="earlier-process")
    wf = json.loads(Path(backend.img2img.source).read_text())
    buf = io.BytesIO()
    req.image.save(buf, "PNG")
    wf["2"]["inputs"]["image"] = client.upload_image(buf.getvalue())
    wf["1"]["inputs"]["ckpt_name"] = CKPT
    wf["6"]["inputs"].update(seed=req.seed, steps=req.steps, sampler_name=req.sampler, scheduler=req.scheduler)
    client.queue_prompt(wf, req.prompt_id)
    client.close()


# -- the happy path --------------------------------------------------------------------------------

def test_img2img_keyframe(double, make, tmp_path):
    backend = make(double.url)
    assert isinstance(backend, KeyframeBackend) and backend.name == "comfyui"
    req = request()
    result = backend.generate(req)
    assert result.image.size == (64, 32) and result.image.mode == "RGB"
    assert result.info["prompt_id"] == req.prompt_id and result.info["server"] == double.url
    # the shipped workflow ends in PreviewImage: the result is in ComfyUI's temp/
    image = result.info["outputs"]["8"]["images"][0]
    assert image["type"] == "temp" and image["subfolder"] == ""
    assert image["filename"].startswith("ComfyUI_temp_") and result.info["output_type"] == "temp"
    assert Path(result.info["saved"]).is_relative_to(tmp_path / "data")
    posted = [r.body for r in double.requests if r.path == "/prompt"]
    assert len(posted) == 1 and posted[0]["prompt_id"] == req.prompt_id
    assert posted[0]["client_id"] == backend.client_id
    sampler = posted[0]["prompt"]["6"]["inputs"]
    assert (sampler["seed"], sampler["steps"], sampler["denoise"], sampler["sampler_name"]) == (7, 4, 0.3, "euler")
    assert posted[0]["prompt"]["4"]["inputs"]["text"] == "a window"
    assert posted[0]["prompt"]["2"]["inputs"]["image"] == result.info["upload"]
    # Deterministic from the seed: the same request under another prompt_id gives the same pixels.
    again = backend.generate(request())
    assert again.image.tobytes() == result.image.tobytes()
    assert backend.generate(request(seed=8)).image.tobytes() != result.image.tobytes()


def test_txt2img_cold_start(double, make):
    result = make(double.url).generate(request(image=False, width=80, height=48))
    assert result.image.size == (80, 48)
    posted = [r.body for r in double.requests if r.path == "/prompt"][0]["prompt"]
    assert posted["3"]["inputs"]["width"] == 80 and posted["6"]["inputs"]["denoise"] == 1.0
    assert double.count("POST", "/upload/image") == 0


def test_input_of_another_size_is_resized_and_odd_sizes_are_refused(double, make):
    backend = make(double.url)
    req = request(image=False)
    big = KeyframeRequest(**{**req.__dict__, "image": Image.new("RGB", (640, 320))})
    assert backend.generate(big).image.size == (64, 32)
    with pytest.raises(PermanentBackendError, match="not a multiple of 8"):
        backend.generate(request(width=60))


# -- validation against /object_info ---------------------------------------------------------------

def test_validate_names_the_checkpoints_the_server_has(double, make):
    backend = make(double.url, checkpoint="v1-5-pruned-emaonly.safetensors")
    with pytest.raises(PermanentBackendError, match=r"it has: random-sd15.safetensors"):
        backend.validate()
    assert double.count("POST", "/prompt") == 0


def test_validate_names_an_unknown_node(double, make, tmp_path):
    wf = json.loads(shared_file("example_img2img_api.json").read_text())
    wf["9"] = {"class_type": "ETN_LoadImageBase64", "inputs": {"image": ""}}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(wf))
    backend = make(double.url, workflow=str(path))
    with pytest.raises(PermanentBackendError, match=r"node 9: class_type 'ETN_LoadImageBase64' is not installed"):
        backend.validate()


def test_bad_sampler_is_refused_before_posting(double, make):
    with pytest.raises(PermanentBackendError, match=r"sampler 'euler_magic' is not one .* knows"):
        make(double.url).generate(request(sampler="euler_magic"))
    assert double.count("POST", "/prompt") == 0


def test_a_rejection_by_the_server_names_node_input_and_reason(double, make, tmp_path):
    # Link types are the server's to check: an IMAGE wired into a LATENT input.
    wf = json.loads(shared_file("example_img2img_api.json").read_text())
    wf["6"]["inputs"]["latent_image"] = ["2", 0]
    path = tmp_path / "mistyped.json"
    path.write_text(json.dumps(wf))
    backend = make(double.url, workflow=str(path), mapping={"image": "2.inputs.image"})
    with pytest.raises(PermanentBackendError) as err:
        backend.generate(request())
    assert ("node 6 (KSampler) input 'latent_image': Return type mismatch between linked nodes: "
            "latent_image, received_type(IMAGE) mismatch input_type(LATENT)") in str(err.value)


def test_mapping_to_a_missing_node_fails_at_construction(double, make):
    with pytest.raises(PermanentBackendError, match=r"mapping 'seed' = '30.inputs.seed': the workflow "
                                                    r"has no node '30' \(it has 1, 2, 3, 4, 5, 6, 7, 8\)"):
        make(double.url, mapping={"seed": "30.inputs.seed"})


# -- uploads -----------------------------------------------------------------------------------------

def test_same_input_is_uploaded_once(double, make):
    backend = make(double.url)
    first = backend.generate(request())
    second = backend.generate(request(seed=99))
    assert first.info["upload"] == second.info["upload"]
    assert double.count("POST", "/upload/image") == 1


def test_an_input_the_server_lost_is_uploaded_again_once(double, make):
    backend = make(double.url)
    backend.generate(request())
    double.inputs.clear()  # someone cleaned ComfyUI's input dir
    req = request(seed=11)
    assert backend.generate(req).image.size == (64, 32)
    assert double.count("POST", "/upload/image") == 2 and double.posts_for(req.prompt_id) == 2


# -- re-attach: never a duplicate ------------------------------------------------------------------

def test_a_finished_prompt_is_fetched_not_posted_again(double, make):
    req = request()
    make(double.url).generate(req)
    restarted = make(double.url)  # a new daemon process with the prompt_id from the ledger
    result = restarted.generate(req)
    assert result.info["reattached"] == "finished" and result.info["posts"] == 0
    assert double.posts_for(req.prompt_id) == 1


def test_a_queued_prompt_is_waited_for_not_posted_again(double, make):
    double.delay = 0.3
    backend = make(double.url)
    req = request()
    submit_directly(double, backend, req)
    result = backend.generate(req)
    assert result.info["reattached"] == "queued"
    assert double.posts_for(req.prompt_id) == 1 and len(double.history) == 1


def test_a_forgotten_prompt_is_resubmitted_exactly_once(double, make):
    double.faults.forget_after_accept = 1  # accepted, then the server "restarts"
    req = request()
    result = make(double.url).generate(req)
    assert result.info["resubmissions"] == 1
    assert double.posts_for(req.prompt_id) == 2


def test_a_prompt_forgotten_twice_is_transient_and_never_posted_a_third_time(double, make):
    double.faults.forget_after_accept = 2
    req = request()
    with pytest.raises(TransientBackendError, match="forgot prompt .* again"):
        make(double.url).generate(req)
    assert double.posts_for(req.prompt_id) == 2


# -- deadlines -----------------------------------------------------------------------------------------

def test_a_stuck_prompt_of_ours_is_interrupted_and_rerun_on_retry(double, make):
    double.delay = 30.0
    backend = make(double.url, deadline=0.3)
    req = request()
    with pytest.raises(TransientBackendError, match=r"did not finish .* within 0.3s; interrupted it"):
        backend.generate(req)
    interrupts = [r.body for r in double.requests if r.path == "/interrupt"]
    assert interrupts == [{"prompt_id": req.prompt_id}]
    double.delay = 0.0
    retry = make(double.url).generate(req)  # the worker's retry, maybe after a restart
    assert retry.image.size == (64, 32)
    assert double.posts_for(req.prompt_id) == 2


def test_a_prompt_stuck_behind_someone_else_is_dequeued_not_interrupting_them(double, make):
    double.delay = 30.0
    other = request()
    backend = make(double.url, deadline=0.3)
    submit_directly(double, backend, other)
    assert double.wait_running(other.prompt_id)
    mine = request(seed=1)
    with pytest.raises(TransientBackendError, match="took it off the queue"):
        backend.generate(mine)
    assert double.count("POST", "/interrupt") == 0
    assert double.running.prompt_id == other.prompt_id and not double.pending
    double.forget()


# -- failures in history -----------------------------------------------------------------------------

def test_bad_input_execution_error_is_permanent_with_comfyuis_message(double, make):
    double.faults.execution_errors.append({
        "node_id": "2", "node_type": "LoadImage", "exception_type": "PIL.UnidentifiedImageError",
        "exception_message": "cannot identify image file '…/corrupt.png'\n"})
    req = request()
    with pytest.raises(PermanentBackendError, match=r"node 2 \(LoadImage\) failed: PIL.UnidentifiedImageError: "
                                                    r"cannot identify image file"):
        make(double.url).generate(req)
    # Re-attaching to it later gives the same verdict without running it again.
    with pytest.raises(PermanentBackendError):
        make(double.url).generate(req)
    assert double.posts_for(req.prompt_id) == 1


def test_out_of_memory_is_transient_and_rerun_on_retry(double, make):
    double.faults.execution_errors.append({
        "node_id": "6", "node_type": "KSampler", "exception_type": "torch.OutOfMemoryError",
        "exception_message": "CUDA out of memory. Tried to allocate 2.00 GiB"})
    backend = make(double.url)
    req = request()
    with pytest.raises(TransientBackendError, match="OutOfMemoryError"):
        backend.generate(req)
    assert backend.generate(req).info["reattached"] == "finished"  # found the failed run, ran it again
    assert double.posts_for(req.prompt_id) == 2


def test_non_image_bytes_are_refused(double, make):
    double.faults.view_garbage = True
    with pytest.raises(UnsafeOutputError, match="not an image"):
        make(double.url).generate(request())


def test_a_traversal_filename_is_refused_and_nothing_is_written(double, make, tmp_path):
    double.faults.output_override = {"filename": "../../../escaped.png", "subfolder": ""}
    with pytest.raises(UnsafeOutputError, match="unsafe output filename"):
        make(double.url).generate(request())
    double.faults.output_override = {"filename": "x.png", "subfolder": "../.."}
    with pytest.raises(UnsafeOutputError, match="unsafe output subfolder"):
        make(double.url).generate(request(seed=2))
    assert not any(p.name in ("escaped.png", "x.png") for p in tmp_path.rglob("*.png"))
    assert double.count("GET", "/view") == 0


def test_an_output_of_the_wrong_size_is_refused(double, make):
    double.faults.output_size = (128, 128)
    with pytest.raises(UnsafeOutputError, match="128x128 image, expected 64x32"):
        make(double.url).generate(request())


# -- transport faults and many servers ---------------------------------------------------------------

def test_a_500_while_polling_is_retried(double, make):
    double.fail_next(2, method="GET", path="/history")
    assert make(double.url).generate(request()).image.size == (64, 32)


def test_a_500_on_post_is_transient_and_the_retry_posts_once_more(double, make):
    double.fail_next(1, method="POST", path="/prompt")
    backend = make(double.url)
    req = request()
    with pytest.raises(TransientBackendError):
        backend.generate(req)
    assert double.posts_for(req.prompt_id) == 1
    assert make(double.url).generate(req).info["posts"] == 1
    assert double.posts_for(req.prompt_id) == 2 and len(double.history) == 1


def test_a_post_that_may_have_landed_is_not_sent_to_another_server(make):
    with ComfyUIDouble(checkpoints=[CKPT]) as a, ComfyUIDouble(checkpoints=[CKPT]) as b:
        a.fail_next(1, method="POST", path="/prompt")
        req = request()
        with pytest.raises(TransientBackendError):
            make([a.url, b.url]).generate(req)
        assert a.posts_for(req.prompt_id) == 1 and b.posts_for(req.prompt_id) == 0


def test_every_server_down_is_transient(make):
    with ComfyUIDouble(checkpoints=[CKPT]) as gone:
        url = gone.url
    with pytest.raises(TransientBackendError, match="every ComfyUI server is down: http://127.0.0.1"):
        make(url).generate(request())


def test_failover_to_the_second_server_when_the_first_dies(make):
    with ComfyUIDouble(checkpoints=[CKPT]) as a, ComfyUIDouble(checkpoints=[CKPT]) as b:
        backend = make([a.url, b.url])
        assert backend.generate(request()).info["server"] == a.url
        a.stop()
        result = backend.generate(request())
        assert result.info["server"] == b.url
        health = {h.url: h for h in backend.health()}
        assert health[a.url].healthy is False and health[a.url].benched_until is not None
        assert health[a.url].last_error and health[b.url].healthy
        # While a is benched it is not even asked.
        before = len(a.requests)
        backend.generate(request())
        assert len(a.requests) == before


def test_reattach_asks_the_hinted_server_first(make):
    with ComfyUIDouble(checkpoints=[CKPT]) as a, ComfyUIDouble(checkpoints=[CKPT]) as b:
        req = request()
        assert make([b.url]).generate(req).info["server"] == b.url
        result = make([a.url, b.url]).generate(req, server_hint=b.url)
        assert result.info["server"] == b.url and result.info["reattached"] == "finished"
        assert a.count("GET", f"/history/{req.prompt_id}") == 0
        # Without the hint every server is asked, so it is found all the same.
        assert make([a.url, b.url]).generate(req).info["server"] == b.url
        assert a.posts_for(req.prompt_id) == 0 and b.posts_for(req.prompt_id) == 1


def test_free_asks_every_server_to_unload(double, make):
    assert make(double.url).free() == {double.url: None}
    assert double.freed == 1
    body = [r.body for r in double.requests if r.path == "/free"][0]
    assert body == {"unload_models": True, "free_memory": True}


def test_probe_brings_a_benched_server_back(double, make):
    backend = make(double.url)
    backend.pool.mark_failed(double.url, "test")
    assert backend.health()[0].healthy is False
    assert backend.probe()[0].healthy is True


# -- the classification rule, on the transcript's real history entries --------------------------------

def _transcript_entry(number: int) -> dict:
    import re
    text = shared_file("api_transcript.md").read_text()
    body = re.search(rf"^## {number}\. .*?(?=^## )", text, re.S | re.M).group(0)
    return next(iter(json.loads(re.findall(r"```json\n(.*?)\n```", body, re.S)[-1]).values()))


def test_real_history_entries_are_classified():
    from dreamd.backends.comfyui.backend import classify
    assert classify(_transcript_entry(30)).ok
    interrupted = classify(_transcript_entry(40))
    assert (interrupted.ok, interrupted.transient) == (False, True) and "node 6 (KSampler)" in interrupted.message
    failed = classify(_transcript_entry(45))
    assert (failed.ok, failed.transient) == (False, False)
    assert "node 2 (LoadImage) failed: PIL.UnidentifiedImageError: cannot identify image file" in failed.message


@pytest.mark.parametrize("etype, message, transient", [
    ("torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate 20.00 MiB", True),
    ("RuntimeError", "CUDA error: an illegal memory access was encountered", True),
    ("MemoryError", "", True),
    ("numpy.core._exceptions._ArrayMemoryError", "Unable to allocate 3.00 GiB for an array", True),
    ("comfy.model_management.InterruptProcessingException", "", True),
    ("PIL.UnidentifiedImageError", "cannot identify image file", False),
    ("ValueError", "room for improvement: bad zoom value", False),
    ("KeyError", "'model.diffusion_model.input_blocks'", False),
    ("FileNotFoundError", "No such file: 'loras/x.safetensors'", False),
])
def test_transient_rule(etype, message, transient):
    from dreamd.backends.comfyui.backend import classify
    entry = {"status": {"status_str": "error", "messages": [["execution_error", {
        "node_id": "6", "node_type": "KSampler", "exception_type": etype, "exception_message": message}]]}}
    assert classify(entry).transient is transient
