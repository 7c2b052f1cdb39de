"""Retention in-process on a real ledger and real files (issue 16): each function of
dreamd/storage/retention.py against the contract of the README's "Storage" section,
with exact row and file sets. Times are explicit (`now`), file ages set with utime."""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import datetime, timedelta

import pytest
from PIL import Image
from sqlalchemy import insert, text

from dreamd.ledger import transitions as tr
from dreamd.ledger.models import Injection, Quality
from dreamd.storage import retention as ret
from dreamd.storage.retention import PassReport
from tests.conftest import wait_for

NOW = datetime(2030, 6, 1, 12, 0, 0, 250000)
OLD = NOW - timedelta(days=30)
HOUR = timedelta(hours=1)


@pytest.fixture
def make_ctx(contexts):
    return contexts


# ---------------------------------------------------------------- building a ledger

def png(ctx, rel: str, color=(10, 20, 30), size=(8, 8), mode="RGB") -> str:
    p = ctx.cfg.data_dir / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(p)
    return rel


def fsize(ctx, rel: str) -> int:
    return (ctx.cfg.data_dir / rel).stat().st_size


def exists(ctx, rel: str) -> bool:
    return (ctx.cfg.data_dir / rel).exists()


def sql(ctx, q: str, **params):
    with ctx.reader.connect() as conn:
        return conn.execute(text(q), params).all()


def keyframe(ctx, chain: int, *, state="completed", path: str | None = "auto", at=OLD,
             completed_at="at", parent_id=None, sha256=None, source="img2img",
             input_path=None, pruned_at=None, thumb_path=None, size=(8, 8), mode="RGB") -> int:
    if path == "auto":
        path = png(ctx, f"keyframes/k{chain}.png", size=size, mode=mode)
    with ctx.engine.begin() as conn:
        kid = tr.create(conn, "keyframe", {
            "chain_index": chain, "backend": "test", "theme": "t", "prompt": f"p{chain}",
            "seed": chain, "denoise": 0.3, "source": source, "width": 8, "height": 8,
            "created_at": at, "parent_id": parent_id, "input_path": input_path})
        conn.execute(text("UPDATE keyframes SET state=:s, path=:p, completed_at=:c, sha256=:h, "
                          "pruned_at=:pr, thumb_path=:tp WHERE id=:i"),
                     {"s": state, "p": path, "c": at if completed_at == "at" else completed_at,
                      "h": sha256, "pr": pruned_at, "tp": thumb_path, "i": kid})
    return kid


def batch(ctx, a: int, b: int, *, state="completed", at=OLD) -> int:
    with ctx.engine.begin() as conn:
        chain = conn.execute(text("SELECT chain_index FROM keyframes WHERE id=:i"),
                             {"i": a}).scalar()
        bid = tr.create(conn, "interpolation", {"chain_index": chain, "from_keyframe_id": a,
                                                "to_keyframe_id": b, "n_frames": 4,
                                                "created_at": at})
        conn.execute(text("UPDATE interpolations SET state=:s WHERE id=:i"),
                     {"s": state, "i": bid})
    return bid


def frame(ctx, chain: int, t: float, state="shown", *, at=OLD, kind="inbetween",
          keyframe_id=None, interpolation_id=None, file=True) -> int:
    rel = f"frames/{chain}-{t}.png"
    if file:
        png(ctx, rel)                        # one colour: every frame one size
    with ctx.engine.begin() as conn:
        fid = tr.create(conn, "frame", {"chain_index": chain, "t": t, "kind": kind, "path": rel,
                                        "keyframe_id": keyframe_id, "created_at": at,
                                        "interpolation_id": interpolation_id})
        conn.execute(text("UPDATE frames SET state=:s WHERE id=:i"), {"s": state, "i": fid})
    return fid


def embedding(ctx, frame_id: int, *, in_cache=0, state="completed", at=OLD,
              id: int | None = None) -> int:
    values = {"frame_id": frame_id, "model": "m", "in_cache": in_cache, "created_at": at}
    if id is not None:
        values["id"] = id
    with ctx.engine.begin() as conn:
        eid = tr.create(conn, "embedding", values)
        conn.execute(text("UPDATE embeddings SET state=:s WHERE id=:i"), {"s": state, "i": eid})
    return eid


def playhead(ctx, frame_id: int | None, chain: int | None, t: float | None) -> None:
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE runtime_state SET playhead_frame_id=:f, "
                          "playhead_chain_index=:c, playhead_t=:t WHERE id=1"),
                     {"f": frame_id, "c": chain, "t": t})


def states(ctx) -> dict[tuple[int, float], str]:
    return {(c, t): s for c, t, s in sql(ctx, "SELECT chain_index, t, state FROM frames")}


