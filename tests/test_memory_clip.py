"""open_clip's real code path with a tiny random-initialised model: a custom model
config and a weights file saved here, loaded through `cache.clip_model` and
`cache.clip_pretrained`, embeddings computed and stored. Nothing is downloaded: the
network is cut, HF_HUB_OFFLINE is set, and a tag whose weights are not cached falls
back to the descriptor with a message naming the file it needs."""

from __future__ import annotations

import json
import socket

import numpy as np
import open_clip
import pytest
import torch
from sqlalchemy import text

from dreamd import config
from dreamd.memory import descriptor
from dreamd.memory.clip import EmbedderError, load_open_clip
from dreamd.memory.embedder import choose_embedder
from dreamd.memory.scale import OPEN_CLIP_SCALE, scale_for
from dreamd.workers.embedding import EmbeddingWorker
from tests.memory_chain import close, make_ctx
from tests.test_memory import add_keyframe, picture

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                       "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2,
                     "layers": 1}}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to reach the network: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model config path, weights path, the reference model): random, seeded."""
    folder = tmp_path_factory.mktemp("clip")
    cfg_path = folder / "tiny-clip.json"
    cfg_path.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(1234)
    net = open_clip.create_model("tiny-clip").eval()
    weights = folder / "tiny-clip-random.pt"
    torch.save(net.state_dict(), weights)
    return cfg_path, weights, net


def cache_toml(model: str, pretrained: str, embedder: str = "open_clip") -> str:
    return (f'[cache]\nembedder = "{embedder}"\nclip_model = "{model}"\n'
            f'clip_pretrained = "{pretrained}"\n')


def test_a_local_weights_file_loads_through_the_configured_path(tiny):
    cfg_path, weights, net = tiny
    cfg = config.parse(cache_toml(str(cfg_path), str(weights)))
    emb, reason = choose_embedder(cfg.cache)
    assert emb.model_id.startswith("open_clip/tiny-clip/tiny-clip-random.pt@")
    assert emb.dim == 16 and "open_clip" in reason
    images = [picture(1), picture(2)]
    got = emb.embed(images)
    assert got.dtype == np.float32 and got.shape == (2, 16)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # the same numbers the saved model gives: the file's weights were loaded, not random ones
    _, _, preprocess = open_clip.create_model_and_transforms("tiny-clip")
    with torch.inference_mode():
        want = net.encode_image(torch.stack([preprocess(im) for im in images]),
                                normalize=True).numpy()
    assert np.allclose(got, want, atol=1e-5)
    assert scale_for(emb.model_id, cfg.cache) == OPEN_CLIP_SCALE


def test_the_worker_stores_open_clip_vectors_with_their_model(tiny, db_path):
    cfg_path, weights, _ = tiny
    ctx = make_ctx(db_path, cache_toml(str(cfg_path), str(weights)))
    ctx.cfg.display.min_buffer_seconds = 0.0              # no playback to protect here
    try:
        for k in range(3):
            add_keyframe(ctx, k, picture(k))
        assert EmbeddingWorker(ctx, ctx.embedders).tick() == 3
        with ctx.reader.connect() as conn:
            rows = conn.execute(text("SELECT model, dim, vector, state FROM embeddings")).all()
        assert len(rows) == 3
        for r in rows:
            assert r.state == "completed" and r.dim == 16
            assert r.model == ctx.embedders.get().model_id
            v = np.frombuffer(r.vector, "<f4")
            assert v.shape == (16,) and abs(np.linalg.norm(v) - 1) < 1e-5
    finally:
        close(ctx)


def test_a_tag_whose_weights_are_not_here_falls_back_and_says_which_file(tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))       # an empty hub cache
    monkeypatch.setenv("HOME", str(tmp_path))                 # and an empty ~/.cache/clip
    cfg = config.parse(cache_toml("ViT-B-32", "laion2b_s34b_b79k", embedder="auto"))
    emb, reason = choose_embedder(cfg.cache)
    assert emb.model_id == descriptor.MODEL_ID
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in reason
    assert "cache.clip_pretrained" in reason


def test_clear_errors_for_wrong_settings(tiny, tmp_path):
    cfg_path, weights, _ = tiny
    with pytest.raises(EmbedderError, match="no such file"):
        load_open_clip(str(cfg_path), str(tmp_path / "missing.safetensors"))
    with pytest.raises(EmbedderError, match="not an open_clip architecture"):
        load_open_clip("ViT-Nope", str(weights))
    with pytest.raises(EmbedderError, match="neither a weights file nor an open_clip tag"):
        load_open_clip("ViT-B-32", "no_such_tag")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(EmbedderError, match="broken.pt"):
        load_open_clip(str(cfg_path), str(broken))
    # asked for open_clip explicitly, it still falls back (and logs an error) rather than
    # leaving the dream without a memory
    cfg = config.parse(cache_toml(str(cfg_path), str(broken)))
    emb, reason = choose_embedder(cfg.cache)
    assert emb.model_id == descriptor.MODEL_ID and "broken.pt" in reason
