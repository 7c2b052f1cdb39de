"""The controls against what img2img loops do to a dream (dreamd/quality/coherence.py,
breaker.py, dreamd/latent/ease.py), through the real planner and keyframe worker
in-process on a real ledger file, with backend doubles that drift and converge as real
loops do (tests/quality_doubles.py); the drift and the change are the recorder's own
measurements in the `quality` table.

The bound stated for colour coherence (README "Colour drift and stagnation"): with
`quality.coherence` at its default strength, a chain whose every keyframe adds a colour
cast and a contrast gain stays within DRIFT_BOUND delta E (the mean CIELAB of each
keyframe against its run's reference) over CHAIN keyframes; without it the drift grows
until the colours run out of gamut.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import datetime, timedelta

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import text

from dreamd.latent.ease import eased
from dreamd.ledger import transitions as tr
from dreamd.quality import coherence, metrics
from dreamd.storage import retention
from dreamd.storage.retention import PassReport
from tests.conftest import with_keys
from tests.quality_doubles import (CHAIN_CONFIG, ConvergingBackend, DriftingBackend,
                                   run_chain, start_image)

CHAIN = 300
DRIFT_BOUND = 8.0       # delta E; about three just-noticeable differences


def rows(ctx, q: str, **params) -> list:
    with ctx.reader.connect() as conn:
        return conn.execute(text(q), params).all()


def drifts(ctx) -> list[float]:
    return [r.drift for r in rows(ctx, "SELECT drift FROM quality WHERE entity = 'keyframe' "
                                       "ORDER BY chain_index")]


@pytest.fixture
def chain(contexts, ledger_template, tmp_path):
    """A worker context for an in-process chain, with extra [quality] keys (and keys of
    other tables), on the test's ledger or, with `own=True`, on a ledger of its own."""
    def make(quality: str = "", *, own: bool = False, **tables: str):
        cfg = with_keys(CHAIN_CONFIG, "quality", quality) if quality else CHAIN_CONFIG
        for table, keys in tables.items():
            cfg = with_keys(cfg, table, keys)
        path = None
        if own:
            path = tmp_path / f"own{len(list(tmp_path.glob('own*')))}" / "dreamd.db"
            path.parent.mkdir()
            shutil.copy(ledger_template, path)
        return contexts(cfg, path=path)
    return make


# ---------------------------------------------------------------- colour coherence

@pytest.mark.slow
def test_a_drifting_chain_stays_near_its_palette_with_coherence_and_drifts_without(chain):
    off = chain('coherence = "off"\nstagnation_keyframes = 0')
    run_chain(off, DriftingBackend(), CHAIN)
    free = drifts(off)
    # without coherence: it grows (early < middle < late) and ends far from the palette
    early, middle, late = (float(np.mean(free[a:b])) for a, b in ((5, 30), (60, 120),
                                                                  (CHAIN - 60, CHAIN)))
    assert early < middle < late, (early, middle, late)
    assert late > 3 * DRIFT_BOUND, late

    for method in ("histogram", "mean"):
        on = chain(f'coherence = "{method}"\nstagnation_keyframes = 0', own=True)
        run_chain(on, DriftingBackend(), CHAIN)
        held = drifts(on)
        assert len(held) == CHAIN
        assert max(held) <= DRIFT_BOUND, (method, int(np.argmax(held)), max(held))
        # one reference for the whole run, its first keyframe, and one palette file for it
        (ref,), = rows(on, "SELECT DISTINCT reference_id FROM quality "
                           "WHERE entity = 'keyframe'")
        sha = rows(on, "SELECT sha256 FROM keyframes WHERE id = :i", i=ref)[0][0]
        assert [p.name for p in (on.cfg.data_dir / "palette").iterdir()] == [
            coherence.palette_path(on.cfg.data_dir, ref, sha).name]


