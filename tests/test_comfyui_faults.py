"""One bad server never stops the dream: a server lacking the checkpoint (set aside, with the
reason and the checkpoints it has; a stop only when none can run the workflow), a server
that accepts connections and never answers (benched after one short look-up), a port that
answers but is not ComfyUI (one line), a recently good server rechecked soon, and
`dreamd doctor`'s per-server check. Real servers on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import uuid

import pytest
from PIL import Image

from dreamd import config
from dreamd.backends import KeyframeRequest
from dreamd.backends.comfyui import ComfyUIBackend
from dreamd.backends.comfyui.client import ComfyUIClient, NotComfyUIError
from dreamd.backends.comfyui.daemon_backend import DaemonBackend
from dreamd.backends.comfyui.doctor import check_servers
from dreamd.backends.comfyui.servers import ServerPool
from dreamd.errors import PermanentBackendError
from tests.comfyui_double import ComfyUIDouble, NotComfyUIServer, SilentServer
from tests.conftest import free_port

CKPT = "random-sd15.safetensors"
# Timeouts a server that answers must meet even on a loaded machine (the doubles are
# threads of this test process); only where a silent server is the point are they
# shorter, and then the silent one meets its timeout whatever the machine's speed.
ANSWERS_WITHIN = 10.0
SILENT_AFTER = 3.0


@pytest.fixture
def make():
    made = []

    def build(urls, **kw) -> ComfyUIBackend:
        kw = {"checkpoint": CKPT, "poll_interval": 0.01, "tries": 2,
              "read_timeout": ANSWERS_WITHIN, "lookup_timeout": ANSWERS_WITHIN,
              "connect_timeout": ANSWERS_WITHIN, "sleep": lambda s: None, **kw}
        backend = ComfyUIBackend(urls, **kw)
        made.append(backend)
        return backend
    yield build
    for backend in made:
        backend.close()


def request(**kw) -> KeyframeRequest:
    fields = dict(chain_index=2, width=64, height=32, seed=3, theme="ethereal", prompt="a window",
                  negative_prompt="", denoise=0.3, steps=4, cfg=6.0, sampler="euler",
                  scheduler="normal", prompt_id=str(uuid.uuid4()),
                  image=Image.new("RGB", (64, 32), (10, 70, 130)))
    return KeyframeRequest(**{**fields, **kw})


# -- a server lacking the checkpoint -----------------------------------------------------------

def test_a_server_lacking_the_checkpoint_is_set_aside_and_the_other_dreams(make):
    with ComfyUIDouble(checkpoints=[]) as empty, ComfyUIDouble(checkpoints=["other.safetensors"]) as other, \
            ComfyUIDouble(checkpoints=[CKPT]) as good:
        backend = make([empty.url, other.url, good.url])
        health = {h.url: h for h in backend.validate()}
        assert "it has: none" in health[empty.url].unfit and health[empty.url].checkpoints == ()
        assert health[other.url].checkpoints == ("other.safetensors",)
        assert health[good.url].unfit is None
        result = backend.generate(request())
        assert result.info["server"] == good.url
        assert empty.count("POST", "/prompt") == other.count("POST", "/prompt") == 0


def test_only_when_no_server_can_run_it_is_it_a_stop(make):
    with ComfyUIDouble(checkpoints=[]) as a, ComfyUIDouble(checkpoints=["x.safetensors"]) as b:
        backend = make([a.url, b.url])
        with pytest.raises(PermanentBackendError, match=r"it has: x.safetensors"):
            backend.validate()


def test_a_server_given_the_checkpoint_is_taken_back(make):
    with ComfyUIDouble(checkpoints=[]) as a, ComfyUIDouble(checkpoints=[CKPT]) as b:
        backend = make([a.url, b.url])
        backend.validate()
        assert backend.pool.is_unfit(a.url)
        a.object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] = [CKPT]
        backend.validate([a.url])
        assert not backend.pool.is_unfit(a.url)
        assert backend.generate(request()).info["server"] == a.url


def test_a_server_that_comes_up_lacking_the_checkpoint_does_not_stop_the_healthy_one(make):
    port = free_port()
    with ComfyUIDouble(checkpoints=[CKPT]) as good:
        comfy = make([good.url, f"http://127.0.0.1:{port}"], bench_base=0.01, recent_bench_cap=0.01)
        daemon = DaemonBackend(comfy, probe_timeouts=(ANSWERS_WITHIN, ANSWERS_WITHIN))
        try:
            daemon.check()
            assert daemon.status() == "ok"
            with ComfyUIDouble(port, checkpoints=["sdxl.safetensors"]):
                comfy.pool.mark_ok(f"http://127.0.0.1:{port}")   # its bench is over
                daemon.check()
                servers = {s["url"]: s for s in daemon.health()["servers"]}
                late = servers[f"http://127.0.0.1:{port}"]
                assert "checkpoint 'random-sd15.safetensors' is not on" in late["set_aside"]
                assert late["checkpoints"] == ["sdxl.safetensors"]
                assert daemon.status() == "ok" and daemon.facts["backend_error"] is None
                assert daemon.generate(request()).info["server"] == good.url
        finally:
            daemon.close()


def test_a_server_that_rejects_the_workflow_is_set_aside_and_the_keyframe_goes_on(make):
    with ComfyUIDouble(checkpoints=[CKPT]) as a, ComfyUIDouble(checkpoints=[CKPT]) as b:
        backend = make([a.url, b.url])
        a.fail_next(1, status=400, method="POST", path="/prompt")   # a model file it lacks, say
        result = backend.generate(request())
        assert result.info["server"] == b.url
        assert "ComfyUI rejected the workflow" in backend.pool.unfit_reason(a.url)
        assert backend.generate(request(seed=4)).info["server"] == b.url   # kept aside


def test_status_lists_a_set_aside_server_with_its_checkpoints():
    from rich.console import Console

    from dreamd.cli.status import print_status
    console = Console(record=True, width=300)
    print_status({"data_dir": "d", "database": "d/dreamd.db", "revision": "0003", "head": "0003",
                  "counts": {}, "last_run": None, "comfyui": {
                      "status": "ok", "error": None, "fallback": "none", "updated_at": "now",
                      "servers": [{"url": "http://a:8188", "healthy": True, "failures": 0,
                                   "set_aside": "checkpoint 'x' is not on http://a:8188",
                                   "checkpoints": ["sdxl.safetensors", "flux.safetensors"]}],
                      "supervisor": None}}, console)
    out = console.export_text()
    assert ("http://a:8188  set aside: checkpoint 'x' is not on http://a:8188 (its checkpoints: "
            "sdxl.safetensors, flux.safetensors)") in out


# -- a server that accepts and never answers ------------------------------------------------------

def test_a_silent_server_listed_first_is_benched_and_the_keyframe_moves_on(make):
    with SilentServer() as silent, ComfyUIDouble(checkpoints=[CKPT]) as good:
        backend = make([silent.url, good.url], tries=4, lookup_timeout=SILENT_AFTER)
        result = backend.generate(request())
        assert result.info["server"] == good.url
        (bad,) = [h for h in backend.health() if h.url == silent.url]
        assert not bad.healthy and f"no answer within {SILENT_AFTER:g}s" in bad.last_error
        assert bad.failures == 1      # one look-up, not four tries of it


def test_the_health_check_benches_a_silent_server(make):
    with SilentServer() as silent, ComfyUIDouble(checkpoints=[CKPT]) as good:
        daemon = DaemonBackend(make([silent.url, good.url], lookup_timeout=SILENT_AFTER),
                               probe_timeouts=(ANSWERS_WITHIN, SILENT_AFTER))
        try:
            daemon.check()
            servers = {s["url"]: s for s in daemon.health()["servers"]}
            assert servers[silent.url]["healthy"] is False
            assert daemon.status() == "ok"
        finally:
            daemon.close()


# -- a port that answers but is not ComfyUI --------------------------------------------------------

def test_not_a_comfyui_server_in_one_line(make, caplog):
    with NotComfyUIServer() as other:
        with pytest.raises(NotComfyUIError) as err:
            ComfyUIClient(other.url, client_id="t", tries=1).system_stats()
        assert str(err.value) == (f"{other.url} is not a ComfyUI server (GET /system_stats "
                                  "answered HTTP 404, text/html)")
        daemon = DaemonBackend(make([other.url]), probe_timeouts=(ANSWERS_WITHIN, ANSWERS_WITHIN))
        try:
            with caplog.at_level(logging.DEBUG):
                daemon.check()
        finally:
            daemon.close()
    lines = [r.getMessage() for r in caplog.records if "is not a ComfyUI server" in r.getMessage()]
    assert lines and all("\n" not in m and "<html" not in m.lower() for m in lines)


def test_each_connection_failure_is_one_short_line(make, caplog):
    url = f"http://127.0.0.1:{free_port()}"
    backend = make([url], tries=3)
    with caplog.at_level(logging.WARNING):
        with pytest.raises(Exception):
            backend.generate(request())
    messages = [r.getMessage() for r in caplog.records]
    assert messages and all("\n" not in m and len(m) < 300 for m in messages)
    assert any("connection refused" in m for m in messages)
    assert not any("HTTPConnectionPool" in m or "object at 0x" in m for m in messages)


# -- a recently good server is rechecked soon -----------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_recently_good_server_is_benched_briefly_a_long_gone_one_longer():
    clock = Clock()
    pool = ServerPool(["http://a"], bench_base=2.0, bench_cap=300.0, recent_cap=10.0,
                      recent_window=600.0, clock=clock)
    pool.mark_ok("http://a")
    assert [pool.mark_failed("http://a", "refused") for _ in range(6)] == [2, 4, 8, 10, 10, 10]
    clock.now += 601          # good too long ago: the doubling goes on to the cap
    assert [pool.mark_failed("http://a", "refused") for _ in range(3)] == [128, 256, 300]


# -- dreamd doctor ---------------------------------------------------------------------------------

def doctor_config(urls, **comfyui) -> config.Config:
    keys = {"urls": urls, "checkpoint": CKPT, **comfyui}
    text = ('[generation]\nbackend = "comfyui"\nsampler = "euler"\nscheduler = "karras"\n'
            "[comfyui]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items()) + "\n")
    return config.parse(text)


def test_doctor_checks_checkpoint_sampler_and_scheduler_per_server():
    with ComfyUIDouble(checkpoints=[CKPT]) as good, ComfyUIDouble(checkpoints=[]) as empty, \
            NotComfyUIServer() as other:
        verdict, detail = check_servers(doctor_config([good.url, empty.url, other.url]))
    assert verdict == "warning"
    assert (f"{good.url} ok (ComfyUI 0.3.64; checkpoint {CKPT}, sampler euler, scheduler "
            "karras all there)") in detail
    assert f"{empty.url} ComfyUI 0.3.64, cannot run the workflow" in detail and "it has: none" in detail
    assert f"{other.url} is not a ComfyUI server" in detail
    with ComfyUIDouble(checkpoints=[CKPT]) as good:
        cfg = doctor_config([good.url])
        cfg.generation.sampler = "euler_magic"
        verdict, detail = check_servers(cfg)
    assert verdict == "problem" and "sampler 'euler_magic' is not one" in detail


def test_doctor_with_start_command_says_dreamd_will_start_comfyui():
    url = f"http://127.0.0.1:{free_port()}"
    verdict, detail = check_servers(doctor_config([url], start_command="python main.py"))
    assert verdict == "ok"
    assert detail == f"comfyui: {url}: not running; dreamd will start ComfyUI with start_command"
    verdict, detail = check_servers(doctor_config([url]))
    assert verdict == "problem" and "DOWN (connection refused" in detail


def test_the_dashboard_shows_progress_and_a_set_aside_server():
    from dreamd.tui.panels import comfyui_lines, progress_text
    assert progress_text({"keyframe": 4, "step": 3, "steps": 20, "node": "6",
                          "node_type": "KSampler"}) == "keyframe 4: KSampler, step 3 of 20"
    assert progress_text({"keyframe": 4, "step": None, "steps": None, "node": "8",
                          "node_type": None}) == "keyframe 4: node 8"
    lines = [str(t) for t in comfyui_lines({"status": "ok", "servers": [
        {"url": "http://a", "healthy": True, "set_aside": "checkpoint 'x' is not on http://a",
         "checkpoints": []}, {"url": "http://b", "healthy": True}]})]
    assert lines == ["ok", "http://a set aside: checkpoint 'x' is not on http://a (its "
                     "checkpoints: none)", "http://b healthy"]
