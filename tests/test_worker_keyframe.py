"""The keyframe worker in-process, on a real ledger file, with the embedded procedural
backend and with ComfyUI doubles (real HTTP servers on 127.0.0.1): a keyframe is img2img
from the previous one, stored (file first, atomically) and completed together with the
interpolation batch of its pair; a failure is retried with backoff, a permanent error
discards it; ComfyUI's prompt id and server are in the ledger before they can be lost."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta

import pytest
from PIL import Image
from sqlalchemy import text

from dreamd.backends import KeyframeRequest
from dreamd.backends.procedural import ProceduralBackend
from dreamd.errors import PermanentBackendError
from dreamd.ledger import transitions as tr
from dreamd.workers import keyframe
from tests.comfyui_double import ComfyUIDouble
from tests.conftest import identity, wait_for, worker_context

CKPT = "random-sd15.safetensors"
CONFIG = """
[generation]
interpolation_frames = 3
steps = 4
cfg = 6.5
sampler = "euler"
scheduler = "karras"
max_attempts = 4
"""
W, H = 64, 32


@pytest.fixture
def ctx(db_path):
    for c in worker_context(db_path, CONFIG):
        c.woken = []
        c.wake = c.woken.append
        yield c


def rows(ctx, q: str, **params) -> list:
    with ctx.reader.connect() as conn:
        return conn.execute(text(q), params).all()


def plan(ctx, chain: int, *, input_path: str | None = None, backend: str = "procedural",
         size=(W, H), denoise: float = 0.4, max_attempts: int = 4, prompt_id=None) -> int:
    with ctx.engine.begin() as conn:
        return tr.create(conn, "keyframe", {
            "chain_index": chain, "backend": backend, "theme": "ethereal",
            "prompt": "a window of light", "negative_prompt": "blurry", "seed": 100 + chain,
            "denoise": denoise, "source": "img2img" if input_path else "seed",
            "input_path": input_path, "width": size[0], "height": size[1],
            "max_attempts": max_attempts, "prompt_id": prompt_id})


def row(ctx, kid: int):
    return rows(ctx, "SELECT * FROM keyframes WHERE id = :i", i=kid)[0]


def png(ctx, rel: str, size=(W, H), colour=(30, 120, 200), mode="RGB", fmt="PNG") -> str:
    path = ctx.cfg.data_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, fmt)
    return rel


def request_for(ctx, r, image=None) -> KeyframeRequest:
    return KeyframeRequest(chain_index=r.chain_index, width=r.width, height=r.height,
                           seed=r.seed, theme=r.theme, prompt=r.prompt,
                           negative_prompt=r.negative_prompt, denoise=r.denoise,
                           steps=4, cfg=6.5, sampler="euler", scheduler="karras", image=image)


def make_due(ctx, kid: int) -> None:
    """The backoff elapsed (as if time passed): the janitor's stage step is in claim."""
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE keyframes SET scheduled_at = '2000-01-01 00:00:00' "
                          "WHERE id = :i"), {"i": kid})


# ---------------------------------------------------------------- the chain

