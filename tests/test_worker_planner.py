"""The planner in-process on a real ledger and real image files (issue 16): the README's
claims about it, exactly. It stays `display.buffer_target_seconds` ahead with one
keyframe in flight; themes rotate every `prompts.rotation_interval` keyframes from the
`dreamd theme` offset; the first link starts from a seed image, then each keyframe from
the last; `prompts.time_of_day` adds the hour's word; the aesthetic memory's injections
become the keyframe's input. Also the worker context the workers share (knobs, leases,
drain, timings)."""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from sqlalchemy import text

from dreamd import seeding
from dreamd.ledger import queries, read_model
from dreamd.ledger import transitions as tr
from dreamd.ledger.models import utcnow
from dreamd.workers import planner
from dreamd.workers.context import drain, log_timing, timed
from tests.conftest import wait_for

THEMES = """
[[prompts.themes]]
name = "ash"
positive = "grey ash"
negative = "colour"
[[prompts.themes]]
name = "bloom"
positive = "red bloom"
negative = "grey"
[[prompts.themes]]
name = "cinder"
positive = "gold cinder"
negative = "blue"
"""
PLAIN = "[cache]\nenabled = false\n"      # no injections: the input is the last keyframe


@pytest.fixture(autouse=True)
def fresh_seed_verdicts():
    seeding.forget_checks()
    yield
    seeding.forget_checks()


@pytest.fixture
def make_ctx(contexts):
    return lambda config_text=PLAIN: contexts(config_text)


def sql(ctx, q: str, **params):
    with ctx.reader.connect() as conn:
        return conn.execute(text(q), params).all()


def write(ctx, q: str, **params) -> None:
    with ctx.engine.begin() as conn:
        conn.execute(text(q), params)


