"""Ledger throughput: claims + completes per second on a real SQLite file, with one
and with several writer threads. Not a test; run by hand or `make bench-ledger`.

    .venv/bin/python bench/ledger.py [--rows 5000] [--threads 1 4 8] [--batch 1]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import threading
import time
from pathlib import Path

from dreamd.ledger import database, transitions as tr


def fill(engine, n: int) -> None:
    with engine.begin() as conn:
        for i in range(n):
            tr.create(conn, "keyframe", {"chain_index": i, "backend": "bench", "theme": "t",
                                         "prompt": "p", "seed": i, "denoise": 0.3,
                                         "source": "img2img", "width": 512, "height": 256})


def drain(engine, threads: int, batch: int) -> tuple[float, int]:
    done = [0] * threads

    def work(k: int) -> None:
        while True:
            with engine.begin() as conn:
                rows = tr.claim(conn, "keyframe", f"w{k}", lease_seconds=60, limit=batch)
            if not rows:
                return
            with engine.begin() as conn:
                for r in rows:
                    tr.complete(conn, "keyframe", r.id, f"w{k}")
            done[k] += len(rows)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0, sum(done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch", type=int, default=1, help="rows per claim")
    args = ap.parse_args()
    print(f"# {platform.node()} {platform.machine()} python {platform.python_version()}, "
          f"rows={args.rows}, batch={args.batch}")
    print("| threads | jobs/s (claim + complete) | transitions/s | ms per job |")
    print("|---|---|---|---|")
    for n in args.threads:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "dreamd.db"
            database.upgrade(path)
            engine = database.writer(path)
            fill(engine, args.rows)
            secs, jobs = drain(engine, n, args.batch)
            engine.dispose()
            assert jobs == args.rows
            # each job: claim (available -> executing) + complete (executing -> completed)
            print(f"| {n} | {jobs / secs:,.0f} | {2 * jobs / secs:,.0f} | "
                  f"{1000 * secs / jobs:.3f} |")


if __name__ == "__main__":
    main()