def frame_files(ctx) -> set[str]:
    d = ctx.cfg.data_dir / "frames"
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def age(path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


# ---------------------------------------------------------------- small parts

def test_pass_report_any_is_true_for_each_kind_of_work_alone():
    assert PassReport().any() is False
    assert PassReport(rows={"frames": 0, "controls": 0}).any() is False
    for name in ("frames", "keyframe_images", "thumbnails", "latents", "blends"):
        assert PassReport(**{name: 1}).any() is True, name
    assert PassReport(rows={"frames": 0, "controls": 2}).any() is True
    assert PassReport(freed=100).any() is False     # bytes alone are not work


def test_unlink_and_size(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"12345")
    assert ret._size(p) == 5 and ret._size(None) == 0 and ret._size(tmp_path / "no") == 0
    assert ret._unlink(None) == 0
    assert ret._unlink(tmp_path / "no") == 0
    assert ret._unlink(p) == 5 and not p.exists()


# ---------------------------------------------------------------- frames

def test_evict_frames_keeps_the_newest_shown_and_everything_ahead(make_ctx):
    ctx = make_ctx("[display]\nmax_output_frames = 12\n")
    for t in (0.5, 0.0, 0.75):                           # chain 0: written out of order
        frame(ctx, 0, t)
    for c in range(1, 6):                                # 13 shown frames in all
        frame(ctx, c, 0.0)
        frame(ctx, c, 0.5)
    member = frame(ctx, 0, 0.25)                         # the oldest, but a cache member
    embedding(ctx, member, in_cache=1)
    screen = frame(ctx, 6, 0.5)                          # on screen
    frame(ctx, 6, 0.25, "ready")                         # skipped over: behind the playhead
    frame(ctx, 5, 0.75, "ready")                         # an earlier chain: behind too
    behind_member = frame(ctx, 4, 0.75, "ready")
    embedding(ctx, behind_member, in_cache=1)
    frame(ctx, 6, 0.75, "ready")                         # ahead
    frame(ctx, 7, 0.0, "ready")                          # ahead
    playhead(ctx, screen, 6, 0.5)
    sizes = {n: (ctx.cfg.data_dir / "frames" / n).stat().st_size for n in frame_files(ctx)}
    report = PassReport(frames=3, freed=7)

    n = ret.evict_frames(ctx, report=report)

    # 13 shown frames besides the one on screen and the member: the 12 newest stay (the
    # limit falls inside chain 0: t, not the row order, orders a chain's frames)
    gone_old = {(0, 0.0)}
    gone_behind = {(6, 0.25), (5, 0.75)}
    got = states(ctx)
    assert {k for k, s in got.items() if s == "evicted"} == gone_old | gone_behind
    assert got[(0, 0.25)] == got[(0, 0.5)] == got[(0, 0.75)] == "shown" and got[(6, 0.5)] == "shown" and got[(1, 0.0)] == "shown"
    assert got[(4, 0.75)] == got[(6, 0.75)] == got[(7, 0.0)] == "ready"
    assert n == 3 and report.frames == 3 + 3
    gone_files = {f"{c}-{t}.png" for c, t in gone_old | gone_behind}
    assert frame_files(ctx) == set(sizes) - gone_files
    assert report.freed == 7 + sum(sizes[f] for f in gone_files)
    assert sql(ctx, "SELECT COUNT(*) FROM frames WHERE state='evicted' "
                    "AND evicted_at IS NULL")[0][0] == 0
    # one moment: the transition's time is the row's evicted_at
    assert sql(ctx, "SELECT COUNT(*) FROM transitions x JOIN frames f ON f.id = x.entity_id "
                    "WHERE x.entity='frame' AND x.to_state='evicted' "
                    "AND x.at = f.evicted_at") == [(3,)]
    logged = sql(ctx, "SELECT f.chain_index, f.t, x.from_state, x.worker, x.detail "
                      "FROM transitions x JOIN frames f ON f.id = x.entity_id "
                      "WHERE x.entity='frame' AND x.to_state='evicted'")
    assert sorted(logged) == sorted(
        [(c, t, "shown", "janitor", "retention") for c, t in gone_old]
        + [(c, t, "ready", "janitor", "behind the playhead") for c, t in gone_behind])
    # a second pass finds nothing more
    assert ret.evict_frames(ctx) == 0


def test_evict_frames_follows_the_live_knob_and_nothing_without_a_playhead(make_ctx):
    ctx = make_ctx("[display]\nmax_output_frames = 10\n")
    for c in range(13):
        frame(ctx, c, 0.0)
    frame(ctx, 0, 0.5, "ready")                          # no playhead yet: not "behind"
    ctx.set_knobs({"display.max_output_frames": 11})
    assert ret.evict_frames(ctx) == 2
    got = states(ctx)
    assert {k for k, s in got.items() if s == "evicted"} == {(0, 0.0), (1, 0.0)}
    assert got[(0, 0.5)] == "ready"


def test_evict_frames_over_budget_takes_the_oldest_until_freed(make_ctx):
    ctx = make_ctx("[display]\nmax_output_frames = 100\n")
    ids = [frame(ctx, c, 0.0) for c in range(20)]
    frame(ctx, 20, 0.0, "ready")                         # ahead: never
    playhead(ctx, ids[-1], 19, 0.0)
    one = fsize(ctx, "frames/0-0.0.png")
    assert all(fsize(ctx, f"frames/{c}-0.0.png") == one for c in range(20))
    report = PassReport()
    assert ret.evict_frames(ctx, budget_bytes=2 * one + 1, report=report) == 3
    assert {k for k, s in states(ctx).items() if s == "evicted"} == {(0, 0.0), (1, 0.0),
                                                                     (2, 0.0)}
    assert report.freed == 3 * one and report.frames == 3
    # exactly the bytes: no frame more
    assert ret.evict_frames(ctx, budget_bytes=2 * one) == 2
    assert {c for (c, _), s in states(ctx).items() if s == "evicted"} == {0, 1, 2, 3, 4}
    # any budget: the KEEP_SHOWN_MIN newest (the one on screen aside) stay, ahead stays
    assert ret.evict_frames(ctx, budget_bytes=10 ** 12) == 19 - 5 - ret.KEEP_SHOWN_MIN
    got = states(ctx)
    assert {c for (c, _), s in got.items() if s == "shown"} == set(range(9, 20))
    assert got[(20, 0.0)] == "ready"
    assert frame_files(ctx) == {f"{c}-0.0.png" for c in range(9, 21)}


def test_evict_frames_budget_counts_what_the_frame_limit_already_frees(make_ctx):
    ctx = make_ctx("[display]\nmax_output_frames = 12\n")
    for c in range(20):
        frame(ctx, c, 0.0)
    one = fsize(ctx, "frames/0-0.0.png")
    # 8 go for the limit; a budget of 9 frames' bytes takes one more, not 9 more
    assert ret.evict_frames(ctx, budget_bytes=9 * one) == 9
    assert {c for (c, _), s in states(ctx).items() if s == "evicted"} == set(range(9))
    # no budget: the limit alone has nothing more
    assert ret.evict_frames(ctx, budget_bytes=0) == 0


def test_evict_frames_rows_before_files_and_a_missing_file(make_ctx, monkeypatch):
    ctx = make_ctx("[display]\nmax_output_frames = 10\n")
    for c in range(11):
        frame(ctx, c, 0.0)
    frame(ctx, -1, 0.0, file=False)                       # its file is already gone
    monkeypatch.setenv("DREAMD_HOLD_AT", "retention-frames-evicted")
    (ctx.cfg.data_dir / "arm-retention-frames-evicted").touch()
    report = PassReport()
    worker = threading.Thread(target=ret.evict_frames, args=(ctx,), kwargs={"report": report})
    worker.start()
    held = ctx.cfg.data_dir / "held-at-retention-frames-evicted"
    try:
        wait_for(held.exists, timeout=60, what="the pass to reach its pause point")
        evicted = {c for (c, _), s in states(ctx).items() if s == "evicted"}
        assert evicted == {-1, 0}                        # rows committed ...
        assert "0-0.0.png" in frame_files(ctx)           # ... files not yet deleted
    finally:
        held.unlink()
        worker.join(timeout=60)
    assert "0-0.0.png" not in frame_files(ctx)
    assert report.frames == 2 and report.freed == fsize(ctx, "frames/1-0.0.png")


# ---------------------------------------------------------------- what is live

def test_protected_keyframes_names_exactly_what_is_still_needed(make_ctx):
    ctx = make_ctx()
    k = {c: keyframe(ctx, c) for c in range(8)}
    head_twin = keyframe(ctx, 7, path=None)              # same chain index, newer id: the head
    pend = {s: keyframe(ctx, 20 + i, state=s, path=None, parent_id=k[i])
            for i, s in enumerate(("available", "executing", "retryable"))}
    keyframe(ctx, 30, state="discarded", path=None, parent_id=k[3])     # not pending
    batch(ctx, k[4], k[5], state="executing")
    batch(ctx, k[3], k[4], state="completed")
    batch(ctx, k[0], k[6], state="cancelled")
    batch(ctx, k[1], k[2], state="retryable")            # overlaps parents: one set
    f = frame(ctx, 6, 0.0, kind="keyframe", keyframe_id=k[6])
    embedding(ctx, f, in_cache=1)
    g = frame(ctx, 3, 0.0, kind="keyframe", keyframe_id=k[3])
    embedding(ctx, g, in_cache=0)                        # not a member
    h = frame(ctx, 7, 0.5, kind="inbetween", keyframe_id=k[7])
    embedding(ctx, h, in_cache=1)                        # a member, but not a keyframe's frame
    with ctx.reader.connect() as conn:
        got = ret.protected_keyframes(conn)
    assert got == {head_twin, k[0], k[1], k[2], k[4], k[5], k[6]}
    assert not set(pend.values()) & got


def test_protected_keyframes_of_an_empty_ledger(make_ctx):
    ctx = make_ctx()
    keyframe(ctx, 0, state="executing", path=None)
    with ctx.reader.connect() as conn:
        assert ret.protected_keyframes(conn) == set()
        assert ret.needed_latents(conn) == set()


# ---------------------------------------------------------------- keyframe images

def test_prune_keyframe_images_past_the_horizon_but_never_a_protected_one(make_ctx):
    ctx = make_ctx("[storage]\nkeyframe_hours = 2\n")
    cut = NOW - 2 * HOUR
    k = {c: keyframe(ctx, c, size=(300, 200)) for c in range(5)}       # all old
    k[5] = keyframe(ctx, 5, size=(300, 200), mode="RGBA")             # JPEG has no alpha
    keyframe(ctx, 6, state="available", path=None, parent_id=k[1])     # k1: a parent
    batch(ctx, k[2], k[3], state="available")                          # k2, k3: batch ends
    f = frame(ctx, 0, 0.0, kind="keyframe", keyframe_id=k[0])
    embedding(ctx, f, in_cache=1)                                      # k0: a member's picture
    at_cut = keyframe(ctx, 10, at=cut)                                 # exactly the horizon
    young = keyframe(ctx, 11, at=cut + timedelta(seconds=1))
    no_time = keyframe(ctx, 12, completed_at=None)
    failed = keyframe(ctx, 13, state="discarded")                      # not completed
    done = keyframe(ctx, 14, pruned_at=OLD)                            # already pruned
    head = keyframe(ctx, 15)                                           # the chain's head
    sizes = {c: fsize(ctx, f"keyframes/k{c}.png") for c in (4, 5)}
    report = PassReport(keyframe_images=1, freed=5)

    assert ret.prune_keyframe_images(ctx, NOW, report=report) == 2

    rows = {r.id: r for r in sql(ctx, "SELECT id, pruned_at, thumb_path, path FROM keyframes")}
    pruned = {i for i, r in rows.items() if r.pruned_at is not None}
    assert pruned == {k[4], k[5], done}
    for c in (4, 5):
        r = rows[k[c]]
        assert r.pruned_at.startswith(str(NOW)[:19])
        assert r.thumb_path == f"thumbs/k{c:06d}-{k[c]}.jpg"
        assert r.path == f"keyframes/k{c}.png"                        # the row keeps it
        assert not exists(ctx, f"keyframes/k{c}.png")
        with Image.open(ctx.cfg.data_dir / r.thumb_path) as im:
            assert im.format == "JPEG" and im.size == (128, 85)
    others = {0: k[0], 1: k[1], 2: k[2], 3: k[3], 10: at_cut, 11: young, 12: no_time,
              13: failed, 14: done, 15: head}
    for c, kid in others.items():
        assert exists(ctx, f"keyframes/k{c}.png"), c
        assert rows[kid].thumb_path is None and rows[kid].path == f"keyframes/k{c}.png"
    assert report.keyframe_images == 3 and report.freed == 5 + sizes[4] + sizes[5]
    assert sorted(p.name for p in (ctx.cfg.data_dir / "thumbs").iterdir()) == [
        f"k000004-{k[4]}.jpg", f"k000005-{k[5]}.jpg"]
    assert ret.prune_keyframe_images(ctx, NOW) == 0      # idempotent


def test_prune_keyframe_images_without_thumbnails_and_of_a_broken_image(make_ctx, caplog):
    ctx = make_ctx("[storage]\nkeyframe_hours = 1\nthumbnails = false\n")
    a = keyframe(ctx, 0)
    keyframe(ctx, 5)                                     # head
    assert ret.prune_keyframe_images(ctx, NOW) == 1
    assert sql(ctx, "SELECT thumb_path FROM keyframes WHERE id=:i", i=a) == [(None,)]
    assert not (ctx.cfg.data_dir / "thumbs").exists() and not exists(ctx, "keyframes/k0.png")

    ctx = make_ctx("[storage]\nkeyframe_hours = 1\n")
    b = keyframe(ctx, 1)
    (ctx.cfg.data_dir / "keyframes/k1.png").write_bytes(b"not an image")
    with caplog.at_level("WARNING", logger="dreamd.storage"):
        assert ret.prune_keyframe_images(ctx, NOW) == 1     # the image still goes
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("keyframe 1: no thumbnail (") and "k1.png" in m for m in said), said
    assert sql(ctx, "SELECT thumb_path, pruned_at IS NOT NULL FROM keyframes WHERE id=:i",
               i=b) == [(None, 1)]
    assert not exists(ctx, "keyframes/k1.png")


