"""The measurements in the ledger, made by the real workers in-process on a real ledger
file: the interpolation worker stores a `segment` row per batch (with the pop where it
begins, also after a restart), the keyframe worker a `keyframe` row per keyframe (its
colour, change, and drift from its run's reference); a failing measurement never fails
the work; the view's thresholds are the module's."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from dreamd.backends import KeyframeResult
from dreamd.ledger import transitions as tr
from dreamd.quality import metrics, recorder
from dreamd.workers import interpolation, keyframe
from tests.conftest import REPO, worker_context

CONFIG = """
[generation]
codec = "pixel"
interpolation_frames = 3
"""
W, H = 128, 64
RED, BLUE, GREEN = (250, 10, 10), (10, 10, 250), (10, 200, 10)


@pytest.fixture
def ctx(db_path):
    yield from worker_context(db_path, CONFIG)


def rows(ctx, q: str, **params) -> list:
    with ctx.reader.connect() as conn:
        return conn.execute(text(q), params).all()


def stored_keyframe(ctx, chain: int, colour) -> int:
    rel = f"keyframes/k{chain:06d}.png"
    path = ctx.cfg.data_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (W, H), colour).save(path)
    with ctx.engine.begin() as conn:
        kid = tr.create(conn, "keyframe", {
            "chain_index": chain, "backend": "procedural", "theme": "t", "prompt": "p",
            "seed": chain, "denoise": 0.3, "source": "img2img", "width": W, "height": H})
        conn.execute(text("UPDATE keyframes SET state = 'completed', path = :p WHERE id = :i"),
                     {"p": rel, "i": kid})
    return kid


def batch(ctx, a: int, b: int, chain: int, n: int = 3) -> int:
    with ctx.engine.begin() as conn:
        return tr.create(conn, "interpolation", {
            "chain_index": chain, "from_keyframe_id": a, "to_keyframe_id": b, "n_frames": n,
            "divisor": 1.0})


def frames_of(ctx, chain: int) -> list[np.ndarray]:
    paths = [r.path for r in rows(ctx, "SELECT path FROM frames WHERE chain_index = :c "
                                       "ORDER BY t", c=chain)]
    out = []
    for p in paths:
        with Image.open(ctx.cfg.data_dir / p) as im:
            out.append(metrics.small_copy(im))
    return out


# ---------------------------------------------------------------- segments

def test_each_batch_gets_a_segment_row_with_the_pop_where_it_begins(ctx):
    k = [stored_keyframe(ctx, i, c) for i, c in enumerate((RED, BLUE, GREEN))]
    b0, b1 = batch(ctx, k[0], k[1], 0), batch(ctx, k[1], k[2], 1)
    codecs = interpolation.Codecs(ctx)
    assert interpolation.tick(ctx, codecs) == 2
    got = rows(ctx, "SELECT * FROM quality WHERE entity = 'segment' ORDER BY chain_index")
    assert [(r.chain_index, r.interpolation_id, r.keyframe_id, r.n_frames) for r in got] == \
        [(0, b0, None, 4), (1, b1, None, 4)]
    first, second = frames_of(ctx, 0), frames_of(ctx, 1)
    # the numbers are those of the frames on disk (small copies of what is shown)
    assert got[0].motion == pytest.approx(metrics.motion(first), abs=1e-3)
    assert got[0].flicker == pytest.approx(metrics.flicker(first), abs=1e-3)
    assert (got[0].boundary, got[0].pop) == (None, None)      # nothing played before it
    # red to blue moves two channels by 240 (160 a pixel) in four steps of slerp, whose
    # arc is a little longer than the straight line
    assert got[0].motion == pytest.approx(160 / 4, rel=0.1)
    assert got[1].boundary == pytest.approx(metrics.boundary_change(first[-1], second[0]),
                                            abs=1e-3)
    assert got[1].pop == pytest.approx(
        got[1].boundary / ((got[0].motion + got[1].motion) / 2), rel=1e-6)
    assert 0.7 < got[1].pop < 1.3                          # a seamless boundary
    assert all(r.measure_ms > 0 and r.created_at is not None for r in got)
    assert all(r.lab_l is None and r.change is None for r in got)


def test_after_a_restart_the_previous_segment_is_read_back_from_disk(ctx, monkeypatch):
    k = [stored_keyframe(ctx, i, c) for i, c in enumerate((RED, BLUE, GREEN))]
    batch(ctx, k[0], k[1], 0)
    interpolation.tick(ctx, interpolation.Codecs(ctx))
    monkeypatch.setattr(recorder, "SEGMENT_ENDS", recorder.Recent())    # a new process
    batch(ctx, k[1], k[2], 1)
    interpolation.tick(ctx, interpolation.Codecs(ctx))
    first, second = frames_of(ctx, 0), frames_of(ctx, 1)
    (boundary,) = rows(ctx, "SELECT boundary FROM quality WHERE chain_index = 1")[0]
    assert boundary == pytest.approx(metrics.boundary_change(first[-1], second[0]), abs=1e-3)


def test_a_hard_cut_between_segments_is_a_pop(ctx):
    """Two chains back to back (a reseed: the chain's head image went missing)."""
    k = [stored_keyframe(ctx, i, c) for i, c in enumerate((RED, RED, BLUE, BLUE))]
    batch(ctx, k[0], k[1], 0)
    batch(ctx, k[2], k[3], 1)
    interpolation.tick(ctx, interpolation.Codecs(ctx))
    (pop,) = rows(ctx, "SELECT pop FROM quality WHERE chain_index = 1")[0]
    assert pop > 50 * metrics.POP_RATIO                   # still segments, one big jump


def test_a_failing_measurement_never_fails_the_batch_and_is_logged_once(ctx, monkeypatch,
                                                                         caplog):
    def broken(*args, **kwargs):
        raise ValueError("no numbers today")

    monkeypatch.setattr(recorder, "measure_segment", broken)
    monkeypatch.setattr(recorder, "_failed_once", set())
    k = [stored_keyframe(ctx, i, c) for i, c in enumerate((RED, BLUE, GREEN))]
    batch(ctx, k[0], k[1], 0)
    batch(ctx, k[1], k[2], 1)
    with caplog.at_level(logging.DEBUG, logger="dreamd.quality"):
        assert interpolation.tick(ctx, interpolation.Codecs(ctx)) == 2
    assert rows(ctx, "SELECT state FROM interpolations") == [("completed",), ("completed",)]
    assert rows(ctx, "SELECT count(*) FROM frames") == [(8,)]
    assert rows(ctx, "SELECT count(*) FROM quality") == [(0,)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "quality of segment 0 not measured (ValueError: no numbers today)" in \
        warnings[0].getMessage()
    assert any(r.levelno == logging.DEBUG and "segment 1" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------- keyframes

class Painter:
    """A backend double that paints each keyframe the colour it is told (the recorder,
    not a backend, is under test here)."""

    name = "procedural"

    def __init__(self, colours) -> None:
        self.colours = list(colours)

    def generate(self, request):
        return KeyframeResult(Image.new("RGB", (request.width, request.height),
                                        self.colours.pop(0)))

    def close(self) -> None:
        pass


def plan(ctx, chain: int, theme: str, source: str = "img2img") -> int:
    with ctx.engine.begin() as conn:
        return tr.create(conn, "keyframe", {
            "chain_index": chain, "backend": "procedural", "theme": theme, "prompt": "p",
            "seed": chain, "denoise": 0.3, "source": source, "width": W, "height": H})


def lab_of(colour) -> np.ndarray:
    return metrics.lab(np.full((1, 1, 3), colour, np.float32))[0, 0]


def test_each_keyframe_gets_its_colour_change_and_drift_from_its_runs_reference(ctx):
    colours = [(120, 120, 120), (130, 110, 120), (130, 110, 120), (60, 60, 200), (70, 60, 200)]
    themes = ["dusk", "dusk", "dusk", "sea", "sea"]
    painter = Painter(colours)
    ids = []
    for i, theme in enumerate(themes):
        ids.append(plan(ctx, i, theme, "seed" if i == 0 else "img2img"))
        assert keyframe.tick(ctx, painter) == 1
    got = rows(ctx, "SELECT * FROM quality WHERE entity = 'keyframe' ORDER BY chain_index")
    assert [(r.chain_index, r.keyframe_id) for r in got] == list(enumerate(ids))
    for r, colour in zip(got, colours):
        assert (r.lab_l, r.lab_a, r.lab_b) == pytest.approx(tuple(lab_of(colour)), abs=0.01)
        assert r.brightness == pytest.approx(sum(colour) / 3, abs=0.01)
        assert r.lab_l_std == pytest.approx(0.0, abs=0.01)
    # change: delta E to the previous keyframe (a flat picture: between the two colours)
    assert got[0].change is None
    for prev, cur, r in zip(colours, colours[1:], got[1:]):
        assert r.change == pytest.approx(float(np.linalg.norm(lab_of(cur) - lab_of(prev))),
                                         abs=0.01)
    assert got[2].change == pytest.approx(0.0, abs=1e-6)       # stagnant
    # the reference: the seed's run of "dusk", then "sea" from its first keyframe
    assert [r.reference_id for r in got] == [ids[0], ids[0], ids[0], ids[3], ids[3]]
    assert got[0].drift == 0.0 and got[3].drift == 0.0
    assert got[1].drift == pytest.approx(float(np.linalg.norm(lab_of(colours[1])
                                                              - lab_of(colours[0]))), abs=0.01)
    assert got[4].drift == pytest.approx(got[4].change, abs=0.01)


def test_a_keyframe_after_a_restart_compares_with_the_previous_image_on_disk(ctx, monkeypatch):
    painter = Painter([(200, 100, 50), (190, 100, 60)])
    plan(ctx, 0, "dusk", "seed")
    keyframe.tick(ctx, painter)
    monkeypatch.setattr(recorder, "KEYFRAMES", recorder.Recent())      # a new process
    plan(ctx, 1, "dusk")
    keyframe.tick(ctx, painter)
    (change,) = rows(ctx, "SELECT change FROM quality WHERE chain_index = 1")[0]
    assert change == pytest.approx(float(np.linalg.norm(lab_of((190, 100, 60))
                                                        - lab_of((200, 100, 50)))), abs=0.01)


def test_a_failing_keyframe_measurement_never_fails_the_keyframe(ctx, monkeypatch, caplog):
    monkeypatch.setattr(recorder, "small_copy", lambda image: 1 / 0)
    monkeypatch.setattr(recorder, "_failed_once", set())
    plan(ctx, 0, "dusk", "seed")
    with caplog.at_level(logging.WARNING, logger="dreamd.quality"):
        assert keyframe.tick(ctx, Painter([(1, 2, 3)])) == 1
    assert rows(ctx, "SELECT state FROM keyframes") == [("completed",)]
    assert rows(ctx, "SELECT count(*) FROM quality") == [(0,)]
    assert "quality of keyframe 0 not measured (ZeroDivisionError" in caplog.text


def test_recent_keeps_the_newest_few():
    r = recorder.Recent(size=2)
    for i in range(3):
        r.put(("d", i), i)
    assert (r.get(("d", 0)), r.get(("d", 1)), r.get(("d", 2))) == (None, 1, 2)


# ---------------------------------------------------------------- the view

def test_the_views_thresholds_are_the_modules():
    sql = (REPO / "migrations" / "versions" / "0008_quality.py").read_text()
    assert re.search(rf"pop >= {metrics.POP_RATIO} THEN", sql)
    assert re.search(rf"change < {metrics.STAGNANT_CHANGE} THEN", sql)


def test_a_full_disk_is_one_line_without_a_traceback(ctx, monkeypatch, caplog):
    """A condition the daemon already reports (here the ledger's disk is full) is one
    warning naming it; a traceback is kept for what nobody explains."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    def full(*args, **kwargs):
        raise OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(recorder, "_insert", full)
    monkeypatch.setattr(recorder, "_failed_once", set())
    k = [stored_keyframe(ctx, i, c) for i, c in enumerate((RED, BLUE))]
    batch(ctx, k[0], k[1], 0)
    with caplog.at_level(logging.DEBUG, logger="dreamd.quality"):
        assert interpolation.tick(ctx, interpolation.Codecs(ctx)) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].exc_info is None, warnings
    assert "quality of segment 0 not measured (disk full)" in warnings[0].getMessage()