def test_coherence_pulls_a_cast_input_back_to_the_palette_by_its_strength():
    ref = Image.fromarray(start_image(128, 64, 7).astype(np.uint8))
    cast = np.asarray(ref, np.float32) * [1.1, 0.8, 1.05] + [30, -10, 25]
    image = Image.fromarray(np.clip(cast, 0, 255).astype(np.uint8))
    ref_lab = metrics.lab(np.asarray(ref, np.float32))

    def mean_lab(im):
        return metrics.lab(np.asarray(im, np.float32)).mean(axis=(0, 1))

    before = np.linalg.norm(mean_lab(image) - ref_lab.mean(axis=(0, 1)))
    assert before > 10
    for method in ("histogram", "mean"):
        full = coherence.match_image(image, ref_lab, method, 1.0)
        half = coherence.match_image(image, ref_lab, method, 0.5)
        none = coherence.match_image(image, ref_lab, method, 0.0)
        d_full = np.linalg.norm(mean_lab(full) - ref_lab.mean(axis=(0, 1)))
        d_half = np.linalg.norm(mean_lab(half) - ref_lab.mean(axis=(0, 1)))
        assert d_full < 1.0, (method, d_full)
        assert 0.35 * before < d_half < 0.65 * before, (method, d_half, before)
        # strength 0 changes nothing but the round trip through CIELAB
        assert np.abs(np.asarray(none, int) - np.asarray(image, int)).max() <= 1
        # the spread (contrast) of each channel comes back too, not only the mean
        spread = metrics.lab(np.asarray(full, np.float32)).std(axis=(0, 1))
        assert spread == pytest.approx(ref_lab.std(axis=(0, 1)), rel=0.1, abs=0.5)


def test_inputs_that_are_not_a_plain_chain_step_go_unchanged(chain):
    ctx = chain()
    run_chain(ctx, DriftingBackend(), 3)      # 0: the run's reference; 1 made from it
    image = Image.new("RGB", (128, 64), (200, 20, 120))
    head = rows(ctx, "SELECT * FROM keyframes ORDER BY chain_index DESC LIMIT 1")[0]

    class Row:
        chain_index, theme, parent_id, input_path = 3, head.theme, head.id, head.path
        source = "img2img"
    assert coherence.steer(ctx, Row, image)[0] is not image      # a chain step: matched
    for source in ("seed", "injection"):                        # a start, a deliberate blend
        Row.source = source
        assert coherence.steer(ctx, Row, image) == (image, None)
    Row.source, Row.theme = "img2img", "another theme"          # a new run starts here
    assert coherence.steer(ctx, Row, image) == (image, None)
    Row.theme = head.theme
    ctx.set_knobs({"quality.coherence": "off"})
    assert coherence.steer(ctx, Row, image) == (image, None)
    ctx.set_knobs({"quality.coherence": "histogram", "quality.coherence_strength": 0.0})
    assert coherence.steer(ctx, Row, image) == (image, None)
    assert coherence.steer(ctx, Row, None) == (None, None)


def test_the_second_keyframe_of_a_run_is_not_matched_to_itself(chain):
    """Its input is the reference: matching would change nothing but rounding (and would
    cost a remote backend the upload of the file as it is)."""
    ctx = chain()
    seen = []

    class Recording(DriftingBackend):
        def generate(self, request):
            seen.append(request.palette)
            return super().generate(request)
    run_chain(ctx, Recording(), 3)
    first = rows(ctx, "SELECT id FROM keyframes WHERE chain_index = 0")[0].id
    assert seen[:2] == [None, None]
    assert seen[2] is not None and seen[2].keyframe_id == first and seen[2].strength == 0.5
    assert seen[2].image().size == (128, 64)


def test_a_theme_change_renews_the_reference_and_the_old_palette_goes(chain):
    ctx = chain()
    ctx.set_knobs({"prompts.rotation_interval": 5})
    run_chain(ctx, DriftingBackend(), 12)     # themes: 0-4, 5-9, 10-11
    refs = rows(ctx, "SELECT chain_index, reference_id FROM quality "
                     "WHERE entity = 'keyframe' ORDER BY chain_index")
    ids = {r.chain_index: r.reference_id for r in refs}
    kid = {r.chain_index: r.id for r in rows(ctx, "SELECT chain_index, id FROM keyframes")}
    assert [ids[c] for c in range(12)] == [kid[0]] * 5 + [kid[5]] * 5 + [kid[10]] * 2
    folder = ctx.cfg.data_dir / "palette"
    names = sorted(p.name for p in folder.iterdir())
    assert [n.split("-")[1] for n in names] == sorted(str(kid[c]) for c in (0, 5))
    # the janitor's pass: only the head's run's palette is live (none made for it yet:
    # its second keyframe is its reference's own child); past the grace, the others go
    assert coherence.prune_palettes(ctx) == 0                    # young files stay
    freed = coherence.prune_palettes(ctx, now=time.time() + 60)
    assert freed > 0 and list(folder.iterdir()) == []
    run_chain(ctx, DriftingBackend(), 1)                         # 12: matched to 10's
    assert [p.name.split("-")[1] for p in folder.iterdir()] == [str(kid[10])]
    assert coherence.prune_palettes(ctx, now=time.time() + 60) == 0
    # a file no row names (another ledger's, a crash's temp file) goes too
    stray = folder / f"ref-{kid[10]}-000000000000.png"
    stray.write_bytes(b"x")
    (folder / ".ref.png.123.tmp").write_bytes(b"x")
    coherence.prune_palettes(ctx, now=time.time() + 60)
    assert [p.name.split("-")[1] for p in folder.iterdir()] == [str(kid[10])]


