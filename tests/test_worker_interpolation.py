"""The interpolation worker in-process, on a real ledger file with real keyframe images
and the pixel codec: a segment's frames are t = 0, 1/(N+1), …, N/(N+1) of the pair
(k, k+1), written as files (atomically, at the keyframe's size) before their rows; the
keyframes' latents are stored in `latents/` and reused; a failure is retried or, for a
codec error, discarded."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image
from sqlalchemy import text

from dreamd.latent.pixel import PixelCodec
from dreamd.latent.storage import latent_meta, load_latent, save_latent
from dreamd.ledger import transitions as tr
from dreamd.workers import interpolation
from tests.conftest import identity, worker_context

CONFIG = """
[generation]
codec = "pixel"
interpolation_frames = 3
"""
RED, BLUE = (250, 10, 10), (10, 10, 250)


@pytest.fixture
def ctx(db_path):
    yield from worker_context(db_path, CONFIG)


def rows(ctx, q: str, **params) -> list:
    with ctx.reader.connect() as conn:
        return conn.execute(text(q), params).all()


def keyframe(ctx, chain: int, colour, *, size=(16, 8), sha: bool = True) -> int:
    rel = f"keyframes/k{chain:06d}.png"
    path = ctx.cfg.data_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if sha else None
    with ctx.engine.begin() as conn:
        kid = tr.create(conn, "keyframe", {
            "chain_index": chain, "backend": "procedural", "theme": "t", "prompt": "p",
            "seed": chain, "denoise": 0.3, "source": "img2img", "width": size[0],
            "height": size[1]})
        conn.execute(text("UPDATE keyframes SET state = 'completed', path = :p, sha256 = :s "
                          "WHERE id = :i"), {"p": rel, "s": digest, "i": kid})
    return kid


def batch(ctx, a: int, b: int, n: int, *, chain: int = 0, divisor: float = 1.0,
          max_attempts: int = 3) -> int:
    with ctx.engine.begin() as conn:
        return tr.create(conn, "interpolation", {
            "chain_index": chain, "from_keyframe_id": a, "to_keyframe_id": b, "n_frames": n,
            "divisor": divisor, "max_attempts": max_attempts})


def pixel(path, xy=(0, 0)):
    with Image.open(path) as im:
        return im.size, im.mode, im.getpixel(xy)


# ---------------------------------------------------------------- naming

def test_positions_are_the_segment_start_and_its_in_betweens():
    assert interpolation.positions(0) == [0.0]
    assert interpolation.positions(1) == [0.0, 0.5]
    assert interpolation.positions(3) == [0.0, 0.25, 0.5, 0.75]
    assert interpolation.positions(4) == [0.0, 0.2, 0.4, 0.6, 0.8]


def test_frame_and_latent_names(ctx):
    assert interpolation.frame_path(ctx, 3, 0.25) == ctx.cfg.frames_dir / "000003-0250000.png"
    assert interpolation.frame_path(ctx, 12, 1 / 3).name == "000012-0333333.png"
    sha = "ab" * 32
    one, two = PixelCodec(), PixelCodec(divisor=2)
    p1, p2 = interpolation.latent_path(ctx, sha, one), interpolation.latent_path(ctx, sha, two)
    assert p1.parent == ctx.cfg.data_dir / "latents"
    space = hashlib.sha256(json.dumps({"codec": "pixel", "divisor": 1.0},
                                      sort_keys=True).encode()).hexdigest()[:12]
    assert p1.name == f"{sha}-{space}.safetensors"
    assert p2 != p1 and p2.name.startswith(sha)        # another latent space, another file


# ---------------------------------------------------------------- a segment

def test_a_batch_becomes_frames_at_t_0_to_n_over_n_plus_1_files_before_rows(ctx):
    a, b = keyframe(ctx, 0, RED), keyframe(ctx, 1, BLUE)
    bid = batch(ctx, a, b, 3)
    codecs = interpolation.Codecs(ctx)
    assert interpolation.tick(ctx, codecs) == 1
    frames = rows(ctx, "SELECT chain_index, t, kind, keyframe_id, interpolation_id, path, "
                       "state FROM frames ORDER BY id")
    assert [tuple(f) for f in frames] == [
        (0, 0.0, "keyframe", a, bid, "frames/000000-0000000.png", "ready"),
        (0, 0.25, "inbetween", None, bid, "frames/000000-0250000.png", "ready"),
        (0, 0.5, "inbetween", None, bid, "frames/000000-0500000.png", "ready"),
        (0, 0.75, "inbetween", None, bid, "frames/000000-0750000.png", "ready")]
    reds = []
    for f in frames:
        size, mode, (r, g, b_) = pixel(ctx.cfg.data_dir / f.path)
        assert (size, mode) == ((16, 8), "RGB")
        reds.append(r)
        assert abs(r + b_ - 260) <= 60           # between the two: the blend moves red to blue
    assert reds[0] >= 245                         # t = 0 is the keyframe itself, decoded
    assert reds == sorted(reds, reverse=True) and reds[-1] > 20   # never reaches b (t < 1)
    assert sorted(p.name for p in ctx.cfg.frames_dir.iterdir()) == \
        [f.path.split("/")[1] for f in frames]    # no temporary file left behind
    state, codec, ms, attempt = rows(ctx, "SELECT state, codec, duration_ms, attempt FROM "
                                          "interpolations WHERE id = :i", i=bid)[0]
    assert (state, codec, attempt) == ("completed", "pixel", 1) and ms > 0
    detail = rows(ctx, "SELECT detail, worker FROM transitions WHERE entity = 'interpolation' "
                       "AND to_state = 'completed'")
    assert json.loads(detail[0].detail)["frames"] == 4
    assert detail[0].worker == ctx.lease_owner("interpolation")
    assert rows(ctx, "SELECT count(*) FROM transitions WHERE entity = 'frame' AND worker = :w",
                w=ctx.lease_owner("interpolation")) == [(4,)]
    assert ctx.facts["codec"] == "pixel"
    assert codecs.reason == "pixel codec as configured"
    assert ctx.facts["interpolation_ms_per_frame"] == pytest.approx(ms / 4)
    assert json.loads(detail[0].detail)["ms"] == round(ms, 1)
    assert interpolation.tick(ctx, codecs) == 0      # nothing left to do


def test_a_segment_without_in_betweens_is_the_keyframe_alone(ctx):
    a, b = keyframe(ctx, 4, RED), keyframe(ctx, 5, BLUE)
    ctx.set_knobs({"generation.interpolation_frames": 0})     # `dreamd set` since it was made
    batch(ctx, a, b, 3, chain=4)
    assert interpolation.tick(ctx, interpolation.Codecs(ctx)) == 1
    assert rows(ctx, "SELECT t, kind, keyframe_id, path FROM frames") == \
        [(0.0, "keyframe", a, "frames/000004-0000000.png")]
    (ms,) = rows(ctx, "SELECT duration_ms FROM interpolations")[0]
    assert ctx.facts["interpolation_ms_per_frame"] == pytest.approx(ms)   # one frame


def test_the_governors_choice_at_claim_sets_how_many_frames_and_their_size(ctx):
    a, b = keyframe(ctx, 0, RED), keyframe(ctx, 1, BLUE)
    bid = batch(ctx, a, b, 5)
    ctx.set_knobs({"governor.enabled": True})
    ctx.facts["governor"] = {"interpolation_frames": 1, "resolution_divisor": 2.0}
    codecs = interpolation.Codecs(ctx)
    assert interpolation.tick(ctx, codecs) == 1
    assert rows(ctx, "SELECT n_frames, divisor FROM interpolations WHERE id = :i", i=bid) == \
        [(1, 2.0)]
    frames = rows(ctx, "SELECT t, path FROM frames ORDER BY t")
    assert [t for t, _ in frames] == [0.0, 0.5]
    for _, path in frames:                           # made at half size, shown at full
        assert pixel(ctx.cfg.data_dir / path)[0] == (16, 8)
    half = codecs.get(2.0)
    assert half.divisor == 2 and codecs.get(2) is half       # built once per divisor
    assert codecs.get(None) is codecs.get(1.0) is codecs.get()
    assert codecs.get(None).divisor == 1
    latents = sorted(p.name for p in (ctx.cfg.data_dir / "latents").iterdir())
    space = hashlib.sha256(json.dumps(latent_meta(half), sort_keys=True).encode()).hexdigest()
    assert len(latents) == 2 and all(n.endswith(f"-{space[:12]}.safetensors") for n in latents)


def test_codecs_release_before_and_after_use(ctx):
    codecs = interpolation.Codecs(ctx)
    codecs.release()                                 # nothing built yet: nothing to do
    codecs.get(2.0)
    codecs.release()
    assert codecs.get() is codecs.get(None)          # still usable: rebuilt lazily


def test_write_frame_resizes_to_the_keyframes_size_and_leaves_no_temporary(ctx):
    path = interpolation.write_frame(ctx, 7, 0.5, Image.new("RGB", (8, 4), RED), (16, 8))
    assert path == ctx.cfg.frames_dir / "000007-0500000.png"
    assert pixel(path) == ((16, 8), "RGB", RED)
    assert [p.name for p in ctx.cfg.frames_dir.iterdir()] == [path.name]
    same = interpolation.write_frame(ctx, 7, 0.5, Image.new("RGB", (16, 8), BLUE), (16, 8))
    assert same == path and pixel(path) == ((16, 8), "RGB", BLUE)   # replaced whole


# ---------------------------------------------------------------- latents

def test_the_keyframes_latents_are_stored_and_reused(ctx):
    a, b = keyframe(ctx, 0, RED), keyframe(ctx, 1, BLUE)
    codec = PixelCodec()
    row_a = rows(ctx, "SELECT id, path, sha256 FROM keyframes WHERE id = :i", i=a)[0]
    latent = interpolation.encode_keyframe(ctx, codec, row_a)
    stored = interpolation.latent_path(ctx, row_a.sha256, codec)
    assert stored.is_file() and latent.shape == (3, 8, 16)
    # stored with what it is the latent of: the image's hash and size (a restart reuses it
    # only for that image, and decodes it to frames of that size)
    assert load_latent(stored)[1] == latent_meta(codec, width=16, height=8,
                                                 image_sha256=row_a.sha256)
    assert float(latent[0].mean()) == pytest.approx(250 / 255 * 2 - 1, abs=1e-3)
    # a stored latent for the image is what is used: here a grey one, made on purpose
    save_latent(stored, torch.zeros(3, 8, 16),
                latent_meta(codec, width=16, height=8, image_sha256=row_a.sha256))
    assert float(interpolation.encode_keyframe(ctx, codec, row_a).abs().max()) == 0.0
    # through the worker: the segment starts from the stored (grey) latent of a
    batch(ctx, a, b, 1)
    interpolation.tick(ctx, interpolation.Codecs(ctx))
    first = rows(ctx, "SELECT path FROM frames WHERE t = 0")[0].path
    r, g, b_ = pixel(ctx.cfg.data_dir / first)[2]
    assert abs(r - 128) <= 2 and abs(g - 128) <= 2 and abs(b_ - 128) <= 2
    assert len(list((ctx.cfg.data_dir / "latents").iterdir())) == 2


class Elsewhere(PixelCodec):
    """The pixel codec as if it lived on a GPU: torch's `meta` device stands in (the only
    device besides the CPU here). It notes where its input was and answers on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.device = torch.device("meta")
        self.inputs = []

    def encode(self, images):
        self.inputs.append(images.device)
        return torch.zeros(images.shape[0], 3, *images.shape[2:])


