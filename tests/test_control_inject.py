"""The `inject` control (the dashboard's "inject now" key): applied by the controls
worker, it makes the next planned keyframe an injection with reason `requested`, even
inside the warm-up where the memory would never inject; rejected, with the key named,
when the memory cannot inject at all. In-process on a real ledger."""

from __future__ import annotations

from PIL import Image
from sqlalchemy import text

from dreamd.ledger import controls as ledger_controls
from dreamd.workers import controls
from tests.memory_chain import REPO, Chain, CollapsingBackend, close, make_ctx

CONFIG = f"""
[generation]
resolution = [128, 64]
interpolation_frames = 0
seeds_dir = "{REPO / 'seeds'}"
[display]
min_buffer_seconds = 0.0
[cache]
embedder = "descriptor"
warmup_keyframes = 100
injection_probability = 0.0
collapse_probability = 0.0
"""


def _control(ctx, command: str) -> int:
    with ctx.engine.begin() as conn:
        return ledger_controls.request(conn, command, {})


def _state(ctx, cid: int):
    with ctx.reader.connect() as conn:
        return conn.execute(text("SELECT state, error FROM controls WHERE id = :i"),
                            {"i": cid}).one()


def _injections(ctx):
    with ctx.reader.connect() as conn:
        return conn.execute(text(
            "SELECT k.chain_index, k.source, i.kind, i.reason FROM injections i "
            "JOIN keyframes k ON k.id = i.keyframe_id ORDER BY k.chain_index")).all()


def test_inject_makes_the_next_keyframe_an_injection_inside_the_warmup(db_path):
    ctx = make_ctx(db_path, CONFIG)
    try:
        chain = Chain(ctx, CollapsingBackend(Image.open(REPO / "seeds" / "seed_005.png")))
        chain.run(3)
        assert _injections(ctx) == []            # the warm-up holds without a request
        cid = _control(ctx, "inject")
        controls.tick(ctx)
        assert tuple(_state(ctx, cid)) == ("applied", None)
        chain.run(2)
        rows = _injections(ctx)
        # exactly the next keyframe, once: the request is used up
        assert [(r.chain_index, r.source, r.reason) for r in rows] == \
            [(3, "injection", "requested")]
    finally:
        close(ctx)


def test_inject_is_rejected_naming_the_key_when_the_memory_is_off(db_path):
    ctx = make_ctx(db_path, CONFIG.replace('embedder = "descriptor"',
                                           'embedder = "descriptor"\nenabled = false'))
    try:
        cid = _control(ctx, "inject")
        controls.tick(ctx)
        state, error = _state(ctx, cid)
        assert state == "rejected" and "cache.enabled = false" in error
        assert "inject_requested" not in ctx.facts
    finally:
        close(ctx)

