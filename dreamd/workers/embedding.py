"""The embedding worker: finds frames the memory should know, embeds them, and decides
their cache admission, all through `embedding` rows.

Discovery (chosen over creating rows in the keyframe worker: an embedding row names a
frame, and a keyframe's frame row only exists once its pair is interpolated): each
tick creates an `embedding` row for every new keyframe frame (and, with
`cache.embed_midpoints`, the middle in-between of each pair). A keyframe frame is
embedded from the raw keyframe image (the img2img input, kept forever). Rows are
claimed, embedded outside any transaction, then completed with the vector and the
admission decision in one transaction.

Embedding never stalls playback: it runs in its own tick behind the chain, waits
while the buffer is below `display.min_buffer_seconds`, and when more than
`cache.max_backlog` rows wait, the oldest are cancelled ("skipped under load",
counted in `ctx.facts["embeddings_skipped"]` and in `dreamd stats`).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack

from PIL import Image
from sqlalchemy import func, select

from dreamd.errors import StaleTransitionError
from dreamd.ledger import read_model, transitions
from dreamd.ledger.models import Embedding, Frame, Keyframe, utcnow
from dreamd.memory import cache
from dreamd.memory.embedder import Embedders
from dreamd.memory.scale import scale_for
from dreamd.storage.paths import resolve
from dreamd.workers.context import WorkerContext

log = logging.getLogger("dreamd.embedding")
EM, FR, KF = Embedding.__table__, Frame.__table__, Keyframe.__table__
BATCH = 4            # rows per claim: one model call embeds them together


class EmbeddingWorker:
    def __init__(self, ctx: WorkerContext, embedders: Embedders) -> None:
        self.ctx = ctx
        self.embedders = embedders
        ctx.facts.setdefault("embeddings_skipped", 0)
        with ctx.reader.connect() as conn:
            ctx.facts["cache_size"] = cache.size(conn)
            # Frames up to this id were looked at: those with an embedding row of any
            # model. After a change of model the new one starts from there, with a
            # memory of its own, instead of re-embedding the whole history.
            self.seen_frame_id = conn.execute(select(func.max(EM.c.frame_id))).scalar() or 0

    def tick(self) -> int:
        ctx = self.ctx
        if not ctx.cfg.cache.enabled or not ctx.may_claim():
            return 0
        emb = self.embedders.get()
        self.discover(emb.model_id)
        self.shed()
        done = 0
        owner = ctx.lease_owner("embedding")
        while ctx.may_claim() and not self.under_load():
            with ctx.look("embedding").reading() as conn:   # never the write lock
                if not read_model.has_due(conn, "embedding"):
                    break
            with ctx.engine.begin() as conn:
                rows = transitions.claim(conn, "embedding", owner, limit=BATCH,
                                         lease_seconds=ctx.cfg.generation.lease_seconds)
            if not rows:
                break
            with ctx.holding("embedding", [r.id for r in rows]):
                done += self.process(emb, rows, owner)
        return done

    # ------------------------------------------------------------ finding work
    def discover(self, model: str) -> int:
        """Create embedding rows for frames that have none yet."""
        ctx = self.ctx
        # the idle ticks' questions on the worker's kept connection (a pooled SQLAlchemy
        # one cost more than the questions), each method's in one read transaction
        with ctx.look("embedding").reading(snapshot=True) as conn:
            new = read_model.frames_after(conn, self.seen_frame_id)
            if not new:
                return 0
            have = read_model.embedded_frames(conn, model, new[0]["id"])
        wanted = [r for r in new if r["kind"] == "keyframe" or (
            ctx.cfg.cache.embed_midpoints and _is_midpoint(r["kind"], r["t"], r["n_frames"]))]
        wanted = [r for r in wanted if r["id"] not in have]
        if wanted:
            with ctx.engine.begin() as conn:
                for r in wanted:
                    transitions.create(conn, "embedding", {
                        "frame_id": r["id"], "model": model,
                        "max_attempts": ctx.cfg.generation.max_attempts},
                        worker="embedding", detail={"kind": r["kind"], "chain": r["chain_index"]})
        self.seen_frame_id = new[-1]["id"]
        return len(wanted)

    def shed(self) -> int:
        """Past `cache.max_backlog` waiting rows, cancel the oldest (midpoints first)."""
        ctx = self.ctx
        limit = ctx.cfg.cache.max_backlog
        with ctx.look("embedding").reading(snapshot=True) as conn:
            waiting = read_model.embeddings_waiting(conn)
            if waiting <= limit:
                return 0
            drop = read_model.embeddings_to_shed(conn, waiting - limit)
        with ctx.engine.begin() as conn:
            for i in drop:
                try:
                    transitions.transition(conn, "embedding", i, "available", "cancelled",
                                           worker="embedding", event="skipped",
                                           detail="skipped under load",
                                           values={"completed_at": utcnow()})
                except StaleTransitionError:
                    pass
        ctx.facts["embeddings_skipped"] = ctx.facts.get("embeddings_skipped", 0) + len(drop)
        log.info("embedding: skipped %d frame(s) under load (backlog %d > %d)", len(drop),
                 waiting, limit)
        return len(drop)

    def under_load(self) -> bool:
        """Playback is short of frames: keyframes and in-betweens get the CPU first."""

        ctx = self.ctx
        need = math.ceil(ctx.knob("display.min_buffer_seconds") * ctx.knob("display.fps"))
        with ctx.look("embedding").reading(snapshot=True) as conn:
            has_chain = read_model.newest_frame(conn) is not None
            return has_chain and read_model.frames_ahead_of_playhead(conn, at_most=need) < need

    # ------------------------------------------------------------ the work
    def process(self, emb, rows, owner: str) -> int:
        ctx = self.ctx
        started = time.perf_counter()
        with ctx.reader.connect() as conn:
            paths = dict(conn.execute(
                select(FR.c.id, cache.IMAGE_PATH)
                .select_from(FR.outerjoin(KF, KF.c.id == FR.c.keyframe_id))
                .where(FR.c.id.in_([r.frame_id for r in rows]))).all())
        images, ok = [], []
        for r in rows:
            try:
                with Image.open(resolve(ctx.cfg.data_dir, paths[r.frame_id])) as im:
                    images.append(im.convert("RGB"))
                ok.append(r)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._fail(r, owner, f"image of frame {r.frame_id}: {exc}", permanent=True)
        if not ok:
            return 0
        try:
            with ExitStack() as leases:
                for r in ok:
                    leases.enter_context(ctx.lease("embedding", r.id, owner))
                vectors = emb.embed(images)
        except Exception as exc:
            log.exception("embedding %s failed", [r.id for r in ok])
            for r in ok:
                self._fail(r, owner, f"{type(exc).__name__}: {exc}", permanent=False)
            return 0
        ms = (time.perf_counter() - started) * 1000 / len(ok)
        c = ctx.cfg.cache
        threshold = scale_for(emb.model_id, c).admission
        done = 0
        for r, v in zip(ok, vectors):
            try:
                with ctx.engine.begin() as conn:
                    now = utcnow()
                    adm = cache.decide(conn, v, emb.model_id, threshold, c.max_size)
                    # the decision goes on the completion's history row (`dreamd stats`)
                    transitions.complete(conn, "embedding", r.id, owner, values={
                        "model": emb.model_id, "dim": int(v.shape[0]),
                        "vector": cache.to_blob(v), "in_cache": int(adm.admitted),
                        "last_used_at": now if adm.admitted else None},
                        detail={**adm.detail(), "ms": round(ms, 1)})
                    cache.apply(conn, adm, now)
                    ctx.facts["cache_size"] = cache.size(conn)
                done += 1
            except StaleTransitionError as exc:
                log.warning("embedding %d: %s (lease lost)", r.id, exc)
        log.debug("embedded %d frame(s) with %s, %.0f ms each", done, emb.model_id, ms)
        return done

    def _fail(self, row, owner: str, error: str, permanent: bool) -> None:
        try:
            with self.ctx.engine.begin() as conn:
                transitions.fail(conn, "embedding", row.id, owner, error, permanent=permanent)
        except StaleTransitionError as exc:
            log.warning("embedding %d: %s", row.id, exc)


def _is_midpoint(kind: str, t: float, n_frames: int | None) -> bool:
    """The in-between nearest t = 0.5 of its pair."""
    if kind != "inbetween" or not n_frames:
        return False
    n = n_frames + 1
    return round(t * n) == n // 2