def test_prune_keyframe_images_zero_hours_keeps_and_the_budget_takes_oldest_first(make_ctx):
    ctx = make_ctx("[storage]\nkeyframe_hours = 0\n")
    k = {c: keyframe(ctx, c) for c in range(6)}
    batch(ctx, k[0], k[1], state="executing")            # protected: 0 and 1
    assert ret.prune_keyframe_images(ctx, NOW) == 0
    assert ret.prune_keyframe_images(ctx, NOW, budget_bytes=0) == 0
    one = fsize(ctx, "keyframes/k2.png")
    assert all(fsize(ctx, f"keyframes/k{c}.png") == one for c in range(6))
    report = PassReport()
    assert ret.prune_keyframe_images(ctx, NOW, budget_bytes=one + 1, report=report) == 2
    pruned = {i for i, in sql(ctx, "SELECT id FROM keyframes WHERE pruned_at IS NOT NULL")}
    assert pruned == {k[2], k[3]} and report.freed == 2 * one
    assert {p.name for p in (ctx.cfg.data_dir / "keyframes").iterdir()} == {
        "k0.png", "k1.png", "k4.png", "k5.png"}
    assert ret.prune_keyframe_images(ctx, NOW, budget_bytes=10 ** 12) == 1   # k4; k5 = head
    assert {p.name for p in (ctx.cfg.data_dir / "keyframes").iterdir()} == {
        "k0.png", "k1.png", "k5.png"}


def test_prune_thumbnails_only_over_budget_oldest_first(make_ctx):
    ctx = make_ctx()
    k = {}
    for c in range(4):
        rel = png(ctx, f"thumbs/t{c}.jpg")
        k[c] = keyframe(ctx, c, path=None, thumb_path=rel, pruned_at=OLD)
    keyframe(ctx, 9, path=None)                          # no thumbnail
    one = fsize(ctx, "thumbs/t0.jpg")
    report = PassReport(thumbnails=2, freed=1)
    assert ret.prune_thumbnails(ctx, 0, report) == 0
    assert ret.prune_thumbnails(ctx, one + 1, report) == 2
    left = {i for i, in sql(ctx, "SELECT id FROM keyframes WHERE thumb_path IS NOT NULL")}
    assert left == {k[2], k[3]}
    assert {p.name for p in (ctx.cfg.data_dir / "thumbs").iterdir()} == {"t2.jpg", "t3.jpg"}
    assert report.thumbnails == 4 and report.freed == 1 + 2 * one
    assert sql(ctx, "SELECT COUNT(*) FROM keyframes")[0][0] == 5     # rows stay


# ---------------------------------------------------------------- latents and blends

def test_prune_latents_keeps_what_pending_batches_and_the_head_need(make_ctx):
    ctx = make_ctx()
    report = PassReport(latents=1)
    assert ret.prune_latents(ctx, report) == 0           # no folder yet
    a = keyframe(ctx, 0, sha256="aaa")
    b = keyframe(ctx, 1, sha256="bbb")
    c = keyframe(ctx, 2, sha256="ccc")
    keyframe(ctx, 3, sha256="ddd")                       # the head
    keyframe(ctx, 4, sha256="eee", state="executing")    # pending: not the head
    batch(ctx, a, b, state="retryable")
    batch(ctx, b, c, state="completed")
    d = ctx.cfg.data_dir / "latents"
    d.mkdir()
    names = ["aaa-taesd.pt", "aaa-vae.pt", "bbb-taesd.pt", "ccc-taesd.pt", "ddd-taesd.pt",
             "eee-taesd.pt", "xaaa-taesd.pt", "ccc-fresh.pt", "ccc-2s.pt"]
    for n in names:
        (d / n).write_bytes(b"x" * 10)
        age(d / n, 60)
    age(d / "ccc-2s.pt", ret.LATENT_GRACE + 0.6)
    age(d / "ccc-fresh.pt", 0)
    assert ret.prune_latents(ctx, report) == 4
    assert sorted(p.name for p in d.iterdir()) == [
        "aaa-taesd.pt", "aaa-vae.pt", "bbb-taesd.pt", "ccc-fresh.pt", "ddd-taesd.pt"]
    assert report.latents == 5 and report.freed == 40