def test_keyframes_are_img2img_from_the_previous_one_and_make_the_pairs_batch(ctx):
    backend = ProceduralBackend()
    k0 = plan(ctx, 0)
    assert keyframe.tick(ctx, backend) == 1
    first = row(ctx, k0)
    assert (first.state, first.path, first.backend, first.server, first.prompt_id) == \
        ("completed", f"keyframes/k000000-{k0}.png", "procedural", None, None)
    data = (ctx.cfg.data_dir / first.path).read_bytes()
    assert first.sha256 == hashlib.sha256(data).hexdigest()
    assert first.generation_ms > 0 and first.attempt == 1 and first.error is None
    assert rows(ctx, "SELECT count(*) FROM interpolations") == [(0,)]   # no pair yet
    seed = ProceduralBackend().generate(request_for(ctx, first)).image
    with Image.open(ctx.cfg.data_dir / first.path) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (W, H))
        assert im.tobytes() == seed.tobytes()                  # txt2img: no input
    assert ctx.woken == ["interpolation", "planner", "embedding"]
    assert ctx.facts["generation_time"] == pytest.approx(first.generation_ms / 1000)

    k1 = plan(ctx, 1, input_path=first.path)
    assert keyframe.tick(ctx, backend) == 1
    second = row(ctx, k1)
    with Image.open(ctx.cfg.data_dir / first.path) as im:
        expected = ProceduralBackend().generate(request_for(ctx, second, im.convert("RGB")))
    with Image.open(ctx.cfg.data_dir / second.path) as im:
        assert im.tobytes() == expected.image.tobytes()       # img2img from keyframe 0
        assert im.tobytes() != ProceduralBackend().generate(
            request_for(ctx, second)).image.tobytes()
    batches = rows(ctx, "SELECT chain_index, from_keyframe_id, to_keyframe_id, n_frames, "
                        "divisor, max_attempts, state FROM interpolations")
    assert [tuple(b) for b in batches] == [(0, k0, k1, 3, 1.0, 4, "available")]
    created = rows(ctx, "SELECT worker FROM transitions WHERE entity = 'interpolation'")
    assert created == [(ctx.lease_owner("keyframe"),)]
    done = rows(ctx, "SELECT detail, worker FROM transitions WHERE entity = 'keyframe' "
                     "AND to_state = 'completed' ORDER BY id")
    assert json.loads(done[1].detail)["ms"] == round(second.generation_ms, 1)
    assert done[1].worker == ctx.lease_owner("keyframe")
    assert sorted(p.name for p in ctx.cfg.keyframes_dir.iterdir()) == \
        [f"k000000-{k0}.png", f"k000001-{k1}.png"]          # no temporary left behind


def test_the_pair_is_made_with_the_last_completed_keyframe_before_it(ctx):
    backend = ProceduralBackend()
    old = plan(ctx, 0)
    keyframe.tick(ctx, backend)
    again = plan(ctx, 0)                       # a second completed link 0 (a re-plan)
    keyframe.tick(ctx, backend)
    failed = plan(ctx, 0)                      # and one that never completed
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE keyframes SET state = 'discarded' WHERE id = :i"),
                     {"i": failed})
    png(ctx, "keyframes/other.png")
    plan(ctx, 2, input_path="keyframes/other.png")      # no link 1: no pair for it
    keyframe.tick(ctx, backend)
    assert rows(ctx, "SELECT count(*) FROM interpolations") == [(0,)]
    k1 = plan(ctx, 1, input_path=row(ctx, again).path)
    ctx.set_knobs({"generation.interpolation_frames": 7})     # `dreamd set` applies here
    keyframe.tick(ctx, backend)
    assert rows(ctx, "SELECT from_keyframe_id, to_keyframe_id, n_frames FROM "
                     "interpolations") == [(again, k1, 7)]
    assert old < again


def test_the_governors_choice_is_the_new_batchs(ctx):
    k0 = plan(ctx, 0)
    keyframe.tick(ctx, ProceduralBackend())
    ctx.set_knobs({"governor.enabled": True})
    ctx.facts["governor"] = {"interpolation_frames": 2, "resolution_divisor": 2.0}
    k1 = plan(ctx, 1, input_path=row(ctx, k0).path)
    keyframe.tick(ctx, ProceduralBackend())
    assert rows(ctx, "SELECT n_frames, divisor FROM interpolations WHERE to_keyframe_id = :i",
                i=k1) == [(2, 2.0)]


# ---------------------------------------------------------------- the input image

def test_load_input_reads_resizes_or_names_the_unusable_file(ctx, tmp_path):
    data = ctx.cfg.data_dir
    r = row(ctx, plan(ctx, 0))
    assert keyframe.load_input(r, W, H, data) is None
    rel = png(ctx, "keyframes/big.png", size=(128, 64), colour=(10, 200, 30), mode="RGBA")
    r = row(ctx, plan(ctx, 1, input_path=rel))
    im = keyframe.load_input(r, W, H, data)
    assert (im.mode, im.size, im.getpixel((3, 3))) == ("RGB", (W, H), (10, 200, 30))
    same = keyframe.load_input(r, 128, 64, data)
    assert same.size == (128, 64)
    missing = row(ctx, plan(ctx, 2, input_path="keyframes/gone.png"))
    with pytest.raises(PermanentBackendError) as err:
        keyframe.load_input(missing, W, H, data)
    assert str(err.value).startswith("input image keyframes/gone.png: [Errno 2] No such file")
    (data / "keyframes/bad.png").write_bytes(b"not an image")
    bad = row(ctx, plan(ctx, 3, input_path="keyframes/bad.png"))
    with pytest.raises(PermanentBackendError, match=r"^input image keyframes/bad.png: cannot "
                                                    r"identify image file"):
        keyframe.load_input(bad, W, H, data)


