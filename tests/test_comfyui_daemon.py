"""The ComfyUI backend inside the daemon: `dreamd run` as a real subprocess against ComfyUI
doubles, real HTTP servers on 127.0.0.1 that record every request. End to end, a workflow
the server cannot run, SIGKILL mid prompt and re-attach, failover, the procedural fallback,
a supervised ComfyUI; and the pieces in-process (config tables, health, fallback, /free)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest
from PIL import Image
from rich.console import Console
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from dreamd import config
from dreamd.backends import KeyframeRequest
from dreamd.errors import ConfigError, LedgerError, PermanentBackendError
from tests import invariants
from tests.comfyui_double import ComfyUIDouble
from tests.conftest import (FAST_CONFIG, REPO, dreamd_cmd, free_port, wait_for, wheel_names,
                            with_keys)

CKPT = "random-sd15.safetensors"
pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX signals")


def comfy_config(urls: list[str], data_dir=None, **comfyui) -> str:
    """FAST_CONFIG on the comfyui backend; short timeouts and benches so tests move."""
    keys = {"urls": urls, "checkpoint": CKPT, "poll_interval_seconds": 0.05,
            "connect_timeout_seconds": 1.0, "read_timeout_seconds": 5.0, "tries": 2,
            "bench_seconds_max": 1.0, **comfyui}
    lines = [f"{k} = {json.dumps(v)}" for k, v in keys.items() if not isinstance(v, dict)]
    lines += [f"{k} = {{ {', '.join(f'{n} = {json.dumps(x)}' for n, x in v.items())} }}"
              for k, v in keys.items() if isinstance(v, dict)]
    head = FAST_CONFIG.replace("[generation]\n", '[generation]\nbackend = "comfyui"\n')
    if data_dir is not None:
        head += f"[system]\ndata_dir = {json.dumps(str(data_dir))}\n"
    return head + "[comfyui]\n" + "\n".join(lines) + "\n"


@pytest.fixture
def double():
    with ComfyUIDouble(checkpoints=[CKPT]) as d:
        yield d


def status(daemon) -> dict:
    try:
        return json.loads((daemon.data_dir / "output" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def cli_status(daemon) -> dict:
    out = subprocess.run(dreamd_cmd("--config", str(daemon.config), "status", "--json"),
                         env=daemon.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def rows(daemon, sql: str, **params) -> list:
    try:
        engine = daemon.db()
    except LedgerError:  # the daemon has not created it yet
        return []
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql), params).all()
    except OperationalError:  # not migrated yet
        return []
    finally:
        engine.dispose()


def completed_on(daemon, url: str) -> int:
    found = rows(daemon, "SELECT count(*) FROM keyframes WHERE state = 'completed' AND "
                         "server = :url", url=url)
    return found[0][0] if found else 0


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def daemon_log(daemon) -> str:
    return (daemon.data_dir / "logs" / "dreamd.log").read_text()


# -- the daemon, end to end ----------------------------------------------------------------------

def test_keyframes_come_from_comfyui_and_free_reaches_it(daemon, double):
    daemon.config.write_text(comfy_config([double.url]))
    proc = daemon.start()
    try:
        wait_for(lambda: status(daemon).get("frame_number", 0) >= 5
                 and status(daemon).get("comfyui_status") == "ok", timeout=90,
                 what=f"frames from ComfyUI:\n{daemon.output()[-3000:]}")
        free = subprocess.run(dreamd_cmd("--config", str(daemon.config), "free"),
                              env=daemon.env, capture_output=True, text=True, timeout=60)
        assert free.returncode == 0, free.stderr
        # generating: the free lasts until the next keyframe, and the command says so
        assert "the next keyframe loads the model again" in free.stdout
        assert "`dreamd pause` first" in free.stdout
        wait_for(lambda: double.freed == 1, timeout=15, what="POST /free")
        report = cli_status(daemon)
    finally:
        stop(proc)
    facts = invariants.check(daemon.data_dir)
    assert facts["keyframes"] >= 2 and facts["shown"]
    done = rows(daemon, "SELECT prompt_id, server, backend, path FROM keyframes "
                        "WHERE state = 'completed'")
    assert done and all(r.server == double.url and r.backend == "comfyui" for r in done)
    # one POST per keyframe, under the prompt_id the ledger recorded first
    assert [double.posts_for(r.prompt_id) for r in done] == [1] * len(done)
    with Image.open(daemon.data_dir / done[0].path) as im:
        assert im.size == (128, 64)
    assert rows(daemon, "SELECT command, state FROM controls")[0] == ("free", "applied")
    assert report["comfyui"]["status"] == "ok"
    assert [(s["url"], s["healthy"]) for s in report["comfyui"]["servers"]] == [(double.url, True)]
    assert status(daemon)["backend"] == "comfyui"


@pytest.mark.slow
def test_a_checkpoint_the_server_lacks_stops_the_backend_once(daemon, double):
    daemon.config.write_text(comfy_config([double.url], checkpoint="nope.safetensors"))
    result = daemon.run(4)
    assert result.returncode == 0, result.stdout
    assert status(daemon)["comfyui_status"] == "error"
    log = daemon_log(daemon)
    assert log.count("ComfyUI backend stopped") == 1
    assert "checkpoint 'nope.safetensors' is not on" in log and f"it has: {CKPT}" in log
    # no loop: nothing was posted and at most one keyframe row waits for a fixed config
    assert double.count("POST", "/prompt") == 0
    assert rows(daemon, "SELECT count(*) FROM keyframes")[0][0] <= 1
    report = cli_status(daemon)["comfyui"]
    assert report["status"] == "error" and f"it has: {CKPT}" in report["error"]
    invariants.check(daemon.data_dir)


@pytest.mark.slow
def test_a_server_lacking_the_checkpoint_is_set_aside_and_the_dream_goes_on(daemon, double):
    """Listed first, a server without the checkpoint no longer keeps the dream from
    starting: it is set aside, listed in `dreamd status` with the checkpoints it has."""
    with ComfyUIDouble(checkpoints=["sdxl_base.safetensors"]) as lacking:
        daemon.config.write_text(comfy_config([lacking.url, double.url]))
        proc = daemon.start()
        try:
            wait_for(lambda: completed_on(daemon, double.url) >= 2, timeout=90,
                     what=f"keyframes from the fit server:\n{daemon.output()[-3000:]}")
            report = cli_status(daemon)["comfyui"]
        finally:
            stop(proc)
    assert report["status"] == "ok" and report["error"] is None
    servers = {s["url"]: s for s in report["servers"]}
    assert "checkpoint 'random-sd15.safetensors' is not on" in servers[lacking.url]["set_aside"]
    assert servers[lacking.url]["checkpoints"] == ["sdxl_base.safetensors"]
    assert servers[double.url]["set_aside"] is None
    assert lacking.count("POST", "/prompt") == 0
    assert daemon_log(daemon).count("is set aside") == 1
    invariants.check(daemon.data_dir)


def test_the_procedural_fallback_dreams_while_every_server_is_down(daemon):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    daemon.config.write_text(comfy_config([url], fallback="procedural"))
    proc = daemon.start()
    try:
        wait_for(lambda: status(daemon).get("comfyui_status") == "fallback"
                 and status(daemon).get("frame_number", 0) >= 5, timeout=90,
                 what=f"fallback frames:\n{daemon.output()[-3000:]}")
        made = rows(daemon, "SELECT count(*) FROM keyframes WHERE state = 'completed' "
                            "AND backend = 'procedural'")[0][0]
        assert made >= 1
        assert cli_status(daemon)["comfyui"]["servers"][0]["healthy"] is False
        with ComfyUIDouble(port, checkpoints=[CKPT]):   # a server comes back
            wait_for(lambda: status(daemon).get("comfyui_status") == "ok", timeout=30,
                     what="ComfyUI to be used again")
            wait_for(lambda: completed_on(daemon, url) >= 1, timeout=30,
                     what="a keyframe from the server that came back")
            stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    invariants.check(daemon.data_dir)


def test_sigterm_during_a_keyframe_stops_at_once_and_cleans_up(daemon, double):
    """The stop reaches the wait on the websocket: no grace sat out, the lease released (the
    prompt is left to ComfyUI and re-attached at the next start), dreamd.pid removed; and
    while it ran, status.json showed the prompt's progress."""
    double.delay = 300.0
    # the aesthetic memory off: its first tick imports open_clip, slow enough on a loaded
    # machine to sit out the grace on its own, which is not what this test is about
    daemon.config.write_text(with_keys(comfy_config([double.url], deadline_seconds=600.0),
                                       "cache", "enabled = false"))
    proc = daemon.start()
    try:
        wait_for(lambda: double.running is not None, timeout=90,
                 what=f"a prompt running on ComfyUI:\n{daemon.output()[-3000:]}")
        prompt_id = double.running.prompt_id
        progress = wait_for(lambda: (status(daemon).get("keyframe_progress") or {}).get(
            "node_type") == "KSampler" and status(daemon)["keyframe_progress"], timeout=30,
            what="the prompt's progress in status.json")
        assert progress["node"] == "6" and progress["keyframe"] is not None
    finally:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    log = daemon_log(daemon)
    assert "still running after" not in log and "stopped (signal SIGTERM)" in log
    assert not (daemon.data_dir / "dreamd.pid").exists()
    (row,) = rows(daemon, "SELECT state, attempt FROM keyframes WHERE prompt_id = :p", p=prompt_id)
    assert row.state == "available" and row.attempt == 0      # released, not failed
    assert double.posts_for(prompt_id) == 1
    assert status(daemon)["keyframe_progress"] is None


