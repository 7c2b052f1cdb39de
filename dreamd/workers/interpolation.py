"""The interpolation worker: claims a batch for the pair (k, k+1), encodes both
keyframes (or reuses their stored latents), slerps all N+1 positions in one call,
decodes them as one batch and writes the frames (files first, fsynced), then
completes the batch and creates its frame rows in one transaction.

A segment's frames are t = 0, 1/(N+1), …, N/(N+1): the keyframe itself (t = 0) is
shown as decoded by the same codec as its in-betweens, so detail does not jump at
every keyframe; the raw keyframe stays the img2img input.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from pathlib import Path

from PIL import Image
from sqlalchemy import select

from dreamd.conditions import begin_retrying, environment_recovered, postpone_for
from dreamd.storage.files import write_atomic
from dreamd.faults import pause_point, slow_down
from dreamd.errors import CodecError, StaleTransitionError
from dreamd.ledger import transitions
from dreamd.ledger.models import Keyframe
from dreamd.quality import recorder as quality
from dreamd.storage.paths import resolve, stored
from dreamd.workers.context import WorkerContext, drain, log_timing, timed
from dreamd.governor import worker as governor

log = logging.getLogger("dreamd.interpolation")
KF = Keyframe.__table__
PNG_LEVEL = 1   # frames are short-lived: speed over size (~4 ms vs ~25 ms at level 6)


def frame_path(ctx: WorkerContext, chain_index: int, t: float) -> Path:
    return ctx.cfg.frames_dir / f"{chain_index:06d}-{round(t * 1_000_000):07d}.png"


def latent_path(ctx: WorkerContext, image_sha256: str, codec) -> Path:
    """Named by what it is the latent of: the image's content hash and the codec's
    identity (name, divisor, weights). A latent can never stand for another image,
    whatever became of row ids (a deleted ledger, a copied data dir); retention
    (dreamd/storage/retention.py) deletes it once no pending batch needs it."""
    from dreamd.latent.storage import latent_file

    return latent_file(ctx.cfg.data_dir, image_sha256, codec)


def positions(n: int) -> list[float]:
    """Playback positions of a segment with n in-betweens: 0, 1/(n+1), …, n/(n+1)."""
    return [i / (n + 1) for i in range(n + 1)]


class Codecs:
    """The codec, built lazily on first use (loading weights takes time) and released
    on request (the guard frees device memory while a game runs)."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self._codec = None
        self._sized: dict[float, object] = {}   # the same codec at other divisors
        self._lock = threading.Lock()
        self.reason = ""

    def get(self, divisor: float | None = None):
        """The codec at `divisor` (a batch's, as the governor chose it); at the
        configured one when None."""
        codec = self._configured()
        if divisor is None or float(divisor) == float(self.ctx.cfg.generation.resolution_divisor):
            return codec
        with self._lock:
            if float(divisor) not in self._sized:
                from dreamd.latent.choose import at_divisor
                self._sized[float(divisor)] = at_divisor(codec, float(divisor))
            return self._sized[float(divisor)]

    def _configured(self):
        with self._lock:
            if self._codec is None:
                from dreamd.latent.choose import codec_for

                self._codec, self.reason = codec_for(self.ctx.cfg)
                self.ctx.facts["codec"] = self._codec.name
            return self._codec

    def release(self) -> None:
        with self._lock:
            for codec in [self._codec, *self._sized.values()]:
                if codec is not None:
                    codec.release()


def encode_keyframe(ctx: WorkerContext, codec, row):
    """The keyframe's latent: stored beside its frame once, reused after a restart."""
    import torch

    from dreamd.latent.images import to_tensor
    from dreamd.latent.storage import latent_meta, load_latent, reusable, save_latent

    image_file = resolve(ctx.cfg.data_dir, row.path)
    sha = row.sha256 or hashlib.sha256(image_file.read_bytes()).hexdigest()
    path = latent_path(ctx, sha, codec)
    if path.exists():
        try:
            latent, meta = load_latent(path)
            if reusable(meta, codec) and meta.get("image_sha256") == sha:
                return latent.to(codec.device)
        except CodecError as exc:
            log.warning("ignoring stored latent %s: %s", path, exc)
    with Image.open(image_file) as im:
        image = im.convert("RGB")
    with torch.inference_mode():
        # float32 in: the codec casts to its own precision; a bf16 image would round pixels
        latent = codec.encode(to_tensor(image, codec.device, torch.float32))[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_latent(path, latent, latent_meta(codec, width=image.width, height=image.height,
                                          image_sha256=sha))
    return latent


def write_frame(ctx: WorkerContext, chain_index: int, t: float, image: Image.Image,
                size: tuple[int, int]) -> Path:
    """Files before rows: the frame is on disk (fsynced) before its row can exist."""
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=PNG_LEVEL)
    path = frame_path(ctx, chain_index, t)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue(), fsync=True)
    return path