def test_an_input_image_it_may_not_read_waits_and_is_never_discarded(ctx):
    """Permission denied is the machine's condition, not the keyframe's fault: raised
    as it is (the worker postpones), not as a permanent error that discards."""
    from tests.test_ledger_unit import as_nobody

    rel = png(ctx, "keyframes/locked.png")
    (ctx.cfg.data_dir / rel).chmod(0o000)
    r = row(ctx, plan(ctx, 0, input_path=rel))
    with pytest.raises(PermissionError), as_nobody():
        keyframe.load_input(r, W, H, ctx.cfg.data_dir)


def test_input_png_is_the_files_bytes_only_when_they_are_an_rgb_png_of_the_size(ctx):
    data = ctx.cfg.data_dir
    assert keyframe.input_png(row(ctx, plan(ctx, 0)), W, H, data) is None
    good = png(ctx, "in/good.png")
    r = row(ctx, plan(ctx, 1, input_path=good))
    assert keyframe.input_png(r, W, H, data) == (data / good).read_bytes()
    assert keyframe.input_png(r, W * 2, H, data) is None             # another width
    assert keyframe.input_png(r, W, H * 2, data) is None             # another height
    for rel, kw in (("in/rgba.png", {"mode": "RGBA", "colour": (1, 2, 3, 4)}),
                    ("in/jpeg.jpg", {"fmt": "JPEG"})):
        r = row(ctx, plan(ctx, 2, input_path=png(ctx, rel, **kw)))
        assert keyframe.input_png(r, W, H, data) is None
    gone = row(ctx, plan(ctx, 3, input_path="in/none.png"))
    assert keyframe.input_png(gone, W, H, data) is None
    (data / "in/junk.png").write_bytes(b"junk")
    assert keyframe.input_png(row(ctx, plan(ctx, 4, input_path="in/junk.png")), W, H,
                              data) is None


def test_keyframe_path(ctx):
    assert keyframe.keyframe_path(ctx, 12, 345) == ctx.cfg.keyframes_dir / "k000012-345.png"


# ---------------------------------------------------------------- failures

def test_a_permanent_error_discards_the_keyframe_at_once(ctx):
    kid = plan(ctx, 0, size=(4, 4))            # the procedural backend's floor is 8
    assert keyframe.tick(ctx, ProceduralBackend()) == 0
    r = row(ctx, kid)
    assert (r.state, r.attempt, r.path) == ("discarded", 1, None)
    assert r.error == "procedural: size 4x4 is outside 8..8192"
    why = json.loads(rows(ctx, "SELECT detail FROM transitions WHERE entity = 'keyframe' "
                               "AND event = 'failed'")[0].detail)["why"]
    assert why == "permanent"
    assert ctx.woken == [] and "generation_time" not in ctx.facts


def test_an_unreadable_input_image_is_permanent(ctx):
    kid = plan(ctx, 1, input_path="keyframes/nowhere.png")
    keyframe.tick(ctx, ProceduralBackend())
    r = row(ctx, kid)
    assert r.state == "discarded"
    assert r.error.startswith("input image keyframes/nowhere.png: [Errno 2]")


def freeze_the_ledgers_clock(monkeypatch) -> None:
    """From now on the ledger's transitions happen at one instant: a backoff of seconds
    never ends by itself between two ticks, however slow the machine (make_due ends it)."""
    frozen = tr.utcnow()
    monkeypatch.setattr(tr, "utcnow", lambda: frozen)