def test_prune_blends_keeps_those_of_pending_injections(make_ctx):
    ctx = make_ctx()
    report = PassReport(blends=2)
    assert ret.prune_blends(ctx, report) == 0            # no folder yet
    d = ctx.cfg.data_dir / "injections"
    d.mkdir()
    for n in ("pending.png", "done.png", "other.png", "fresh.png", "grace.png", "img.png"):
        (d / n).write_bytes(b"y" * 7)
        age(d / n, 120)
    age(d / "fresh.png", 0)
    age(d / "grace.png", ret.FILE_GRACE + 0.6)
    keyframe(ctx, 0, state="executing", path=None, source="injection",
             input_path="injections/pending.png")
    keyframe(ctx, 1, path=None, source="injection", input_path="injections/done.png")
    keyframe(ctx, 2, state="available", path=None, source="img2img",
             input_path="injections/img.png")
    assert ret.prune_blends(ctx, report) == 4
    assert sorted(p.name for p in d.iterdir()) == ["fresh.png", "pending.png"]
    assert report.blends == 6 and report.freed == 28


# ---------------------------------------------------------------- rows

def test_prune_rows_frame_horizon(make_ctx):
    ctx = make_ctx("[storage]\nframe_history_hours = 1\nhistory_days = 0\n"
                   "[cache]\ncollapse_window = 2\n")
    old, new = NOW - HOUR - timedelta(minutes=1), NOW - HOUR + timedelta(minutes=1)
    kept = ret.EMBEDDINGS_KEPT + 4 * 2
    f = {}
    f["old"] = frame(ctx, 0, 0.0, "evicted", at=old, file=False)
    f["new"] = frame(ctx, 0, 0.1, "evicted", at=new, file=False)
    f["shown"] = frame(ctx, 0, 0.2, "shown", at=old, file=False)
    f["ready"] = frame(ctx, 0, 0.3, "ready", at=old, file=False)
    f["member"] = frame(ctx, 0, 0.4, "evicted", at=old, file=False)
    f["emb"] = frame(ctx, 0, 0.5, "evicted", at=old, file=False)     # its embedding goes too
    f["emb_live"] = frame(ctx, 0, 0.6, "evicted", at=old, file=False)
    f["source"] = frame(ctx, 0, 0.7, "evicted", at=old, file=False)
    f["screen"] = frame(ctx, 0, 0.8, "evicted", at=old, file=False)
    playhead(ctx, f["screen"], 0, 0.8)
    kf = keyframe(ctx, 0, path=None, at=new)
    with ctx.engine.begin() as conn:
        conn.execute(insert(Injection.__table__).values(
            keyframe_id=kf, kind="cache", source_frame_id=f["source"], reason="forced",
            weight=0.5, created_at=old))
    e = {}
    e["member"] = embedding(ctx, f["member"], in_cache=1, at=old)
    e["emb"] = embedding(ctx, f["emb"], state="discarded", at=old)
    e["emb_live"] = embedding(ctx, f["emb_live"], state="executing", at=old)
    e["cancelled"] = embedding(ctx, f["shown"], state="cancelled", at=old)
    e["new"] = embedding(ctx, f["shown"], at=new)
    top = 1000
    e["edge"] = embedding(ctx, f["shown"], at=old, id=top - kept)         # oldest kept-out
    e["within"] = embedding(ctx, f["shown"], at=old, id=top - kept + 1)   # among the newest
    e["top"] = embedding(ctx, f["ready"], at=new, id=top)
    transitions_before = sql(ctx, "SELECT id, at FROM transitions")
    report = PassReport(rows={"frames": 600, "controls": 3})

    assert ret.prune_rows(ctx, NOW, report) is False

    left_f = {i for i, in sql(ctx, "SELECT id FROM frames")}
    assert left_f == set(f.values()) - {f["old"], f["emb"]}
    left_e = {i for i, in sql(ctx, "SELECT id FROM embeddings")}
    assert left_e == set(e.values()) - {e["emb"], e["cancelled"], e["edge"]}
    cut = str(NOW - HOUR)
    left_t = {i for i, in sql(ctx, "SELECT id FROM transitions")}
    assert left_t == {i for i, at in transitions_before if at >= cut}
    assert 0 < len(left_t) < len(transitions_before)
    dropped = len(transitions_before) - len(left_t)
    assert report.rows == {"frames": 602, "controls": 3, "embeddings": 3,
                           "transitions": dropped}
    assert sql(ctx, "SELECT COUNT(*) FROM keyframes")[0][0] == 1      # history_days = 0


def test_prune_rows_history_days_children_first(make_ctx):
    ctx = make_ctx("[storage]\nframe_history_hours = 0\nhistory_days = 1\n")
    old, new = NOW - timedelta(days=1, minutes=1), NOW - timedelta(hours=23)
    k = {c: keyframe(ctx, c, at=old) for c in (0, 2, 3, 4, 5)}
    thumb = png(ctx, "thumbs/t1.jpg")
    # an image pruned long ago: its path is not deleted again (here a file has taken it)
    k[1] = keyframe(ctx, 1, path=png(ctx, "keyframes/k1-stale.png"), at=old, pruned_at=old,
                    thumb_path=thumb)
    kn = keyframe(ctx, 7, at=new)                        # young
    kp = keyframe(ctx, 8, state="executing", at=old)     # pending
    head = keyframe(ctx, 9, at=old)                      # the chain's head
    child = keyframe(ctx, 10, state="discarded", path=None, parent_id=k[0], at=new)
    b_old = batch(ctx, k[2], k[3], at=old)               # goes, then its ends can go
    b_framed = batch(ctx, k[4], k[5], at=old)            # a frame names it: stays
    frame(ctx, 4, 0.5, "evicted", interpolation_id=b_framed, file=False)
    b_pending = batch(ctx, kn, kp, state="executing", at=old)
    with ctx.engine.begin() as conn:
        for kid in (k[0], kn):
            conn.execute(insert(Injection.__table__).values(
                keyframe_id=kid, kind="seed", reason="forced", weight=0.5, created_at=old))
        cids = {}
        for name, state, at in (("applied", "applied", old), ("rejected", "rejected", old),
                                ("waiting", "available", old), ("young", "applied", new)):
            cids[name] = tr.create(conn, "control", {"command": "pause", "created_at": at})
            conn.execute(text("UPDATE controls SET state=:s WHERE id=:i"),
                         {"s": state, "i": cids[name]})
    n_transitions = sql(ctx, "SELECT COUNT(*) FROM transitions")[0][0]
    freed = sum(fsize(ctx, f"keyframes/k{c}.png") for c in (0, 2, 3)) + fsize(ctx, thumb)
    report = PassReport()

    assert ret.prune_rows(ctx, NOW, report) is False

    gone_k = {k[0], k[1], k[2], k[3]}
    assert {i for i, in sql(ctx, "SELECT id FROM keyframes")} == (
        set(k.values()) | {kn, kp, head, child}) - gone_k
    assert {i for i, in sql(ctx, "SELECT id FROM interpolations")} == {b_framed, b_pending}
    assert b_old not in {b_framed, b_pending}
    assert {i for i, in sql(ctx, "SELECT id FROM controls")} == {cids["waiting"],
                                                                 cids["young"]}
    assert sql(ctx, "SELECT keyframe_id FROM injections") == [(kn,)]
    assert sql(ctx, "SELECT parent_id FROM keyframes WHERE id=:i", i=child) == [(None,)]
    assert {p.name for p in (ctx.cfg.data_dir / "keyframes").iterdir()} == {
        "k1-stale.png", "k4.png", "k5.png", "k7.png", "k8.png", "k9.png"}
    assert not exists(ctx, thumb)
    assert report.rows == {"controls": 2, "governor_decisions": 0, "interpolations": 1,
                           "keyframes": 4}
    assert report.freed == freed
    assert sql(ctx, "SELECT COUNT(*) FROM transitions")[0][0] == n_transitions