def test_the_janitor_deletes_the_palettes_no_run_needs(chain):
    from dreamd.workers.janitor import Janitor

    ctx = chain()
    ctx.set_knobs({"prompts.rotation_interval": 4})
    run_chain(ctx, DriftingBackend(), 11)     # runs 0-3, 4-7, 8-10: palettes of 0, 4, 8
    folder = ctx.cfg.data_dir / "palette"
    assert len(list(folder.iterdir())) == 3
    hour_ago = time.time() - 3600
    for p in folder.iterdir():
        os.utime(p, (hour_ago, hour_ago))
    Janitor(ctx).storage()
    ref = rows(ctx, "SELECT id FROM keyframes WHERE chain_index = 8")[0].id
    assert [p.name.split("-")[1] for p in folder.iterdir()] == [str(ref)]


def test_a_reference_whose_image_is_gone_uses_its_thumbnail_or_none(chain, caplog):
    caplog.set_level(logging.INFO, logger="dreamd.quality")
    ctx = chain()
    run_chain(ctx, DriftingBackend(), 2)
    ref = rows(ctx, "SELECT * FROM keyframes WHERE chain_index = 0")[0]
    thumb = ctx.cfg.data_dir / "thumbs" / "t0.jpg"
    thumb.parent.mkdir()
    Image.open(ctx.cfg.data_dir / ref.path).convert("RGB").save(thumb)
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE keyframes SET pruned_at = '2030-01-01', thumb_path = "
                          "'thumbs/t0.jpg' WHERE id = :i"), {"i": ref.id})
    (ctx.cfg.data_dir / ref.path).unlink()
    run_chain(ctx, DriftingBackend(), 1)
    assert len(list((ctx.cfg.data_dir / "palette").iterdir())) == 1
    for p in (ctx.cfg.data_dir / "palette").iterdir():
        p.unlink()
    thumb.unlink()
    run_chain(ctx, DriftingBackend(), 2)       # nothing to match to: made all the same
    assert caplog.text.count("the image of its colour reference") == 1    # said once
    assert rows(ctx, "SELECT COUNT(*) FROM keyframes WHERE state = 'completed'")[0][0] == 5


def test_a_failing_coherence_never_fails_the_keyframe(chain, monkeypatch, caplog):
    ctx = chain()
    run_chain(ctx, DriftingBackend(), 2)
    monkeypatch.setattr(coherence, "match_image",
                        lambda *a: (_ for _ in ()).throw(MemoryError("no room")))
    monkeypatch.setattr(coherence, "_failed_once", type(coherence._failed_once)())
    run_chain(ctx, DriftingBackend(), 2)
    assert rows(ctx, "SELECT COUNT(*) FROM keyframes WHERE state = 'completed'")[0][0] == 4
    assert caplog.text.count("colour coherence failed") == 1


def test_match_latent_moves_each_channels_mean_and_spread_towards_the_reference():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 16, 16, generator=g) * torch.tensor([1.0, 0.5, 2.0, 0.8])[:, None, None] \
        + torch.tensor([0.2, -0.3, 0.1, 0.0])[:, None, None]
    drifted = (ref[None] * 1.6 + torch.tensor([0.9, 0.4, -0.7, 0.3])[None, :, None, None]
               ).repeat(2, 1, 2, 2).to(torch.float16)     # a batch, twice the size, fp16
    out = coherence.match_latent(drifted, ref, 1.0)
    assert out.shape == drifted.shape and out.dtype == torch.float16
    stats = lambda t: (t.float().mean(dim=(-2, -1)), t.float().std(dim=(-2, -1)))  # noqa: E731
    (m, s), (rm, rs) = stats(out), stats(ref)
    assert torch.allclose(m, rm.expand_as(m), atol=2e-2)
    assert torch.allclose(s, rs.expand_as(s), rtol=2e-2)
    half = coherence.match_latent(drifted, ref[None], 0.5)
    hm = stats(half)[0]
    dm = stats(drifted)[0]
    assert torch.allclose(hm, (dm + rm) / 2, atol=2e-2)
    assert coherence.match_latent(drifted, ref, 0.0) is drifted
    with pytest.raises(ValueError, match="channels"):
        coherence.match_latent(drifted, ref[:3], 1.0)