def test_an_unexpected_failure_is_retried_with_backoff_until_attempts_run_out(ctx, monkeypatch):
    # the keyframes folder is a file: writing the image fails (not a condition of the
    # disk, so no postponing: a plain failure)
    ctx.cfg.keyframes_dir.parent.mkdir(parents=True, exist_ok=True)
    ctx.cfg.keyframes_dir.write_text("in the way")
    kid = plan(ctx, 0, max_attempts=3)
    freeze_the_ledgers_clock(monkeypatch)
    waits = []
    for attempt in (1, 2, 3):
        assert keyframe.tick(ctx, ProceduralBackend()) == 0
        r = row(ctx, kid)
        assert r.attempt == attempt
        assert r.error.startswith("FileExistsError: ") or r.error.startswith("NotADirectoryError")
        if attempt < 3:
            assert r.state == "retryable"
            at = rows(ctx, "SELECT at FROM transitions WHERE entity = 'keyframe' AND "
                           "event = 'failed' ORDER BY id DESC LIMIT 1")[0].at
            waits.append(datetime.fromisoformat(r.scheduled_at) - datetime.fromisoformat(at))
            assert keyframe.tick(ctx, ProceduralBackend()) == 0     # not due yet
            assert row(ctx, kid).attempt == attempt
            make_due(ctx, kid)
    assert row(ctx, kid).state == "discarded"
    assert waits == [timedelta(seconds=2), timedelta(seconds=4)]


def test_a_transient_error_is_retried_then_succeeds(ctx, monkeypatch):
    with ComfyUIDouble(checkpoints=[CKPT]) as double:
        backend = comfyui(ctx, [double.url])
        try:
            kid = plan(ctx, 0, backend="comfyui")
            freeze_the_ledgers_clock(monkeypatch)
            double.fail_next(10, status=500, method="POST", path="/prompt")
            assert keyframe.tick(ctx, backend) == 0
            r = row(ctx, kid)
            assert (r.state, r.attempt) == ("retryable", 1)
            assert "HTTP 500" in r.error
            why = json.loads(rows(ctx, "SELECT detail FROM transitions WHERE entity = "
                                       "'keyframe' AND event = 'failed'")[0].detail)["why"]
            assert why == "will retry"
            double.faults.fail.clear()
            make_due(ctx, kid)
            assert keyframe.tick(ctx, backend) == 1
        finally:
            backend.close()
    r = row(ctx, kid)
    assert (r.state, r.attempt, r.error) == ("completed", 2, None)


def test_a_transient_error_during_a_stop_records_no_failure(ctx):
    with ComfyUIDouble(checkpoints=[CKPT]) as double:
        backend = comfyui(ctx, [double.url])
        try:
            kid = plan(ctx, 0, backend="comfyui")
            with ctx.engine.begin() as conn:
                (claimed,) = tr.claim(conn, "keyframe", ctx.lease_owner("keyframe"),
                                      lease_seconds=30)
            double.fail_next(10, status=500, method="POST", path="/prompt")
            ctx.stopping.set()
            assert keyframe.process(ctx, backend, claimed, ctx.lease_owner("keyframe")) == 0
        finally:
            backend.close()
    r = row(ctx, kid)
    assert (r.state, r.error) == ("executing", None)      # the daemon releases it
    assert rows(ctx, "SELECT count(*) FROM transitions WHERE event = 'failed'") == [(0,)]


def test_a_result_of_the_wrong_size_is_permanent(ctx):
    with ComfyUIDouble(checkpoints=[CKPT]) as double:
        backend = comfyui(ctx, [double.url])
        try:
            kid = plan(ctx, 0, backend="comfyui")
            double.faults.output_size = (32, 32)
            keyframe.tick(ctx, backend)
        finally:
            backend.close()
    r = row(ctx, kid)
    assert r.state == "discarded"
    assert "32x32" in r.error and "64x32" in r.error


# ---------------------------------------------------------------- ComfyUI

def comfyui(ctx, urls):
    from dreamd.backends.comfyui import ComfyUIBackend
    return ComfyUIBackend(urls, checkpoint=CKPT, tries=1, poll_interval=0.01,
                          queue_check_interval=0.02, deadline=20.0, connect_timeout=2.0,
                          read_timeout=5.0, data_dir=ctx.cfg.data_dir,
                          bench_base=0.001, recent_bench_cap=0.001, sleep=lambda s: None)


