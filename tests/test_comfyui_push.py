"""Push, not poll: the backend follows each prompt over the double's websocket (which
tests/test_comfyui_double.py diffs against every section of the shared transcript), with /history as the truth and the fallback when
the socket is refused, silent or drops mid-prompt; progress is reported; a stop reaches
the wait. Real HTTP and websocket servers on 127.0.0.1."""

from __future__ import annotations

import logging
import threading
import uuid

import pytest
from PIL import Image

from dreamd.backends import KeyframeRequest
from dreamd.backends.comfyui import ComfyUIBackend
from dreamd.errors import PermanentBackendError, TransientBackendError
from tests.comfyui_double import ComfyUIDouble

CKPT = "random-sd15.safetensors"


@pytest.fixture
def double():
    with ComfyUIDouble(checkpoints=[CKPT]) as d:
        yield d


@pytest.fixture
def make():
    made = []

    def build(url: str, **kw) -> ComfyUIBackend:
        kw = {"checkpoint": CKPT, "poll_interval": 0.01, "queue_check_interval": 5.0,
              "tries": 2, "read_timeout": 5.0, **kw}
        backend = ComfyUIBackend(url, **kw)
        made.append(backend)
        return backend
    yield build
    for backend in made:
        backend.close()


def request(steps: int = 4, **kw) -> KeyframeRequest:
    fields = dict(chain_index=3, width=64, height=32, seed=11, theme="ethereal", prompt="a window",
                  negative_prompt="", denoise=0.3, steps=steps, cfg=6.0, sampler="euler",
                  scheduler="normal", prompt_id=str(uuid.uuid4()),
                  image=Image.new("RGB", (64, 32), (30, 60, 90)))
    return KeyframeRequest(**{**fields, **kw})


def history_gets(double: ComfyUIDouble, prompt_id: str) -> int:
    return double.count("GET", f"/history/{prompt_id}")


# -- the backend follows prompts by push ---------------------------------------------------------

def test_a_keyframe_is_pushed_not_polled(double, make):
    double.delay = 0.5
    backend = make(double.url)
    req = request()
    result = backend.generate(req)
    assert result.info["pushed"] is True and result.image.size == (64, 32)
    # at a 10 ms poll, polling would have asked ~50 times during the 0.5 s prompt
    assert history_gets(double, req.prompt_id) <= 4


def test_polling_when_push_is_off(double, make):
    double.delay = 0.3
    backend = make(double.url, push=False)
    req = request()
    assert backend.generate(req).info["pushed"] is False
    assert history_gets(double, req.prompt_id) > 5


def test_progress_is_reported_step_by_step_then_cleared(double, make):
    backend = make(double.url)
    seen: list = []
    backend.on_progress = seen.append
    req = request(steps=5)
    backend.generate(req)
    steps = [(p["node"], p["node_type"], p["step"], p["steps"]) for p in seen if p and p["step"]]
    assert steps == [("6", "KSampler", i, 5) for i in range(1, 6)]
    assert {"node": "8", "node_type": "PreviewImage"}.items() <= next(
        p for p in seen if p and p["node"] == "8").items()
    assert seen[-1] is None


def test_an_execution_error_arrives_by_push_and_history_decides(double, make):
    double.faults.execution_errors = [{"exception_type": "ValueError",
                                       "exception_message": "bad latent"}]
    backend = make(double.url)
    with pytest.raises(PermanentBackendError, match="ValueError: bad latent"):
        backend.generate(request())


@pytest.mark.parametrize("fault", ["ws_drop_after", "ws_silent", "ws_refuse"])
def test_without_a_working_socket_the_keyframe_is_polled(double, make, fault, caplog):
    """A socket that drops mid-prompt (reconnected, /history read at once), one that sends
    nothing, a server without one (polled): the keyframe still comes."""
    double.delay = 0.3
    setattr(double.faults, fault, 3 if fault == "ws_drop_after" else True)
    backend = make(double.url)
    req = request(steps=8)
    with caplog.at_level(logging.INFO, logger="dreamd.backends.comfyui"):
        result = backend.generate(req)
    assert result.image.size == (64, 32) and double.posts_for(req.prompt_id) == 1
    if fault == "ws_drop_after":   # reconnected at once (a restarted server), /history read
        assert "dropped" in caplog.text and "reconnected" in caplog.text
    else:
        assert result.info["pushed"] is False and "polling" in caplog.text
    # the next keyframe does not wait on a dead socket either
    assert backend.generate(request(seed=12)).image.size == (64, 32)


def test_a_stop_reaches_the_wait(double, make):
    double.delay = 120.0
    stopping = threading.Event()
    backend = make(double.url, stopping=stopping)
    req = request()
    outcome: list = []

    def run() -> None:
        try:
            backend.generate(req)
        except Exception as exc:
            outcome.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert double.wait_running(req.prompt_id, timeout=30)
    stopping.set()
    thread.join(timeout=30)   # generous: the wait checks the flag every 0.25 s
    assert not thread.is_alive()
    assert isinstance(outcome[0], TransientBackendError) and "stopping" in str(outcome[0])
    assert double.posts_for(req.prompt_id) == 1   # left running: re-attached at the next start


def test_a_fresh_prompt_with_a_recorder_is_posted_without_look_ups(double, make):
    backend = make(double.url)
    recorded: list = []
    req = request(on_server=recorded.append)
    backend.generate(req)
    assert recorded == [double.url] and double.posts_for(req.prompt_id) == 1
    assert double.count("GET", "/queue") == 0   # no re-attach look-up: nothing could have it
    # a server on record: looked up first, found finished, fetched, not posted again
    again = backend.generate(request(prompt_id=req.prompt_id, server_hint=double.url,
                                     on_server=recorded.append))
    assert again.info["reattached"] == "finished" and double.posts_for(req.prompt_id) == 1


def test_nothing_is_posted_when_the_server_cannot_be_recorded(double, make):
    def broken(url: str) -> None:
        raise OSError("disk full")
    with pytest.raises(TransientBackendError, match="was not posted: disk full"):
        make(double.url).generate(request(on_server=broken))
    assert double.count("POST", "/prompt") == 0


def test_the_input_file_is_uploaded_as_it_is(double, make, tmp_path):
    """The keyframe worker hands over the previous keyframe's PNG when it already fits:
    those bytes are uploaded, no encode; anything else is left to the backend to encode."""
    from types import SimpleNamespace

    from dreamd.workers.keyframe import input_png
    image = Image.new("RGB", (64, 32), (30, 60, 90))
    image.save(tmp_path / "k.png", compress_level=9)
    image.convert("RGBA").save(tmp_path / "rgba.png")
    image.save(tmp_path / "k.jpg")
    row = lambda name: SimpleNamespace(input_path=name)   # noqa: E731
    png = input_png(row("k.png"), 64, 32, tmp_path)
    assert png == (tmp_path / "k.png").read_bytes()
    assert [input_png(row(n), w, 32, tmp_path) for n, w in
            (("rgba.png", 64), ("k.jpg", 64), ("k.png", 128), (None, 64))] == [None] * 4
    make(double.url).generate(request(image=image, image_png=png))
    assert png in double.inputs.values()
