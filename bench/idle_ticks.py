"""The CPU of one idle tick of each polling worker (planner, governor, embedding,
keyframe, interpolation) on a copy of a settled ledger with a full buffer: nothing to
make, so each tick only asks the ledger whether there is. Not a test.

    .venv/bin/python bench/idle_ticks.py DATA_DIR [--ticks 50] [--sleep 0.3]
        [--tree CHECKOUT] [--only planner governor ...]

DATA_DIR: a daemon's data directory after it filled its buffer (e.g. one left by
`bench/pipeline.py --idle-only`); its dreamd.db and WAL are copied, never touched.
--tree times another checkout of dreamd (a `git archive` of an older commit) with the
same script, for a before/after on the same ledger and the same minutes.

Each tick is timed with time.thread_time() after --sleep seconds asleep, as the
daemon's ticks come (every 2 s): cold caches cost several times a hot loop's figure.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

WORKERS = ("planner", "governor", "embedding", "keyframe", "interpolation")
CONFIG = """[system]
data_dir = "{data}"
[generation]
resolution = [512, 256]
interpolation_frames = 10
[display]
fps = 15
buffer_target_seconds = 1.0
min_buffer_seconds = 0.5
max_output_frames = 100000
"""


def tick_of(name: str, ctx):
    if name == "planner":
        from dreamd.workers import planner
        return lambda: planner.tick(ctx)
    if name == "governor":
        from dreamd.governor.worker import GovernorWorker
        return GovernorWorker(ctx).tick
    if name == "embedding":
        from dreamd.memory.embedder import Embedders
        from dreamd.workers.embedding import EmbeddingWorker
        return EmbeddingWorker(ctx, Embedders(ctx.cfg.cache)).tick
    from dreamd.workers import interpolation, keyframe
    module = keyframe if name == "keyframe" else interpolation
    return lambda: module.tick(ctx, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--ticks", type=int, default=50)
    p.add_argument("--sleep", type=float, default=0.3)
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    p.add_argument("--only", nargs="+", choices=WORKERS, default=list(WORKERS))
    args = p.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    from dreamd import config
    from dreamd.ledger import database
    from dreamd.workers.context import WorkerContext

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        for suffix in ("", "-wal"):
            if (args.data / f"dreamd.db{suffix}").exists():
                shutil.copy(args.data / f"dreamd.db{suffix}", data)
        cfg = config.parse(CONFIG.format(data=data))
        engine, reader = database.writer(cfg.db_path), database.reader(cfg.db_path)
        ctx = WorkerContext(cfg=cfg, engine=engine, reader=reader, run_id=1, owner="bench")
        print(f"dreamd from {args.tree}; {args.ticks} ticks, {args.sleep} s asleep before each")
        for name in args.only:
            tick = tick_of(name, ctx)
            first = tick()
            times = []
            for _ in range(args.ticks):
                time.sleep(args.sleep)
                start = time.thread_time()
                tick()
                times.append((time.thread_time() - start) * 1e6)
            print(f"{name:14s} mean {statistics.mean(times):6.0f} us  median "
                  f"{statistics.median(times):6.0f} us  (first tick: {first!r})", flush=True)
        if hasattr(ctx, "close_looks"):
            ctx.close_looks()
        engine.dispose()
        reader.dispose()


if __name__ == "__main__":
    main()