def test_comfyui_gets_the_prompt_id_from_the_ledger_and_the_input_as_it_is(ctx):
    with ComfyUIDouble(checkpoints=[CKPT]) as double:
        backend = comfyui(ctx, [double.url])
        try:
            k0 = plan(ctx, 0, backend="comfyui")
            assert keyframe.tick(ctx, backend) == 1
            first = row(ctx, k0)
            k1 = plan(ctx, 1, backend="comfyui", input_path=first.path, denoise=0.5)
            assert keyframe.tick(ctx, backend) == 1
        finally:
            backend.close()
        posted = [r.body for r in double.requests if r.path == "/prompt" and r.method == "POST"]
        uploads = list(double.inputs.values())
    second = row(ctx, k1)
    assert [p["prompt_id"] for p in posted] == [first.prompt_id, second.prompt_id]
    assert first.prompt_id != second.prompt_id and len(first.prompt_id) == 36
    assert (first.server, second.server) == (double.url, double.url)
    assert (first.backend, second.backend) == ("comfyui", "comfyui")
    # the previous keyframe's file, uploaded byte for byte: no second PNG encode
    assert uploads == [(ctx.cfg.data_dir / first.path).read_bytes()]
    sampler = posted[1]["prompt"]["6"]["inputs"]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["denoise"],
            sampler["sampler_name"], sampler["scheduler"]) == (101, 4, 6.5, 0.5, "euler",
                                                              "karras")
    assert posted[1]["prompt"]["4"]["inputs"]["text"] == "a window of light"
    assert posted[1]["prompt"]["5"]["inputs"]["text"] == "blurry"
    assert rows(ctx, "SELECT from_keyframe_id, to_keyframe_id FROM interpolations") == [(k0, k1)]


def test_comfyui_reattaches_with_the_prompt_id_already_in_the_ledger(ctx):
    with ComfyUIDouble(checkpoints=[CKPT]) as double:
        backend = comfyui(ctx, [double.url])
        try:
            kid = plan(ctx, 0, backend="comfyui", prompt_id="0f0f0f0f-1111-2222-3333-444455556666")
            ctx.set_knobs({"generation.steps": 9, "generation.cfg": 3.0})
            assert keyframe.tick(ctx, backend) == 1
        finally:
            backend.close()
        posted = [r.body for r in double.requests if r.path == "/prompt" and r.method == "POST"]
    assert [p["prompt_id"] for p in posted] == ["0f0f0f0f-1111-2222-3333-444455556666"]
    assert row(ctx, kid).prompt_id == "0f0f0f0f-1111-2222-3333-444455556666"
    inputs = posted[0]["prompt"]["6"]["inputs"]
    assert (inputs["steps"], inputs["cfg"]) == (9, 3.0)        # live knobs, not the file's


def test_the_server_is_recorded_as_soon_as_the_backend_knows_it(ctx):
    kid = plan(ctx, 0, backend="comfyui")
    owner = ctx.lease_owner("keyframe")
    with ctx.engine.begin() as conn:
        tr.claim(conn, "keyframe", owner, lease_seconds=30)
    keyframe._server_recorder(ctx, kid, "someone else")("http://elsewhere:8188")
    assert row(ctx, kid).server is None                       # only by the lease holder
    keyframe._server_recorder(ctx, kid, owner)("http://here:8188")
    assert row(ctx, kid).server == "http://here:8188"


def process_after_a_theft(ctx, kid: int):
    """Claim keyframe `kid`, let another worker ('thief') take its lease, then process
    it as the first owner would go on doing: (frames made, the row claimed, its owner)."""
    owner = ctx.lease_owner("keyframe")
    with ctx.engine.begin() as conn:
        (claimed,) = tr.claim(conn, "keyframe", owner, lease_seconds=30)
        conn.execute(text("UPDATE keyframes SET lease_owner = 'thief' WHERE id = :i"),
                     {"i": kid})
    return keyframe.process(ctx, ProceduralBackend(), claimed, owner), claimed, owner


def test_a_keyframe_whose_lease_was_lost_is_not_completed(ctx):
    """Another worker took the row while the backend ran: the image stays unrecorded,
    no batch is made, and the row is the new holder's."""
    kid = plan(ctx, 0)
    done, claimed, owner = process_after_a_theft(ctx, kid)
    assert done == 0
    r = row(ctx, kid)
    assert (r.state, r.lease_owner, r.path) == ("executing", "thief", None)
    assert ctx.woken == [] and "generation_time" not in ctx.facts
    # and a failure reported for a lost lease changes nothing either
    keyframe._fail(ctx, claimed, owner, "boom", permanent=True)
    assert (row(ctx, kid).state, row(ctx, kid).error) == ("executing", None)