def png(path: Path, color=(40, 80, 120), size=(16, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def keyframe(ctx, chain: int, *, state="completed", image=True) -> int:
    """A keyframe row of chain index `chain`; completed ones have their image on disk."""
    rel = f"keyframes/k{chain:06d}.png"
    if image:
        png(ctx.cfg.data_dir / rel, color=(chain * 20 % 255, 90, 160))
    with ctx.engine.begin() as conn:
        kid = tr.create(conn, "keyframe", {
            "chain_index": chain, "backend": "procedural", "theme": "t", "prompt": "p",
            "seed": chain, "denoise": 0.3, "source": "img2img", "width": 16, "height": 8})
        conn.execute(text("UPDATE keyframes SET state = :s, path = :p WHERE id = :i"),
                     {"s": state, "p": rel if state == "completed" else None, "i": kid})
    return kid


def last_row(ctx):
    with ctx.reader.connect() as conn:
        return conn.execute(text("SELECT * FROM keyframes WHERE state = 'completed' "
                                 "ORDER BY chain_index DESC LIMIT 1")).first()


def ready_frames(ctx, chain: int, ts) -> None:
    with ctx.engine.begin() as conn:
        for t in ts:
            tr.create(conn, "frame", {"chain_index": chain, "t": t, "kind": "inbetween",
                                      "path": f"frames/{chain}-{t}.png"})


def batch(ctx, chain: int, n_frames: int, state: str) -> int:
    a, b = keyframe(ctx, chain, image=False), keyframe(ctx, chain + 1, image=False)
    with ctx.engine.begin() as conn:
        bid = tr.create(conn, "interpolation", {"chain_index": chain, "from_keyframe_id": a,
                                                "to_keyframe_id": b, "n_frames": n_frames})
        conn.execute(text("UPDATE interpolations SET state = :s WHERE id = :i"),
                     {"s": state, "i": bid})
    # only the batch matters here: its keyframes leave the chain
    write(ctx, "UPDATE keyframes SET state = 'cancelled' WHERE id IN (:a, :b)", a=a, b=b)
    return bid


def playhead(ctx, chain: int | None, t: float | None) -> None:
    write(ctx, "UPDATE runtime_state SET playhead_chain_index = :c, playhead_t = :t "
               "WHERE id = 1", c=chain, t=t)


def planned(ctx) -> list:
    return sql(ctx, "SELECT * FROM keyframes WHERE state = 'available' ORDER BY id")


# ---------------------------------------------------------------- seeds and words

def test_keyframe_seeds_are_derived_from_the_base_seed_and_the_index():
    """README: keyframe k uses a seed derived from generation.seed and k: the same
    config makes the same dream, and no two links share a seed."""
    m = 2**31 - 1
    assert planner.keyframe_seed(0, 0) == 1
    assert planner.keyframe_seed(0, 1) == 7_920
    assert planner.keyframe_seed(1, 0) == 1_000_004
    assert planner.keyframe_seed(12_345, 678) == (12_345 * 1_000_003 + 678 * 7_919 + 1) % m
    assert planner.keyframe_seed(12_345, 678) == 1_612_987_883
    assert planner.keyframe_seed(2**31, 5) == (2**31 * 1_000_003 + 5 * 7_919 + 1) % m
    seeds = [planner.keyframe_seed(42, k) for k in range(2000)]
    assert len(set(seeds)) == 2000 and all(0 <= s < m for s in seeds)


def test_time_of_day_words_change_at_5_8_17_and_20():
    words = ["at dawn", "in daylight", "at dusk", "at night"]
    got = {h: planner.with_time_of_day("sea", words, h) for h in range(24)}
    expect = {h: "sea, " + ("at dawn" if 5 <= h < 8 else "in daylight" if 8 <= h < 17
                            else "at dusk" if 17 <= h < 20 else "at night") for h in range(24)}
    assert got == expect
    assert [got[h] for h in (4, 5, 7, 8, 16, 17, 19, 20)] == [
        "sea, at night", "sea, at dawn", "sea, at dawn", "sea, in daylight",
        "sea, in daylight", "sea, at dusk", "sea, at dusk", "sea, at night"]
    # an empty word adds nothing (no dangling comma)
    assert planner.with_time_of_day("sea", ["", "x", "y", "z"], 6) == "sea"
    # without an hour, the local hour now
    now = datetime.now().hour, planner.with_time_of_day("sea", words), datetime.now().hour
    assert now[1] in (expect[now[0]], expect[now[2]])


# ---------------------------------------------------------------- how far ahead

def test_frames_ahead_counts_ready_frames_after_the_playhead(make_ctx):
    ctx = make_ctx()
    ready_frames(ctx, 0, (0.0, 0.25, 0.5))
    ready_frames(ctx, 1, (0.0,))
    write(ctx, "UPDATE frames SET state = 'shown' WHERE chain_index = 0 AND t = 0.0")
    with ctx.reader.connect() as conn:
        assert read_model.frames_ahead_of_playhead(queries.dbapi(conn)) == 3          # no playhead yet: every ready frame
    playhead(ctx, 0, 0.25)
    with ctx.reader.connect() as conn:
        assert read_model.frames_ahead_of_playhead(queries.dbapi(conn)) == 2          # (0, 0.5) and (1, 0)
    playhead(ctx, 1, 0.0)
    with ctx.reader.connect() as conn:
        assert read_model.frames_ahead_of_playhead(queries.dbapi(conn)) == 0
    write(ctx, "DELETE FROM runtime_state")
    with ctx.reader.connect() as conn:
        assert read_model.frames_ahead_of_playhead(queries.dbapi(conn)) == 3          # no runtime row: no playhead


def test_frames_coming_counts_what_unfinished_batches_will_make(make_ctx):
    ctx = make_ctx()
    with ctx.reader.connect() as conn:
        assert read_model.frames_coming(queries.dbapi(conn)) == 0
    batch(ctx, 0, 4, "available")      # 4 in-betweens + the segment's keyframe frame
    batch(ctx, 2, 3, "executing")
    batch(ctx, 4, 5, "retryable")
    for state in ("completed", "discarded", "cancelled"):
        batch(ctx, 6, 9, state)
    with ctx.reader.connect() as conn:
        assert read_model.frames_coming(queries.dbapi(conn)) == 5 + 4 + 6


def test_the_planner_keeps_buffer_target_seconds_ahead(make_ctx):
    """README: the planner keeps the chain ahead of the playhead by
    display.buffer_target_seconds (live knobs: fps x seconds frames)."""
    ctx = make_ctx()
    woken = []
    ctx.wake = woken.append
    ctx.set_knobs({"display.fps": 2, "display.buffer_target_seconds": 4.0})   # 8 frames
    keyframe(ctx, 0)
    ready_frames(ctx, 0, (0.0, 0.2, 0.4))
    batch(ctx, 1, 4, "executing")                        # 5 coming: 3 + 5 = 8 = the target
    assert planner.tick(ctx) is None and planned(ctx) == []
    write(ctx, "UPDATE frames SET state = 'shown' WHERE t = 0.0")    # 2 + 5 = 7 < 8
    kid = planner.tick(ctx)
    assert kid is not None and [r.id for r in planned(ctx)] == [kid]
    assert planned(ctx)[0].chain_index == 1 and woken == ["keyframe"]
    # a pending keyframe: never a second one in flight, whatever the buffer
    write(ctx, "DELETE FROM frames")
    for state in ("available", "executing", "retryable"):
        write(ctx, "UPDATE keyframes SET state = :s WHERE id = :i", s=state, i=kid)
        assert planner.tick(ctx) is None
    assert len(sql(ctx, "SELECT id FROM keyframes WHERE chain_index = 1 "
                        "AND state != 'cancelled'")) == 1
    write(ctx, "UPDATE keyframes SET state = 'discarded' WHERE id = :i", i=kid)
    assert planner.tick(ctx) is not None                 # replanned once it is gone


def test_the_buffer_target_counts_frames_coming_as_well_as_ready(make_ctx):
    ctx = make_ctx()
    ctx.set_knobs({"display.fps": 1, "display.buffer_target_seconds": 6.0})
    keyframe(ctx, 0)
    batch(ctx, 1, 5, "available")                        # 6 coming, nothing ready
    assert planner.tick(ctx) is None
    ready_frames(ctx, 0, (0.0,))
    batch_id = sql(ctx, "SELECT id FROM interpolations")[0].id
    write(ctx, "UPDATE interpolations SET n_frames = 3 WHERE id = :i", i=batch_id)
    assert planner.tick(ctx) is not None                 # 1 ready + 4 coming < 6


def test_the_first_link_is_planned_whatever_the_buffer(make_ctx):
    ctx = make_ctx()
    ctx.set_knobs({"display.fps": 1, "display.buffer_target_seconds": 1.0})
    ready_frames(ctx, 0, (0.0, 0.5))                      # 2 ahead >= 1, but no keyframe
    kid = planner.tick(ctx)
    assert kid is not None and planned(ctx)[0].chain_index == 0


def test_the_newest_completed_keyframe_is_the_next_input(make_ctx):
    ctx = make_ctx()
    for chain in (2, 0, 1):                               # ids not in chain order
        keyframe(ctx, chain)
    keyframe(ctx, 7, state="discarded", image=False)      # not a link of the chain
    keyframe(ctx, 8, state="cancelled", image=False)
    kid = planner.tick(ctx)
    row = sql(ctx, "SELECT * FROM keyframes WHERE id = :i", i=kid)[0]
    parent = sql(ctx, "SELECT id, path FROM keyframes WHERE chain_index = 2")[0]
    assert (row.chain_index, row.source, row.parent_id, row.input_path) == (
        3, "img2img", parent.id, parent.path)


@pytest.mark.parametrize("fact", ["paused", "storage_low", "backend_unusable", "stopping"])
def test_nothing_is_planned_while_paused_low_on_disk_stopping_or_without_a_backend(
        make_ctx, fact):
    ctx = make_ctx()
    if fact == "stopping":
        ctx.stopping.set()
    else:
        ctx.facts[fact] = "yes"
    assert planner.tick(ctx) is None and planned(ctx) == []
    ctx.stopping.clear()
    ctx.facts.clear()
    assert planner.tick(ctx) is not None


# ---------------------------------------------------------------- what a keyframe is

def test_a_planned_keyframe_carries_the_config_and_live_knobs(make_ctx, caplog):
    ctx = make_ctx(PLAIN + THEMES + "[generation]\nseed = 77\nresolution = [128, 64]\n"
                   "max_attempts = 5\ndenoise = 0.4\n")
    ctx.set_knobs({"generation.denoise": 0.55})
    keyframe(ctx, 0)
    caplog.set_level(logging.DEBUG, logger="dreamd.planner")
    kid = planner.tick(ctx)
    assert [r.getMessage() for r in caplog.records if r.name == "dreamd.planner"] == [
        f"planned keyframe {kid} (chain 1, img2img, theme ash)"]
    row = sql(ctx, "SELECT * FROM keyframes WHERE id = :i", i=kid)[0]
    assert (row.chain_index, row.backend, row.theme, row.prompt, row.negative_prompt) == (
        1, "procedural", "ash", "grey ash", "colour")
    assert (row.seed, row.denoise, row.width, row.height, row.max_attempts) == (
        planner.keyframe_seed(77, 1), 0.55, 128, 64, 5)
    assert (row.state, row.attempt) == ("available", 0)
    entry = sql(ctx, "SELECT * FROM transitions WHERE entity = 'keyframe' "
                                       "AND entity_id = :i", i=kid)
    assert len(entry) == 1
    assert (entry[0].from_state, entry[0].to_state, entry[0].worker, entry[0].event) == (
        None, "available", "planner", "created")
    assert json.loads(entry[0].detail) == {"theme": "ash", "source": "img2img"}


def test_themes_rotate_every_rotation_interval_keyframes_from_the_offset(make_ctx):
    """README: keyframe k uses theme (k // rotation_interval + offset) % len(themes)."""
    ctx = make_ctx(PLAIN + THEMES + "[prompts]\nrotation_interval = 5\n")
    ctx.set_knobs({"prompts.rotation_interval": 2})       # the live knob wins
    names = ["ash", "bloom", "cinder"]
    got = []
    for k in range(8):
        kid = planner.tick(ctx)
        got.append(sql(ctx, "SELECT theme, prompt, negative_prompt FROM keyframes "
                            "WHERE id = :i", i=kid)[0])
        write(ctx, "UPDATE keyframes SET state = 'completed', path = :p WHERE id = :i",
              p=str(png(ctx.cfg.data_dir / f"keyframes/n{k}.png")), i=kid)
    assert [g.theme for g in got] == [names[(k // 2) % 3] for k in range(8)]
    assert [g.prompt for g in got[:2]] == ["grey ash"] * 2
    assert (got[2].prompt, got[2].negative_prompt) == ("red bloom", "grey")
    # `dreamd theme` moves the offset (runtime_state.theme_index)
    write(ctx, "UPDATE runtime_state SET theme_index = 2 WHERE id = 1")
    kid = planner.tick(ctx)                                # k = 8: (4 + 2) % 3 = 0
    assert sql(ctx, "SELECT theme FROM keyframes WHERE id = :i", i=kid)[0].theme == "ash"
    write(ctx, "UPDATE keyframes SET state = 'completed', path = :p WHERE id = :i",
          p=str(png(ctx.cfg.data_dir / "keyframes/n8.png")), i=kid)
    write(ctx, "UPDATE runtime_state SET theme_index = 4 WHERE id = 1")
    kid = planner.tick(ctx)                                # k = 9: (4 + 4) % 3 = 2
    assert sql(ctx, "SELECT theme FROM keyframes WHERE id = :i", i=kid)[0].theme == "cinder"
    # without a runtime row the offset is 0
    write(ctx, "UPDATE keyframes SET state = 'completed', path = :p WHERE id = :i",
          p=str(png(ctx.cfg.data_dir / "keyframes/n9.png")), i=kid)
    write(ctx, "DELETE FROM runtime_state")
    kid = planner.tick(ctx)                                # k = 10: 5 % 3 = 2
    assert sql(ctx, "SELECT theme FROM keyframes WHERE id = :i", i=kid)[0].theme == "cinder"


def test_plan_takes_the_theme_offset_it_is_given(make_ctx):
    ctx = make_ctx(PLAIN + THEMES + "[prompts]\nrotation_interval = 1\n")
    kid = planner.plan(ctx, None, theme_offset=1)
    assert sql(ctx, "SELECT theme FROM keyframes WHERE id = :i", i=kid)[0].theme == "bloom"
    write(ctx, "UPDATE keyframes SET state = 'cancelled'")
    kid = planner.plan(ctx, None)                         # the default offset is 0
    assert sql(ctx, "SELECT theme FROM keyframes WHERE id = :i", i=kid)[0].theme == "ash"


def test_the_first_link_starts_from_the_seed_its_seed_picks(make_ctx, tmp_path):
    seeds = tmp_path / "seeds"
    files = [png(seeds / f"s{i}.png", color=(i * 60, 0, 0)) for i in range(3)]
    base = 6                                              # its seed picks s1.png
    ctx = make_ctx(PLAIN + f'[generation]\nseeds_dir = "{seeds}"\nseed = {base}\n')
    kid = planner.tick(ctx)
    row = sql(ctx, "SELECT * FROM keyframes WHERE id = :i", i=kid)[0]
    seed = planner.keyframe_seed(base, 0)
    assert (row.source, row.parent_id, row.seed) == ("seed", None, seed)
    assert seed % 3 == 1
    assert row.input_path == str(files[1])                # outside the data dir: absolute
    assert json.loads(sql(ctx, "SELECT detail FROM transitions WHERE entity_id = :i AND "
                               "entity = 'keyframe'", i=kid)[0].detail) == {
        "theme": row.theme, "source": "seed"}


def test_a_seed_inside_the_data_dir_is_stored_relative(make_ctx):
    ctx = make_ctx()
    png(ctx.cfg.data_dir / "seeds" / "only.png")
    ctx.cfg.generation.seeds_dir = str(ctx.cfg.data_dir / "seeds")
    kid = planner.plan(ctx, None)
    assert sql(ctx, "SELECT input_path FROM keyframes WHERE id = :i",
               i=kid)[0].input_path == "seeds/only.png"


def test_no_seed_images_means_a_generated_start_without_a_warning(make_ctx, tmp_path, caplog):
    ctx = make_ctx(PLAIN + f'[generation]\nseeds_dir = "{tmp_path / "none"}"\n')
    caplog.set_level(logging.WARNING, logger="dreamd")
    kid = planner.plan(ctx, None)
    row = sql(ctx, "SELECT source, input_path FROM keyframes WHERE id = :i", i=kid)[0]
    assert (row.source, row.input_path) == ("seed", None)
    assert [r for r in caplog.records if r.name == "dreamd.planner"] == []


def test_only_broken_seeds_are_said_and_the_start_is_generated(make_ctx, tmp_path, caplog):
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "a.png").write_bytes(b"not a png")
    (seeds / "b.jpg").write_bytes(b"nor a jpeg")
    ctx = make_ctx(PLAIN + f'[generation]\nseeds_dir = "{seeds}"\n')
    caplog.set_level(logging.WARNING, logger="dreamd")
    kid = planner.plan(ctx, None)
    row = sql(ctx, "SELECT source, input_path FROM keyframes WHERE id = :i", i=kid)[0]
    assert (row.source, row.input_path) == ("seed", None)
    said = [r.getMessage() for r in caplog.records if r.name == "dreamd.planner"]
    assert said == [f"keyframe {0}: none of the 2 seed images is usable; starting from a "
                    "generated image"]


def test_a_missing_head_image_starts_a_new_chain_at_the_next_index(make_ctx, tmp_path,
                                                                    caplog):
    seeds = tmp_path / "seeds"
    good = png(seeds / "s.png")
    ctx = make_ctx(PLAIN + f'[generation]\nseeds_dir = "{seeds}"\n')
    keyframe(ctx, 0)
    keyframe(ctx, 1)
    (ctx.cfg.data_dir / "keyframes/k000001.png").unlink()
    caplog.set_level(logging.WARNING, logger="dreamd")
    kid = planner.tick(ctx)
    row = sql(ctx, "SELECT * FROM keyframes WHERE id = :i", i=kid)[0]
    assert (row.chain_index, row.source, row.parent_id, row.input_path) == (
        2, "seed", None, str(good))
    said = [r.getMessage() for r in caplog.records if r.name == "dreamd.planner"]
    assert said == ["keyframe 2: the image of keyframe 1 (keyframes/k000001.png) is "
                    "missing; starting anew from a seed"]


def test_a_head_without_a_path_is_a_missing_image(make_ctx):
    ctx = make_ctx()
    keyframe(ctx, 0)
    write(ctx, "UPDATE keyframes SET path = NULL")
    assert planner.head_image(ctx, last_row(ctx)) is False
    write(ctx, "UPDATE keyframes SET path = 'keyframes/k000000.png'")
    assert planner.head_image(ctx, last_row(ctx)) is True
    write(ctx, "UPDATE keyframes SET path = :p", p=str(ctx.cfg.data_dir / "keyframes/k000000.png"))
    assert planner.head_image(ctx, last_row(ctx)) is True
    write(ctx, "UPDATE keyframes SET path = 'keyframes/gone.png'")
    assert planner.head_image(ctx, last_row(ctx)) is False


def test_time_of_day_adds_the_hours_word_to_the_prompt(make_ctx):
    words = '["w-dawn", "w-day", "w-dusk", "w-night"]'
    ctx = make_ctx(PLAIN + THEMES + f"[prompts]\ntime_of_day = true\ntime_of_day_words = {words}\n")
    before = datetime.now().hour
    kid = planner.plan(ctx, None)
    after = datetime.now().hour
    prompt = sql(ctx, "SELECT prompt FROM keyframes WHERE id = :i", i=kid)[0].prompt
    ws = json.loads(words)
    assert prompt in (planner.with_time_of_day("grey ash", ws, before),
                      planner.with_time_of_day("grey ash", ws, after))
    assert prompt.startswith("grey ash, w-")
    ctx.cfg.prompts.time_of_day = False
    write(ctx, "UPDATE keyframes SET state = 'cancelled'")
    kid = planner.plan(ctx, None)
    assert sql(ctx, "SELECT prompt FROM keyframes WHERE id = :i", i=kid)[0].prompt == "grey ash"


# ---------------------------------------------------------------- the aesthetic memory

def memory_ctx(make_ctx, tmp_path):
    seeds = tmp_path / "seeds"
    png(seeds / "s.png", color=(250, 250, 250))
    return make_ctx(f'[generation]\nseeds_dir = "{seeds}"\n'
                    "[cache]\nembedder = \"descriptor\"\n"), seeds / "s.png"


def test_an_injection_becomes_the_keyframes_input_and_is_recorded(make_ctx, tmp_path):
    """README: the next keyframe's input becomes a blend with a seed image or a cached
    frame; an injections row, the keyframe's source `injection`."""
    ctx, seed = memory_ctx(make_ctx, tmp_path)
    keyframe(ctx, 0)
    ctx.facts["inject_requested"] = True                  # `dreamd inject`
    kid = planner.tick(ctx)
    row = sql(ctx, "SELECT * FROM keyframes WHERE id = :i", i=kid)[0]
    inj = sql(ctx, "SELECT * FROM injections")
    assert len(inj) == 1 and inj[0].keyframe_id == kid
    assert (inj[0].kind, inj[0].reason, inj[0].seed_path) == ("seed", "requested", str(seed))
    assert row.source == "injection" and row.parent_id == sql(
        ctx, "SELECT id FROM keyframes WHERE chain_index = 0")[0].id
    assert row.input_path.startswith("injections/") and not Path(row.input_path).is_absolute()
    assert (ctx.cfg.data_dir / row.input_path).is_file()
    detail = json.loads(sql(ctx, "SELECT detail FROM transitions WHERE entity = 'keyframe' "
                                 "AND entity_id = :i", i=kid)[0].detail)
    assert detail == {"theme": row.theme, "source": "injection", "injection": "seed",
                      "reason": "requested", "weight": ctx.cfg.cache.seed_weight,
                      "blend": "pixels", "similarity": None, "collapse_level": None}
    assert "inject_requested" not in ctx.facts


def test_a_failing_injection_decision_never_stops_the_chain(make_ctx, tmp_path, caplog):
    ctx, _ = memory_ctx(make_ctx, tmp_path)
    keyframe(ctx, 0)
    (ctx.cfg.data_dir / "keyframes/k000000.png").write_bytes(b"not an image")
    ctx.facts["inject_requested"] = True
    caplog.set_level(logging.ERROR, logger="dreamd")
    kid = planner.tick(ctx)
    row = sql(ctx, "SELECT source, input_path FROM keyframes WHERE id = :i", i=kid)[0]
    assert (row.source, row.input_path) == ("img2img", "keyframes/k000000.png")
    assert sql(ctx, "SELECT * FROM injections") == []
    said = [r for r in caplog.records if r.name == "dreamd.planner"]
    assert [r.getMessage() for r in said] == [
        "keyframe 1: the injection decision failed; plain img2img"]
    assert said[0].exc_info and said[0].exc_info[0] is not None


def test_a_keyframe_planned_meanwhile_wins_and_the_blend_is_dropped(make_ctx, tmp_path):
    """Re-checked under the write lock: one keyframe in flight, ever; the blended input
    made for the plan that lost is deleted."""
    ctx, _ = memory_ctx(make_ctx, tmp_path)
    keyframe(ctx, 0)
    woken = []
    ctx.wake = woken.append
    other = keyframe(ctx, 1, state="available", image=False)   # planned meanwhile
    ctx.facts["inject_requested"] = True
    assert planner.plan(ctx, last_row(ctx)) is None
    assert [r.id for r in planned(ctx)] == [other] and woken == []
    assert sql(ctx, "SELECT * FROM injections") == []
    blends = ctx.cfg.data_dir / "injections"
    assert not blends.exists() or list(blends.iterdir()) == []


# ---------------------------------------------------------------- the worker context

LIVE = ["generation.denoise", "generation.interpolation_frames", "generation.steps",
        "generation.cfg", "display.fps", "display.buffer_target_seconds",
        "display.min_buffer_seconds", "display.max_output_frames",
        "prompts.rotation_interval", "governor.enabled"]


def test_live_knobs_override_the_config_and_only_the_live_ones(make_ctx):
    """README: these knobs `dreamd set` may change while the daemon runs."""
    ctx = make_ctx(PLAIN + "[display]\nfps = 12\n")
    assert ctx.knob("display.fps") == 12 and ctx.knob("generation.seed") == 0
    for i, name in enumerate(LIVE):
        ctx.set_knobs({name: 1000 + i})
        assert ctx.knob(name) == 1000 + i, name
    ctx.set_knobs({"generation.seed": 9, "display.fps": 3})
    assert ctx.knob("generation.seed") == 0 and ctx.knob("display.fps") == 3
    ctx.set_knobs({})
    assert ctx.knob("display.fps") == 12


def test_pause_stop_and_the_disk_floor_gate_claims_and_generation(make_ctx):
    ctx = make_ctx()
    assert (ctx.paused(), ctx.may_claim(), ctx.may_generate()) == (False, True, True)
    ctx.facts["storage_low"] = "low disk space"
    assert (ctx.may_claim(), ctx.may_generate()) == (True, False)
    ctx.facts.clear()
    ctx.facts["paused"] = "user"
    assert (ctx.paused(), ctx.may_claim(), ctx.may_generate()) == (True, False, False)
    ctx.facts.clear()
    ctx.stopping.set()
    assert (ctx.paused(), ctx.may_claim(), ctx.may_generate()) == (False, False, False)
    assert ctx.lease_owner("keyframe") == "test:keyframe"
    assert ctx.runtime().id == 1


def test_drain_works_each_due_row_once_under_its_lease_and_in_hand(make_ctx):
    ctx = make_ctx(PLAIN + "[generation]\nlease_seconds = 120\n")
    ids = [keyframe(ctx, k, state="available", image=False) for k in range(3)]
    later = keyframe(ctx, 3, state="available", image=False)
    write(ctx, "UPDATE keyframes SET scheduled_at = :t WHERE id = :i",
          t=utcnow() + timedelta(hours=1), i=later)           # not due yet
    seen = []

    def work(row, owner):
        held = sql(ctx, "SELECT state, lease_owner, lease_expires_at FROM keyframes "
                        "WHERE id = :i", i=row.id)[0]
        seen.append((row.id, owner, held.state, held.lease_owner, set(ctx.in_hand)))
        left = (datetime.fromisoformat(held.lease_expires_at) - utcnow()).total_seconds()
        assert 100 < left <= 120
        with ctx.engine.begin() as conn:
            tr.complete(conn, "keyframe", row.id, owner)
        return 2

    assert drain(ctx, "keyframe", work) == 6
    assert [s[0] for s in seen] == ids
    assert all(s[1:4] == ("test:keyframe", "executing", "test:keyframe") for s in seen)
    assert [s[4] for s in seen] == [{("keyframe", i)} for i in ids]
    assert ctx.in_hand == set()
    assert drain(ctx, "keyframe", work) == 0                   # nothing due: no claim


def test_drain_stops_when_blocked_paused_or_low_on_disk(make_ctx):
    ctx = make_ctx()
    for k in range(2):
        keyframe(ctx, k, state="available", image=False)
    done = []

    def work(row, owner):
        done.append(row.id)
        with ctx.engine.begin() as conn:
            tr.complete(conn, "keyframe", row.id, owner)
        return 1

    assert drain(ctx, "keyframe", work, blocked=lambda: True) == 0
    ctx.facts["storage_low"] = "low"
    assert drain(ctx, "keyframe", work) == 0
    ctx.facts.clear()
    ctx.facts["paused"] = "user"
    assert drain(ctx, "keyframe", work) == 0
    ctx.facts.clear()
    assert done == [] and len(planned(ctx)) == 2
    # blocked after the first: one row worked
    assert drain(ctx, "keyframe", work, blocked=lambda: bool(done)) == 1
    assert len(done) == 1


def test_drain_of_embeddings_goes_on_below_the_disk_floor(make_ctx):
    """Below the floor only what writes images stops (keyframes, in-betweens)."""
    ctx = make_ctx()
    kid = keyframe(ctx, 0)
    with ctx.engine.begin() as conn:
        fid = tr.create(conn, "frame", {"chain_index": 0, "t": 0.0, "kind": "keyframe",
                                        "keyframe_id": kid, "path": "keyframes/k000000.png"})
        tr.create(conn, "embedding", {"frame_id": fid, "model": "m"})
    ctx.facts["storage_low"] = "low"
    got = []

    def work(row, owner):
        got.append((row.frame_id, owner))
        with ctx.engine.begin() as conn:
            tr.complete(conn, "embedding", row.id, owner)
        return 1

    assert drain(ctx, "embedding", work) == 1 and got == [(fid, "test:embedding")]
    batch(ctx, 1, 4, "available")
    assert drain(ctx, "interpolation", lambda row, owner: 1) == 0


def test_a_row_leaves_the_hand_even_when_its_work_fails(make_ctx):
    ctx = make_ctx()
    keyframe(ctx, 0, state="available", image=False)

    def work(row, owner):
        raise RuntimeError("backend exploded")

    with pytest.raises(RuntimeError, match="backend exploded"):
        drain(ctx, "keyframe", work)
    assert ctx.in_hand == set()


def lease_expiry(ctx, kid: int) -> datetime:
    return datetime.fromisoformat(sql(ctx, "SELECT lease_expires_at FROM keyframes "
                                           "WHERE id = :i", i=kid)[0][0])


def test_a_lease_is_renewed_while_the_work_runs(make_ctx, monkeypatch):
    """Work outside a transaction keeps its row: renewed every lease_seconds / 3, so the
    lease never runs out meanwhile and the janitor never takes it away.

    Judged without racing real time (a loaded machine may run the renewal thread late):
    the renewal's own waits are recorded, the test waits for renewals to be written,
    and the janitor looks at set times, past the claim's own lease."""
    from dreamd.workers import context

    waits: list[float] = []

    class RecordedEvent(threading.Event):
        """The renewal loop's `done` event: each wait between renewals is recorded."""
        def wait(self, timeout=None):
            waits.append(timeout)
            return super().wait(timeout)

    monkeypatch.setattr(context, "threading",
                        SimpleNamespace(Event=RecordedEvent, Thread=threading.Thread))
    ctx = make_ctx()
    ctx.cfg.generation.lease_seconds = 1.5
    kid = keyframe(ctx, 0, state="available", image=False)
    with ctx.engine.begin() as conn:
        row = tr.claim(conn, "keyframe", "test:keyframe", lease_seconds=1.5)[0]
    assert row.id == kid
    expiries = [lease_expiry(ctx, kid)]
    with ctx.lease("keyframe", kid, "test:keyframe"):
        for _ in range(3):                       # again and again, not once
            wait_for(lambda: lease_expiry(ctx, kid) > expiries[-1], timeout=60,
                     what="the lease renewed")
            expiries.append(lease_expiry(ctx, kid))
            # the janitor, just after the lease before this renewal would have run out
            with ctx.engine.begin() as conn:
                taken = tr.rescue(conn, "keyframe",
                                  now=expiries[-2] + timedelta(milliseconds=1))
            assert taken == {"available": [], "discarded": []}
    held = sql(ctx, "SELECT state, lease_owner FROM keyframes")[0]
    assert (held.state, held.lease_owner) == ("executing", "test:keyframe")
    # renewed at a third of the lease: two renewals may come late before it runs out
    assert len(waits) >= 3 and set(waits) == {0.5}, waits
    # the same rescue, once the lease has run out, takes the row: it is not blind
    with ctx.engine.begin() as conn:
        taken = tr.rescue(conn, "keyframe", now=utcnow() + timedelta(hours=1))
    assert taken["available"] == [kid]


def test_a_lost_lease_is_said_and_no_longer_renewed(make_ctx, caplog):
    ctx = make_ctx()
    ctx.cfg.generation.lease_seconds = 0.3
    kid = keyframe(ctx, 0, state="available", image=False)
    with ctx.engine.begin() as conn:
        tr.claim(conn, "keyframe", "someone-else", lease_seconds=60)
    caplog.set_level(logging.WARNING, logger="dreamd")
    name = f"lease-keyframe-{kid}"
    others = {t for t in threading.enumerate() if t.name == name}
    with ctx.lease("keyframe", kid, "test:keyframe"):
        (renewal,) = {t for t in threading.enumerate() if t.name == name} - others
        wait_for(lambda: any("lease lost" in r.getMessage() for r in caplog.records),
                 timeout=60, what="the lost lease said")
        # the renewal ends by itself while the work still runs: never renewed (nor said)
        # again, whatever the time it is given
        wait_for(lambda: not renewal.is_alive(), timeout=60, what="the renewal to end")
    said = [r.getMessage() for r in caplog.records if r.name == "dreamd.workers"]
    assert said == [f"keyframe {kid}: lease lost while working"]
    assert sql(ctx, "SELECT lease_owner FROM keyframes")[0][0] == "someone-else"


def test_timed_adds_the_bodys_wall_time_in_ms():
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with timed(timings, "write"):
        pass
    outer = (time.perf_counter() - t0) * 1000
    assert 0 <= timings["write"] <= outer
    with timed(timings, "encode"):
        time.sleep(0.02)
    assert timings["encode"] >= 20
    before = timings["encode"]
    with pytest.raises(ValueError):
        with timed(timings, "encode"):
            time.sleep(0.01)
            raise ValueError("counted anyway")
    assert timings["encode"] >= before + 10 and set(timings) == {"write", "encode"}


def test_timing_lines_are_what_the_benches_read(caplog):
    log = logging.getLogger("dreamd.test_timing")
    caplog.set_level(logging.INFO, logger="dreamd")
    log_timing(log, "keyframe", 7, {"backend": 1.5})
    assert caplog.records == []
    caplog.set_level(logging.DEBUG, logger="dreamd")
    log_timing(log, "keyframe", 7, {"backend": 1.5, "write": 2.254}, server="a", n=3)
    assert [r.getMessage() for r in caplog.records] == [
        "timing keyframe id=7 backend_ms=1.50 write_ms=2.25 server=a n=3"]


def test_a_lease_renewal_that_fails_is_reported_and_retried(make_ctx, db_path, tmp_path,
                                                            caplog):
    """A renewal that fails (a read-only disk, a broken ledger) never kills the work: a
    known condition is reported for status.json, anything else logged, and the renewal
    goes on trying."""
    from dreamd.conditions import READ_ONLY
    from dreamd.ledger import database

    ctx = make_ctx()
    ctx.cfg.generation.lease_seconds = 0.3
    kid = keyframe(ctx, 0, state="available", image=False)
    with ctx.engine.begin() as conn:
        tr.claim(conn, "keyframe", "test:keyframe", lease_seconds=60)
    writer = ctx.engine
    caplog.set_level(logging.WARNING, logger="dreamd")
    read_only, broken = database.reader(db_path), database.writer(tmp_path / "empty.db")
    try:
        with ctx.lease("keyframe", kid, "test:keyframe"):
            ctx.engine = read_only
            wait_for(lambda: ctx.conditions.active(READ_ONLY), timeout=30,
                     what="the read-only ledger reported")
            ctx.engine = broken
            wait_for(lambda: any("renewal failed" in r.getMessage() for r in caplog.records),
                     timeout=30, what="the failed renewal logged")
            ctx.engine = writer
            before = sql(ctx, "SELECT lease_expires_at FROM keyframes")[0][0]
            wait_for(lambda: sql(ctx, "SELECT lease_expires_at FROM keyframes")[0][0] != before,
                     timeout=30, what="the lease renewed again")
    finally:
        ctx.engine = writer
        read_only.dispose()
        broken.dispose()
    said = [r.getMessage() for r in caplog.records]
    assert said[0].startswith(f"keyframe {kid}: read-only file system (")
    failed = [r for r in caplog.records if r.getMessage() == f"keyframe {kid}: lease renewal failed"]
    assert failed and failed[0].exc_info and failed[0].exc_info[0] is not None
    assert not any("lease lost" in m for m in said)


def test_a_row_taken_between_the_look_and_the_claim_ends_the_tick(make_ctx):
    """The due-check reads without the write lock, so the row it saw can be gone by the
    claim (cancelled by `dreamd theme`, say): the tick ends with what it did. Simulated
    with a trigger that lets no claim through."""
    ctx = make_ctx()
    keyframe(ctx, 0, state="available", image=False)
    write(ctx, "CREATE TRIGGER no_claim BEFORE UPDATE OF state ON keyframes "
               "WHEN NEW.state = 'executing' BEGIN SELECT RAISE(IGNORE); END")
    worked = []
    got = drain(ctx, "keyframe", lambda row, owner: worked.append(row) or 1)
    assert got == 0 and isinstance(got, int) and worked == [] and ctx.in_hand == set()


def test_an_inject_request_waits_while_a_keyframe_is_in_flight(make_ctx, tmp_path):
    """`dreamd inject` makes the *next* keyframe an injection: while one is in flight the
    planner decides nothing, so the request is not used up by a plan that cannot be."""
    ctx, _ = memory_ctx(make_ctx, tmp_path)
    keyframe(ctx, 0)
    pending = keyframe(ctx, 1, state="executing", image=False)
    ctx.facts["inject_requested"] = True
    assert planner.tick(ctx) is None
    assert ctx.facts.get("inject_requested") is True
    blends = ctx.cfg.data_dir / "injections"
    assert not blends.exists() or list(blends.iterdir()) == []
    write(ctx, "UPDATE keyframes SET state = 'completed', path = 'keyframes/k000000.png' "
               "WHERE id = :i", i=pending)
    kid = planner.tick(ctx)
    assert sql(ctx, "SELECT source FROM keyframes WHERE id = :i", i=kid)[0].source == "injection"
    assert "inject_requested" not in ctx.facts