# ---------------------------------------------------------------- the stagnation breaker

def test_a_converged_chain_is_broken_recorded_moves_again_and_returns_to_the_users_denoise(
        chain):
    ctx = chain('coherence = "off"')
    backend = ConvergingBackend()
    run_chain(ctx, backend, 30)
    q = ctx.cfg.quality
    keyframes = rows(ctx, "SELECT k.chain_index, k.id, k.denoise, q.change FROM keyframes k "
                          "JOIN quality q ON q.keyframe_id = k.id ORDER BY k.chain_index")
    breaks = rows(ctx, "SELECT * FROM breaks ORDER BY id")
    assert len(breaks) >= 2
    for b in breaks:
        before = [k for k in keyframes if b.chain_index - q.stagnation_keyframes
                  <= k.chain_index < b.chain_index]
        inside = [k for k in keyframes if b.chain_index <= k.chain_index
                  < b.chain_index + b.keyframes]
        # why: the keyframes before it had stopped changing
        assert len(before) == q.stagnation_keyframes == b.stagnant
        assert all(k.change < q.stagnation_floor for k in before)
        assert b.change == pytest.approx(max(k.change for k in before))
        assert (b.reason, b.keyframes, b.denoise, b.user_denoise, b.floor) == (
            "stagnation", q.breaker_keyframes, q.breaker_denoise, 0.3, q.stagnation_floor)
        assert b.keyframe_id == inside[0].id
        # what: its keyframes at the breaker's denoise, and the chain moves again
        assert [k.denoise for k in inside] == [q.breaker_denoise] * q.breaker_keyframes
        assert max(k.change for k in inside) > q.stagnation_floor
        # after: the user's setting again
        after = [k for k in keyframes if k.chain_index == b.chain_index + b.keyframes]
        assert not after or after[0].denoise == 0.3
    boosted = {c for b in breaks for c in range(b.chain_index, b.chain_index + b.keyframes)}
    assert all(k.denoise == 0.3 for k in keyframes if k.chain_index not in boosted)
    assert backend.denoises == [k.denoise for k in keyframes]


def test_a_moving_chain_is_never_broken(chain):
    ctx = chain('coherence = "off"')
    run_chain(ctx, DriftingBackend(structure=200.0), 30)
    changes = [r.change for r in rows(ctx, "SELECT change FROM quality "
                                           "WHERE chain_index > 0 ORDER BY chain_index")]
    n, floor = ctx.cfg.quality.stagnation_keyframes, ctx.cfg.quality.stagnation_floor
    assert all(max(changes[i:i + n]) >= floor for i in range(len(changes) - n + 1))
    assert rows(ctx, "SELECT COUNT(*) FROM breaks")[0][0] == 0


def test_a_break_under_way_survives_a_restart_and_follows_the_knobs(chain):
    ctx = chain('coherence = "off"\nbreaker_keyframes = 4')
    backend = ConvergingBackend()
    while not rows(ctx, "SELECT 1 FROM breaks"):
        run_chain(ctx, backend, 1)
        assert len(backend.denoises) < 40, "no break"
    b = rows(ctx, "SELECT * FROM breaks")[0]
    # a new process (a restarted daemon) finishes the break from the ledger alone
    fresh = chain('coherence = "off"\nbreaker_keyframes = 4')     # the same ledger
    fresh.set_knobs({"generation.denoise": 0.7})       # above the breaker's: the user's wins
    run_chain(fresh, backend, 3)
    made = rows(fresh, "SELECT denoise FROM keyframes WHERE chain_index > :c "
                       "ORDER BY chain_index", c=b.chain_index)
    assert [r.denoise for r in made] == [0.7, 0.7, 0.7]
    assert rows(fresh, "SELECT COUNT(*) FROM breaks")[0][0] == 1
    fresh.set_knobs({"generation.denoise": 0.3, "quality.stagnation_keyframes": 0})
    run_chain(fresh, backend, 12)
    assert rows(fresh, "SELECT COUNT(*) FROM breaks")[0][0] == 1


