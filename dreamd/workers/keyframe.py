"""The keyframe worker: claims a keyframe row, runs the backend outside any
transaction (renewing its lease), stores the image (file first, fsynced), then
completes the row and creates the interpolation batch for the new pair in one
transaction.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import uuid
from pathlib import Path

from PIL import Image
from sqlalchemy import select, update

from dreamd.backends import KeyframeBackend, KeyframeRequest
from dreamd.conditions import begin_retrying, classify, environment_recovered, postpone_for
from dreamd.storage.files import write_atomic
from dreamd.faults import pause_point, slow_down
from dreamd.errors import (KeyframeInterruptedError, PermanentBackendError, StaleTransitionError,
                           TransientBackendError)
from dreamd.ledger import transitions
from dreamd.ledger.models import Keyframe
from dreamd.quality import coherence
from dreamd.quality import recorder as quality
from dreamd.storage.paths import resolve, stored
from dreamd.workers.context import WorkerContext, drain, log_timing, timed
from dreamd.governor import worker as governor

log = logging.getLogger("dreamd.keyframe")
KF = Keyframe.__table__
PNG_LEVEL = 3   # keyframes are kept: smaller files; ~10 ms at 512x256


def keyframe_path(ctx: WorkerContext, chain_index: int, row_id: int) -> Path:
    return ctx.cfg.keyframes_dir / f"k{chain_index:06d}-{row_id}.png"


def load_input(row, width: int, height: int, data_dir: Path) -> Image.Image | None:
    if not row.input_path:
        return None
    try:
        with Image.open(resolve(data_dir, row.input_path)) as im:
            im = im.convert("RGB")
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.LANCZOS)
            return im
    except (OSError, ValueError) as exc:
        if classify(exc):   # permission denied, a read-only mount: waits, never discarded
            raise
        raise PermanentBackendError(f"input image {row.input_path}: {exc}") from exc


def input_png(row, width: int, height: int, data_dir: Path) -> bytes | None:
    """The input file's bytes when it is already an RGB PNG of the keyframe's size (the
    previous keyframe, usually): a remote backend uploads them as they are, sparing a PNG
    encode per keyframe. None otherwise (the backend encodes `image`)."""
    if not row.input_path:
        return None
    try:
        data = resolve(data_dir, row.input_path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            fits = im.format == "PNG" and im.mode == "RGB" and im.size == (width, height)
    except (OSError, ValueError):
        return None
    return data if fits else None


def input_digest(row, data_dir: Path) -> str | None:
    """The sha256 of the input file as it is on disk (KeyframeRequest.input_sha256)."""
    if not row.input_path:
        return None
    try:
        return hashlib.sha256(resolve(data_dir, row.input_path).read_bytes()).hexdigest()
    except OSError:
        return None


def tick(ctx: WorkerContext, backend: KeyframeBackend) -> int:
    """Make keyframes while there are any to make; returns how many were completed."""
    # backend_unusable: the backend cannot make keyframes now (every server down, or
    # stopped on a configuration error); claiming would only burn attempts
    return drain(ctx, "keyframe", lambda row, owner: process(ctx, backend, row, owner),
                 blocked=lambda: bool(ctx.facts.get("backend_unusable")))


def process(ctx: WorkerContext, backend: KeyframeBackend, row, owner: str) -> int:
    started = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        prompt_id = row.prompt_id
        if prompt_id is None and backend.name != "procedural":
            # The id is in the ledger before the remote server can know it, so a
            # restarted daemon re-attaches instead of submitting twice.
            prompt_id = str(uuid.uuid4())
            with ctx.engine.begin() as conn:
                conn.execute(update(KF).where(KF.c.id == row.id, KF.c.lease_owner == owner)
                             .values(prompt_id=prompt_id))
        raw = load_input(row, row.width, row.height, ctx.cfg.data_dir)
        # colour coherence: the input pulled towards its theme run's palette
        steered, palette = coherence.steer(ctx, row, raw)
        request = KeyframeRequest(
            chain_index=row.chain_index, width=row.width, height=row.height, seed=row.seed,
            theme=row.theme, prompt=row.prompt, negative_prompt=row.negative_prompt,
            denoise=row.denoise, steps=ctx.knob("generation.steps"),
            cfg=ctx.knob("generation.cfg"), sampler=ctx.cfg.generation.sampler,
            scheduler=ctx.cfg.generation.scheduler,
            image=steered, palette=palette, prompt_id=prompt_id,
            input_sha256=(input_digest(row, ctx.cfg.data_dir)
                          if hasattr(backend, "keyframe_written") else None),
            image_png=(input_png(row, row.width, row.height, ctx.cfg.data_dir)
                       if backend.name != "procedural" and steered is raw else None),
            server_hint=row.server, on_server=_server_recorder(ctx, row.id, owner))
        with ctx.lease("keyframe", row.id, owner), timed(timings, "generate"):
            result = backend.generate(request)
            slow_down("keyframe")         # a test's slow backend (DREAMD_SLOW)
        image = result.image.convert("RGB")
        if image.size != (row.width, row.height):
            raise PermanentBackendError(f"{backend.name} returned {image.size[0]}x"
                                        f"{image.size[1]}, expected {row.width}x{row.height}")
        with timed(timings, "write"):
            buf = io.BytesIO()
            image.save(buf, "PNG", compress_level=PNG_LEVEL)
            data = buf.getvalue()
            path = keyframe_path(ctx, row.chain_index, row.id)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data, fsync=True)
            sha = hashlib.sha256(data).hexdigest()
            keep = getattr(backend, "keyframe_written", None)
            if keep is not None:      # a backend that feeds latents keeps this one's
                keep(row.chain_index, sha)
        pause_point("keyframe-written", ctx.cfg.data_dir)
    except KeyframeInterruptedError as exc:
        _postpone_for_pause(ctx, row, owner, str(exc))
        return 0
    except (TransientBackendError, PermanentBackendError) as exc:
        if ctx.stopping.is_set() and isinstance(exc, TransientBackendError):
            # the stop cut the wait short: the daemon releases the lease, the next start
            # re-attaches to the prompt (no failure recorded, no backoff)
            log.info("keyframe %d: %s", row.chain_index, exc)
            return 0
        _fail(ctx, row, owner, str(exc), permanent=isinstance(exc, PermanentBackendError))
        return 0
    except Exception as exc:  # a bug or an unexpected failure: retry, attempts bound it
        if postpone_for(ctx, "keyframe", row.id, owner, exc):
            return 0      # a full disk, a read-only one: waits without using an attempt
        log.exception("keyframe %d failed (row %d)", row.chain_index, row.id)
        _fail(ctx, row, owner, f"{type(exc).__name__}: {exc}", permanent=False)
        return 0
    environment_recovered(ctx)

    ms = (time.perf_counter() - started) * 1000
    try:
        # the image is on disk: a busy ledger is waited out, not left to the lease
        with timed(timings, "ledger"), begin_retrying(ctx, f"keyframe {row.chain_index}") as conn:
            transitions.complete(conn, "keyframe", row.id, owner, detail={"ms": round(ms, 1)},
                                 values={"path": stored(ctx.cfg.data_dir, path), "sha256": sha,
                                         "generation_ms": ms,
                                         # the seed the backend used (a fixed-seed policy
                                         # overrides the planner's): made again from it
                                         "seed": result.info.get("seed", row.seed),
                                         "server": result.info.get("server"),
                                         # a fallback backend may have made it
                                         "backend": result.info.get("backend") or row.backend})
            prev = conn.execute(select(KF.c.id, KF.c.chain_index)
                                .where(KF.c.chain_index == row.chain_index - 1,
                                       KF.c.state == "completed")
                                .order_by(KF.c.id.desc()).limit(1)).first()
            if prev is not None:
                # N and the interpolation size as the governor chose them now: a change
                # lands at a segment boundary (dreamd/governor/worker.py)
                n_frames, divisor = governor.current(ctx)
                transitions.create(conn, "interpolation", {
                    "chain_index": prev.chain_index, "from_keyframe_id": prev.id,
                    "to_keyframe_id": row.id, "n_frames": n_frames, "divisor": divisor,
                    "max_attempts": ctx.cfg.generation.max_attempts}, worker=owner)
    except StaleTransitionError as exc:
        log.warning("keyframe %d: %s (its lease was lost; another attempt will redo it)",
                    row.chain_index, exc)
        return 0
    # measured before the planner wakes, so it plans the next one knowing this one's
    # change and drift; never fails the keyframe (dreamd/quality/recorder.py)
    with timed(timings, "quality"):
        quality.record_keyframe(ctx, row, image)
    for stage in ("interpolation", "planner", "embedding"):
        ctx.wake(stage)
    ctx.facts["generation_time"] = ms / 1000
    log_timing(log, "keyframe", row.id, timings)
    log.info("keyframe %d ready (%s, %.0f ms; row %d)", row.chain_index, row.theme, ms, row.id)
    return 1


def _server_recorder(ctx: WorkerContext, row_id: int, owner: str):
    """Record which server has the prompt as soon as the backend knows, so a restarted
    daemon asks that server first when it re-attaches."""
    def record(url: str) -> None:
        with ctx.engine.begin() as conn:
            conn.execute(update(KF).where(KF.c.id == row_id, KF.c.lease_owner == owner)
                         .values(server=url))
    return record


def _postpone_for_pause(ctx: WorkerContext, row, owner: str, error: str) -> None:
    """Interrupted for a pause (the guard freeing the GPU): back to wait with its attempt
    given back, never discarded; its prompt id is dropped, since ComfyUI's history now
    says that prompt was interrupted, and a new one is posted once the dream resumes."""
    try:
        with begin_retrying(ctx, f"keyframe {row.chain_index}") as conn:
            transitions.postpone(conn, "keyframe", row.id, owner, error,
                                 delay_seconds=0.0, why="paused")
            conn.execute(update(KF).where(KF.c.id == row.id)
                         .values(prompt_id=None, server=None))
        log.info("keyframe %d (row %d) postponed: %s", row.chain_index, row.id, error)
    except StaleTransitionError as exc:
        log.warning("keyframe %d: %s", row.chain_index, exc)


def _fail(ctx: WorkerContext, row, owner: str, error: str, permanent: bool) -> None:
    try:
        with ctx.engine.begin() as conn:
            state = transitions.fail(conn, "keyframe", row.id, owner, error, permanent=permanent)
        log.warning("keyframe %d (row %d) failed, now %s: %s", row.chain_index, row.id, state,
                    error)
    except StaleTransitionError as exc:
        log.warning("keyframe %d: %s", row.chain_index, exc)