# -- crash safety, failover, supervision (slow) --------------------------------------------------

@pytest.mark.slow
def test_sigkill_mid_prompt_then_restart_reattaches_without_posting_again(daemon, double):
    double.delay = 4.0
    daemon.config.write_text(comfy_config([double.url], deadline_seconds=60.0))
    proc = daemon.start()
    try:
        wait_for(lambda: double.running is not None, timeout=90,
                 what=f"a prompt running on ComfyUI:\n{daemon.output()[-3000:]}")
        prompt_id = double.running.prompt_id
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # the ledger knew the prompt and its server before the server did
    (row,) = rows(daemon, "SELECT state, server FROM keyframes WHERE prompt_id = :p",
                  p=prompt_id)
    assert row.state == "executing" and row.server == double.url
    double.delay = 0.2
    proc = daemon.start()
    try:
        wait_for(lambda: rows(daemon, "SELECT 1 FROM keyframes WHERE prompt_id = :p AND "
                                      "state = 'completed'", p=prompt_id), timeout=90,
                 what=f"the re-attached keyframe:\n{daemon.output()[-3000:]}")
        wait_for(lambda: completed_on(daemon, double.url) >= 3, timeout=60, what="more keyframes")
    finally:
        stop(proc)
    assert double.posts_for(prompt_id) == 1
    log = daemon_log(daemon)
    assert f"prompt {prompt_id} is queued on" in log or f"prompt {prompt_id} already finished" in log
    done = rows(daemon, "SELECT prompt_id FROM keyframes WHERE state = 'completed'")
    assert [double.posts_for(r.prompt_id) for r in done] == [1] * len(done)
    invariants.check(daemon.data_dir)


