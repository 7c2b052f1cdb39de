"""The aesthetic memory against a deliberately collapsing img2img chain, in-process on
a real ledger: collapse is seen within the window, an injection follows and the next
keyframes move away from the collapsed look; nothing is injected during the warm-up;
the cooldown holds; without injections the chain stays collapsed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from dreamd.memory import collapse, descriptor
from dreamd.memory.scale import DESCRIPTOR_SCALE
from dreamd.storage.paths import resolve
from tests.memory_chain import REPO, Chain, CollapsingBackend, close, make_ctx

WARMUP, COOLDOWN, WINDOW, LINKS = 8, 4, 6, 30
THRESHOLD = DESCRIPTOR_SCALE.collapse


def config(injections: bool) -> str:
    return f"""
[generation]
resolution = [128, 64]
interpolation_frames = 0
seeds_dir = "{REPO / 'seeds'}"
[display]
min_buffer_seconds = 0.0
[cache]
embedder = "descriptor"
injections = {str(injections).lower()}
collapse_window = {WINDOW}
warmup_keyframes = {WARMUP}
cooldown_keyframes = {COOLDOWN}
injection_probability = 0.0
collapse_probability = 1.0
seed_probability = 0.0
"""


def run_chain(db_path, injections: bool):
    ctx = make_ctx(db_path, config(injections))
    attractor = Image.open(REPO / "seeds" / "seed_005.png")
    Chain(ctx, CollapsingBackend(attractor)).run(LINKS)
    return ctx


def keyframe_vectors(ctx) -> dict[int, np.ndarray]:
    """Descriptors of the keyframe images themselves (independent of the ledger's)."""
    with ctx.reader.connect() as conn:
        rows = conn.execute(text("SELECT chain_index, path FROM keyframes "
                                 "WHERE state = 'completed' ORDER BY chain_index")).all()
    return {k: descriptor.describe(Image.open(resolve(ctx.cfg.data_dir, p))) for k, p in rows}


def injections(ctx):
    with ctx.reader.connect() as conn:
        return conn.execute(text(
            "SELECT k.chain_index, k.source, k.input_path, i.kind, i.reason, i.weight, "
            "i.similarity, i.source_frame_id, i.seed_path "
            "FROM injections i JOIN keyframes k ON k.id = i.keyframe_id "
            "ORDER BY k.chain_index")).all()


@pytest.fixture
def on(db_path):
    ctx = run_chain(db_path, injections=True)
    yield ctx
    close(ctx)


def test_collapse_is_detected_within_the_window_without_injections(db_path):
    ctx = run_chain(db_path, injections=False)
    try:
        assert injections(ctx) == []
        with ctx.reader.connect() as conn:
            model = collapse.current_model(conn)
            rows = collapse.recent_keyframes(conn, model, LINKS)
        chain = [r[0] for r in rows]
        vectors = [r[3] for r in rows]
        # embedding runs one link behind the chain (a keyframe's frame row exists once
        # its pair is interpolated), never further in this in-process run
        assert chain[-1] >= LINKS - 3
        levels = {chain[i + WINDOW - 1]: collapse.mean_pairwise(vectors[i:i + WINDOW])
                  for i in range(len(vectors) - WINDOW + 1)}
        # the backend pulls 35 % of the way to its attractor: by link 6 less than 8 % of
        # the seed is left; every window made only of such links is seen as collapse
        for end, level in levels.items():
            if end - WINDOW + 1 >= 6:
                assert level >= THRESHOLD, (end, level)
        assert levels[max(levels)] > 0.95       # and it stays collapsed: nothing helps it
    finally:
        close(ctx)


def test_injection_follows_collapse_and_breaks_it(on):
    rows = injections(on)
    assert rows, "no injection although the chain collapsed"
    chains = [r.chain_index for r in rows]
    # nothing during the warm-up; the chain was collapsed when it ended, so the first
    # keyframe allowed to be injected is
    assert min(chains) == WARMUP
    # the cooldown holds between every two injections
    assert all(b - a >= COOLDOWN for a, b in zip(chains, chains[1:])), chains
    assert len(chains) >= 2
    for r in rows:
        assert r.source == "injection" and r.reason in ("collapse", "bootstrap", "forced")
        assert r.weight == pytest.approx(0.6)
        assert (r.kind == "cache") == (r.source_frame_id is not None)
        assert (r.kind == "seed") == (r.seed_path is not None)
    # the first keyframe after the warm-up is injected; while the cache has no frame in
    # the band yet (everything so far lies on the way to the attractor) a seed stands in
    first = rows[0]
    assert first.reason in ("collapse", "bootstrap")
    cached = [r for r in rows if r.kind == "cache"]
    assert cached and cached[0].reason == "collapse"
    assert DESCRIPTOR_SCALE.band_min <= cached[0].similarity <= DESCRIPTOR_SCALE.band_max

    # the similarity of the next keyframes to the collapsed look drops
    v = keyframe_vectors(on)
    j = first.chain_index
    collapsed = float(v[j - 2] @ v[j - 1])
    after = [float(v[j + i] @ v[j - 1]) for i in range(3)]
    assert collapsed > 0.95
    # (the backend pulls back to its attractor, so the effect fades over a few links)
    assert after[0] < collapsed - 0.2, (collapsed, after)
    assert np.mean(after) < collapsed - 0.1, (collapsed, after)


def test_the_decision_is_in_the_ledger(on):
    """Why the dream turned: the injection row, and the keyframe's creation detail."""
    for row in injections(on)[:2]:
        with on.reader.connect() as conn:
            detail = json.loads(conn.execute(text(
                "SELECT t.detail FROM transitions t JOIN keyframes k ON k.id = t.entity_id "
                "WHERE t.entity = 'keyframe' AND t.event = 'created' AND k.chain_index = :k"),
                {"k": row.chain_index}).scalar_one())
            view = conn.execute(text("SELECT reason, kind FROM injection_log "
                                     "WHERE chain_index = :k"), {"k": row.chain_index}).one()
        assert (detail["injection"], detail["reason"]) == (row.kind, row.reason)
        assert detail["collapse_level"] >= THRESHOLD
        assert detail["blend"] == "pixels"            # the pixel codec has no latent space
        assert tuple(view) == (row.reason, row.kind)
        assert Image.open(resolve(on.cfg.data_dir, row.input_path)).size == (128, 64)


def test_memory_keeps_recent_keyframes_apart(on, ledger_template, tmp_path):
    off_db = tmp_path / "off" / "dreamd.db"
    off_db.parent.mkdir()
    shutil.copy(ledger_template, off_db)
    off = run_chain(off_db, injections=False)
    try:
        off_v, on_v = keyframe_vectors(off), keyframe_vectors(on)
    finally:
        close(off)

    def late_level(v):
        ks = sorted(v)[WARMUP:]
        return np.mean([collapse.mean_pairwise([v[k] for k in ks[i:i + WINDOW]])
                        for i in range(len(ks) - WINDOW + 1)])

    assert late_level(on_v) < late_level(off_v) - 0.1, (late_level(on_v), late_level(off_v))
