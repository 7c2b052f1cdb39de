"""The planner keeps the chain ahead of the playhead: when the frames ready or on
their way cover less than `buffer_target_seconds`, it creates the next keyframe
row and decides its input (the last keyframe, a seed for the first link, or an
injection the aesthetic memory decides: dreamd/memory/injection.py) and its theme.
It is the only creator of keyframe rows, and keeps one in flight.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime
from types import SimpleNamespace

from sqlalchemy import func, select

from dreamd import seeding
from dreamd.ledger import read_model, transitions
from dreamd.ledger.models import Keyframe
from dreamd.ledger.states import JobState as J
from dreamd.storage.paths import resolve, stored
from dreamd.memory import injection as memory_injection
from dreamd.quality import breaker
from dreamd.workers.context import WorkerContext

log = logging.getLogger("dreamd.planner")

KF = Keyframe.__table__
PENDING = (J.available, J.executing, J.retryable)


def keyframe_seed(base: int, chain_index: int) -> int:
    """A seed per link, derived from the base seed (reproducible, never the same twice)."""
    return (base * 1_000_003 + chain_index * 7_919 + 1) % (2**31 - 1)


def head_image(ctx: WorkerContext, last) -> bool:
    """Is the chain's newest keyframe image (the next img2img input) on disk?"""
    path = resolve(ctx.cfg.data_dir, last.path)
    return path is not None and path.exists()


def tick(ctx: WorkerContext) -> int | None:
    """Plan at most one keyframe; returns its id when one was created."""
    if not ctx.may_generate():
        return None
    if ctx.facts.get("backend_unusable"):
        # the backend cannot make keyframes now (stopped on a configuration error, or every
        # server down): a new row would only be discarded and planned again, forever
        return None
    fps = ctx.knob("display.fps")
    target = ctx.knob("display.buffer_target_seconds") * fps
    # the read model's questions on the planner's kept connection (a pooled SQLAlchemy
    # one cost more than the questions), in one read transaction as before
    with ctx.look("planner").reading(snapshot=True) as conn:
        if read_model.in_progress(conn) is not None:
            return None
        last = read_model.last_keyframe(conn)
        # counted up to the target only: whether it is reached is all that matters here
        ahead = read_model.frames_coming(conn)
        ahead += read_model.frames_ahead_of_playhead(conn,
                                                     at_most=max(0, math.ceil(target - ahead)))
        # one keyframe beyond the interpolated ones: the next pair needs it anyway
        if last is not None and ahead >= target:
            return None
        theme_offset = read_model.theme_index(conn)
    return plan(ctx, None if last is None else SimpleNamespace(**last),
                theme_offset=theme_offset)


def with_time_of_day(prompt: str, words: list[str], hour: int | None = None) -> str:
    """The prompt with the word for the local hour: dawn 5-8, day 8-17, dusk 17-20, night."""
    if hour is None:
        hour = datetime.now().hour
    word = words[0 if 5 <= hour < 8 else 1 if 8 <= hour < 17 else 2 if 17 <= hour < 20 else 3]
    return f"{prompt}, {word}" if word else prompt


def _injection(ctx: WorkerContext, last, k: int):
    """The memory's decision for keyframe k; a failure there never stops the chain."""
    try:
        return memory_injection.decide(ctx, last, k)
    except Exception:
        log.exception("keyframe %d: the injection decision failed; plain img2img", k)
        return None


def plan(ctx: WorkerContext, last, theme_offset: int = 0) -> int:
    cfg = ctx.cfg
    k = 0 if last is None else last.chain_index + 1
    themes = cfg.prompts.themes
    theme = themes[(k // ctx.knob("prompts.rotation_interval") + theme_offset) % len(themes)]
    seed = keyframe_seed(cfg.generation.seed, k)
    width, height = cfg.generation.resolution
    values = {"chain_index": k, "backend": cfg.generation.backend, "theme": theme.name,
              "prompt": theme.positive, "negative_prompt": theme.negative, "seed": seed,
              "denoise": ctx.knob("generation.denoise"), "width": width, "height": height,
              "max_attempts": cfg.generation.max_attempts}
    # a chain that stopped changing is made to move: a few keyframes at a higher denoise
    values["denoise"], brk = breaker.denoise_for(ctx, k, values["denoise"])
    if last is not None and not head_image(ctx, last):
        # the chain's newest image is gone (moved aside, deleted by hand): a new chain
        # starts at the next index from a seed, instead of a keyframe that cannot run
        log.warning("keyframe %d: the image of keyframe %d (%s) is missing; starting anew "
                    "from a seed", k, last.chain_index, last.path)
        last = None
    if last is None:
        # checked now, not when the keyframe runs: a broken seed would be discarded
        # and planned again forever; with no usable seed the backend generates a start
        seeds = seeding.seed_files(cfg.seed_dirs())
        start = seeding.pick_seed(seeds, seed % len(seeds)) if seeds else None
        if seeds and start is None:
            log.warning("keyframe %d: none of the %d seed images is usable; starting from "
                        "a generated image", k, len(seeds))
        values["source"] = "seed"
        values["input_path"] = stored(cfg.data_dir, start) if start else None
    else:
        values.update(source="img2img", parent_id=last.id, input_path=last.path)
    if cfg.prompts.time_of_day:
        values["prompt"] = with_time_of_day(values["prompt"], cfg.prompts.time_of_day_words)
    injection = _injection(ctx, last, k)      # the aesthetic memory: dreamd/memory/
    if injection is not None:
        values.update(source="injection",
                      input_path=stored(cfg.data_dir, injection.input_path))
    with ctx.engine.begin() as conn:
        # re-checked under the write lock: one keyframe in flight, ever
        if conn.execute(select(func.count()).select_from(KF)
                        .where(KF.c.state.in_(PENDING))).scalar_one():
            memory_injection.abandon(injection)
            return None  # type: ignore[return-value]
        kid = transitions.create(conn, "keyframe", values, worker="planner",
                                 detail={"theme": theme.name, "source": values["source"],
                                         **(injection.detail() if injection else {})})
        if injection is not None:
            memory_injection.record(conn, kid, injection)
        breaker.record(conn, kid, k, brk)
    log.debug("planned keyframe %d (chain %d, %s, theme %s)", kid, k, values["source"],
              theme.name)
    ctx.wake("keyframe")
    return kid
