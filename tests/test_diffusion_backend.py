"""The in-process backend on tiny models of the real architecture (random weights, saved as
an original-layout single file and loaded through the backend's own path): keyframes,
seeds, latent feedback, prompt caching, the step clamp, free, out of memory, and the
procedural fallback for every bad input (dreamd/backends/diffusion/backend.py)."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import threading
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dreamd import config as C
from dreamd import platform as dreamd_platform
from dreamd.backends import KeyframeRequest
from dreamd.backends.diffusion import backend as diffusion
from dreamd.backends.diffusion import latents as kept
from dreamd.conditions import OUT_OF_MEMORY, Conditions, classify
from dreamd.latent.storage import latent_file
from tests import diffusion_tiny as tiny

W, H = 128, 64


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, Path]:
    """One tiny SD 1.x checkpoint in the LDM layout, its config skeleton, and a LoRA."""
    root = tmp_path_factory.mktemp("model")
    parts = tiny.tiny_parts()
    return {"ckpt": tiny.save_ldm(root / "tiny-sd15.safetensors", parts),
            "skeleton": tiny.save_skeleton(root / "skeleton", parts),
            "lora": tiny.save_lora(root / "tiny-lora.safetensors", parts["unet"]),
            "root": root}


def make_cfg(tmp_path: Path, files: dict, **diffusion_keys) -> C.Config:
    keys = {"model": str(files["ckpt"]), "config_dir": str(files["skeleton"]), "lora": "none",
            **diffusion_keys}
    generation = diffusion_keys.pop("generation", {})
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items() if k != "generation")
    gen = "\n".join(f"{k} = {json.dumps(v)}" for k, v in generation.items())
    (tmp_path / "dreamd.toml").write_text(
        f'[generation]\nbackend = "diffusers"\nseed = 7\n{gen}\n[diffusion]\n{lines}\n')
    return C.load(tmp_path / "dreamd.toml", data_dir=tmp_path / "data")


def context(cfg, codecs=None) -> SimpleNamespace:
    return SimpleNamespace(cfg=cfg, facts={}, stopping=threading.Event(),
                           conditions=Conditions(), codecs=codecs)


def request(k: int = 1, image: Image.Image | None = None, **kw) -> KeyframeRequest:
    if image is None and k > 0 and "no_image" not in kw:
        image = Image.new("RGB", (W, H), (40, 90, 160))
    kw.pop("no_image", None)
    return KeyframeRequest(chain_index=k, width=W, height=H, seed=1000 + k, theme="t",
                           prompt="a glowing wireframe cathedral", negative_prompt="blurry",
                           denoise=0.5, image=image, **kw)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_txt2img_then_img2img_from_a_single_file(tmp_path, model):
    b = diffusion.DiffusionBackend(make_cfg(tmp_path, model)).start()
    first = b.generate(request(0, no_image=True))
    assert first.image.size == (W, H)
    assert first.info == {"backend": "diffusers", "seed": 1000, "steps": 4, "input": "txt2img"}
    second = b.generate(request(1, first.image))
    assert second.info["input"] == "encoded" and second.image.size == (W, H)
    assert pixels(second.image).std() > 0
    assert b.facts["backend_now"] == "diffusers" and b.facts["backend_problem"] is None


def test_the_same_seed_and_input_make_the_same_keyframe(tmp_path, model):
    cfg = make_cfg(tmp_path, model)
    one = diffusion.DiffusionBackend(cfg).start().generate(request(3))
    two = diffusion.DiffusionBackend(cfg).start().generate(request(3))
    assert np.array_equal(pixels(one.image), pixels(two.image))
    other = diffusion.DiffusionBackend(cfg).start().generate(
        dataclasses.replace(request(3), seed=1))
    assert not np.array_equal(pixels(one.image), pixels(other.image))


def test_seed_policy_fixed_uses_the_base_seed(tmp_path, model):
    b = diffusion.DiffusionBackend(make_cfg(tmp_path, model, seed_policy="fixed")).start()
    assert b.generate(request(5)).info["seed"] == 7         # generation.seed, not 1005
    b = diffusion.DiffusionBackend(make_cfg(tmp_path, model)).start()
    assert b.generate(request(5)).info["seed"] == 1005


def test_steps_are_raised_so_one_step_runs_and_it_is_said_once(tmp_path, model, caplog):
    b = diffusion.DiffusionBackend(make_cfg(tmp_path, model, steps=1)).start()
    caplog.set_level(logging.INFO, logger="dreamd.diffusion")
    low = dataclasses.replace(request(1), denoise=0.3)
    assert b.generate(low).info["steps"] == 4               # int(4 x 0.3) = 1
    assert b.generate(dataclasses.replace(low, chain_index=2)).info["steps"] == 4
    said = [r for r in caplog.records if "would run no step" in r.getMessage()]
    assert len(said) == 1 and "4 steps (1 run)" in said[0].getMessage()


def test_prompt_embeddings_are_computed_once_per_prompt(tmp_path, model):
    b = diffusion.DiffusionBackend(make_cfg(tmp_path, model)).start()
    b.generate(request(1))
    calls = []
    encoder = b._pipe.text_encoder
    original = encoder.forward
    encoder.forward = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    b.generate(request(2))
    b.generate(request(3))
    assert calls == []
    b.generate(dataclasses.replace(request(4), prompt="another theme"))
    assert len(calls) == 1


def counting_encodes(b) -> list:
    calls: list = []
    vae = b._pipe.vae
    original = vae.encode
    vae.encode = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    return calls


def test_the_previous_keyframe_is_fed_as_its_latent(tmp_path, model):
    cfg = make_cfg(tmp_path, model)
    b = diffusion.DiffusionBackend(cfg).start()
    made = b.generate(request(1))
    sha = "a" * 64
    b.keyframe_written(1, sha)
    stored = kept.feedback_path(cfg.data_dir, sha, b._key)
    assert stored.exists()
    encodes = counting_encodes(b)
    nxt = dataclasses.replace(request(2, made.image), input_sha256=sha)
    fed = b.generate(nxt)
    assert fed.info["input"] == "latent" and encodes == []
    # the same keyframe made again from its seed and its input: the same pixels
    assert np.array_equal(pixels(b.generate(nxt).image), pixels(fed.image))
    # a restarted daemon's backend finds the latent on disk
    fresh = diffusion.DiffusionBackend(cfg).start()
    again = fresh.generate(nxt)
    assert again.info["input"] == "latent"
    assert np.array_equal(pixels(again.image), pixels(fed.image))
    # an input that is not that keyframe (a blend, a seed image) is encoded
    other = fresh.generate(dataclasses.replace(nxt, input_sha256="b" * 64))
    assert other.info["input"] == "encoded"


def test_a_steered_input_is_colour_matched_in_latent_space(tmp_path, model):
    from dreamd.quality.coherence import Palette

    cfg = make_cfg(tmp_path, model)
    b = diffusion.DiffusionBackend(cfg).start()
    made = b.generate(request(1))
    b.keyframe_written(1, "c" * 64)
    ref = tmp_path / "ref.png"
    Image.new("RGB", (64, 32), (200, 40, 40)).save(ref)
    palette = Palette(keyframe_id=9, path=ref, method="mean", strength=1.0)
    plain = b.generate(dataclasses.replace(request(2, made.image), input_sha256="c" * 64))
    matched = b.generate(dataclasses.replace(request(2, made.image), input_sha256="c" * 64,
                                             palette=palette))
    assert matched.info["input"] == "latent, colour-matched"
    assert not np.array_equal(pixels(plain.image), pixels(matched.image))


@pytest.fixture
def taesd_codecs(tmp_path):
    """The interpolation worker's Codecs with a TAESD codec (real architecture, random)."""
    from tests.conftest_codecs import diffusers_tiny, save_taesd_pair

    _, decoder = save_taesd_pair(tmp_path / "vae_approx", diffusers_tiny(width=16))
    return decoder