def test_prune_rows_takes_quality_rows_with_what_they_measure(make_ctx):
    """A keyframe's or a batch's quality row goes with it, at its horizon (ON DELETE
    CASCADE), never before and never alone."""
    ctx = make_ctx("[storage]\nframe_history_hours = 0\nhistory_days = 1\n")
    old, new = NOW - timedelta(days=1, minutes=1), NOW - timedelta(hours=23)
    k0, k1 = keyframe(ctx, 0, at=old), keyframe(ctx, 1, at=old)
    k2 = keyframe(ctx, 2, at=new)
    head = keyframe(ctx, 3, at=old)                          # the chain's head stays
    b_old, b_new = batch(ctx, k0, k1, at=old), batch(ctx, k2, head, at=new)
    with ctx.engine.begin() as conn:
        q = {}
        for name, entity, kid, bid in (("k0", "keyframe", k0, None), ("k1", "keyframe", k1, None),
                                       ("k2", "keyframe", k2, None),
                                       ("head", "keyframe", head, None),
                                       ("b_old", "segment", None, b_old),
                                       ("b_new", "segment", None, b_new)):
            # measured long after the row it describes: the row's age decides
            q[name] = conn.execute(insert(Quality.__table__).values(
                entity=entity, chain_index=0, keyframe_id=kid, interpolation_id=bid,
                motion=1.0, created_at=new)).inserted_primary_key[0]
    ret.prune_rows(ctx, NOW, PassReport())
    assert {i for i, in sql(ctx, "SELECT id FROM keyframes")} == {k2, head}
    assert {i for i, in sql(ctx, "SELECT id FROM interpolations")} == {b_new}
    assert {i for i, in sql(ctx, "SELECT id FROM quality")} == {q["k2"], q["head"], q["b_new"]}
    ctx.cfg.storage.history_days = 0                        # 0 = keep every row
    ret.prune_rows(ctx, NOW + timedelta(days=365), PassReport())
    assert sql(ctx, "SELECT COUNT(*) FROM quality")[0][0] == 3


def test_prune_rows_zero_keeps_everything(make_ctx):
    ctx = make_ctx("[storage]\nframe_history_hours = 0\nhistory_days = 0\n")
    keyframe(ctx, 0, at=OLD - timedelta(days=3000))
    keyframe(ctx, 1, at=OLD - timedelta(days=3000))
    frame(ctx, 0, 0.0, "evicted", at=OLD - timedelta(days=3000), file=False)
    before = sql(ctx, "SELECT (SELECT COUNT(*) FROM keyframes), (SELECT COUNT(*) FROM frames),"
                      " (SELECT COUNT(*) FROM transitions)")
    report = PassReport()
    assert ret.prune_rows(ctx, NOW, report) is False
    assert report.rows == {} and report.freed == 0
    assert sql(ctx, "SELECT (SELECT COUNT(*) FROM keyframes), (SELECT COUNT(*) FROM frames),"
                    " (SELECT COUNT(*) FROM transitions)") == before


def test_prune_rows_works_in_batches(make_ctx):
    ctx = make_ctx("[storage]\nframe_history_hours = 1\nhistory_days = 0\n")
    with ctx.engine.begin() as conn:
        conn.execute(text("INSERT INTO transitions (entity, entity_id, to_state, at) "
                          "VALUES ('frame', :i, 'ready', :at)"),
                     [{"i": i, "at": str(OLD)} for i in range(ret.BATCH + 1)])
    last = sql(ctx, "SELECT MAX(id) FROM transitions")[0][0]
    report = PassReport()
    assert ret.prune_rows(ctx, NOW, report) is True      # a full batch: more to come
    assert sql(ctx, "SELECT id FROM transitions") == [(last,)]
    assert ret.prune_rows(ctx, NOW, report) is False
    assert sql(ctx, "SELECT id FROM transitions") == []
    assert report.rows["transitions"] == ret.BATCH + 1


# ---------------------------------------------------------------- one pass

def _pass_setup(ctx):
    """A stale latent, a stale blend, 15 shown frames (5 beyond KEEP_SHOWN_MIN), keyframe
    images and thumbnails, all sizes known."""
    d = ctx.cfg.data_dir
    (d / "latents").mkdir()
    (d / "latents" / "zzz-taesd.pt").write_bytes(b"L" * 1000)
    age(d / "latents" / "zzz-taesd.pt", 60)
    (d / "injections").mkdir()
    (d / "injections" / "b.png").write_bytes(b"B" * 500)
    age(d / "injections" / "b.png", 60)
    ids = [frame(ctx, c, 0.0) for c in range(16)]
    playhead(ctx, ids[-1], 15, 0.0)
    k = {c: keyframe(ctx, c, at=NOW - timedelta(minutes=5)) for c in range(3)}  # k2: head
    for c in range(2):
        rel = png(ctx, f"thumbs/t{c}.jpg")
        keyframe(ctx, 100 + c, state="discarded", path=None, thumb_path=rel, pruned_at=OLD)
    return k


def test_run_pass_spends_the_budget_in_order(make_ctx):
    ctx = make_ctx("[display]\nmax_output_frames = 100\n[storage]\nkeyframe_hours = 0\n"
                   "frame_history_hours = 0\nhistory_days = 0\n")
    _pass_setup(ctx)
    frame_b = fsize(ctx, "frames/0-0.0.png")
    # no budget: only the stale latent and blend go
    r = ret.run_pass(ctx, now=NOW)
    assert (r.latents, r.blends, r.frames, r.keyframe_images, r.thumbnails) == (1, 1, 0, 0, 0)
    assert r.freed == 1500 and r.rows == {} and r.any()
    _pass_setup_again(ctx)
    r = ret.run_pass(ctx, over_budget=1500, now=NOW)     # latent + blend pay for it all
    assert (r.latents, r.blends, r.frames, r.keyframe_images, r.thumbnails) == (1, 1, 0, 0, 0)
    _pass_setup_again(ctx)
    r = ret.run_pass(ctx, over_budget=1500 + frame_b + 1, now=NOW)
    assert (r.latents, r.blends, r.frames, r.keyframe_images, r.thumbnails) == (1, 1, 2, 0, 0)
    assert {c for (c, _), s in states(ctx).items() if s == "evicted"} == {0, 1}
    assert r.freed == 1500 + 2 * frame_b
    r = ret.run_pass(ctx, now=NOW)
    assert not r.any() and r.freed == 0


def _pass_setup_again(ctx):
    d = ctx.cfg.data_dir
    (d / "latents" / "zzz-taesd.pt").write_bytes(b"L" * 1000)
    age(d / "latents" / "zzz-taesd.pt", 60)
    (d / "injections" / "b.png").write_bytes(b"B" * 500)
    age(d / "injections" / "b.png", 60)