def test_a_gap_in_the_measurements_is_no_stagnation(chain):
    ctx = chain('coherence = "off"')
    backend = ConvergingBackend()
    run_chain(ctx, backend, 6)
    with ctx.engine.begin() as conn:       # keyframe 4 was never measured
        conn.execute(text("DELETE FROM quality WHERE chain_index = 4"))
    run_chain(ctx, backend, 3)             # 7, 8 still see the gap among the last four
    assert rows(ctx, "SELECT COUNT(*) FROM breaks")[0][0] == 0


def test_breaks_go_with_their_keyframe_at_the_history_horizon(chain):
    ctx = chain('coherence = "off"', storage="frame_history_hours = 0\nhistory_days = 1")
    backend = ConvergingBackend()
    while not rows(ctx, "SELECT 1 FROM breaks"):
        run_chain(ctx, backend, 1)
    run_chain(ctx, backend, 3)
    # the chain's interpolation batches were never run: cancelled, they pin nothing
    with ctx.engine.begin() as conn:
        for (bid,) in conn.execute(text("SELECT id FROM interpolations")).all():
            tr.transition(conn, "interpolation", bid, "available", "cancelled")
    first = rows(ctx, "SELECT keyframe_id FROM breaks")[0].keyframe_id
    retention.prune_rows(ctx, datetime.utcnow() + timedelta(hours=12), PassReport())
    assert rows(ctx, "SELECT COUNT(*) FROM breaks")[0][0] == 1        # not yet
    while retention.prune_rows(ctx, datetime.utcnow() + timedelta(days=2), PassReport()):
        pass
    assert not rows(ctx, "SELECT 1 FROM keyframes WHERE id = :i", i=first)
    assert rows(ctx, "SELECT COUNT(*) FROM breaks")[0][0] == 0


# ---------------------------------------------------------------- the ease

def test_smooth_ease_keeps_the_ends_runs_forward_and_is_symmetric():
    ts = [i / 11 for i in range(12)]
    assert eased(ts, "linear") == ts
    e = eased(ts, "smooth")
    assert e[0] == 0.0 and e[-1] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(e, e[1:]))
    assert all(e[i] + e[-1 - i] == pytest.approx(1.0) for i in range(12))
    steps = np.diff(e)
    assert steps[0] == pytest.approx(steps[-1]) and steps[0] < 0.6 * np.mean(steps)
    assert max(steps) < 1.6 * np.mean(steps)
    with pytest.raises(ValueError, match="quality.ease"):
        eased(ts, "cubic")


def _segments(ease: str, n: int = 8) -> list[list[np.ndarray]]:
    """Three crafted segments slerped in pixels as the interpolation worker does: a slow
    drift, then a fast turn to another picture, then slow again (what a keyframe that
    changed a lot between two that changed little looks like)."""
    from dreamd.latent.slerp import slerp

    a = start_image(64, 32, 1)
    keys = [a, a * 0.92 + 8, start_image(64, 32, 2), start_image(64, 32, 2) * 0.92 + 8]
    ts = [i / (n + 1) for i in range(n + 1)]
    out = []
    for x, y in zip(keys, keys[1:]):
        lat = slerp(torch.tensor(x), torch.tensor(y), eased(ts, ease))
        out.append([f.numpy().astype(np.float32) for f in lat])
    return out


def _pops(segments) -> list[float]:
    pops = []
    for prev, seg in zip(segments, segments[1:]):
        q = metrics.measure_segment(seg, prev[-1], metrics.motion(prev))
        pops.append(q.pop)
    return pops


def test_smooth_ease_brings_the_pop_at_a_change_of_pace_under_the_steps_around_it():
    linear, smooth = _pops(_segments("linear")), _pops(_segments("smooth"))
    # linear: the fast segment's last step lands on a slow one: bigger than around it
    assert max(linear) > 1.5, linear
    assert max(smooth) < 1.0, smooth
    assert all(s < l for s, l in zip(smooth, linear))
