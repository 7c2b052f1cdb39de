"""The controls worker in-process, on a real ledger file: every command's effect (on the
worker's facts, on `runtime_state`, on the live knobs) and its `applied` or `rejected`
row with the error a user reads; what `dreamd config show` adds; what a restart keeps.
`free` goes to real ComfyUI doubles on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from dreamd.errors import ConfigError
from dreamd.ledger import queries
from dreamd.ledger import transitions as tr
from dreamd.ledger import controls as ledger_controls
from dreamd.workers import controls
from dreamd.config import live_knobs
from tests.comfyui_double import ComfyUIDouble
from tests.conftest import worker_context

LIVE = ", ".join(sorted(live_knobs()))


@pytest.fixture
def ctx(db_path):
    yield from worker_context(db_path, "")


def send(ctx, command: str, args: dict | None = None, **kw) -> int:
    with ctx.engine.begin() as conn:
        return ledger_controls.request(conn, command, args, **kw)


def rows(ctx, q: str, **params) -> list:
    with ctx.reader.connect() as conn:
        return conn.execute(text(q), params).all()


def control(ctx, cid: int):
    return rows(ctx, "SELECT command, args, state, error, applied_at FROM controls "
                     "WHERE id = :i", i=cid)[0]


def runtime(ctx):
    return ctx.runtime()


def store(ctx, **values) -> None:
    with ctx.engine.begin() as conn:
        queries.update_runtime(conn, **values)


# ---------------------------------------------------------------- request

def test_request_writes_an_available_row_with_its_args_and_who_sent_it(ctx):
    a = send(ctx, "pause", {"reason": "lunch"})
    b = send(ctx, "resume", worker="guard")
    got = rows(ctx, "SELECT id, command, args, state, error, applied_at FROM controls "
                    "ORDER BY id")
    assert [tuple(r) for r in got] == [(a, "pause", '{"reason": "lunch"}', "available", None, None),
                                       (b, "resume", "{}", "available", None, None)]
    assert rows(ctx, "SELECT entity_id, to_state, worker FROM transitions "
                     "WHERE entity = 'control' ORDER BY id") == \
        [(a, "available", "surface"), (b, "available", "guard")]


def test_request_refuses_an_unknown_command_naming_them_all(ctx):
    with ctx.engine.begin() as conn:
        with pytest.raises(ConfigError) as err:
            ledger_controls.request(conn, "snooze")
    assert str(err.value) == ("unknown control 'snooze': expected one of pause, resume, set, "
                              "theme, free, inject, stop")
    assert rows(ctx, "SELECT count(*) FROM controls") == [(0,)]


# ---------------------------------------------------------------- tick: applied / rejected

def test_tick_applies_in_order_and_records_each_applied_row(ctx):
    first = send(ctx, "pause", {"reason": "meeting"})
    second = send(ctx, "resume")
    assert controls.tick(ctx) == 2
    for cid, command in ((first, "pause"), (second, "resume")):
        c = control(ctx, cid)
        assert (c.command, c.state, c.error) == (command, "applied", None)
        assert c.applied_at is not None
    # resume came after pause: the dream runs
    rt = runtime(ctx)
    assert (rt.paused, rt.pause_reason) == (0, None)
    assert not ctx.paused() and ctx.facts["paused_by"] is None
    assert rows(ctx, "SELECT entity_id, from_state, to_state, worker FROM transitions "
                     "WHERE entity = 'control' AND from_state IS NOT NULL ORDER BY id") == \
        [(first, "available", "applied", "controls"), (second, "available", "applied", "controls")]
    assert controls.tick(ctx) == 0          # nothing left: an applied row is not read again


def test_a_rejected_control_keeps_its_error_and_the_next_ones_still_apply(ctx):
    bad = send(ctx, "theme", {"name": "nowhere"})
    good = send(ctx, "pause")
    seen = []
    assert controls.tick(ctx, on_knobs=seen.append) == 2
    c = control(ctx, bad)
    assert (c.state, c.error) == ("rejected", "no theme named 'nowhere': themes are "
                                              "ethereal, cathedral, signal")
    assert c.applied_at is not None
    assert rows(ctx, "SELECT from_state, to_state, worker FROM transitions WHERE entity = "
                     "'control' AND entity_id = :i ORDER BY id", i=bad)[-1] == \
        ("available", "rejected", "controls")
    assert control(ctx, good).state == "applied"
    assert seen == []                       # no knob changed
    assert runtime(ctx).theme_index == 0


def test_controls_that_are_not_json_objects_or_miss_a_key_are_rejected(ctx):
    broken = send(ctx, "set", {"value": "0.5"})                 # no key
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE controls SET args = 'not json' WHERE id = :i"), {"i": broken})
    missing = send(ctx, "set", {"value": "0.5"})
    assert controls.tick(ctx) == 2
    assert control(ctx, broken).state == "rejected"
    assert "Expecting value" in control(ctx, broken).error
    assert (control(ctx, missing).state, control(ctx, missing).error) == ("rejected", "'key'")


def test_empty_args_read_as_an_empty_object(ctx):
    cid = send(ctx, "pause")
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE controls SET args = '' WHERE id = :i"), {"i": cid})
    controls.tick(ctx)
    assert control(ctx, cid).state == "applied"
    assert ctx.facts["pause_reason"] == "paused by user"


# ---------------------------------------------------------------- pause / resume

def test_pause_with_and_without_a_reason(ctx):
    send(ctx, "pause")
    controls.tick(ctx)
    rt = runtime(ctx)
    assert (rt.paused, rt.pause_reason) == (1, "paused by user")
    assert ctx.facts == {"paused": True, "pause_reason": "paused by user", "paused_by": "user"}
    send(ctx, "pause", {"reason": "dinner"})
    controls.tick(ctx)
    assert (runtime(ctx).paused, runtime(ctx).pause_reason) == (1, "dinner")
    assert ctx.facts["pause_reason"] == "dinner" and ctx.paused()


def test_the_guard_pauses_and_resumes_its_own_pause(ctx):
    send(ctx, "pause", {"reason": "elden.exe", "source": "guard"}, worker="guard")
    controls.tick(ctx)
    assert ctx.facts == {"paused": True, "pause_reason": "elden.exe", "paused_by": "guard"}
    with ctx.reader.connect() as conn:
        assert ledger_controls.pause_source(conn) == "guard"
    resume = send(ctx, "resume", {"source": "guard"}, worker="guard")
    controls.tick(ctx)
    assert control(ctx, resume).state == "applied"
    assert ctx.facts == {"paused": False, "pause_reason": None, "paused_by": None}
    assert (runtime(ctx).paused, runtime(ctx).pause_reason) == (0, None)


def test_a_guard_resume_of_the_users_pause_is_rejected_with_the_reason(ctx):
    send(ctx, "pause", {"reason": "mine", "source": "someone"})   # not the guard: the user's
    resume = send(ctx, "resume", {"source": "guard"}, worker="guard")
    controls.tick(ctx)
    assert ctx.facts["paused_by"] == "user"
    c = control(ctx, resume)
    assert (c.state, c.error) == ("rejected", "the dream was paused by the user, not by the "
                                              "game guard: the guard never undoes that "
                                              "(`dreamd resume` does)")
    assert ctx.paused() and runtime(ctx).paused == 1
    # the user's own resume lifts it
    send(ctx, "resume")
    controls.tick(ctx)
    assert not ctx.paused() and runtime(ctx).paused == 0


def test_pause_source_reads_the_last_applied_pause(ctx):
    with ctx.reader.connect() as conn:
        assert ledger_controls.pause_source(conn) is None          # not paused
    store(ctx, paused=1)
    with ctx.reader.connect() as conn:
        assert ledger_controls.pause_source(conn) == "user"        # paused, no control says by whom
    send(ctx, "pause", {"source": "guard"})
    controls.tick(ctx)
    send(ctx, "pause", {"reason": "me"})
    controls.tick(ctx)
    with ctx.reader.connect() as conn:
        assert ledger_controls.pause_source(conn) == "user"        # the newest applied pause
    send(ctx, "pause", {"source": "guard"})
    with ctx.reader.connect() as conn:
        assert ledger_controls.pause_source(conn) == "user"        # not applied yet
    controls.tick(ctx)
    with ctx.reader.connect() as conn:
        assert ledger_controls.pause_source(conn) == "guard"
    send(ctx, "set", {"key": "display.fps", "value": "12"})     # a later control of another kind
    controls.tick(ctx)
    with ctx.reader.connect() as conn:
        assert ledger_controls.pause_source(conn) == "guard"           # only pauses say who paused


# ---------------------------------------------------------------- set / reset

def test_set_changes_a_live_knob_stores_it_and_tells_the_listener(ctx):
    seen = []
    send(ctx, "set", {"key": "generation.denoise", "value": "0.45"})
    send(ctx, "set", {"key": "display.fps", "value": "12"})
    assert controls.tick(ctx, on_knobs=seen.append) == 2
    assert ctx.knob("generation.denoise") == 0.45 and ctx.knob("display.fps") == 12.0
    assert runtime(ctx).knobs == '{"display.fps": 12.0, "generation.denoise": 0.45}'
    assert seen == [{"generation.denoise": 0.45},
                    {"generation.denoise": 0.45, "display.fps": 12.0}]


def test_a_set_out_of_range_is_rejected_naming_the_range(ctx):
    seen = []
    cid = send(ctx, "set", {"key": "generation.denoise", "value": "5"})
    controls.tick(ctx, on_knobs=seen.append)
    assert control(ctx, cid).state == "rejected"
    assert control(ctx, cid).error == ("generation.denoise = 5.0 is invalid: expected a value "
                                       "between 0.01 and 1")
    assert seen == [] and ctx.knob("generation.denoise") == 0.3
    assert runtime(ctx).knobs in (None, "", "{}")


def test_reset_forgets_one_knob_and_all_forgets_every_one(ctx):
    for key, value in (("generation.denoise", "0.5"), ("generation.steps", "9"),
                       ("display.fps", "20")):
        send(ctx, "set", {"key": key, "value": value})
    send(ctx, "set", {"reset": "generation.steps"})
    seen = []
    controls.tick(ctx, on_knobs=seen.append)
    assert seen[-1] == {"generation.denoise": 0.5, "display.fps": 20.0}
    assert ctx.knob("generation.steps") == ctx.cfg.generation.steps
    assert json.loads(runtime(ctx).knobs) == {"display.fps": 20.0, "generation.denoise": 0.5}
    send(ctx, "set", {"reset": "all"})
    controls.tick(ctx, on_knobs=seen.append)
    assert seen[-1] == {} and runtime(ctx).knobs == "{}"
    assert ctx.knob("generation.denoise") == 0.3


def test_a_knob_that_cannot_change_while_running_is_named_with_the_live_ones(ctx):
    with pytest.raises(ConfigError) as err:
        ledger_controls.validate_knob("generation.resolution", "[64, 64]")
    assert str(err.value) == (f"generation.resolution cannot be set while running: live keys "
                              f"are {LIVE}")
    cid = send(ctx, "set", {"reset": "generation.resolution"})
    controls.tick(ctx)
    assert control(ctx, cid).error == str(err.value)


def test_a_misspelt_knob_gets_a_suggestion(ctx):
    with pytest.raises(ConfigError) as err:
        ledger_controls.validate_knob("generation.denoize", "0.4")
    assert str(err.value) == (f"unknown key 'generation.denoize'; did you mean "
                              f"generation.denoise? (live keys: {LIVE})")
    # close to no live knob but to a config key: that one is suggested
    with pytest.raises(ConfigError) as err:
        ledger_controls.validate_reset("comfyui.checkpiont")
    assert str(err.value) == (f"unknown key 'comfyui.checkpiont'; did you mean "
                              f"comfyui.checkpoint? (live keys: {LIVE})")
    with pytest.raises(ConfigError) as err:
        ledger_controls.validate_knob("zzz", "1")
    assert str(err.value) == f"unknown key 'zzz' (live keys: {LIVE})"
    assert ledger_controls.validate_reset("all") == "all"
    assert ledger_controls.validate_reset("display.fps") == "display.fps"
    assert ledger_controls.validate_knob("generation.steps", "12") == 12


def test_checked_knobs_keeps_the_valid_and_says_why_for_the_rest():
    good, bad = ledger_controls.checked_knobs({"generation.denoise": 0.4, "display.fps": float("nan"),
                                        "generation.resolution": [8, 8], "nope": 1})
    assert good == {"generation.denoise": 0.4}
    assert set(bad) == {"display.fps", "generation.resolution", "nope"}
    assert "finite number" in bad["display.fps"]
    assert "cannot be set while running" in bad["generation.resolution"]
    assert bad["nope"].startswith("unknown key 'nope'")


# ---------------------------------------------------------------- restore (a restart)

def test_restore_keeps_the_pause_and_the_knobs_and_drops_a_bad_one_for_good(ctx, caplog):
    send(ctx, "pause", {"reason": "night", "source": "guard"})
    controls.tick(ctx)
    store(ctx, knobs=json.dumps({"generation.steps": 12, "display.fps": float("nan"),
                                 "generation.cfg": 5.0}))
    ctx.facts.clear()
    ctx.set_knobs({})
    with caplog.at_level("WARNING", logger="dreamd.controls"):
        controls.restore(ctx)
    assert ctx.facts == {"paused": True, "pause_reason": "night", "paused_by": "guard"}
    assert ctx.knob("generation.steps") == 12 and ctx.knob("generation.cfg") == 5.0
    assert runtime(ctx).knobs == '{"generation.cfg": 5.0, "generation.steps": 12}'
    assert [r.getMessage() for r in caplog.records] == \
        ["stored knob display.fps dropped: display.fps = nan is invalid: expected a finite "
         "number"]


def test_restore_leaves_good_knobs_as_stored(ctx):
    stored = '{"generation.steps":12}'          # not the form dreamd writes: untouched
    store(ctx, knobs=stored)
    controls.restore(ctx)
    assert ctx.facts == {"paused": False, "pause_reason": None, "paused_by": None}
    assert ctx.knob("generation.steps") == 12
    assert runtime(ctx).knobs == stored


# ---------------------------------------------------------------- overrides (config show)

def test_overrides_show_stored_knobs_and_sets_not_applied_yet(ctx):
    store(ctx, knobs=json.dumps({"generation.steps": 12, "display.fps": float("nan"),
                                 "generation.cfg": 5.0}))
    send(ctx, "set", {"key": "generation.denoise", "value": "0.6"})
    s2 = send(ctx, "set", {"key": "generation.steps", "value": "15"})
    send(ctx, "set", {"key": "generation.cfg", "value": "99"})          # out of range: skipped
    send(ctx, "set", {"value": "1"})                                      # no key: skipped
    send(ctx, "pause")                                                    # not a set
    applied = send(ctx, "set", {"key": "display.fps", "value": "3"})
    with ctx.engine.begin() as conn:
        tr.transition(conn, "control", applied, "available", "applied")
    with ctx.reader.connect() as conn:
        out, bad = ledger_controls.overrides(conn)
    s1 = s2 - 1
    assert out == {
        "generation.steps": (15, f"sent by `dreamd set` (control {s2}, applied when a daemon "
                                 f"reads it)"),
        "generation.cfg": (5.0, "stored by `dreamd set`"),
        "generation.denoise": (0.6, f"sent by `dreamd set` (control {s1}, applied when a "
                                    f"daemon reads it)")}
    assert list(bad) == ["display.fps"]


def test_overrides_follow_pending_resets_in_order(ctx):
    store(ctx, knobs=json.dumps({"generation.steps": 12, "generation.cfg": 5.0,
                                 "display.fps": float("nan")}))
    send(ctx, "set", {"reset": "generation.steps"})
    send(ctx, "set", {"reset": "display.fps"})
    send(ctx, "set", {"reset": "nonsense"})                   # rejected later: skipped now
    with ctx.reader.connect() as conn:
        out, bad = ledger_controls.overrides(conn)
    assert out == {"generation.cfg": (5.0, "stored by `dreamd set`")} and bad == {}
    send(ctx, "set", {"key": "generation.steps", "value": "7"})
    send(ctx, "set", {"reset": "all"})
    with ctx.reader.connect() as conn:
        assert ledger_controls.overrides(conn) == ({}, {})
    send(ctx, "set", {"key": "generation.steps", "value": "8"})   # after the reset: kept
    with ctx.reader.connect() as conn:
        out, _ = ledger_controls.overrides(conn)
    assert [(k, v[0]) for k, v in out.items()] == [("generation.steps", 8)]


def test_overrides_drop_what_a_pending_reset_forgets_and_keep_the_rest(ctx):
    bad_knobs = {"display.fps": float("nan"), "display.min_buffer_seconds": -5.0}
    store(ctx, knobs=json.dumps({"generation.steps": 12, **bad_knobs}))
    send(ctx, "set", {"reset": "display.fps"})
    with ctx.reader.connect() as conn:
        out, bad = ledger_controls.overrides(conn)
    assert list(out) == ["generation.steps"] and list(bad) == ["display.min_buffer_seconds"]
    send(ctx, "set", {"reset": "all"})
    with ctx.reader.connect() as conn:
        assert ledger_controls.overrides(conn) == ({}, {})


def test_overrides_of_a_ledger_without_runtime_state(db_path):
    from dreamd.ledger import database
    engine = database.reader(db_path)
    try:
        with engine.connect() as conn:
            assert ledger_controls.overrides(conn) == ({}, {})
    finally:
        engine.dispose()


# ---------------------------------------------------------------- theme

def keyframe_row(ctx, chain: int) -> None:
    with ctx.engine.begin() as conn:
        tr.create(conn, "keyframe", {"chain_index": chain, "backend": "procedural",
                                     "theme": "t", "prompt": "p", "seed": chain,
                                     "denoise": 0.3, "source": "img2img", "width": 8,
                                     "height": 8})


def test_theme_next_moves_the_rotation_on_by_one(ctx):
    store(ctx, theme_index=4)
    send(ctx, "theme", {"name": "next"})
    send(ctx, "theme")                          # no name: next too
    controls.tick(ctx)
    assert runtime(ctx).theme_index == 6        # one after the other: each one further
    send(ctx, "theme", {"name": "next"})
    controls.tick(ctx)
    assert runtime(ctx).theme_index == 7


@pytest.mark.parametrize("made, rotation, name, index", [
    (0, 20, "ethereal", 0), (0, 20, "signal", 2), (0, 20, "cathedral", 1),
    # no keyframe yet, a theme per keyframe: the first one (k = 0) is the theme asked for
    (0, 1, "signal", 2),
    # k_next = 5, rotation 2: the planner picks themes[(5 // 2 + i) % 3] = themes[(2 + i) % 3]
    (5, 2, "ethereal", 1), (5, 2, "signal", 0), (5, 2, "cathedral", 2),
    # k_next = 7, rotation 3: (7 // 3 + i) % 3 = (2 + i) % 3
    (7, 3, "cathedral", 2),
])
def test_theme_by_name_makes_the_next_keyframe_that_theme(ctx, made, rotation, name, index):
    for k in range(made):
        keyframe_row(ctx, k)
    store(ctx, knobs=json.dumps({"prompts.rotation_interval": rotation}))
    ctx.set_knobs({"prompts.rotation_interval": rotation})
    cid = send(ctx, "theme", {"name": name})
    controls.tick(ctx)
    assert control(ctx, cid).state == "applied"
    got = runtime(ctx).theme_index
    assert got == index
    names = [t.name for t in ctx.cfg.prompts.themes]
    assert names[(made // rotation + got) % len(names)] == name


# ---------------------------------------------------------------- inject

def test_inject_asks_the_planner_and_changes_no_runtime_column(ctx):
    before = runtime(ctx)
    cid = send(ctx, "inject")
    controls.tick(ctx)
    assert control(ctx, cid).state == "applied"
    assert ctx.facts == {"inject_requested": True}
    after = runtime(ctx)
    assert (after.paused, after.theme_index, after.knobs, after.updated_at) == \
        (before.paused, before.theme_index, before.knobs, before.updated_at)


@pytest.mark.parametrize("toml, error", [
    ("[cache]\nenabled = false\n", "the aesthetic memory is off (cache.enabled = false): "
                                  "nothing to inject"),
    ("[cache]\ninjections = false\n", "injections are off (cache.injections = false)"),
])
def test_inject_is_rejected_naming_the_key_that_forbids_it(db_path, toml, error):
    for ctx in worker_context(db_path, toml):
        cid = send(ctx, "inject")
        controls.tick(ctx)
        assert (control(ctx, cid).state, control(ctx, cid).error) == ("rejected", error)
        assert "inject_requested" not in ctx.facts


# ---------------------------------------------------------------- free

class Holder:
    """A lazily built model holder (the codec's, the embedder's): counts its releases."""

    def __init__(self) -> None:
        self.released = 0

    def release(self) -> None:
        self.released += 1


def comfyui(urls):
    from dreamd.backends.comfyui import ComfyUIBackend
    return ComfyUIBackend(urls, checkpoint="random-sd15.safetensors", tries=1,
                          connect_timeout=2.0, read_timeout=5.0)


def test_free_releases_the_local_models_and_every_servers_memory(ctx):
    ctx.codecs, ctx.embedders = Holder(), Holder()
    with ComfyUIDouble(checkpoints=["random-sd15.safetensors"]) as a, \
            ComfyUIDouble(checkpoints=["random-sd15.safetensors"]) as b:
        backend = comfyui([a.url, b.url])
        try:
            cid = send(ctx, "free")
            assert controls.tick(ctx, backend=backend) == 1
        finally:
            backend.close()
        assert (a.freed, b.freed) == (1, 1)
    assert control(ctx, cid).state == "applied"
    assert (ctx.codecs.released, ctx.embedders.released) == (1, 1)


def test_free_is_applied_when_one_server_freed_and_rejected_when_none_did(ctx, caplog):
    with ComfyUIDouble(checkpoints=["random-sd15.safetensors"]) as a, \
            ComfyUIDouble(checkpoints=["random-sd15.safetensors"]) as b:
        backend = comfyui([a.url, b.url])
        try:
            b.fail_next(1, status=500, path="/free")
            one = send(ctx, "free")
            with caplog.at_level("WARNING", logger="dreamd.controls"):
                controls.tick(ctx, backend=backend)
            assert control(ctx, one).state == "applied" and a.freed == 1
            assert f"free: ComfyUI at {b.url} did not: POST {b.url}/free: HTTP 500: 500 " \
                   f"Internal Server Error: injected" in [r.getMessage() for r in caplog.records]
            a.fail_next(1, status=500, path="/free")
            b.fail_next(1, status=500, path="/free")
            none = send(ctx, "free")
            controls.tick(ctx, backend=backend)
        finally:
            backend.close()
    c = control(ctx, none)
    assert c.state == "rejected"
    why = "HTTP 500: 500 Internal Server Error: injected"
    assert c.error == (f"no ComfyUI server freed its memory: {a.url}: POST {a.url}/free: {why}; "
                       f"{b.url}: POST {b.url}/free: {why}")


def test_free_with_a_backend_that_holds_no_server_memory(ctx):
    from dreamd.backends.procedural import ProceduralBackend
    ctx.codecs = Holder()
    cid = send(ctx, "free")
    controls.tick(ctx, backend=ProceduralBackend())
    assert control(ctx, cid).state == "applied" and ctx.codecs.released == 1
    assert controls.free(None) == {}        # no backend, no context: nothing to free


def test_an_unknown_command_that_reached_the_ledger_is_rejected(ctx):
    with ctx.engine.begin() as conn:
        cid = tr.create(conn, "control", {"command": "dance", "args": "{}"})
    controls.tick(ctx)
    assert (control(ctx, cid).state, control(ctx, cid).error) == \
        ("rejected", "unknown control 'dance'")