def test_run_pass_reaches_keyframes_then_thumbnails_and_prunes_rows(make_ctx):
    ctx = make_ctx("[display]\nmax_output_frames = 100\n[storage]\nkeyframe_hours = 0\n"
                   "thumbnails = false\nframe_history_hours = 1\nhistory_days = 0\n")
    k = _pass_setup(ctx)
    frame_b = fsize(ctx, "frames/0-0.0.png")
    kf_b = fsize(ctx, "keyframes/k0.png")
    thumb_b = fsize(ctx, "thumbs/t0.jpg")
    frames_all = 5 * frame_b
    with ctx.engine.begin() as conn:                    # history past the horizon
        conn.execute(text("INSERT INTO transitions (entity, entity_id, to_state, at) "
                          "VALUES ('frame', 1, 'ready', :at)"), {"at": str(OLD)})
    # everything evictable but one thumbnail's worth: the keyframe images k0, k1 (k2 is
    # the head) and the first thumbnail
    r = ret.run_pass(ctx, over_budget=1500 + frames_all + 2 * kf_b + 1, now=NOW)
    assert (r.latents, r.blends, r.frames, r.keyframe_images, r.thumbnails) == (1, 1, 5, 2, 1)
    assert r.freed == 1500 + frames_all + 2 * kf_b + thumb_b
    assert {i for i, in sql(ctx, "SELECT id FROM keyframes WHERE pruned_at IS NULL "
                                 "AND path IS NOT NULL")} == {k[2]}
    assert sorted(p.name for p in (ctx.cfg.data_dir / "thumbs").iterdir()) == ["t1.jpg"]
    assert r.rows.get("transitions", 0) >= 1
    assert sql(ctx, "SELECT COUNT(*) FROM transitions WHERE at < :c", c=str(NOW - HOUR)) == [(0,)]


def _bulk_frames(ctx, chains, state: str) -> None:
    """Frame rows without files (a pass finds them gone: 0 bytes each), fast."""
    with ctx.engine.begin() as conn:
        conn.execute(text("INSERT INTO frames (chain_index, t, kind, path, state, created_at) "
                          "VALUES (:c, 0.0, 'inbetween', :p, :s, :at)"),
                     [{"c": c, "p": f"frames/{c}.png", "s": state, "at": str(OLD)}
                      for c in chains])


def test_evict_frames_works_in_batches(make_ctx):
    ctx = make_ctx("[display]\nmax_output_frames = 10\n")
    _bulk_frames(ctx, range(1000, 1512), "shown")        # 502 beyond the limit
    _bulk_frames(ctx, range(0, 501), "ready")            # 501 behind the playhead
    _bulk_frames(ctx, [2000], "shown")
    playhead(ctx, None, 2000, 0.5)

    def evicted():
        return {c for c, in sql(ctx, "SELECT chain_index FROM frames WHERE state='evicted'")}

    assert ret.evict_frames(ctx) == 2 * ret.BATCH
    # the newest 500 beyond the limit, and 500 of those behind: one batch of each
    # (the newest 10 shown are 2000 and 1511..1503)
    assert evicted() & set(range(1000, 1512)) == set(range(1003, 1503))
    assert len(evicted() & set(range(501))) == ret.BATCH
    assert ret.evict_frames(ctx) == 3 + 1
    assert evicted() == set(range(501)) | set(range(1000, 1503))


def test_evict_frames_over_budget_looks_at_four_batches(make_ctx):
    ctx = make_ctx("[display]\nmax_output_frames = 100\n")
    _bulk_frames(ctx, range(4 * ret.BATCH + 12), "shown")
    # files already gone free nothing, so the budget takes all it may look at in a pass
    assert ret.evict_frames(ctx, budget_bytes=1) == 4 * ret.BATCH
    shown_left = {c for c, in sql(ctx, "SELECT chain_index FROM frames WHERE state='shown'")}
    n = 4 * ret.BATCH + 12
    # the oldest 2,000 went: the two left besides the newest are the youngest of the rest
    assert shown_left == set(range(n - ret.KEEP_SHOWN_MIN - 2, n))


def test_evict_frames_over_budget_takes_the_oldest_of_more_than_a_pass_reads(make_ctx):
    """With `display.max_output_frames` above four batches, the budget still takes the
    oldest shown frame first, not the oldest of the newest 2,010."""
    ctx = make_ctx("[display]\nmax_output_frames = 100000\n")
    _bulk_frames(ctx, range(4 * ret.BATCH + 20), "shown")
    png(ctx, "frames/0.png")                             # the oldest: the only bytes there
    assert ret.evict_frames(ctx, budget_bytes=1) == 1
    assert sql(ctx, "SELECT chain_index FROM frames WHERE state='evicted'") == [(0,)]
    assert not exists(ctx, "frames/0.png")


def _bulk_keyframes(ctx, chains) -> None:
    """Completed keyframe rows without files (a pass finds them gone: 0 bytes each), old."""
    with ctx.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO keyframes (chain_index, state, backend, theme, prompt, negative_prompt,"
            " seed, denoise, source, path, width, height, attempt, max_attempts, scheduled_at,"
            " created_at, completed_at) VALUES (:c, 'completed', 't', 't', 'p', '', 1, 0.3,"
            " 'img2img', :p, 8, 8, 1, 3, :at, :at, :at)"),
            [{"c": c, "p": f"keyframes/{c}.png", "at": str(OLD)} for c in chains])


def _bulk_members(ctx, chains) -> None:
    """The keyframes of these chain indexes made cache members' pictures: each gets its
    keyframe frame and an embedding in the cache."""
    with ctx.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO frames (chain_index, t, kind, keyframe_id, path, state, created_at) "
            "SELECT chain_index, 0.0, 'keyframe', id, path, 'shown', :at FROM keyframes "
            "WHERE chain_index IN (SELECT value FROM json_each(:chains))"),
            {"at": str(OLD), "chains": json.dumps(list(chains))})
        conn.execute(text(
            "INSERT INTO embeddings (frame_id, model, in_cache, state, attempt, max_attempts,"
            " scheduled_at, created_at) SELECT f.id, 'm', 1, 'completed', 1, 3, :at, :at "
            "FROM frames f WHERE f.kind = 'keyframe' "
            "AND f.chain_index IN (SELECT value FROM json_each(:chains))"),
            {"at": str(OLD), "chains": json.dumps(list(chains))})


def test_prune_keyframe_images_works_in_batches(make_ctx):
    ctx = make_ctx("[storage]\nkeyframe_hours = 1\nthumbnails = false\n")
    _bulk_keyframes(ctx, range(ret.BATCH + 2))
    assert ret.prune_keyframe_images(ctx, NOW) == ret.BATCH
    left = {c for c, in sql(ctx, "SELECT chain_index FROM keyframes WHERE pruned_at IS NULL")}
    assert left == {ret.BATCH, ret.BATCH + 1}            # oldest first; the last is the head
    assert ret.prune_keyframe_images(ctx, NOW) == 1