def test_the_keyframe_and_its_stored_latent_go_to_the_codecs_device(ctx):
    a = keyframe(ctx, 0, RED)
    row_a = rows(ctx, "SELECT id, path, sha256 FROM keyframes WHERE id = :i", i=a)[0]
    codec = Elsewhere()
    interpolation.encode_keyframe(ctx, codec, row_a)
    assert codec.inputs == [torch.device("meta")]            # the image, on its device
    reused = interpolation.encode_keyframe(ctx, codec, row_a)
    assert codec.inputs == [torch.device("meta")]            # stored: not encoded again
    assert reused.device == torch.device("meta")             # and loaded onto its device


def test_a_latent_made_by_another_codec_or_unreadable_is_made_again(ctx, caplog):
    a = keyframe(ctx, 0, RED)
    row = rows(ctx, "SELECT id, path, sha256 FROM keyframes WHERE id = :i", i=a)[0]
    codec = PixelCodec()
    path = interpolation.latent_path(ctx, row.sha256, codec)
    path.parent.mkdir(parents=True)
    # another codec's latent at this name (a renamed file): not reused
    save_latent(path, torch.zeros(3, 8, 16), {"codec": "taesd", "divisor": 1.0,
                                             "image_sha256": row.sha256})
    assert float(interpolation.encode_keyframe(ctx, codec, row)[0].mean()) > 0.9
    path.write_bytes(b"not a latent")
    with caplog.at_level("WARNING", logger="dreamd.interpolation"):
        latent = interpolation.encode_keyframe(ctx, codec, row)
    assert float(latent[0].mean()) > 0.9
    assert any(r.getMessage().startswith(f"ignoring stored latent {path}: ")
               for r in caplog.records)
    assert path.stat().st_size > 100                  # written again, readable