def test_with_a_taesd_codec_keyframes_decode_by_it_and_their_latents_serve_the_inbetweens(
        tmp_path, model, taesd_codecs):
    from dreamd.workers.interpolation import Codecs, encode_keyframe

    cfg = make_cfg(tmp_path, model)
    cfg.generation.codec, cfg.generation.codec_path = "taesd", str(taesd_codecs)
    cfg.generation.codec_precision = "fp32"
    ctx = context(cfg)
    ctx.codecs = Codecs(ctx)
    b = diffusion.DiffusionBackend(cfg, ctx).start()
    made = b.generate(request(1))
    codec = ctx.codecs.get(1.0)
    latent = b._last[1]
    # decoded by the codec: exactly what the codec makes of the keyframe's latent
    expected = (codec.decode(latent[None])[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.array_equal(pixels(made.image), expected.clip(0, 255).astype("uint8"))
    # and the latent is where the interpolation worker looks first
    import hashlib
    import io
    buf = io.BytesIO()
    made.image.save(buf, "PNG")
    sha = hashlib.sha256(buf.getvalue()).hexdigest()
    (cfg.data_dir / "keyframes").mkdir(parents=True)
    (cfg.data_dir / "keyframes" / "k.png").write_bytes(buf.getvalue())
    b.keyframe_written(1, sha)
    assert latent_file(cfg.data_dir, sha, codec).exists()
    calls = []
    original = codec.encode
    codec.encode = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    row = SimpleNamespace(path="keyframes/k.png", sha256=sha)
    got = encode_keyframe(ctx, codec, row)
    assert calls == [] and torch.equal(got.cpu(), latent)


def test_a_vae_codec_from_the_same_checkpoint_shares_the_space(tmp_path, model):
    from dreamd.latent.choose import choose_codec

    codec, _ = choose_codec("sd-vae", path=model["ckpt"], precision="fp32")
    assert kept.shares_space(codec, "sd15", (model["ckpt"],))
    other = tmp_path / "copy.safetensors"
    other.write_bytes(model["ckpt"].read_bytes())
    assert not kept.shares_space(codec, "sd15", (other,))     # another file: not known same
    assert not kept.shares_space(codec, "sdxl", (model["ckpt"],))


def test_free_gives_the_model_back_and_the_next_keyframe_loads_it(tmp_path, model, caplog,
                                                                  monkeypatch):
    b = diffusion.DiffusionBackend(make_cfg(tmp_path, model)).start()
    b.generate(request(1))
    unet = weakref.ref(b._pipe.unet)
    caplog.set_level(logging.INFO, logger="dreamd.diffusion")
    trimmed: list[bool] = []
    monkeypatch.setattr(dreamd_platform, "give_heap_back",
                        lambda: trimmed.append(unet() is None) or True)
    assert b.free() == {}
    gc.collect()
    assert b._pipe is None and unet() is None              # no reference left anywhere
    assert trimmed == [True]             # the heap handed back once the model was gone
    assert any("unloaded (free)" in r.getMessage() for r in caplog.records)
    assert b.generate(request(2)).info["backend"] == "diffusers"
    assert b.loads == 2


def test_free_while_generating_unloads_when_the_keyframe_is_done(tmp_path, model):
    b = diffusion.DiffusionBackend(make_cfg(tmp_path, model)).start()
    b.generate(request(1))
    freed: list = []
    unet = b._pipe.unet
    original = unet.forward

    def forward(*a, **kw):
        if not freed:
            freed.append(b.free())      # the controls worker, while the UNet runs
        return original(*a, **kw)
    unet.forward = forward
    result = b.generate(request(2))
    assert freed == [{}] and result.info["backend"] == "diffusers" and b._pipe is None


def test_out_of_memory_unloads_and_is_a_condition_not_a_failure(tmp_path, model):
    ctx = context(make_cfg(tmp_path, model))
    b = diffusion.DiffusionBackend(ctx.cfg, ctx).start()
    b.generate(request(1))

    def oom(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    b._pipe.unet.forward = oom
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        b.generate(request(2))
    assert classify(info.value) == OUT_OF_MEMORY
    assert b._pipe is None                                  # the card is given back
    ctx.conditions.report(OUT_OF_MEMORY, "keyframe 2", info.value)   # what postpone_for does
    assert b.generate(request(2)).info["backend"] == "diffusers"   # loaded again
    assert not ctx.conditions.active(OUT_OF_MEMORY)


def test_stopping_mid_keyframe_is_transient(tmp_path, model):
    from dreamd.errors import TransientBackendError

    ctx = context(make_cfg(tmp_path, model, steps=4))
    b = diffusion.DiffusionBackend(ctx.cfg, ctx).start()
    b.generate(request(1))
    original = b._pipe.unet.forward

    def forward(*a, **kw):
        ctx.stopping.set()
        return original(*a, **kw)
    b._pipe.unet.forward = forward
    with pytest.raises(TransientBackendError, match="stopping"):
        b.generate(dataclasses.replace(request(2), denoise=1.0))


# ---------------------------------------------------------------- bad inputs

def fallback_said(b, caplog, *words: str) -> str:
    lines = [r.getMessage() for r in caplog.records
             if r.name == "dreamd.diffusion" and r.levelno >= logging.ERROR]
    assert len(lines) == 1, lines
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert b.facts["backend_now"] == "procedural"
    assert "dreaming on the procedural backend meanwhile" in b.facts["backend_problem"]
    return lines[0]


def test_a_missing_model_falls_back_and_comes_back_when_it_appears(tmp_path, model, caplog,
                                                                   monkeypatch):
    caplog.set_level(logging.INFO)
    target = tmp_path / "later.safetensors"
    b = diffusion.DiffusionBackend(make_cfg(tmp_path, model, model=str(target))).start()
    fallback_said(b, caplog, "later.safetensors", "no such file",
                  "dreamd models pull stable-diffusion-v1-5/stable-diffusion-v1-5")
    made = b.generate(request(1))
    assert made.info["backend"] == "procedural" and made.image.size == (W, H)
    target.write_bytes(model["ckpt"].read_bytes())        # the file arrives
    b._retry_at = 0.0                                        # (RECHECK_SECONDS later)
    assert b.generate(request(2)).info["backend"] == "diffusers"
    assert b.facts["backend_problem"] is None and b.facts["backend_now"] == "diffusers"


def test_a_checkpoint_of_another_shape_falls_back_once_until_the_file_changes(
        tmp_path, model, caplog, monkeypatch):
    # the tiny model against the SD 1.5 skeleton dreamd ships: its tensors do not fit
    caplog.set_level(logging.INFO)
    b = diffusion.DiffusionBackend(make_cfg(tmp_path, model, config_dir="")).start()
    assert b.generate(request(1)).info["backend"] == "procedural"
    fallback_said(b, caplog, str(model["ckpt"]), "do not fit the SD 1.x architecture",
                  "diffusion.config_dir")
    tried = []
    monkeypatch.setattr(diffusion.load, "build", lambda *a, **kw: tried.append(1))
    b._retry_at = 0.0
    assert b.generate(request(2)).info["backend"] == "procedural"
    assert tried == []                       # the same file: not loaded again for nothing


def test_a_lora_that_does_not_fit_falls_back(tmp_path, model, caplog):
    # made for a UNet with other widths, and nothing in its header tells the family
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(**{**tiny.TINY_UNET, "cross_attention_dim": 48,
                                    "block_out_channels": (64, 64)})
    lora = tiny.save_lora(tmp_path / "other-lora.safetensors", other)
    caplog.set_level(logging.INFO)
    b = diffusion.DiffusionBackend(make_cfg(tmp_path, model, lora=str(lora))).start()
    assert b.generate(request(1)).info["backend"] == "procedural"
    fallback_said(b, caplog, "other-lora.safetensors", "does not fit the model",
                  'diffusion.lora = "none"')


def test_a_lora_that_fits_is_fused_and_changes_the_image(tmp_path, model):
    plain = diffusion.DiffusionBackend(make_cfg(tmp_path, model)).start()
    with_lora = diffusion.DiffusionBackend(
        make_cfg(tmp_path, model, lora=str(model["lora"]))).start()
    a, b = plain.generate(request(1)), with_lora.generate(request(1))
    assert b.info["backend"] == "diffusers"
    assert not np.array_equal(pixels(a.image), pixels(b.image))
    names = [n for n, _ in with_lora._pipe.unet.named_modules()]
    assert not any("lora" in n for n in names)               # fused: no adapter layers


def test_the_guards_free_interrupts_the_keyframe_and_unloads_the_model(tmp_path, model):
    """A game starts mid-keyframe: interrupt() stops it at its next step (the UNet runs
    once more at most, not the remaining steps), the keyframe is KeyframeInterruptedError
    (postponed by its worker, never failed) and free() unloads the model right after."""
    from dreamd.errors import KeyframeInterruptedError
    from dreamd.workers import controls

    ctx = context(make_cfg(tmp_path, model, steps=8))
    b = diffusion.DiffusionBackend(ctx.cfg, ctx).start()
    assert b.interrupt() == ""                              # nothing being made
    b.generate(request(1))
    original = b._pipe.unet.forward
    calls: list = []

    def forward(*a, **kw):
        calls.append(1)
        if len(calls) == 2:                     # the controls worker, while the UNet runs
            controls.free(b, None, interrupt=True)
        return original(*a, **kw)
    b._pipe.unet.forward = forward
    with pytest.raises(KeyframeInterruptedError, match="interrupted for a pause"):
        b.generate(dataclasses.replace(request(2), denoise=1.0))
    assert len(calls) <= 3 and b._pipe is None              # of 8 steps; unloaded
    assert b.generate(request(3)).info["backend"] == "diffusers"   # the next loads it
