"""Injection: the planner's choice to feed the next keyframe something besides the last.

With a base probability per keyframe (raised while the chain is collapsing), after a
warm-up and outside a cooldown, the next keyframe's input becomes a blend of the
current keyframe and either a cached frame in a similarity band (related, but
different) or a seed image. Seeds come with an adaptive probability that grows with
each cache injection in a row, and are forced after `seed_force_after` of them (the
cache alone is not keeping the dream alive); a seed also stands in when the cache has
no candidate yet ("bootstrap"). The blend runs in the codec's latent space when the
codec is a real VAE, else in pixels; the blended image is written (files before rows)
and the `injections` row is created with the keyframe row, in one transaction.

Decisions draw from a generator seeded by (generation.seed, chain index), so a run
replays the same decisions from the same ledger.
"""

from __future__ import annotations

import io
import logging
import random
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from sqlalchemy import Connection, insert, select

from dreamd.storage.files import write_atomic
from dreamd.storage.paths import resolve, stored
from dreamd.ledger.models import Injection as InjectionModel, Keyframe, utcnow
from dreamd.memory import cache, collapse
from dreamd.memory.scale import scale_for

log = logging.getLogger("dreamd.memory")
IN, KF = InjectionModel.__table__, Keyframe.__table__
PNG_LEVEL = 3


@dataclass
class Injection:
    kind: str                       # cache | seed
    reason: str                     # collapse | chance | bootstrap | forced | requested
    weight: float                   # share of the injected picture in the blend
    input_path: Path                # the blended image the keyframe starts from
    method: str                     # "latent:<codec>" or "pixels"
    similarity: float | None = None  # injected picture vs the newest embedded keyframe
    source_frame_id: int | None = None
    embedding_id: int | None = None
    seed_path: str | None = None
    level: float | None = None      # the window's mean similarity when deciding

    def detail(self) -> dict:
        return {"injection": self.kind, "reason": self.reason, "weight": round(self.weight, 3),
                "blend": self.method,
                "similarity": None if self.similarity is None else round(self.similarity, 4),
                "collapse_level": None if self.level is None else round(self.level, 4)}


@dataclass
class History:
    last_chain: int | None          # chain index of the newest injected keyframe
    cache_run: int                  # cache injections since the last seed injection
    last_seed: str | None


def history(conn: Connection) -> History:
    rows = conn.execute(select(IN.c.kind, IN.c.seed_path, KF.c.chain_index)
                        .select_from(IN.join(KF, KF.c.id == IN.c.keyframe_id))
                        .order_by(IN.c.id.desc()).limit(200)).all()
    run = 0
    last_seed = None
    for r in rows:
        if r.kind == "seed":
            last_seed = r.seed_path
            break
        run += 1
    return History(rows[0].chain_index if rows else None, run, last_seed)


def rng_for(seed: int, chain_index: int) -> random.Random:
    return random.Random(f"dreamd-memory:{seed}:{chain_index}")


def decide(ctx, last, k: int) -> Injection | None:
    """Whether keyframe k starts from something besides keyframe k-1 (`last`), and from
    what; the blended input is on disk when an Injection is returned."""
    c = ctx.cfg.cache
    # `dreamd inject` / the dashboard's key: no warm-up, cooldown or chance applies
    requested = bool(ctx.facts.get("inject_requested"))
    if (not c.enabled or not c.injections or last is None or not last.path
            or (k < c.warmup_keyframes and not requested)):
        return None
    rng = rng_for(ctx.cfg.generation.seed, k)
    with ctx.reader.connect() as conn:
        hist = history(conn)
        if (hist.last_chain is not None and k - hist.last_chain < c.cooldown_keyframes
                and not requested):
            return None
        model = collapse.current_model(conn)
        scale = scale_for(model or "", c)
        win = collapse.window(conn, c.collapse_window, scale.collapse, model)
        p = c.collapse_probability if win.collapsing else c.injection_probability
        if rng.random() >= p and not requested:   # drawn anyway: later draws stay the same
            return None
        ctx.facts.pop("inject_requested", None)
        reason = "requested" if requested else "collapse" if win.collapsing else "chance"
        forced = hist.cache_run >= c.seed_force_after
        p_seed = c.seed_probability + (1 - c.seed_probability) * min(
            1.0, hist.cache_run / c.seed_force_after)
        kind = "seed" if forced or rng.random() < p_seed else "cache"
        if forced and not requested:
            reason = "forced"
        pick = None
        if kind == "cache":
            found = [] if win.reference is None else cache.candidates(
                conn, model, win.reference, (scale.band_min, scale.band_max),
                before_chain=win.chain[0] if win.chain else None, data_dir=ctx.cfg.data_dir)
            pick = cache.pick(found, rng)
            if pick is None:
                kind, reason = "seed", "requested" if requested else "bootstrap"
    size = (last.width, last.height)
    if kind == "cache":
        image, method = blend(ctx, resolve(ctx.cfg.data_dir, last.path),
                              resolve(ctx.cfg.data_dir, pick.path), c.injection_weight, size)
        inj = Injection("cache", reason, c.injection_weight, Path(), method,
                        similarity=pick.similarity, source_frame_id=pick.frame_id,
                        embedding_id=pick.embedding_id, level=win.level)
    else:
        seed = choose_seed(ctx, rng, hist.last_seed)
        if seed is None:
            log.info("keyframe %d: a %s seed injection was due, but there are no seed images "
                     "(see `dreamd seeds`)", k, reason)
            return None
        image, method = blend(ctx, resolve(ctx.cfg.data_dir, last.path), seed, c.seed_weight,
                              size)
        inj = Injection("seed", reason, c.seed_weight, Path(), method,
                        seed_path=stored(ctx.cfg.data_dir, seed),
                        similarity=seed_similarity(ctx, seed, model, win.reference),
                        level=win.level)
    inj.input_path = write_input(ctx, k, image)
    log.info("keyframe %d: %s injection (%s), weight %.2f, similarity %s, window %s", k,
             inj.kind, inj.reason, inj.weight,
             "n/a" if inj.similarity is None else f"{inj.similarity:.3f}",
             "n/a" if win.level is None else f"{win.level:.3f}")
    return inj


