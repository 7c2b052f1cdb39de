"""Pausing for a game (any `free` rule) is immediate on the GPU: the guard's free control
interrupts the keyframe in flight on ComfyUI (POST /interrupt for that prompt, off the
queue when it has not started), then POST /free with both flags; the keyframe worker
postpones the row with its attempt given back and a fresh prompt id to come, never
discarded. A ComfyUI double on 127.0.0.1 sees every request."""

from __future__ import annotations

import json
import threading
import time

import pytest

from dreamd.errors import KeyframeInterruptedError
from dreamd.workers import controls, keyframe
from tests.comfyui_double import ComfyUIDouble
from tests.conftest import wait_for
from tests.test_comfyui_backend import CKPT, make, request, submit_directly  # noqa: F401
from tests.test_worker_keyframe import comfyui, ctx, make_due, plan, row, rows  # noqa: F401


def after(double: ComfyUIDouble, since: int) -> list[tuple[str, object]]:
    """The POSTs the double saw after request number `since` (path, body)."""
    return [(r.path, r.body) for r in double.requests[since:] if r.method == "POST"
            and r.path in ("/interrupt", "/free", "/queue")]


def generate_in_thread(backend, req):
    out: dict = {}

    def run():
        try:
            out["result"] = backend.generate(req)
        except Exception as exc:        # what the test asserts on
            out["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_the_running_prompt_is_interrupted_then_comfyui_frees(make):
    with ComfyUIDouble(checkpoints=[CKPT]) as double:
        double.delay = 60.0                      # a keyframe that would take a minute
        backend = make(double.url)
        req = request()
        thread, out = generate_in_thread(backend, req)
        assert double.wait_running(req.prompt_id)
        since = len(double.requests)
        controls.free(backend, None, interrupt=True)      # the guard's free control
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert isinstance(out.get("error"), KeyframeInterruptedError), out
        assert after(double, since) == [
            ("/interrupt", {"prompt_id": req.prompt_id}),
            ("/queue", {"delete": [req.prompt_id]}),
            ("/free", {"unload_models": True, "free_memory": True})]
        wait_for(lambda: double.running is None, timeout=60, what="the run to stop")
        assert backend.interrupt() == ""                  # nothing in flight any more


def test_a_prompt_still_queued_is_taken_off_the_queue_and_nobody_else_is_stopped(make):
    with ComfyUIDouble(checkpoints=[CKPT]) as double:
        double.delay = 60.0
        backend = make(double.url)
        other = request()
        submit_directly(double, backend, other)           # another client's prompt runs
        assert double.wait_running(other.prompt_id)
        mine = request(seed=1)
        thread, out = generate_in_thread(backend, mine)
        wait_for(lambda: any(i.prompt_id == mine.prompt_id for i in double.pending),
                 timeout=60, what="our prompt queued")
        assert mine.prompt_id in backend.interrupt()
        thread.join(timeout=60)
        assert isinstance(out.get("error"), KeyframeInterruptedError)
        assert double.running.prompt_id == other.prompt_id and not double.pending
        double.forget()


def test_a_keyframe_interrupted_for_a_pause_is_postponed_never_failed(ctx):
    with ComfyUIDouble(checkpoints=[CKPT]) as double:
        double.delay = 60.0
        backend = comfyui(ctx, [double.url])
        try:
            kid = plan(ctx, 0, backend="comfyui", max_attempts=1)

            def interrupt_when_running():
                wait_for(lambda: double.running is not None, timeout=60, what="the prompt")
                ctx.facts["paused"] = True          # the guard's pause, applied first
                controls.free(backend, None, interrupt=True)
            guard = threading.Thread(target=interrupt_when_running, daemon=True)
            guard.start()
            assert keyframe.tick(ctx, backend) == 0
            # the worker may give up the prompt while the guard's thread is still sending
            # /interrupt (it saw the flag first): the requests are read once that is done
            guard.join(timeout=60)
            assert not guard.is_alive()
            r = row(ctx, kid)
            # with one attempt allowed, a failure would have discarded it
            assert (r.state, r.attempt, r.prompt_id, r.server) == ("retryable", 0, None, None)
            assert "interrupted for a pause" in r.error
            detail = json.loads(rows(ctx, "SELECT detail FROM transitions WHERE entity = "
                                          "'keyframe' AND event = 'postponed'")[0].detail)
            assert detail["why"] == "paused"
            interrupted = [r.body["prompt_id"] for r in double.requests
                           if r.path == "/interrupt"]
            # the dream resumes: the keyframe is made under a new prompt id
            double.delay = 0.0
            ctx.facts["paused"] = False
            make_due(ctx, kid)
            assert keyframe.tick(ctx, backend) == 1
            done = row(ctx, kid)
            assert (done.state, done.attempt) == ("completed", 1)
            assert done.prompt_id not in interrupted and len(interrupted) == 1
        finally:
            backend.close()
    assert rows(ctx, "SELECT count(*) FROM keyframes WHERE state = 'discarded'")[0][0] == 0


def test_without_interrupt_free_only_frees(make):
    """`dreamd free` (the user's) frees memory; it does not cut a keyframe short."""
    with ComfyUIDouble(checkpoints=[CKPT]) as double:
        double.delay = 0.5
        backend = make(double.url)
        req = request()
        thread, out = generate_in_thread(backend, req)
        assert double.wait_running(req.prompt_id)
        controls.free(backend, None)
        thread.join(timeout=60)
        assert "result" in out and double.count("POST", "/interrupt") == 0
        assert double.freed == 1


@pytest.mark.slow        # a daemon on ComfyUI, a keyframe cut short and made again: ~15 s
def test_a_daemon_frees_comfyui_at_once_for_a_full_screen_window(daemon, tmp_path):
    """End to end: a daemon whose keyframe is running on ComfyUI when a full-screen window
    comes in front (guard.on_fullscreen = "free", through the platform layer's test
    hook): the double sees /interrupt for that prompt, then /free; the keyframe is
    postponed, and made once the window is gone."""
    from tests.conftest import with_keys
    from tests.test_comfyui_daemon import comfy_config, rows, status
    from tests.test_daemon import RUN_DEADLINE, stop, wait_in
    from tests.test_guard_presence import write_look

    look = tmp_path / "presence.json"
    write_look(look, {"monitors": [[0, 0, 1920, 1080]]})
    with ComfyUIDouble(checkpoints=[CKPT]) as double:
        daemon.config.write_text(with_keys(comfy_config([double.url]), "guard",
                                           'check_interval_seconds = 0.5\n'
                                           'presence_resume_seconds = 1.0\n'
                                           'on_fullscreen = "free"\n'))
        proc = daemon.start(extra_env={"DREAMD_PRESENCE_FILE": str(look)})
        try:
            wait_in(daemon, lambda: status(daemon).get("status") == "playing", "playback",
                    RUN_DEADLINE)
            double.delay = 120.0                  # the next keyframe would take 2 minutes

            def slow_prompt():
                """The prompt running under the long delay (not one that began before)."""
                item = double.running
                began = double.started_at.get(item.prompt_id) if item else None
                return item if began and time.monotonic() - began > 1.0 else None
            running = wait_for(slow_prompt, timeout=60, what="a slow prompt running")
            write_look(look, {"monitors": [[0, 0, 1920, 1080]], "foreground": {
                "process": "vlc.exe", "rect": [0, 0, 1920, 1080]}})
            wait_for(lambda: double.freed >= 1, timeout=60, what="POST /free")
            posts = [(r.path, r.body) for r in double.requests
                     if r.path in ("/interrupt", "/free")]
            assert posts[:2] == [("/interrupt", {"prompt_id": running.prompt_id}),
                                 ("/free", {"unload_models": True, "free_memory": True})]
            wait_for(lambda: status(daemon).get("pause_reason")
                     == "a full-screen window: vlc.exe", timeout=60, what="the pause's reason")
            postponed = wait_for(lambda: rows(
                daemon, "SELECT k.id, k.chain_index FROM keyframes k JOIN transitions t ON "
                        "t.entity = 'keyframe' AND t.entity_id = k.id WHERE "
                        "t.event = 'postponed' AND t.detail LIKE '%paused%'"),
                timeout=60, what="the keyframe postponed")
            double.delay = 0.0
            write_look(look, {"monitors": [[0, 0, 1920, 1080]]})
            wait_for(lambda: rows(daemon, "SELECT 1 FROM keyframes WHERE id = :i AND "
                                          "state = 'completed'", i=postponed[0].id),
                     timeout=60, what="the postponed keyframe made after the resume")
        finally:
            stop(daemon, proc)
    assert rows(daemon, "SELECT count(*) FROM keyframes WHERE state = 'discarded'")[0][0] == 0
    made = rows(daemon, "SELECT prompt_id, attempt FROM keyframes WHERE id = :i",
                i=postponed[0].id)[0]
    assert made.prompt_id != running.prompt_id and made.attempt == 1


def test_a_prompt_interrupt_took_off_the_queue_is_not_posted_again(make):
    """The waiting generate() may look between interrupt()'s /queue delete and its own
    check: the prompt is then neither queued nor in history, which otherwise means the
    server restarted and forgot it. It must not be posted again (it ran on, queued,
    after the pause: seen under load)."""
    from dreamd.backends.comfyui.backend import _Job
    with ComfyUIDouble(checkpoints=[CKPT]) as double:
        backend = make(double.url)
        job = _Job(request=request(), template=None, png=None, prompt_id="p-1", values={})
        job.interrupted = job.cancelled = True          # what interrupt() had done
        since = len(double.requests)
        with pytest.raises(KeyframeInterruptedError):
            backend._forgotten(double.url, job)
        assert job.resubmissions == 0
        assert not [r for r in double.requests[since:] if r.path == "/prompt"]


def test_interrupt_returns_only_once_the_cancel_is_sent_whoever_sends_it(make):
    """The waiting generate() may have begun sending /interrupt and the /queue delete
    itself (it saw the flag first); interrupt() must still wait for them, or the guard's
    /free overtakes the delete (seen under load: /interrupt, /free, /queue)."""
    from dreamd.backends.comfyui.backend import _Job
    with ComfyUIDouble(checkpoints=[CKPT]) as double:
        backend = make(double.url)
        job = _Job(request=request(), template=None, png=None, prompt_id="p-2", values={})
        job.url, job.cancelled = double.url, True       # generate() is sending them now
        backend._in_flight[job.prompt_id] = job
        returned = threading.Event()
        waiter = threading.Thread(target=lambda: (backend.interrupt(), returned.set()),
                                  daemon=True)
        waiter.start()
        assert not returned.wait(0.5)                   # still waiting for the sender
        job.cancel_sent = True
        assert returned.wait(60)
        backend._in_flight.pop(job.prompt_id)
