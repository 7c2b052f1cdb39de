"""Running the dream chain in-process, one link at a time, on a real ledger: the
planner, keyframe, interpolation and embedding workers called in order, so memory
tests see exactly what the daemon would write, without its clock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from dreamd.backends import KeyframeRequest, KeyframeResult
from dreamd.ledger.models import Keyframe
from dreamd.memory.embedder import Embedders
from dreamd.workers import interpolation, keyframe, planner
from dreamd.workers.context import WorkerContext
from dreamd.workers.embedding import EmbeddingWorker
from tests.conftest import close_worker_context, open_worker_context

REPO = Path(__file__).resolve().parents[1]
KF = Keyframe.__table__


def make_ctx(db_path: Path, toml: str = "", run_id: int = 1) -> WorkerContext:
    """A worker context with the chain's codecs and embedders; `close` it at the end."""
    ctx = open_worker_context(db_path, toml, run_id=run_id, owner=f"test:{run_id}")
    ctx.codecs = interpolation.Codecs(ctx)
    ctx.embedders = Embedders(ctx.cfg.cache)
    return ctx


close = close_worker_context


@pytest.fixture
def memory_contexts(db_path):
    """make_ctx on the test's ledger, a run each, never "under load" unless asked, every
    one closed at the end: `memory_contexts(toml)`. Import it into a test module to use it."""
    made: list[WorkerContext] = []

    def make(toml: str = "") -> WorkerContext:
        made.append(make_ctx(db_path, toml, run_id=len(made) + 1))
        made[-1].cfg.display.min_buffer_seconds = 0.0
        return made[-1]
    yield make
    for ctx in made:
        close(ctx)


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