def test_a_keyframe_row_without_a_hash_is_named_by_its_files_content(ctx):
    a = keyframe(ctx, 0, RED, sha=False)
    row = rows(ctx, "SELECT id, path, sha256 FROM keyframes WHERE id = :i", i=a)[0]
    assert row.sha256 is None
    interpolation.encode_keyframe(ctx, PixelCodec(), row)
    digest = hashlib.sha256((ctx.cfg.data_dir / row.path).read_bytes()).hexdigest()
    assert interpolation.latent_path(ctx, digest, PixelCodec()).is_file()


# ---------------------------------------------------------------- failures

def test_a_missing_keyframe_file_fails_the_batch_for_a_retry_with_backoff(ctx, monkeypatch):
    a, b = keyframe(ctx, 0, RED), keyframe(ctx, 1, BLUE)
    (ctx.cfg.data_dir / "keyframes/k000001.png").unlink()
    bid = batch(ctx, a, b, 2)
    # from its creation on, the ledger's clock stands still: the tick's next look for due
    # work comes before the 2 s backoff ends however slow the machine (or it would claim
    # the batch again and use a second attempt)
    frozen = tr.utcnow()
    monkeypatch.setattr(tr, "utcnow", lambda: frozen)
    assert interpolation.tick(ctx, interpolation.Codecs(ctx)) == 0
    state, attempt, error, created, scheduled = rows(
        ctx, "SELECT state, attempt, error, created_at, scheduled_at FROM interpolations "
             "WHERE id = :i", i=bid)[0]
    assert (state, attempt) == ("retryable", 1)
    assert error.startswith("FileNotFoundError: ")
    assert rows(ctx, "SELECT count(*) FROM frames") == [(0,)]
    why = json.loads(rows(ctx, "SELECT detail FROM transitions WHERE entity = 'interpolation' "
                               "AND event = 'failed'")[0].detail)["why"]
    assert why == "will retry"