def test_the_image_is_on_disk_before_the_row_is_completed(ctx, monkeypatch, fsynced):
    from tests.test_worker_interpolation import held

    k0 = plan(ctx, 0)
    keyframe.tick(ctx, ProceduralBackend())
    k1 = plan(ctx, 1, input_path=row(ctx, k0).path)
    release = held(ctx, monkeypatch, "keyframe-written",
                   lambda: keyframe.tick(ctx, ProceduralBackend()))
    image = ctx.cfg.keyframes_dir / f"k000001-{k1}.png"
    assert image.is_file() and identity(image) in fsynced    # on the disk, not in a cache
    assert (row(ctx, k1).state, row(ctx, k1).path) == ("executing", None)
    assert rows(ctx, "SELECT count(*) FROM interpolations") == [(0,)]
    assert release() == 1
    assert row(ctx, k1).state == "completed"
    assert rows(ctx, "SELECT count(*) FROM interpolations") == [(1,)]


def test_comfyui_has_the_prompt_id_and_server_in_the_ledger_before_completion(ctx, monkeypatch):
    from tests.test_worker_interpolation import held

    with ComfyUIDouble(checkpoints=[CKPT], delay=0.2) as double:
        backend = comfyui(ctx, [double.url])
        try:
            kid = plan(ctx, 0, backend="comfyui")
            release = held(ctx, monkeypatch, "keyframe-written",
                           lambda: keyframe.tick(ctx, backend))
            r = row(ctx, kid)
            assert (r.state, r.server) == ("executing", double.url)
            assert [b.body["prompt_id"] for b in double.requests
                    if b.path == "/prompt" and b.method == "POST"] == [r.prompt_id]
            assert release() == 1
        finally:
            backend.close()
    r = row(ctx, kid)
    # the double takes 0.2 s per prompt: the keyframe's time includes it, in ms
    assert r.generation_ms >= 200 and ctx.facts["generation_time"] >= 0.2
    assert ctx.facts["generation_time"] == pytest.approx(r.generation_ms / 1000)


def test_a_prompt_id_is_never_written_over_another_workers_lease(ctx):
    with ComfyUIDouble(checkpoints=[CKPT]) as double:
        backend = comfyui(ctx, [double.url])
        try:
            kid = plan(ctx, 0, backend="comfyui")
            owner = ctx.lease_owner("keyframe")
            with ctx.engine.begin() as conn:
                (claimed,) = tr.claim(conn, "keyframe", owner, lease_seconds=30)
                conn.execute(text("UPDATE keyframes SET lease_owner = 'thief' WHERE id = :i"),
                             {"i": kid})
            assert keyframe.process(ctx, backend, claimed, owner) == 0
        finally:
            backend.close()
    r = row(ctx, kid)
    assert (r.prompt_id, r.server, r.state) == (None, None, "executing")


def test_the_backend_that_made_it_is_recorded(ctx):
    """A fallback backend may stand in: the row says which one made the image."""
    kid = plan(ctx, 0, backend="comfyui")
    keyframe.tick(ctx, ProceduralBackend())
    assert (row(ctx, kid).backend, row(ctx, kid).prompt_id) == ("procedural", None)


# ---------------------------------------------------------------- the machine's conditions

def fill(folder) -> None:
    """Fill the small file system at `folder` to the last byte."""
    try:
        (folder / "filler").write_bytes(b"\0" * (1 << 20))
    except OSError:
        pass