def choose_seed(ctx, rng: random.Random, last_seed: str | None) -> Path | None:
    from dreamd.seeding import pick_seed, seed_files   # seeds are seeding's

    seeds = seed_files(ctx.cfg.seed_dirs())
    if len(seeds) > 1 and last_seed:
        seeds = [s for s in seeds if stored(ctx.cfg.data_dir, s) != last_seed] or seeds
    # the rng's pick, or the next usable one after it: a broken seed is skipped
    return pick_seed(seeds, rng.randrange(len(seeds))) if seeds else None


def seed_similarity(ctx, seed: Path, model: str | None, reference) -> float | None:
    """The seed against the current look, when the embedder of `model` is already loaded
    (the planner never waits for a model to load)."""
    holder = getattr(ctx, "embedders", None)
    emb = holder.loaded() if holder is not None else None
    if emb is None or reference is None or emb.model_id != model:
        return None
    try:
        with Image.open(seed) as im:
            return float(emb.embed([im.convert("RGB")])[0] @ reference)
    except (OSError, ValueError):
        return None


def _load(path: Path, size: tuple[int, int]) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGB")
        return im if im.size == size else im.resize(size, Image.Resampling.LANCZOS)


def blend(ctx, current: Path, other: Path, weight: float,
          size: tuple[int, int]) -> tuple[Image.Image, str]:
    """(1 - weight) of `current` and `weight` of `other`: slerp between their latents when
    the codec is a real one (a blend a VAE decodes is a picture, not a double exposure),
    else a plain mix of pixels."""
    a, b = _load(current, size), _load(other, size)
    holder = getattr(ctx, "codecs", None)
    codec = holder.get() if holder is not None else None
    if codec is not None and codec.name != "pixel":
        try:
            return _latent_blend(getattr(codec, "inner", codec), a, b, weight, size), \
                f"latent:{codec.name}"
        except Exception:  # a codec failure must not stop the dream: blend pixels instead
            log.exception("latent blend with %s failed; blending pixels", codec.name)
    return Image.blend(a, b, weight), "pixels"


def _latent_blend(codec, a: Image.Image, b: Image.Image, weight: float,
                  size: tuple[int, int]) -> Image.Image:
    import torch

    from dreamd.latent.images import to_images, to_tensor
    from dreamd.latent.slerp import slerp

    with torch.inference_mode():
        latents = codec.encode(to_tensor([a, b], codec.device, codec.dtype))
        mixed = slerp(latents[0], latents[1], [weight])
        image = to_images(codec.decode(mixed))[0]
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


def write_input(ctx, k: int, image: Image.Image) -> Path:
    """The blended input, fsynced before any row names it; kept like keyframes are."""
    path = ctx.cfg.data_dir / "injections" / f"k{k:06d}-{uuid.uuid4().hex[:8]}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=PNG_LEVEL)
    write_atomic(path, buf.getvalue(), fsync=True)
    return path


def record(conn: Connection, keyframe_id: int, inj: Injection) -> int:
    """The injections row, in the transaction that creates the keyframe."""
    now = utcnow()
    if inj.embedding_id is not None:
        cache.touch(conn, inj.embedding_id, now)
    return conn.execute(insert(IN).values(
        keyframe_id=keyframe_id, kind=inj.kind, source_frame_id=inj.source_frame_id,
        seed_path=inj.seed_path, similarity=inj.similarity, reason=inj.reason,
        weight=inj.weight, created_at=now).returning(IN.c.id)).scalar_one()


def abandon(inj: Injection | None) -> None:
    """The keyframe was not created after all: its blended input is nobody's."""
    if inj is not None:
        inj.input_path.unlink(missing_ok=True)
