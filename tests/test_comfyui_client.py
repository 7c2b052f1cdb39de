"""The ComfyUI client: bounded retries on transport errors and 5xx, no retry of a POST that
may have landed, rejections that name node/input/reason, and distrust of what comes back."""

from __future__ import annotations

import io
import json
import re
import socket
import struct
import threading
from pathlib import Path

import pytest
from PIL import Image

from dreamd.backends.comfyui.client import (ComfyUIClient, OutputRef, PromptRejectedError,
                                            ServerUnreachableError, UnsafeOutputError,
                                            check_output_ref, content_name, decode_image,
                                            describe_rejection, local_path)
from dreamd.errors import PermanentBackendError, TransientBackendError
from tests.conftest import free_port

try:
    from tests.comfyui_double import ComfyUIDouble, shared_file
except ModuleNotFoundError:
    from comfyui_double import ComfyUIDouble, shared_file  # type: ignore[no-redef]


def png(size=(64, 32), colour=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def double():
    with ComfyUIDouble(checkpoints=["random-sd15.safetensors"]) as d:
        yield d


def client_for(url: str, sleeps: Sleeps | None = None, **kw) -> ComfyUIClient:
    kw.setdefault("tries", 4)
    return ComfyUIClient(url, client_id="test", sleep=sleeps if sleeps is not None else Sleeps(),
                         jitter=lambda: 1.0, backoff_base=0.1, backoff_cap=0.3, **kw)


def workflow(image: str) -> dict:
    wf = json.loads(shared_file("example_img2img_api.json").read_text())
    wf["2"]["inputs"]["image"] = image
    return wf


# -- transport: retry, bounded, with capped backoff ---------------------------------------------

def test_5xx_is_retried_with_capped_backoff_then_succeeds(double):
    sleeps = Sleeps()
    double.fail_next(3, path="/system_stats")
    assert client_for(double.url, sleeps).system_stats()["system"]["comfyui_version"] == "0.3.64"
    assert double.count("GET", "/system_stats") == 4
    assert sleeps == [0.1, 0.2, 0.3]  # base * 2**n, capped at 0.3 (jitter pinned to 1.0)


def test_retries_are_bounded(double):
    sleeps = Sleeps()
    double.fail_next(10, path="/queue")
    with pytest.raises(ServerUnreachableError, match="failed 4 times.*HTTP 500"):
        client_for(double.url, sleeps).queue()
    assert double.count("GET", "/queue") == 4 and len(sleeps) == 3


def test_refused_connection_is_transient():
    sleeps = Sleeps()
    with pytest.raises(TransientBackendError, match="failed 3 times"):
        client_for(f"http://127.0.0.1:{free_port()}", sleeps, tries=3).history("x")
    assert len(sleeps) == 2


def test_read_timeout_is_transient():
    # A socket that accepts (the kernel's backlog) but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ServerUnreachableError, match="timed out"):
            client_for(url, tries=2, read_timeout=0.2).system_stats()


def test_connection_reset_is_retried():
    resets = []

    def serve(sock: socket.socket) -> None:
        for _ in range(2):
            conn, _ = sock.accept()
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # RST
            resets.append(1)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        t = threading.Thread(target=serve, args=(sock,), daemon=True)
        t.start()
        with pytest.raises(ServerUnreachableError, match="failed 2 times"):
            client_for(f"http://127.0.0.1:{sock.getsockname()[1]}", tries=2).system_stats()
        t.join(5)
    assert len(resets) == 2


def test_post_prompt_is_not_retried_once_it_may_have_landed(double):
    client = client_for(double.url)
    ref = client.upload_image(png())
    double.fail_next(1, method="POST", path="/prompt")
    with pytest.raises(ServerUnreachableError) as err:
        client.queue_prompt(workflow(ref), "p1")
    assert err.value.sent is True
    assert double.posts_for("p1") == 1


def test_post_prompt_to_a_refused_port_is_retried_and_says_nothing_was_sent():
    sleeps = Sleeps()
    with pytest.raises(ServerUnreachableError) as err:
        client_for(f"http://127.0.0.1:{free_port()}", sleeps, tries=3).queue_prompt({}, "p1")
    assert err.value.sent is False and len(sleeps) == 2


# -- status errors decide -------------------------------------------------------------------------

def test_rejection_names_node_class_input_and_reason(double):
    client = client_for(double.url)
    wf = workflow(client.upload_image(png()))
    wf["1"]["inputs"]["ckpt_name"] = "nope.safetensors"
    wf["6"]["inputs"]["sampler_name"] = "bogus"
    with pytest.raises(PromptRejectedError) as err:
        client.queue_prompt(wf, "p1")
    message = str(err.value)
    assert "node 1 (CheckpointLoaderSimple) input 'ckpt_name'" in message
    assert "'nope.safetensors' not in ['random-sd15.safetensors']" in message
    assert "node 6 (KSampler) input 'sampler_name': Value not in list" in message
    assert isinstance(err.value, PermanentBackendError)
    assert ("6", "sampler_name", "value_not_in_list") in err.value.failed_inputs()


def test_rejection_without_node_errors_still_names_the_node(double):
    client = client_for(double.url)
    wf = workflow(client.upload_image(png()))
    wf["9"] = {"class_type": "NoSuchNode", "inputs": {}}
    with pytest.raises(PromptRejectedError, match=r"invalid_prompt.*NoSuchNode does not exist.*#9"):
        client.queue_prompt(wf, "p1")


def test_every_rejection_in_the_transcript_is_described():
    transcript = shared_file("api_transcript.md").read_text()
    for number in range(16, 26):
        text = re.search(rf"^## {number}\. .*?(?=^## )", transcript, re.S | re.M).group(0)
        body = json.loads(re.findall(r"```json\n(.*?)\n```", text, re.S)[-1])
        message = describe_rejection(body)
        assert body["error"]["message"] in message
        for node_id, node in body["node_errors"].items():
            for err in node["errors"]:
                assert f"node {node_id} ({node['class_type']}) input '{err['extra_info']['input_name']}'" in message
                assert err["message"] in message


def test_client_prompt_id_and_client_id_are_sent(double):
    client = client_for(double.url)
    number = client.queue_prompt(workflow(client.upload_image(png())), "my-id")
    posted = [r.body for r in double.requests if r.path == "/prompt"][0]
    assert (posted["prompt_id"], posted["client_id"], number) == ("my-id", "test", 0)
    state = client.queue()
    assert state.number_of("my-id") == 0 or client.history("my-id") is not None


def test_missing_view_is_permanent(double):
    with pytest.raises(PermanentBackendError, match="no output 'x/nope.png'"):
        client_for(double.url).view(OutputRef("nope.png", "x", "output"))


# -- uploads are named by content ------------------------------------------------------------------

def test_upload_is_named_by_content_and_sent_once(double):
    client = client_for(double.url)
    data = png()
    first = client.upload_image(data)
    assert first == f"dreamd/{content_name(data)}" and re.fullmatch(r"dreamd/dreamd_[0-9a-f]{16}\.png", first)
    assert client.upload_image(data) == first
    assert double.count("POST", "/upload/image") == 1
    # A new process (a restart) uploads again, and ComfyUI keeps one file for it.
    assert client_for(double.url).upload_image(data) == first
    assert [k for k in double.inputs if k[1] == content_name(data)] == [("dreamd", content_name(data))]
    assert client.upload_image(png(colour=(1, 1, 1))) != first


# -- what comes back is checked ---------------------------------------------------------------------

@pytest.mark.parametrize("item", [
    {"filename": "../../etc/passwd", "subfolder": "", "type": "output"},
    {"filename": "/etc/passwd", "subfolder": "", "type": "output"},
    {"filename": "a/b.png", "subfolder": "", "type": "output"},
    {"filename": "..\\b.png", "subfolder": "", "type": "output"},
    {"filename": "C:x.png", "subfolder": "", "type": "output"},
    {"filename": "..", "subfolder": "", "type": "output"},
    {"filename": "", "subfolder": "", "type": "output"},
    {"filename": "x.png", "subfolder": "../up", "type": "output"},
    {"filename": "x.png", "subfolder": "/abs", "type": "output"},
    {"filename": "x.png", "subfolder": "a/../../b", "type": "output"},
    {"filename": "x.png", "subfolder": "a\\b", "type": "output"},
    {"filename": "x.png", "subfolder": "a//b", "type": "output"},
    {"filename": "x.png", "subfolder": "", "type": "../input"},
    "not-an-object",
])
def test_unsafe_output_names_are_refused(item):
    with pytest.raises(UnsafeOutputError):
        check_output_ref(item)


def test_safe_output_names_stay_inside_the_data_dir(tmp_path: Path):
    ref = check_output_ref({"filename": "keyframe_00001_.png", "subfolder": "dreamd/a", "type": "output"})
    assert local_path(tmp_path, ref) == tmp_path.resolve() / "dreamd" / "a" / "keyframe_00001_.png"
    with pytest.raises(UnsafeOutputError):  # even a ref built by hand cannot climb out
        local_path(tmp_path, OutputRef("x.png", "../..", "output"))


def test_decode_checks_bytes_size_and_pixel_limit(monkeypatch):
    assert decode_image(png((64, 32)), (64, 32)).size == (64, 32)
    with pytest.raises(UnsafeOutputError, match="not an image"):
        decode_image(b"<html>oops</html>", (64, 32))
    with pytest.raises(UnsafeOutputError, match="expected 64x64"):
        decode_image(png((64, 32)), (64, 64))
    big = io.BytesIO()
    Image.new("1", (4000, 3000)).save(big, "PNG")  # 12 MP that compress to a few KB
    with pytest.raises(UnsafeOutputError, match="pixel limit"):
        decode_image(big.getvalue(), None, max_pixels=10_000_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own bomb check is an error too
    with pytest.raises(UnsafeOutputError, match="bomb"):
        decode_image(png((64, 32)), None)


def test_download_is_capped(double):
    double.files[("output", "x", "big.png")] = png((256, 256), colour=(9, 9, 9))
    client = client_for(double.url, max_download_bytes=100)
    with pytest.raises(UnsafeOutputError, match="larger than 100 bytes"):
        client.view(OutputRef("big.png", "x", "output"))
    assert len(client_for(double.url).view(OutputRef("big.png", "x", "output"))) > 100