def test_a_full_disk_postpones_the_keyframe_without_using_an_attempt(ctx, tmp_path):
    from dreamd.conditions import DISK_FULL
    from tests.conftest import mount_tmpfs

    mounted = mount_tmpfs(ctx.cfg.keyframes_dir, "64k")
    folder = next(mounted)
    try:
        fill(folder)
        kid = plan(ctx, 0)
        assert keyframe.tick(ctx, ProceduralBackend()) == 0
        r = row(ctx, kid)
        assert (r.state, r.attempt) == ("retryable", 0)
        assert r.error.startswith("disk full: ")
        assert rows(ctx, "SELECT event FROM transitions WHERE entity = 'keyframe' "
                         "ORDER BY id DESC LIMIT 1") == [("postponed",)]
        assert ctx.conditions.active(DISK_FULL)
        (folder / "filler").unlink()
        make_due(ctx, kid)
        assert keyframe.tick(ctx, ProceduralBackend()) == 1
        assert row(ctx, kid).state == "completed"
        assert not ctx.conditions.active(DISK_FULL)        # the image was written: over
    finally:
        next(mounted, None)


# ---------------------------------------------------------------- the lease and the log

class RenewedWhileItWorks(ProceduralBackend):
    """The procedural backend, taking as long as its keyframe's lease needs to be renewed
    once (not a fixed time that a loaded machine may not renew within); it notes how far
    past the claim's own lease the renewal put the expiry."""

    def __init__(self, ctx, lease_seconds: float) -> None:
        self.ctx, self.lease_seconds, self.seen = ctx, lease_seconds, []

    def lag(self, kid: int) -> timedelta:
        started, expires = rows(self.ctx, "SELECT started_at, lease_expires_at FROM "
                                          "keyframes WHERE id = :i", i=kid)[0]
        return datetime.fromisoformat(expires) - datetime.fromisoformat(started)

    def generate(self, request):
        (kid,) = rows(self.ctx, "SELECT id FROM keyframes WHERE state = 'executing'")[0]
        self.seen.append(wait_for(
            lambda: self.lag(kid) > timedelta(seconds=self.lease_seconds) and self.lag(kid),
            timeout=60, what="the lease renewed while the backend works"))
        return super().generate(request)


def test_the_lease_is_renewed_while_the_backend_works(ctx, monkeypatch):
    ctx.cfg.generation.lease_seconds = 0.6
    monkeypatch.setenv("DREAMD_SLOW", "keyframe=0.5")          # and 0.5 s more, counted
    kid = plan(ctx, 0)
    backend = RenewedWhileItWorks(ctx, 0.6)
    assert keyframe.tick(ctx, backend) == 1, row(ctx, kid).error
    # renewed after the claim's own lease (which ends at started + 0.6 s)
    assert backend.seen and backend.seen[0] > timedelta(seconds=0.6)
    assert row(ctx, kid).generation_ms >= 500


def test_each_keyframe_logs_its_timing_line_for_the_bench(ctx, caplog):
    import logging
    import re
    import time

    kid = plan(ctx, 0)
    with caplog.at_level(logging.DEBUG, logger="dreamd.keyframe"):
        started = time.perf_counter()
        keyframe.tick(ctx, ProceduralBackend())
        wall_ms = (time.perf_counter() - started) * 1000
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("timing ")]
    assert len(lines) == 1
    assert re.fullmatch(rf"timing keyframe id={kid} generate_ms=[\d.]+ write_ms=[\d.]+ "
                        r"ledger_ms=[\d.]+ quality_ms=[\d.]+ ", lines[0]), lines[0]
    assert "keyframe 0 ready (ethereal, " in caplog.text
    assert 0 < row(ctx, kid).generation_ms <= wall_ms      # measured inside the call