def test_prune_keyframe_images_past_more_protected_ones_than_a_pass_reads(make_ctx):
    """Issue 20: a cache of `cache.max_size` >= 2,000 members holds more of the oldest
    images than the pass reads at once; the images after them still go, by age and by
    budget (the protected ones are left out before the limit, not after it)."""
    ctx = make_ctx("[storage]\nkeyframe_hours = 1\nthumbnails = false\n")
    members = range(4 * ret.BATCH + 10)                  # the oldest: all cache members
    _bulk_keyframes(ctx, members)
    _bulk_members(ctx, members)
    n = len(members)
    old = keyframe(ctx, n)                               # past the horizon
    young = keyframe(ctx, n + 1, at=NOW)                 # only the budget may take it
    head = keyframe(ctx, n + 2, at=NOW)
    with ctx.reader.connect() as conn:
        assert len(ret.protected_keyframes(conn)) == n + 1

    def pruned():
        return {i for i, in sql(ctx, "SELECT id FROM keyframes WHERE pruned_at IS NOT NULL")}

    report = PassReport()
    assert ret.prune_keyframe_images(ctx, NOW, report=report) == 1
    assert pruned() == {old} and not exists(ctx, f"keyframes/k{n}.png")
    assert report.freed > 0
    assert ret.prune_keyframe_images(ctx, NOW) == 0
    assert ret.prune_keyframe_images(ctx, NOW, budget_bytes=1) == 1
    assert pruned() == {old, young} and exists(ctx, f"keyframes/k{n + 2}.png")
    assert ret.prune_keyframe_images(ctx, NOW, budget_bytes=10 ** 12) == 0   # the head
    assert head not in pruned()


def test_prune_rows_takes_old_governor_decisions_but_keeps_the_newest(make_ctx):
    """The governor's decisions are history like the rest (storage.history_days); the
    newest stays whatever its age: it is what the governor resumes from."""
    from dreamd.ledger.models import GovernorDecision

    ctx = make_ctx("[storage]\nhistory_days = 7\n")
    GD = GovernorDecision.__table__
    with ctx.engine.begin() as conn:
        for at in (OLD, OLD + HOUR, NOW - HOUR, OLD + 2 * HOUR):     # the last is newest
            conn.execute(insert(GD).values(at=at, run_id=1, reason="slow_keyframes",
                                           message="m", interpolation_frames=10,
                                           resolution_divisor=1.0, fps=4.0))
    report = PassReport()
    ret.prune_rows(ctx, NOW, report)
    left = sql(ctx, "SELECT id FROM governor_decisions ORDER BY id")
    assert [r.id for r in left] == [3, 4]
    assert report.rows["governor_decisions"] == 2
    ctx.cfg.storage.history_days = 0                     # 0 = keep every row
    ret.prune_rows(ctx, NOW + timedelta(days=365), PassReport())
    assert len(sql(ctx, "SELECT id FROM governor_decisions")) == 2


# ---------------------------------------------------------------- the survivors of `make mutate`
# (bench/MUTATION.md): each test below pins a behaviour a mutant changed unseen.

def test_evict_frames_behind_the_playhead_when_no_shown_frame_is_over_the_limit(make_ctx):
    ctx = make_ctx("[display]\nmax_output_frames = 50\n")
    on = frame(ctx, 3, 0.5)                              # shown: well under the limit
    frame(ctx, 2, 0.25, "ready")                         # passed, never shown: goes
    frame(ctx, 3, 0.25, "ready")                         # passed in the playhead's segment
    frame(ctx, 3, 0.75, "ready")                         # ahead: stays
    frame(ctx, 4, 0.0, "ready")
    playhead(ctx, on, 3, 0.5)
    report = PassReport()
    assert ret.evict_frames(ctx, report=report) == 2
    assert states(ctx) == {(3, 0.5): "shown", (2, 0.25): "evicted", (3, 0.25): "evicted",
                           (3, 0.75): "ready", (4, 0.0): "ready"}
    assert frame_files(ctx) == {"3-0.5.png", "3-0.75.png", "4-0.0.png"}
    assert report.frames == 2


def test_evict_frames_keeps_the_latest_positions_within_a_segment(make_ctx):
    """Within one segment the newest shown is the highest t, whatever the ids say."""
    ctx = make_ctx("[display]\nmax_output_frames = 10\n")
    ts = [i / 13 for i in range(12, -1, -1)]             # ids in the reverse of t
    for t in ts:
        frame(ctx, 7, t)
    assert ret.evict_frames(ctx) == 3
    assert states(ctx) == {(7, t): "evicted" if t < 3 / 13 - 1e-9 else "shown" for t in ts}


def test_prune_keyframe_images_goes_past_a_protected_one_and_oldest_first(make_ctx):
    ctx = make_ctx("[storage]\nkeyframe_hours = 1\nthumbnails = false\n")
    k = {c: keyframe(ctx, c) for c in (4, 3, 2, 1, 0)}   # ids in the reverse of the chain
    f = frame(ctx, 0, 0.0, kind="keyframe", keyframe_id=k[0])
    embedding(ctx, f, in_cache=1)                        # k0: the oldest, but protected
    # k4 is the head; of k1..k3, over budget and young, the oldest goes first
    assert ret.prune_keyframe_images(ctx, NOW - 365 * 24 * HOUR,
                                     budget_bytes=1) == 1
    assert {i for i, in sql(ctx, "SELECT id FROM keyframes WHERE pruned_at IS NOT NULL")} == {
        k[1]}
    assert ret.prune_keyframe_images(ctx, NOW) == 2     # past the horizon: k2, k3
    assert {i for i, in sql(ctx, "SELECT id FROM keyframes WHERE pruned_at IS NULL")} == {
        k[0], k[4]}


def _hold(ctx, monkeypatch, point: str, fn, *args, **kwargs):
    """Run `fn` in a thread held at the fault point `point`; returns (release, join)."""
    monkeypatch.setenv("DREAMD_HOLD_AT", point)
    (ctx.cfg.data_dir / f"arm-{point}").touch()
    worker = threading.Thread(target=fn, args=args, kwargs=kwargs)
    worker.start()
    held = ctx.cfg.data_dir / f"held-at-{point}"
    wait_for(held.exists, timeout=60, what=f"the pass to reach {point}")

    def release():
        held.unlink()
        worker.join(timeout=60)
        assert not worker.is_alive()
    return release


def test_prune_keyframe_images_rows_before_files(make_ctx, monkeypatch):
    """A crash between the two leaves an orphan file (reconcile removes it), never a
    row that names an image it no longer has."""
    ctx = make_ctx("[storage]\nkeyframe_hours = 1\n")
    a = keyframe(ctx, 0)
    keyframe(ctx, 1)                                     # the head
    release = _hold(ctx, monkeypatch, "retention-images-pruned",
                    ret.prune_keyframe_images, ctx, NOW)
    try:
        assert sql(ctx, "SELECT pruned_at IS NOT NULL, thumb_path FROM keyframes WHERE id=:i",
                   i=a) == [(1, f"thumbs/k000000-{a}.jpg")]
        assert exists(ctx, "keyframes/k0.png")           # not yet deleted
        assert exists(ctx, f"thumbs/k000000-{a}.jpg")    # the thumbnail first of all
    finally:
        release()
    assert not exists(ctx, "keyframes/k0.png") and exists(ctx, "keyframes/k1.png")


def test_prune_rows_rows_before_files(make_ctx, monkeypatch):
    ctx = make_ctx("[storage]\nframe_history_hours = 0\nhistory_days = 1\n")
    a = keyframe(ctx, 0)
    keyframe(ctx, 1)                                     # the head
    release = _hold(ctx, monkeypatch, "retention-rows-pruned",
                    ret.prune_rows, ctx, NOW, PassReport())
    try:
        assert {i for i, in sql(ctx, "SELECT id FROM keyframes")} == {a + 1}
        assert exists(ctx, "keyframes/k0.png")
    finally:
        release()
    assert not exists(ctx, "keyframes/k0.png")