def test_a_codec_that_cannot_load_discards_the_batch_for_good(db_path):
    toml = CONFIG.replace('codec = "pixel"', 'codec = "taesd"')
    for ctx in worker_context(db_path, toml):
        a, b = keyframe(ctx, 0, RED), keyframe(ctx, 1, BLUE)
        bid = batch(ctx, a, b, 2, max_attempts=5)
        assert interpolation.tick(ctx, interpolation.Codecs(ctx)) == 0
        state, attempt, error = rows(ctx, "SELECT state, attempt, error FROM interpolations "
                                          "WHERE id = :i", i=bid)[0]
        assert (state, attempt) == ("discarded", 1)
        assert error.startswith("CodecError: codec taesd: no usable weights")
        assert not ctx.cfg.frames_dir.exists() or not any(ctx.cfg.frames_dir.iterdir())


# ---------------------------------------------------------------- files before rows

def held(ctx, monkeypatch, point: str, work):
    """Run `work` in a thread that stops at the crash-test hook `point` (DREAMD_HOLD_AT);
    returns (the thread's result holder, a function that lets it go on)."""
    import threading
    import time

    monkeypatch.setenv("DREAMD_HOLD_AT", point)
    ctx.cfg.data_dir.mkdir(parents=True, exist_ok=True)
    (ctx.cfg.data_dir / f"arm-{point}").touch()
    marker = ctx.cfg.data_dir / f"held-at-{point}"
    out: list = []
    thread = threading.Thread(target=lambda: out.append(work()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline, f"never reached {point}"
        assert thread.is_alive(), f"finished without reaching {point}"
        time.sleep(0.01)

    def release():
        marker.unlink()
        thread.join(timeout=60)
        return out[0]
    return release


def test_the_frames_are_on_disk_before_any_row_names_them(ctx, monkeypatch, fsynced):
    a, b = keyframe(ctx, 0, RED), keyframe(ctx, 1, BLUE)
    bid = batch(ctx, a, b, 3)
    release = held(ctx, monkeypatch, "frames-written",
                   lambda: interpolation.tick(ctx, interpolation.Codecs(ctx)))
    files = list(ctx.cfg.frames_dir.iterdir())
    assert len(files) == 4
    assert all(identity(f) in fsynced for f in files)     # on the disk, not in a cache
    assert rows(ctx, "SELECT count(*) FROM frames") == [(0,)]
    assert rows(ctx, "SELECT state FROM interpolations WHERE id = :i", i=bid) == \
        [("executing",)]
    assert release() == 1
    assert rows(ctx, "SELECT count(*) FROM frames") == [(4,)]


def test_a_batch_whose_lease_was_lost_creates_no_frames(ctx, monkeypatch):
    a, b = keyframe(ctx, 0, RED), keyframe(ctx, 1, BLUE)
    bid = batch(ctx, a, b, 3)
    release = held(ctx, monkeypatch, "frames-written",
                   lambda: interpolation.tick(ctx, interpolation.Codecs(ctx)))
    with ctx.engine.begin() as conn:            # the janitor gave it to another worker
        conn.execute(text("UPDATE interpolations SET lease_owner = 'other' WHERE id = :i"),
                     {"i": bid})
    assert release() == 0
    assert rows(ctx, "SELECT count(*) FROM frames") == [(0,)]
    assert rows(ctx, "SELECT state, lease_owner FROM interpolations WHERE id = :i", i=bid) == \
        [("executing", "other")]
    assert "interpolation_ms_per_frame" not in ctx.facts


def test_the_batchs_time_is_in_ms_and_counts_its_frames(ctx, monkeypatch):
    # DREAMD_SLOW: a decoder that takes 0.05 s per frame at full size (a quarter of it at
    # half size): the recorded time is at least that, in ms
    monkeypatch.setenv("DREAMD_SLOW", "inbetween=0.05")
    a, b = keyframe(ctx, 0, RED), keyframe(ctx, 1, BLUE)
    full = batch(ctx, a, b, 3)
    interpolation.tick(ctx, interpolation.Codecs(ctx))
    (ms,) = rows(ctx, "SELECT duration_ms FROM interpolations WHERE id = :i", i=full)[0]
    assert ms >= 200 and ctx.facts["interpolation_ms_per_frame"] >= 50
    c = keyframe(ctx, 2, RED)
    ctx.set_knobs({"governor.enabled": True})
    ctx.facts["governor"] = {"interpolation_frames": 1, "resolution_divisor": 2.0}
    half = batch(ctx, b, c, 1, chain=1)
    interpolation.tick(ctx, interpolation.Codecs(ctx))
    (ms,) = rows(ctx, "SELECT duration_ms FROM interpolations WHERE id = :i", i=half)[0]
    assert ms >= 2 * 0.05 / 4 * 1000


def test_the_batchs_time_is_exact_on_a_set_clock_and_leaves_out_building_the_codec(
        ctx, monkeypatch):
    import types

    ticks = iter([64.0, 64.3125])      # 312.5 ms (exact in binary) from claim to frames on disk
    monkeypatch.setattr(interpolation, "time",
                        types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    a, b = keyframe(ctx, 0, RED), keyframe(ctx, 1, BLUE)
    bid = batch(ctx, a, b, 3)
    codecs = interpolation.Codecs(ctx)
    codecs.get()                                       # built before: a lookup only
    assert interpolation.tick(ctx, codecs) == 1
    (ms,) = rows(ctx, "SELECT duration_ms FROM interpolations WHERE id = :i", i=bid)[0]
    # less the lookup (the codec's own timing, in real time: microseconds, 100 ms allowed)
    assert 212.5 < ms < 312.5
    (detail,) = rows(ctx, "SELECT detail FROM transitions WHERE entity = 'interpolation' "
                          "AND to_state = 'completed'")[0]
    assert json.loads(detail)["ms"] == round(ms, 1)         # 312.5 or 312.4: not 312


# ---------------------------------------------------------------- which codec

def test_the_codec_is_looked_for_where_the_config_says(db_path, tmp_path):
    models = tmp_path / "comfy-models"
    models.mkdir()
    toml = f"""
[generation]
codec = "auto"
[comfyui]
models_dir = "{models}"
checkpoint = "mine.safetensors"
"""
    for ctx in worker_context(db_path, toml):
        codecs = interpolation.Codecs(ctx)
        codec = codecs.get()
        assert codec.name == "pixel" and ctx.facts["codec"] == "pixel"
        assert codecs.reason == (
            f"pixel codec: no VAE or TAESD weights found (looked at: {models}/vae_approx "
            f"(no taesd_decoder.*); {models}/vae (no weight files); "
            f"{models}/checkpoints/mine.safetensors (missing))")


@pytest.mark.parametrize("precision, variant, device, divisor, made", [
    ("fp32", "auto", "cpu", 1.0, "taesd from {decoder} (taesd pair), fp32 as configured"),
    # no GPU here: "cuda" is system.gpu's, and without it the CPU, saying so
    pytest.param("bf16", "xl", "cuda", 2.0,
                 "taesdxl from {decoder} (taesd pair), bf16 as configured, at 1/2 size; "
                 "codec_device is cuda but CUDA has no GPU 1 here (0 found): on the CPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"))])
def test_a_weight_file_named_in_the_config_is_the_codec(db_path, tmp_path, caplog, precision,
                                                        variant, device, divisor, made):
    from tests.conftest_codecs import diffusers_tiny, save_taesd_pair

    decoder = save_taesd_pair(tmp_path / "w", diffusers_tiny())[1]
    toml = f"""
[system]
gpu = 1
[generation]
codec = "taesd"
codec_path = "{decoder}"
codec_device = "{device}"
codec_precision = "{precision}"
codec_variant = "{variant}"
resolution_divisor = {divisor}
"""
    caplog.set_level("INFO")
    for ctx in worker_context(db_path, toml):
        codecs = interpolation.Codecs(ctx)
        codec = codecs.get()
        assert codec.name == ("taesdxl" if variant == "xl" else "taesd")
        assert codec.device == torch.device("cpu") and getattr(codec, "divisor", 1.0) == divisor
        assert codecs.reason == made.format(decoder=decoder)
        said = [r.getMessage() for r in caplog.records if "codec" in r.getMessage()]
        assert said[-1] == f"codec chosen: {made.format(decoder=decoder)}"
        assert said.count(said[-1]) == 1                        # said once, in words


# ---------------------------------------------------------------- the machine, the lease, the log

def test_a_full_disk_postpones_the_batch_without_using_an_attempt(ctx):
    from dreamd.conditions import DISK_FULL
    from tests.conftest import mount_tmpfs

    a, b = keyframe(ctx, 0, RED), keyframe(ctx, 1, BLUE)
    bid = batch(ctx, a, b, 3)
    mounted = mount_tmpfs(ctx.cfg.frames_dir, "64k")
    folder = next(mounted)
    try:
        try:
            (folder / "filler").write_bytes(b"\0" * (1 << 20))
        except OSError:
            pass
        assert interpolation.tick(ctx, interpolation.Codecs(ctx)) == 0
        state, attempt, error = rows(ctx, "SELECT state, attempt, error FROM interpolations "
                                          "WHERE id = :i", i=bid)[0]
        assert (state, attempt) == ("retryable", 0) and error.startswith("disk full: ")
        assert rows(ctx, "SELECT worker FROM transitions WHERE event = 'postponed'") == \
            [(ctx.lease_owner("interpolation"),)]          # by the lease's holder, checked
        assert ctx.conditions.active(DISK_FULL)
        (folder / "filler").unlink()
        with ctx.engine.begin() as conn:
            conn.execute(text("UPDATE interpolations SET scheduled_at = '2000-01-01' "
                              "WHERE id = :i"), {"i": bid})
        assert interpolation.tick(ctx, interpolation.Codecs(ctx)) == 1
        assert not ctx.conditions.active(DISK_FULL)
    finally:
        next(mounted, None)


def test_a_failure_after_the_lease_was_lost_records_nothing(ctx):
    a, b = keyframe(ctx, 0, RED), keyframe(ctx, 1, BLUE)
    (ctx.cfg.data_dir / "keyframes/k000001.png").unlink()
    bid = batch(ctx, a, b, 3)
    owner = ctx.lease_owner("interpolation")
    with ctx.engine.begin() as conn:
        (claimed,) = tr.claim(conn, "interpolation", owner, lease_seconds=30)
        conn.execute(text("UPDATE interpolations SET lease_owner = 'other' WHERE id = :i"),
                     {"i": bid})
    assert interpolation.process(ctx, interpolation.Codecs(ctx), claimed, owner) == 0
    assert rows(ctx, "SELECT state, error, lease_owner FROM interpolations") == \
        [("executing", None, "other")]


def test_the_lease_is_renewed_while_the_frames_are_made(ctx, monkeypatch):
    """Held at frames-written, inside the lease, until a renewal is recorded: the batch
    waits for the renewal instead of racing it with a slow decoder (which a loaded
    machine may not renew within)."""
    from datetime import datetime, timedelta

    from tests.conftest import wait_for

    ctx.cfg.generation.lease_seconds = 0.6
    a, b = keyframe(ctx, 0, RED), keyframe(ctx, 1, BLUE)
    bid = batch(ctx, a, b, 3)
    release = held(ctx, monkeypatch, "frames-written",
                   lambda: interpolation.tick(ctx, interpolation.Codecs(ctx)))

    def renewed() -> bool:
        started, expires = rows(ctx, "SELECT started_at, lease_expires_at FROM "
                                     "interpolations WHERE id = :i", i=bid)[0]
        # the claim's lease ends at started + 0.6 s: later, only by a renewal
        return datetime.fromisoformat(expires) - datetime.fromisoformat(started) > \
            timedelta(seconds=0.6)

    try:
        wait_for(renewed, timeout=60, what="the lease renewed while the frames are made")
    finally:
        assert release() == 1


def test_each_batch_logs_its_timing_line_for_the_bench(ctx, caplog):
    import logging
    import re
    import time

    a, b = keyframe(ctx, 0, RED), keyframe(ctx, 1, BLUE)
    bid = batch(ctx, a, b, 3)
    with caplog.at_level(logging.DEBUG, logger="dreamd.interpolation"):
        started = time.perf_counter()
        interpolation.tick(ctx, interpolation.Codecs(ctx))
        wall_ms = (time.perf_counter() - started) * 1000
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("timing ")]
    assert len(lines) == 1
    assert re.fullmatch(rf"timing interpolation id={bid} codec_ms=[\d.]+ encode_ms=[\d.]+ "
                        r"slerp_ms=[\d.]+ decode_ms=[\d.]+ write_ms=[\d.]+ ledger_ms=[\d.]+ "
                        r"quality_ms=[\d.]+ frames=4", lines[0]), lines[0]
    (ms,) = rows(ctx, "SELECT duration_ms FROM interpolations")[0]
    assert 0 < ms <= wall_ms