def test_the_generation_time_recorded_is_the_calls_duration_in_ms(ctx, monkeypatch):
    """On a clock the test sets (a quarter second from start to end), so it is exact."""
    import types

    ticks = iter([100.0, 100.25])
    monkeypatch.setattr(keyframe, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    kid = plan(ctx, 0)
    assert keyframe.tick(ctx, ProceduralBackend()) == 1
    assert row(ctx, kid).generation_ms == 250.0
    (detail,) = rows(ctx, "SELECT detail FROM transitions WHERE entity = 'keyframe' "
                          "AND to_state = 'completed'")[0]
    assert json.loads(detail)["ms"] == 250.0
    assert ctx.facts["generation_time"] == 0.25


def test_a_failure_is_logged_with_what_became_of_the_keyframe(ctx, caplog):
    kid = plan(ctx, 0, size=(4, 4))
    with caplog.at_level("WARNING", logger="dreamd.keyframe"):
        keyframe.tick(ctx, ProceduralBackend())
    assert f"keyframe 0 (row {kid}) failed, now discarded: procedural: size 4x4 is outside " \
           f"8..8192" in [r.getMessage() for r in caplog.records]


def test_comfyui_reattaches_to_the_server_on_record_instead_of_posting_again(ctx):
    from tests.test_comfyui_backend import submit_directly

    rel = png(ctx, "keyframes/prev.png")
    with ComfyUIDouble(checkpoints=[CKPT]) as double:
        backend = comfyui(ctx, [double.url])
        try:
            pid = "11111111-2222-3333-4444-555555555555"
            kid = plan(ctx, 1, backend="comfyui", input_path=rel, prompt_id=pid)
            with ctx.engine.begin() as conn:           # an earlier daemon sent it there
                conn.execute(text("UPDATE keyframes SET server = :s WHERE id = :i"),
                             {"s": double.url, "i": kid})
            with Image.open(ctx.cfg.data_dir / rel) as im:
                req = request_for(ctx, row(ctx, kid), im.convert("RGB"))
            submit_directly(double, backend, KeyframeRequest(**{**req.__dict__,
                                                                "prompt_id": pid}))
            assert keyframe.tick(ctx, backend) == 1
        finally:
            backend.close()
        assert double.posts_for(pid) == 1              # the earlier one, never again
    assert row(ctx, kid).state == "completed"


class Facts(dict):
    """ctx.facts that keeps every keyframe_progress written into it: what status.json
    would show at each moment, without a look that must fall inside the prompt's run."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.progress: list = []

    def __setitem__(self, key, value) -> None:
        if key == "keyframe_progress":
            self.progress.append(value)
        super().__setitem__(key, value)


def test_the_daemons_comfyui_backend_shows_which_keyframe_is_in_progress(ctx):
    """status.json's keyframe_progress names the keyframe the worker asked for, while
    the prompt runs, and nothing once it is done."""
    from dreamd.backends.comfyui.daemon_backend import DaemonBackend

    ctx.facts = Facts(ctx.facts)
    with ComfyUIDouble(checkpoints=[CKPT], delay=0.5) as double:
        backend = DaemonBackend(comfyui(ctx, [double.url]), facts=ctx.facts)
        try:
            kid = plan(ctx, 5, backend="comfyui")
            assert keyframe.tick(ctx, backend) == 1
        finally:
            backend.close()
    assert row(ctx, kid).state == "completed"
    shown = ctx.facts.progress
    assert shown[:-1] and {p["keyframe"] for p in shown[:-1]} == {5}, shown
    assert shown[-1] is None and ctx.facts["keyframe_progress"] is None


@pytest.mark.parametrize("cause", ["permanent", "unexpected", "disk full"])
def test_a_failure_after_the_lease_was_lost_leaves_the_row_to_its_new_holder(ctx, cause):
    from tests.conftest import mount_tmpfs

    mounted = None
    if cause == "unexpected":
        ctx.cfg.keyframes_dir.parent.mkdir(parents=True, exist_ok=True)
        ctx.cfg.keyframes_dir.write_text("in the way")
    elif cause == "disk full":
        mounted = mount_tmpfs(ctx.cfg.keyframes_dir, "64k")
        fill(next(mounted))
    try:
        kid = plan(ctx, 0, size=(4, 4) if cause == "permanent" else (W, H))
        assert process_after_a_theft(ctx, kid)[0] == 0
    finally:
        if mounted is not None:
            next(mounted, None)
    r = row(ctx, kid)
    assert (r.state, r.lease_owner, r.error, r.attempt) == ("executing", "thief", None, 1)


def test_no_keyframe_is_claimed_while_the_backend_is_unusable(ctx):
    """Every server down, or stopped on a configuration error: claiming would only burn
    attempts."""
    kid = plan(ctx, 0)
    ctx.facts["backend_unusable"] = True
    assert keyframe.tick(ctx, ProceduralBackend()) == 0
    assert (row(ctx, kid).state, row(ctx, kid).attempt) == ("available", 0)
    ctx.facts["backend_unusable"] = False
    assert keyframe.tick(ctx, ProceduralBackend()) == 1
