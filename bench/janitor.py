"""The janitor's CPU on a settled data dir, with nothing made (issue 24). Not a test.

    .venv/bin/python bench/janitor.py DATA_DIR [--minutes 5] [--repeat 5]

Copies DATA_DIR (a stopped daemon's data dir: dreamd.db and its folders) to a temp dir,
then prints the CPU (time.thread_time) of one walk of it (space.measure), of one look at
the free space, of Janitor.measure, and of the janitor's ticks per minute: a tick every
5 s as the daemon's, on a set monotonic clock, so the walks fall where they would in a
daemon and no sleeping is needed. The free space stays far above the floor (1 GB).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dreamd.storage import space  # noqa: E402
from dreamd.workers import janitor  # noqa: E402
from tests.conftest import close_worker_context, open_worker_context  # noqa: E402

TICK = 5.0          # the daemon's janitor interval (dreamd/daemon.py)


def cpu_ms(fn, calls: int, repeat: int) -> list[float]:
    """CPU ms per call, one figure per round, sorted (the first call is not counted)."""
    fn()
    rounds = []
    for _ in range(repeat):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        rounds.append((time.thread_time() - start) * 1000 / calls)
    return sorted(rounds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--minutes", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dreamd-janitor-"))
    data = tmp / "data"
    shutil.copytree(args.data_dir, data)
    ctx = open_worker_context(data / "dreamd.db", (
        f'[system]\ndata_dir = "{data}"\n[storage]\nmin_free_gb = 1\nbudget_gb = 20\n'
        '[display]\nmax_output_frames = 100000\n'))
    try:
        files = sum(space.measure(data).files.values())
        print(f"{files} files in {args.data_dir}")
        fmt = " ".join
        print("walk (space.measure) ms:",
              fmt(f"{x:.2f}" for x in cpu_ms(lambda: space.measure(data), 20, args.repeat)))
        print("free-space look ms:",
              fmt(f"{x:.4f}" for x in cpu_ms(lambda: space.free_bytes(data), 2000,
                                                 args.repeat)))
        print("Janitor.measure ms:", fmt(f"{x:.2f}" for x in cpu_ms(
            janitor.Janitor(ctx).measure, 20, args.repeat)))
        clock = [1000.0]
        real_time = janitor.time
        janitor.time = types.SimpleNamespace(monotonic=lambda: clock[0],
                                             perf_counter=time.perf_counter)
        walks = [0]
        walk = space.measure

        def counted(*a, **kw):
            walks[0] += 1
            return walk(*a, **kw)

        space.measure = counted
        try:
            jan = janitor.Janitor(ctx)

            def minutes() -> None:
                for _ in range(int(60 / TICK) * args.minutes):
                    clock[0] += TICK
                    jan.tick()

            per_minute = [x / args.minutes for x in cpu_ms(minutes, 1, args.repeat)]
        finally:
            janitor.time, space.measure = real_time, walk
        print("janitor ticks, CPU ms per minute:", fmt(f"{x:.1f}" for x in per_minute))
        print(f"walks per minute: {walks[0] / ((args.repeat + 1) * args.minutes):.2f}")
        print(f"= {sorted(per_minute)[len(per_minute) // 2] / 600:.3f} % of a core (median)")
    finally:
        close_worker_context(ctx)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
