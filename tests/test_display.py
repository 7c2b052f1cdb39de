"""The display writer in-process on a real ledger: order, buffering, underrun, gaps,
and atomic writes that retry while a reader holds the target (Windows)."""

from __future__ import annotations

import json
import os
import threading

import pytest
from PIL import Image
from sqlalchemy import text

from dreamd.display.status import KEYS
from dreamd.display import writer as writer_mod
from dreamd.display.writer import DisplayWriter
from dreamd.ledger import transitions as tr
from dreamd.storage import files
from tests.conftest import worker_context


@pytest.fixture
def ctx(db_path, tmp_path):
    yield from worker_context(db_path, "[display]\nfps = 10.0\nmin_buffer_seconds = 0.3\n"
                                       "buffer_target_seconds = 5.0\n")


def add_segment(ctx, chain: int, n: int, *, batch_state: str = "completed") -> None:
    """A keyframe pair's batch and its frames (or only the batch, if not completed)."""
    frames_dir = ctx.cfg.frames_dir
    frames_dir.mkdir(parents=True, exist_ok=True)
    with ctx.engine.begin() as conn:
        kids = []
        for k in (chain, chain + 1):
            kid = conn.execute(text("SELECT id FROM keyframes WHERE chain_index=:k"),
                               {"k": k}).scalar()
            if kid is None:
                kid = tr.create(conn, "keyframe", {
                    "chain_index": k, "backend": "test", "theme": "t", "prompt": f"prompt {k}",
                    "seed": k, "denoise": 0.3, "source": "img2img", "width": 8, "height": 8,
                    "state": "available"})
                conn.execute(text("UPDATE keyframes SET state='completed' WHERE id=:i"),
                             {"i": kid})
            kids.append(kid)
        bid = tr.create(conn, "interpolation", {"chain_index": chain, "from_keyframe_id": kids[0],
                                                "to_keyframe_id": kids[1], "n_frames": n})
        if batch_state == "completed":
            conn.execute(text("UPDATE interpolations SET state='completed' WHERE id=:i"),
                         {"i": bid})
            for i in range(n + 1):
                t = i / (n + 1)
                path = frames_dir / f"{chain}-{i}.png"
                Image.new("RGB", (8, 8), (chain * 40 % 255, i * 20, 0)).save(path)
                tr.create(conn, "frame", {"chain_index": chain, "t": t,
                                          "kind": "keyframe" if i == 0 else "inbetween",
                                          "interpolation_id": bid, "path": str(path)})


def shown(ctx):
    with ctx.reader.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT chain_index, t FROM frames WHERE state='shown' ORDER BY shown_at, id"))]


def status(ctx):
    return json.loads((ctx.cfg.output_dir / "status.json").read_text())


def test_plays_in_order_and_holds_on_underrun(ctx, monkeypatch):
    # these ticks come back to back, not a frame apart: the output files with each one
    monkeypatch.setattr(writer_mod, "STATUS_GAP", 0.0)
    w = DisplayWriter(ctx)
    w.tick()
    assert status(ctx)["status"] == "buffering" and status(ctx)["frame_number"] == 0
    add_segment(ctx, 0, 3)                       # 4 frames = 0.4 s >= min buffer 0.3 s
    for _ in range(4):
        w.tick()
    assert shown(ctx) == [(0, 0.0)]            # the first at once, the rest in a batch
    assert w.record()                            # (due RECORD_EVERY s later, or now)
    assert shown(ctx) == [(0, 0.0), (0, 0.25), (0, 0.5), (0, 0.75)]
    st = status(ctx)
    assert list(st) == list(KEYS) and st["status"] == "playing" and st["keyframe_index"] == 0
    assert st["current_prompt"] == "prompt 0"
    current = ctx.cfg.output_dir / "current_frame.png"
    with Image.open(current) as im:
        assert im.getpixel((0, 0)) == (0, 60, 0)          # the frame at i = 3
    with Image.open(ctx.cfg.output_dir / "previous_frame.png") as im:
        assert im.getpixel((0, 0)) == (0, 40, 0)
    w.tick()
    w.tick()                                     # underrun: one episode, counted once
    st = status(ctx)
    assert st["status"] == "underrun" and st["is_buffering"] is True
    assert ctx.runtime().underruns == 1
    assert shown(ctx)[-1] == (0, 0.75)           # the last frame is held