@pytest.mark.slow
def test_keyframes_fail_over_when_a_server_dies(daemon):
    with ComfyUIDouble(checkpoints=[CKPT]) as a, ComfyUIDouble(checkpoints=[CKPT]) as b:
        a.delay = b.delay = 0.3
        daemon.config.write_text(comfy_config([a.url, b.url]))
        proc = daemon.start()
        try:
            wait_for(lambda: completed_on(daemon, a.url) >= 2, timeout=90,
                     what=f"keyframes on the first server:\n{daemon.output()[-3000:]}")
            a.stop()
            wait_for(lambda: completed_on(daemon, b.url) >= 3, timeout=60,
                     what="keyframes on the second server")

            def dead_one_shown() -> bool:
                servers = (cli_status(daemon).get("comfyui") or {}).get("servers") or []
                return [(s["url"], s["healthy"]) for s in servers] == [(a.url, False),
                                                                       (b.url, True)]
            wait_for(dead_one_shown, timeout=30, what="dreamd status showing the dead server")
            assert status(daemon)["comfyui_status"] == "ok"
        finally:
            stop(proc)
        for r in rows(daemon, "SELECT prompt_id FROM keyframes WHERE state = 'completed'"):
            # at most the one in flight when `a` died was posted twice, once to each server
            assert 1 <= a.posts_for(r.prompt_id) + b.posts_for(r.prompt_id) <= 2
        assert not any(a.posts_for(r.prompt_id) > 1 or b.posts_for(r.prompt_id) > 1
                       for r in rows(daemon, "SELECT prompt_id FROM keyframes"))
    invariants.check(daemon.data_dir)


