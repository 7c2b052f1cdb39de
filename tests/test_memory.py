"""The aesthetic memory's parts on a real ledger: the descriptor, cache admission and
LRU eviction, a cache that survives a restart, vectors of different models never
compared, skipping under load, the janitor keeping members' files, blending, stats."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from sqlalchemy import text

from dreamd import config
from dreamd.errors import ConfigError
from dreamd.ledger import transitions as tr
from dreamd.memory import cache, collapse, descriptor, injection, stats
from dreamd.workers import janitor
from dreamd.workers.embedding import EmbeddingWorker
from dreamd.workers.planner import with_time_of_day
from tests.memory_chain import REPO, close, memory_contexts  # noqa: F401 (a fixture)



def picture(i: int, size=(128, 64)) -> Image.Image:
    """Distinct pictures: each a different palette and layout."""
    rng = np.random.default_rng(i)
    im = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 90, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.integers(0, size[0] - 20), rng.integers(0, size[1] - 10)
        d.ellipse([x0, y0, x0 + rng.integers(10, 60), y0 + rng.integers(8, 40)],
                  fill=tuple(int(v) for v in rng.integers(60, 255, 3)))
    return im


def add_keyframe(ctx, k: int, image: Image.Image) -> int:
    """A completed keyframe k with its file and its frame row; returns the frame id."""
    ctx.cfg.keyframes_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.cfg.keyframes_dir / f"k{k:06d}.png"
    image.save(path)
    with ctx.engine.begin() as conn:
        kid = tr.create(conn, "keyframe", {
            "chain_index": k, "backend": "test", "theme": "t", "prompt": "p", "seed": k,
            "denoise": 0.3, "source": "img2img", "width": image.width,
            "height": image.height})
        conn.execute(text("UPDATE keyframes SET state = 'completed', path = :p WHERE id = :i"),
                     {"p": str(path), "i": kid})
        return tr.create(conn, "frame", {"chain_index": k, "t": 0.0, "kind": "keyframe",
                                         "keyframe_id": kid, "path": str(path)})


def rows(ctx, sql: str, **params):
    with ctx.reader.connect() as conn:
        return conn.execute(text(sql), params).all()


@pytest.fixture
def make(memory_contexts):
    def _make(extra: str = ""):
        ctx = memory_contexts(extra)
        ctx.cfg.generation.resolution = [128, 64]
        return ctx
    return _make


# ---------------------------------------------------------------- the descriptor

def test_descriptor_is_a_deterministic_unit_vector_that_ranks_pictures():
    a, b = picture(1), picture(2)
    noisy = Image.fromarray(np.clip(np.asarray(a, np.int16) + np.random.default_rng(0)
                                    .integers(-6, 7, (64, 128, 3)), 0, 255).astype(np.uint8))
    va, vb, vn = (descriptor.describe(x) for x in (a, b, noisy))
    assert va.dtype == np.float32 and va.shape == (descriptor.DIM,)
    assert np.linalg.norm(va) == pytest.approx(1.0, abs=1e-5)
    assert np.array_equal(va, descriptor.describe(a.copy()))
    assert float(va @ vn) > 0.85 and float(va @ vb) < 0.3


# ---------------------------------------------------------------- admission, LRU, restart

def test_cache_admits_diverse_frames_evicts_lru_and_survives_a_restart(make):
    ctx = make('[cache]\nembedder = "descriptor"\nmax_size = 3\nsimilarity_threshold = 0.9\n')
    for k in range(5):
        add_keyframe(ctx, k, picture(k))
    assert EmbeddingWorker(ctx, ctx.embedders).tick() == 5
    members = rows(ctx, "SELECT e.id, f.chain_index FROM embeddings e JOIN frames f "
                        "ON f.id = e.frame_id WHERE in_cache = 1 ORDER BY f.chain_index")
    assert [m.chain_index for m in members] == [2, 3, 4]     # 0 and 1 were the LRU
    assert ctx.facts["cache_size"] == 3
    blobs = rows(ctx, "SELECT model, dim, length(vector) AS n FROM embeddings")
    assert {(b.model, b.dim, b.n) for b in blobs} == {
        (descriptor.MODEL_ID, descriptor.DIM, 4 * descriptor.DIM)}
    detail = [json.loads(d) for (d,) in rows(
        ctx, "SELECT detail FROM transitions WHERE entity = 'embedding' AND event = "
             "'completed' ORDER BY id")]
    assert [d["admitted"] for d in detail] == [True] * 5
    assert detail[3]["evicted"] == [members[0].id - 2] and detail[4]["evicted"]

    # a near copy of frame 2 does not join, but keeps frame 2 fresh
    add_keyframe(ctx, 5, picture(2))
    EmbeddingWorker(ctx, ctx.embedders).tick()
    last = json.loads(rows(ctx, "SELECT detail FROM transitions WHERE entity = 'embedding' "
                                "ORDER BY id DESC LIMIT 1")[0].detail)
    assert last["admitted"] is False and last["nearest"] == members[0].id
    assert last["similarity"] > 0.99

    # restart: a new context and worker on the same ledger find the same cache
    close(ctx)
    ctx2 = make('[cache]\nembedder = "descriptor"\nmax_size = 3\nsimilarity_threshold = 0.9\n')
    worker = EmbeddingWorker(ctx2, ctx2.embedders)
    assert ctx2.facts["cache_size"] == 3
    add_keyframe(ctx2, 6, picture(6))
    worker.tick()
    now = rows(ctx2, "SELECT f.chain_index FROM embeddings e JOIN frames f ON f.id = "
                     "e.frame_id WHERE in_cache = 1 ORDER BY f.chain_index")
    # frame 3 was the least recently used (2 was matched after it, 4 admitted after it)
    assert [r.chain_index for r in now] == [2, 4, 6]


def test_vectors_of_different_models_are_never_compared(make):
    ctx = make('[cache]\nembedder = "descriptor"\nmax_size = 2\n')
    image = picture(7)
    fid = add_keyframe(ctx, 0, image)
    other = descriptor.describe(image)       # as alike as can be, but another model's
    with ctx.engine.begin() as conn:
        eid = tr.create(conn, "embedding", {"frame_id": fid, "model": "open_clip/x/y"})
        conn.execute(text("UPDATE embeddings SET state = 'completed', vector = :v, dim = :d, "
                          "in_cache = 1, last_used_at = '2000-01-01' WHERE id = :i"),
                     {"v": cache.to_blob(other), "d": other.size, "i": eid})
    fid1 = add_keyframe(ctx, 1, image)
    add_keyframe(ctx, 2, picture(9))
    EmbeddingWorker(ctx, ctx.embedders).tick()
    mine = rows(ctx, "SELECT in_cache, last_used_at FROM embeddings WHERE frame_id = :f "
                     "AND model = :m", f=fid1, m=descriptor.MODEL_ID)
    # the other model's identical vector did not keep it out: its own model's cache was empty
    assert mine[0].in_cache == 1
    with ctx.reader.connect() as conn:
        assert collapse.current_model(conn) == descriptor.MODEL_ID
        win = collapse.window(conn, 2, 0.5)
        assert all(v.shape == (descriptor.DIM,) for v in win.vectors)
        found = cache.candidates(conn, descriptor.MODEL_ID, win.reference, (0.0, 1.0))
        assert {c.embedding_id for c in found}.isdisjoint({eid})
        report = stats.collect(conn, window=2)
    assert report["model"] == descriptor.MODEL_ID
    assert report["models"] == {descriptor.MODEL_ID: 2, "open_clip/x/y": 1}
    # a member of a model no longer in use is the first to leave a full cache
    add_keyframe(ctx, 3, picture(8))
    EmbeddingWorker(ctx, ctx.embedders).tick()
    assert rows(ctx, "SELECT in_cache FROM embeddings WHERE id = :i", i=eid)[0].in_cache == 0


# ---------------------------------------------------------------- load, retention

def test_backlog_is_skipped_and_counted_and_playback_comes_first(make):
    ctx = make('[cache]\nembedder = "descriptor"\nmax_backlog = 2\n[display]\nfps = 4.0\n')
    ctx.cfg.display.min_buffer_seconds = 1.0
    for k in range(5):
        add_keyframe(ctx, k, picture(k))
    worker = EmbeddingWorker(ctx, ctx.embedders)
    # 5 ready frames ahead, 4 needed: not under load
    assert not worker.under_load()
    ctx.cfg.display.min_buffer_seconds = 10.0          # now 40 are needed: under load
    assert worker.under_load()
    assert worker.tick() == 0                           # found, shed, but nothing embedded
    assert ctx.facts["embeddings_skipped"] == 3
    states = dict(rows(ctx, "SELECT state, count(*) FROM embeddings GROUP BY state"))
    assert states == {"cancelled": 3, "available": 2}
    with ctx.reader.connect() as conn:
        assert stats.collect(conn)["embeddings"]["skipped_under_load"] == 3
    kept = rows(ctx, "SELECT f.chain_index FROM embeddings e JOIN frames f ON f.id = "
                     "e.frame_id WHERE e.state = 'available' ORDER BY 1")
    assert [r.chain_index for r in kept] == [3, 4]      # the newest are the ones that matter


def test_janitor_keeps_the_files_of_cache_members(make):
    ctx = make("[display]\nmax_output_frames = 10\n")
    ctx.cfg.frames_dir.mkdir(parents=True)
    ids = []
    with ctx.engine.begin() as conn:
        for i in range(30):
            path = ctx.cfg.frames_dir / f"f{i}.png"
            Image.new("RGB", (16, 8), (i, i, i)).save(path)
            ids.append(tr.create(conn, "frame", {"chain_index": i, "t": 0.5, "kind": "inbetween",
                                                 "path": str(path)}))
        conn.execute(text("UPDATE frames SET state = 'shown'"))
        eid = tr.create(conn, "embedding", {"frame_id": ids[0], "model": "m"})
        conn.execute(text("UPDATE embeddings SET in_cache = 1 WHERE id = :i"), {"i": eid})
    assert janitor.enforce_retention(ctx) == 19
    assert (ctx.cfg.frames_dir / "f0.png").exists()     # the oldest, but a member
    assert not (ctx.cfg.frames_dir / "f1.png").exists()
    assert (ctx.cfg.frames_dir / "f29.png").exists()


# ---------------------------------------------------------------- blending, prompts, config

class FakeLatentCodec:
    """A stand-in for a VAE: latents are the pixels in [-1, 1] at half size."""

    name = "fake-vae"
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self):
        self.calls = 0

    def encode(self, images):
        self.calls += 1
        return torch.nn.functional.avg_pool2d(images, 2) * 2 - 1

    def decode(self, latents):
        return ((torch.nn.functional.interpolate(latents, scale_factor=2) + 1) / 2).clamp(0, 1)


class Holder:
    def __init__(self, codec):
        self.codec = codec

    def get(self):
        return self.codec


def test_blend_runs_in_the_codecs_latent_space_when_there_is_one(make, tmp_path):
    ctx = make()
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (128, 64), (200, 0, 0)).save(a)
    Image.new("RGB", (128, 64), (0, 0, 200)).save(b)
    from dreamd.latent.pixel import PixelCodec
    ctx.codecs = Holder(PixelCodec())
    mixed, how = injection.blend(ctx, a, b, 0.25, (128, 64))
    assert how == "pixels" and mixed.getpixel((5, 5)) == (150, 0, 50)
    fake = FakeLatentCodec()
    ctx.codecs = Holder(fake)
    mixed, how = injection.blend(ctx, a, b, 0.25, (128, 64))
    assert how == "latent:fake-vae" and fake.calls == 1 and mixed.size == (128, 64)
    r, _, bl = mixed.getpixel((5, 5))
    assert r > bl > 0                                   # mostly the current keyframe


def test_time_of_day_words():
    words = ["at dawn", "in daylight", "at dusk", "at night"]
    assert [with_time_of_day("angel", words, h) for h in (6, 12, 18, 23, 2)] == [
        "angel, at dawn", "angel, in daylight", "angel, at dusk", "angel, at night",
        "angel, at night"]
    with pytest.raises(ConfigError, match="four strings"):
        config.parse('[prompts]\ntime_of_day_words = ["a", "b"]\n')
    with pytest.raises(ConfigError, match="cache.band_min"):
        config.parse("[cache]\nband_min = 0.8\nband_max = 0.5\n")


def test_planner_adds_the_time_of_day_when_asked(make, monkeypatch):
    from dreamd.workers import planner
    ctx = make(f'[prompts]\ntime_of_day = true\n[generation]\nseeds_dir = "{REPO / "seeds"}"\n')
    kid = planner.plan(ctx, None)
    prompt = rows(ctx, "SELECT prompt FROM keyframes WHERE id = :i", i=kid)[0].prompt
    assert prompt.rsplit(", ", 1)[1] in ctx.cfg.prompts.time_of_day_words


# ---------------------------------------------------------------- dreamd stats

def test_stats_is_light_and_reads_a_real_ledger(make, db_path, dreamd_env):
    ctx = make('[cache]\nembedder = "descriptor"\n')
    for k in range(4):
        add_keyframe(ctx, k, picture(k % 2))
    EmbeddingWorker(ctx, ctx.embedders).tick()
    probe = ("import sys, json\nfrom dreamd.cli import main\nrc = main(sys.argv[1:])\n"
             "print('IMPORTED=' + json.dumps(sorted(m for m in ('torch', 'numpy', 'PIL') "
             "if m in sys.modules)))\nsys.exit(rc)\n")
    env = {**dreamd_env, "DREAMD_DATA_DIR": str(db_path.parent)}
    out = subprocess.run([sys.executable, "-c", probe, "stats", "--json", "--window", "2"],
                         env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    body, imported = out.stdout.rsplit("IMPORTED=", 1)
    assert json.loads(imported) == []
    report = json.loads(body)
    sims = report["similarity"]
    # pictures 0, 1, 0, 1: consecutive pairs differ, pairs two apart are identical
    assert sims["keyframes"] == 4 and sims["consecutive_mean"] < 0.9
    assert report["cache"]["size"] == 2 and report["cache"]["rejected_as_alike"] == 2
    text_out = subprocess.run([sys.executable, "-m", "dreamd", "stats"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60).stdout
    assert "similarity, recent keyframes" in text_out and "cache: 2 members" in text_out