def test_a_later_segment_waits_for_an_earlier_one(ctx):
    w = DisplayWriter(ctx)
    add_segment(ctx, 0, 4)
    add_segment(ctx, 1, 4, batch_state="available")   # being made
    add_segment(ctx, 2, 4)                            # already done
    for _ in range(12):
        w.tick()
    assert [c for c, _ in shown(ctx)] == [0] * 5      # segment 2 does not jump the queue
    with ctx.engine.begin() as conn:
        conn.execute(text("DELETE FROM interpolations WHERE chain_index = 1"))
    add_segment(ctx, 1, 4)
    for _ in range(20):
        w.tick()
    order = shown(ctx)
    assert order == sorted(order) and len(order) == 15


def test_playhead_survives_a_restart(ctx):
    add_segment(ctx, 0, 3)
    w = DisplayWriter(ctx)
    for _ in range(3):
        w.tick()
    assert w.flush(timeout=1.0)                  # as the daemon does when it stops
    again = DisplayWriter(ctx)                   # a new daemon on the same ledger
    assert (again.chain, again.t) == (0, 0.5)
    add_segment(ctx, 1, 3)
    for _ in range(6):
        again.tick()
    again.record()
    order = shown(ctx)
    assert order == sorted(order) and len(set(order)) == len(order) == 8


def test_paused_holds_everything(ctx):
    add_segment(ctx, 0, 3)
    w = DisplayWriter(ctx)
    ctx.facts["paused"], ctx.facts["pause_reason"] = True, "a game"
    for _ in range(3):
        w.tick()
    assert shown(ctx) == []
    st = status(ctx)
    assert st["status"] == "paused" and st["paused"] is True and st["pause_reason"] == "a game"


def test_atomic_replace_retries_while_the_target_is_locked(tmp_path, monkeypatch):
    target = tmp_path / "current_frame.png"
    target.write_bytes(b"old")
    real_replace, calls = os.replace, []

    def locked_twice(src, dst):
        calls.append(dst)
        if len(calls) <= 2:   # what Windows says while Rainmeter has the file open
            raise PermissionError(13, "The process cannot access the file", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", locked_twice)
    files.write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and len(calls) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["current_frame.png"]   # no temp left


def test_atomic_write_gives_up_cleanly(tmp_path, monkeypatch):
    target = tmp_path / "status.json"
    target.write_bytes(b"old")

    def always_locked(src, dst):
        raise PermissionError(13, "locked", str(dst))

    monkeypatch.setattr(files.os, "replace", always_locked)
    monkeypatch.setattr(files, "REPLACE_DELAY", 0.0)
    with pytest.raises(PermissionError):
        files.write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_readers_never_see_a_partial_file(tmp_path):
    target = tmp_path / "current_frame.png"
    payloads = [bytes([i]) * 200_000 for i in range(4)]
    files.write_atomic(target, payloads[0])
    stop, bad = threading.Event(), []

    def read():
        while not stop.is_set():
            data = target.read_bytes()
            if data not in payloads:
                bad.append(len(data))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(200):
        files.write_atomic(target, payloads[i % 4])
    stop.set()
    reader.join()
    assert not bad


def test_playback_starts_at_the_first_segment_even_when_a_later_one_is_ready_first(ctx):
    """Issue 10, item 3: with no playhead yet, a ready segment 1 waits for segment 0
    still being made; playback starts at (0, 0.0) and never skips chain 0."""
    add_segment(ctx, 0, 3, batch_state="available")   # being made (the ledger was busy)
    add_segment(ctx, 1, 3)                            # already done
    w = DisplayWriter(ctx)
    for _ in range(5):
        w.tick()
    assert shown(ctx) == []
    assert status(ctx)["status"] == "buffering"
    with ctx.engine.begin() as conn:
        conn.execute(text("DELETE FROM interpolations WHERE chain_index = 0"))
    add_segment(ctx, 0, 3)
    for _ in range(10):
        w.tick()
    order = shown(ctx)
    assert order[0] == (0, 0.0) and order == sorted(order) and len(order) == 8