def alive(pid: int) -> bool:
    """Running (a zombie no one has reaped yet is not)."""
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _child_pid(daemon) -> int | None:
    try:
        return int((daemon.data_dir / "comfyui.pid").read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_a_supervised_comfyui_is_started_restarted_and_stopped(daemon):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = f"{sys.executable} -m tests.comfyui_double --port {port} --checkpoint {CKPT}"
    daemon.config.write_text(comfy_config([url], start_command=command, start_cwd=str(REPO),
                                          start_env={"DREAMD_SUPERVISED": "yes"}))
    proc = daemon.start()
    try:
        wait_for(lambda: completed_on(daemon, url) >= 1, timeout=90,
                 what=f"a keyframe from the supervised ComfyUI:\n{daemon.output()[-3000:]}")
        first = wait_for(lambda: _child_pid(daemon), timeout=10, what="comfyui.pid")
        os.kill(first, signal.SIGKILL)            # ComfyUI dies: the daemon restarts it
        second = wait_for(lambda: (p := _child_pid(daemon)) not in (None, first) and p,
                          timeout=30, what="a restarted ComfyUI")
        before = completed_on(daemon, url)
        wait_for(lambda: completed_on(daemon, url) > before + 1, timeout=60,
                 what="keyframes from the restarted ComfyUI")
        wait_for(lambda: ((cli_status(daemon)["comfyui"] or {}).get("supervisor") or {})
                 .get("restarts_last_hour") == 1, timeout=20, what="the restart in the status")
    finally:
        stop(proc)
    assert not alive(second) and not (daemon.data_dir / "comfyui.pid").exists()
    log = (daemon.data_dir / "logs" / "comfyui.log").read_text()
    assert log.count("dreamd starts ComfyUI") == 2, log
    assert "CUDA_VISIBLE_DEVICES=0" in log and "stopped cleanly" in log, log

    # a daemon killed outright takes its ComfyUI along (Linux: the parent-death signal; the
    # re-adoption of one left behind elsewhere is tested in test_comfyui_supervisor.py)
    made, orphan = completed_on(daemon, url), None
    proc = daemon.start()
    try:
        orphan = wait_for(lambda: completed_on(daemon, url) > made and _child_pid(daemon),
                          timeout=60, what=f"ComfyUI again:\n{daemon.output()[-3000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if sys.platform.startswith("linux"):
            wait_for(lambda: not alive(orphan), timeout=30, what="ComfyUI to die with its daemon")
        proc = daemon.start()
        fresh = wait_for(lambda: (p := _child_pid(daemon)) not in (None, orphan) and p,
                         timeout=60, what=f"a fresh supervised ComfyUI:\n{daemon.output()[-3000:]}")
        made = completed_on(daemon, url)
        # running (not still starting: a SIGTERM before the handlers are set kills it outright)
        wait_for(lambda: completed_on(daemon, url) > made, timeout=60,
                 what=f"keyframes from the fresh ComfyUI:\n{daemon.output()[-3000:]}")
        stop(proc)
        assert not alive(fresh)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in {orphan, _child_pid(daemon)} - {None}:  # never leak a double
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)
    invariants.check(daemon.data_dir)


# -- the pieces, in-process ----------------------------------------------------------------------

def test_comfyui_tables_in_the_config():
    cfg = config.parse('[comfyui]\nmapping = { seed = "3.inputs.seed", denoise = "" }\n'
                       'start_env = { "A.B" = "1", PATH_X = "y" }\n')
    assert cfg.comfyui.mapping == {"seed": "3.inputs.seed", "denoise": ""}
    again = config.parse(config.to_toml(cfg).split("[[prompts.themes]]")[0])
    assert again.comfyui.start_env == {"A.B": "1", "PATH_X": "y"}
    for bad, message in [("mapping = 3", "expected a table of strings"),
                         ("mapping = { seed = 3 }", r"comfyui.mapping.seed = 3 is invalid"),
                         ('mapping = { seed = "seed" }', "<node id>.inputs.<input name>"),
                         ('upload_subfolder = "../up"', "without '..'"),
                         ("deadline_seconds = 0", "between 1 and 86400")]:
        with pytest.raises(ConfigError, match=message):
            config.parse(f"[comfyui]\n{bad}\n")


def _request(image: bool = True, **kw) -> KeyframeRequest:
    fields = dict(chain_index=1, width=64, height=32, seed=5, theme="ethereal", prompt="a window",
                  negative_prompt="", denoise=0.3, steps=4, cfg=6.0, sampler="euler",
                  scheduler="normal", prompt_id=str(uuid.uuid4()),
                  image=Image.new("RGB", (64, 32), (9, 99, 199)) if image else None)
    return KeyframeRequest(**{**fields, **kw})


@pytest.fixture
def build(tmp_path):
    from dreamd.backends.comfyui.daemon_backend import build_backend
    made = []

    def make(urls: list[str], **comfyui):
        cfg = config.parse(comfy_config(urls, data_dir=tmp_path / "data", **comfyui))
        backend = build_backend(cfg)
        made.append(backend)
        return backend
    yield make
    for backend in made:
        backend.close()


def test_the_server_is_recorded_before_the_prompt_is_posted(double, build):
    backend = build([double.url])
    seen = []
    result = backend.generate(_request(on_server=lambda url: seen.append(
        (url, double.count("POST", "/prompt")))))
    assert seen == [(double.url, 0)] and result.info["server"] == double.url
    assert backend.facts["comfyui_status"] == "ok" and backend.facts["backend_unusable"] is None


def test_a_workflow_the_server_cannot_run_stops_the_backend(double, build):
    backend = build([double.url], checkpoint="nope.safetensors")
    facts = backend.facts
    assert facts["comfyui_status"] == "error" and facts["backend_unusable"] == facts["backend_error"]
    assert f"it has: {CKPT}" in facts["backend_error"]
    assert backend.health()["servers"][0]["healthy"] is True   # the server is fine; we are not


def test_keyframes_failing_for_good_in_a_row_stop_the_backend(double, build):
    backend = build([double.url])
    double.faults.execution_errors = [{"exception_type": "ValueError",
                                       "exception_message": "bad latent"}] * 3
    for _ in range(3):
        assert backend.facts["comfyui_status"] == "ok"
        with pytest.raises(PermanentBackendError, match="ValueError: bad latent"):
            backend.generate(_request())
    assert backend.facts["comfyui_status"] == "error"
    assert backend.facts["backend_error"].startswith("3 keyframes in a row failed for good")


def test_a_workflow_that_cannot_load_is_a_config_error(build, double):
    with pytest.raises(ConfigError, match=r"\[comfyui\]: workflow 'nope' not found"):
        build([double.url], workflow="nope")


def test_every_server_down_without_fallback_makes_the_backend_unusable(build):
    backend = build([f"http://127.0.0.1:{free_port()}"])
    assert backend.facts["comfyui_status"] == "down"
    assert backend.facts["backend_unusable"].startswith("every ComfyUI server is down")


def test_with_the_fallback_the_procedural_dreamer_stands_in(build):
    backend = build([f"http://127.0.0.1:{free_port()}"], fallback="procedural")
    assert backend.facts["comfyui_status"] == "fallback"
    assert backend.facts["backend_unusable"] is None
    result = backend.generate(_request())
    assert result.image.size == (64, 32)
    assert result.info["backend"] == "procedural" and result.info["server"] is None


def test_a_server_is_brought_back_by_the_health_check(build):
    port = free_port()
    backend = build([f"http://127.0.0.1:{port}"])
    assert backend.facts["comfyui_status"] == "down"
    with ComfyUIDouble(port, checkpoints=[CKPT]):
        wait_for(lambda: backend.facts["comfyui_status"] == "ok", timeout=15,
                 what="the health thread to see the server")
        assert backend.generate(_request()).info["server"].endswith(str(port))


def test_the_free_control(double, build):
    from dreamd.ledger.controls import COMMANDS
    from dreamd.workers.controls import free
    assert "free" in COMMANDS
    backend = build([double.url])
    assert free(backend) == {} and double.freed == 1
    assert free(object()) == {}                      # a backend without server memory

    class Failing:
        def free(self):
            return {"http://a": "refused", "http://b": "refused"}
    with pytest.raises(ValueError, match="no ComfyUI server freed its memory"):
        free(Failing())


def test_status_shows_each_server(capsys):
    from dreamd.cli.status import print_status
    console = Console(record=True, width=200)
    print_status({"data_dir": "d", "database": "d/dreamd.db", "revision": "0003",
                  "head": "0003", "counts": {}, "last_run": None, "comfyui": {
                      "status": "ok", "error": None, "fallback": "none", "updated_at": "now",
                      "servers": [
                          {"url": "http://a:8188", "healthy": False, "failures": 3,
                           "last_error": "refused", "benched_until": "later"},
                          {"url": "http://b:8188", "healthy": True, "last_ok": "just now"}],
                      "supervisor": None}}, console)
    out = console.export_text()
    assert "http://a:8188  unhealthy, 3 failures, benched until later: refused" in out
    assert "http://b:8188  healthy, last answer just now" in out


def test_the_workflows_ship_in_the_package():
    import tomllib
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"]["dreamd.workflows"] == "workflows"
    assert "dreamd.workflows" in tool["packages"]
    assert tool["package-data"]["dreamd.workflows"] == ["*.json"]


@pytest.mark.slow
@pytest.mark.xdist_group("wheel")
def test_the_wheel_carries_the_workflows(wheel):
    assert {"dreamd/workflows/sd15_img2img.json", "dreamd/workflows/sd15_txt2img.json",
            "dreamd/backends/comfyui/daemon_backend.py"} <= wheel_names(wheel)
