"""Running the dream chain in-process, one link at a time, on a real ledger: the
planner, keyframe, interpolation and embedding workers called in order, so memory
tests see exactly what the daemon would write, without its clock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select

from dreamd import config
from dreamd.backend import KeyframeRequest, KeyframeResult
from dreamd.ledger import database, queries
from dreamd.ledger.models import Keyframe
from dreamd.memory.embedder import Embedders
from dreamd.workers import interpolation, keyframe, planner
from dreamd.workers.context import WorkerContext
from dreamd.workers.embedding import EmbeddingWorker

REPO = Path(__file__).resolve().parents[1]
KF = Keyframe.__table__


def make_ctx(db_path: Path, toml: str = "", run_id: int = 1) -> WorkerContext:
    cfg = config.parse(toml)
    cfg.system.data_dir = str(db_path.parent)
    engine, reader = database.writer(db_path), database.reader(db_path)
    with engine.begin() as conn:
        queries.runtime(conn)
    ctx = WorkerContext(cfg=cfg, engine=engine, reader=reader, run_id=run_id,
                        owner=f"test:{run_id}")
    ctx.codecs = interpolation.Codecs(ctx)
    ctx.embedders = Embedders(cfg.cache)
    return ctx


def close(ctx: WorkerContext) -> None:
    ctx.engine.dispose()
    ctx.reader.dispose()


class Chain:
    """plan -> keyframe -> interpolation -> embedding, once per `step()`."""

    def __init__(self, ctx: WorkerContext, backend) -> None:
        self.ctx, self.backend = ctx, backend
        self.worker = EmbeddingWorker(ctx, ctx.embedders)

    def last(self):
        with self.ctx.reader.connect() as conn:
            return conn.execute(select(KF).where(KF.c.state == "completed")
                                .order_by(KF.c.chain_index.desc()).limit(1)).first()

    def step(self) -> None:
        planner.plan(self.ctx, self.last())
        keyframe.tick(self.ctx, self.backend)
        interpolation.tick(self.ctx, self.ctx.codecs)
        self.worker.tick()

    def run(self, n: int) -> "Chain":
        for _ in range(n):
            self.step()
        return self


class CollapsingBackend:
    """A deliberately collapsing img2img: every keyframe is its input pulled a fixed
    share of the way to one attractor image (plus a little seeded noise), so a chain
    left alone becomes the attractor within a few links."""

    name = "collapsing"

    def __init__(self, attractor: Image.Image, pull: float = 0.35, noise: float = 0.01):
        self.attractor = np.asarray(attractor.convert("RGB"), np.float32) / 255
        self.pull, self.noise = pull, noise

    def generate(self, request: KeyframeRequest) -> KeyframeResult:
        size = (request.width, request.height)
        target = self.attractor
        if target.shape[:2] != (request.height, request.width):
            target = np.asarray(Image.fromarray((target * 255).astype(np.uint8)).resize(size),
                                np.float32) / 255
        x = target if request.image is None else \
            np.asarray(request.image.convert("RGB").resize(size), np.float32) / 255
        rng = np.random.default_rng(request.seed)
        out = x + (target - x) * self.pull + rng.normal(0, self.noise, x.shape)
        image = Image.fromarray((np.clip(out, 0, 1) * 255).round().astype(np.uint8), "RGB")
        return KeyframeResult(image=image, info={"backend": self.name})

    def close(self) -> None:
        pass