def test_prune_thumbnails_stops_when_exactly_enough_is_freed(make_ctx):
    ctx = make_ctx()
    assert ret.prune_thumbnails(ctx, 10 ** 9, PassReport()) == 0     # none there
    k = {c: keyframe(ctx, c, path=None, thumb_path=png(ctx, f"thumbs/t{c}.jpg"),
                     pruned_at=OLD) for c in range(3)}
    report = PassReport()
    assert ret.prune_thumbnails(ctx, fsize(ctx, "thumbs/t0.jpg"), report) == 1
    assert {i for i, in sql(ctx, "SELECT id FROM keyframes WHERE thumb_path IS NULL")} == {k[0]}


def test_prune_rows_adds_to_what_the_pass_already_counted(make_ctx):
    """run_pass calls prune_rows once a batch on one report: the counts add up."""
    ctx = make_ctx("[storage]\nframe_history_hours = 1\nhistory_days = 1\n[cache]\n"
                   "collapse_window = 2\n")
    f = frame(ctx, 0, 0.0, "evicted", file=False)
    g = frame(ctx, 1, 0.0, "evicted", file=False)        # no embedding: its row can go
    for i in range(34):                                  # the oldest 10 beyond the 24 kept
        embedding(ctx, f, at=OLD)
    with ctx.engine.begin() as conn:
        for state in ("applied", "rejected"):
            cid = tr.create(conn, "control", {"command": "pause", "created_at": OLD})
            conn.execute(text("UPDATE controls SET state=:s WHERE id=:i"), {"s": state, "i": cid})
    a = keyframe(ctx, 0)
    b = keyframe(ctx, 1)
    batch(ctx, a, b)
    keyframe(ctx, 5)                                     # the head
    keyframe(ctx, 2)                                     # an old keyframe nothing names
    assert sql(ctx, "SELECT COUNT(*) FROM keyframes") == [(4,)]
    seen = {"transitions": 1000, "embeddings": 100, "frames": 10, "controls": 7,
            "governor_decisions": 3, "interpolations": 5, "keyframes": 2}
    report = PassReport(rows=dict(seen))
    ret.prune_rows(ctx, NOW, report)
    got = {k: v - seen[k] for k, v in report.rows.items()}
    assert got["embeddings"] == 10 and got["frames"] == 1 and got["controls"] == 2
    assert got["interpolations"] == 1 and got["keyframes"] == 3      # the batch's ends too
    assert got["governor_decisions"] == 0 and got["transitions"] > 0
    assert sql(ctx, "SELECT id FROM frames") == [(f,)] and g != f


def test_prune_rows_without_any_completed_keyframe(make_ctx):
    """No head to keep: every old keyframe row nothing names goes, the first one too."""
    ctx = make_ctx("[storage]\nframe_history_hours = 0\nhistory_days = 1\n")
    ids = [keyframe(ctx, c, state=s, path=None) for c, s in enumerate(("discarded", "cancelled"))]
    assert ids[0] == 1
    report = PassReport()
    ret.prune_rows(ctx, NOW, report)
    assert sql(ctx, "SELECT id FROM keyframes") == [] and report.rows["keyframes"] == 2


def test_run_pass_prunes_rows_in_batches_within_its_time(make_ctx, monkeypatch):
    """Rows go one batch at a time, as many batches as ROWS_SECONDS allows a pass: one
    when it is spent at once, all of them when there is time."""
    ctx = make_ctx("[storage]\nframe_history_hours = 1\nhistory_days = 0\n")
    with ctx.engine.begin() as conn:
        conn.execute(text("INSERT INTO transitions (entity, entity_id, to_state, at) "
                          "VALUES ('frame', :i, 'ready', :at)"),
                     [{"i": i, "at": str(OLD)} for i in range(2 * ret.BATCH + 10)])
    monkeypatch.setattr(ret, "ROWS_SECONDS", 0.0)
    assert ret.run_pass(ctx, now=NOW).rows["transitions"] == ret.BATCH
    monkeypatch.setattr(ret, "ROWS_SECONDS", 600.0)
    assert ret.run_pass(ctx, now=NOW).rows["transitions"] == ret.BATCH + 10
    assert sql(ctx, "SELECT COUNT(*) FROM transitions WHERE at < :c", c=str(NOW - HOUR)) == [(0,)]


def test_ensure_incremental_vacuum_once_and_a_broken_ledger(tmp_path, caplog):
    import sqlite3

    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (x)")
    con.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(100)])
    con.commit()
    con.close()
    assert sqlite3.connect(db).execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    assert ret.ensure_incremental_vacuum(db) is True
    check = sqlite3.connect(db)
    assert check.execute("PRAGMA auto_vacuum").fetchone()[0] == 2          # INCREMENTAL
    assert check.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 100    # nothing lost
    check.close()
    assert ret.ensure_incremental_vacuum(db) is False                       # once

    broken = tmp_path / "broken.db"               # an error (here: not a database) is
    broken.write_bytes(b"not a ledger" * 100)     # said, and the file left as it was
    with caplog.at_level("WARNING", logger="dreamd.storage"):
        assert ret.ensure_incremental_vacuum(broken) is False
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"{broken}: could not turn on incremental vacuum (file is not a "
                            "database); will try at the next start") for m in said), said
    assert broken.read_bytes() == b"not a ledger" * 100


def test_prune_keyframe_images_by_their_own_age_when_completed_out_of_order(make_ctx):
    """With two ComfyUI servers a later keyframe can finish first: each goes by its own
    completion time, not by its place in the chain."""
    ctx = make_ctx("[storage]\nkeyframe_hours = 1\nthumbnails = false\n")
    young = keyframe(ctx, 0, completed_at=NOW - HOUR + timedelta(seconds=5))
    old = keyframe(ctx, 1, completed_at=NOW - 2 * HOUR)
    keyframe(ctx, 2)                                     # the head
    assert ret.prune_keyframe_images(ctx, NOW) == 1
    assert {i for i, in sql(ctx, "SELECT id FROM keyframes WHERE pruned_at IS NOT NULL")} == {
        old} and young != old


def test_prune_thumbnails_a_batch_at_a_time_oldest_first(make_ctx):
    ctx = make_ctx()
    with ctx.engine.begin() as conn:                     # ids in the reverse of the chain
        conn.execute(text(
            "INSERT INTO keyframes (chain_index, state, backend, theme, prompt, negative_prompt,"
            " seed, denoise, source, thumb_path, width, height, attempt, max_attempts,"
            " scheduled_at, created_at, completed_at, pruned_at) VALUES (:c, 'completed', 't',"
            " 't', 'p', '', 1, 0.3, 'img2img', :p, 8, 8, 1, 3, :at, :at, :at, :at)"),
            [{"c": c, "p": f"thumbs/{c}.jpg", "at": str(OLD)}
             for c in range(ret.BATCH + 1, -1, -1)])
    # the files are gone (0 bytes each), so the budget is never met: one batch a call
    assert ret.prune_thumbnails(ctx, 10 ** 9, PassReport()) == ret.BATCH
    left = {c for c, in sql(ctx, "SELECT chain_index FROM keyframes WHERE thumb_path IS NOT NULL")}
    assert left == {ret.BATCH, ret.BATCH + 1}


def test_prune_rows_counts_the_frames_it_deletes(make_ctx):
    ctx = make_ctx("[storage]\nframe_history_hours = 1\nhistory_days = 0\n")
    frame(ctx, 0, 0.0, "evicted", file=False)
    frame(ctx, 1, 0.0, "evicted", at=NOW, file=False)    # young: stays
    report = PassReport()
    ret.prune_rows(ctx, NOW, report)
    assert report.rows["frames"] == 1 and sql(ctx, "SELECT chain_index FROM frames") == [(1,)]