def tick(ctx: WorkerContext, codecs: Codecs) -> int:
    """Make in-betweens while there are batches to make; returns how many were completed."""
    return drain(ctx, "interpolation", lambda batch, owner: process(ctx, codecs, batch, owner))


def process(ctx: WorkerContext, codecs: Codecs, batch, owner: str) -> int:
    import torch

    from dreamd.latent.ease import eased
    from dreamd.latent.images import to_images
    from dreamd.latent.slerp import slerp

    started = time.perf_counter()
    timings: dict[str, float] = {}
    batch = governor.at_claim(ctx, batch, owner)    # N and size as the governor says now
    ts = positions(batch.n_frames)
    try:
        with ctx.reader.connect() as conn:
            pair = {r.id: r for r in conn.execute(select(KF).where(KF.c.id.in_(
                [batch.from_keyframe_id, batch.to_keyframe_id]))).all()}
        a, b = pair[batch.from_keyframe_id], pair[batch.to_keyframe_id]
        with ctx.lease("interpolation", batch.id, owner):
            with timed(timings, "codec"):     # built once: not the batch's own time
                codec = codecs.get(batch.divisor)
            with timed(timings, "encode"):
                la, lb = encode_keyframe(ctx, codec, a), encode_keyframe(ctx, codec, b)
            with torch.inference_mode():
                with timed(timings, "slerp"):
                    # played at t, slerped at the eased t (quality.ease)
                    latents = slerp(la, lb, torch.tensor(eased(ts, ctx.knob("quality.ease")),
                                                         dtype=torch.float32))
                with timed(timings, "decode"):
                    frames = to_images(codec.decode(latents))
                    # a test's slow decoder (DREAMD_SLOW), by area like a real one's
                    slow_down("inbetween", len(ts) / float(batch.divisor or 1.0) ** 2)
            with timed(timings, "write"):
                written = [(t, write_frame(ctx, batch.chain_index, t, image, (a.width, a.height)))
                           for t, image in zip(ts, frames)]
            pause_point("frames-written", ctx.cfg.data_dir)
    except Exception as exc:
        if postpone_for(ctx, "interpolation", batch.id, owner, exc):
            return 0      # a full disk, a read-only one: waits without using an attempt
        log.exception("in-betweens of keyframe %d failed (batch %d)", batch.chain_index, batch.id)
        try:
            with ctx.engine.begin() as conn:
                transitions.fail(conn, "interpolation", batch.id, owner,
                                 f"{type(exc).__name__}: {exc}",
                                 permanent=isinstance(exc, CodecError))
        except StaleTransitionError as stale:
            log.warning("in-betweens of keyframe %d: %s", batch.chain_index, stale)
        return 0
    environment_recovered(ctx)

    # the batch's own time: loading the codec's weights the first time is not (the
    # governor reads duration_ms as the cost of making these frames)
    ms = (time.perf_counter() - started) * 1000 - timings.get("codec", 0.0)
    try:
        # the frames are on disk: a busy ledger is waited out, not left to the lease
        with timed(timings, "ledger"), begin_retrying(ctx, f"in-betweens of keyframe {batch.chain_index}") as conn:
            transitions.complete(conn, "interpolation", batch.id, owner,
                                 values={"duration_ms": ms, "codec": codec.name},
                                 detail={"ms": round(ms, 1), "frames": len(written)})
            for i, (t, path) in enumerate(written):
                transitions.create(conn, "frame", {
                    "chain_index": batch.chain_index, "t": t,
                    "kind": "keyframe" if i == 0 else "inbetween",
                    "keyframe_id": a.id if i == 0 else None, "interpolation_id": batch.id,
                    "path": stored(ctx.cfg.data_dir, path)}, worker=owner)
    except StaleTransitionError as exc:
        log.warning("in-betweens of keyframe %d: %s (lease lost; it will be redone)",
                    batch.chain_index, exc)
        return 0
    ctx.facts["interpolation_ms_per_frame"] = ms / max(1, len(written))
    with timed(timings, "quality"):     # never fails the batch (dreamd/quality/recorder.py)
        quality.record_segment(ctx, batch, frames)
    log_timing(log, "interpolation", batch.id, timings, frames=len(written))
    log.info("in-betweens of keyframe %d ready (%d frames, %.0f ms; batch %d)",
             batch.chain_index, len(written), ms, batch.id)
    return 1
