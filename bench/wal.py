"""A reader holding the ledger, measured (issue 21). Not a test.

    .venv/bin/python bench/wal.py [--hold 240] [--fps 4]

Starts `dreamd run` at the defaults (512x256, N=10) on a fresh data dir, lets it fill its
buffer, then holds a read transaction open on dreamd.db from this process (what an
`sqlite3` shell left in a BEGIN does) for `--hold` seconds, and prints the WAL's size every
15 s, what `dreamd status` says, and how long after the reader lets go the space is back.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hold", type=float, default=240.0)
    ap.add_argument("--fps", type=float, default=4.0)
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="dreamd-wal-")) / "data"
    cfg = data.parent / "dreamd.toml"
    cfg.write_text(f"[display]\nfps = {args.fps}\n[web]\nenabled = false\n")
    env = {**os.environ, "DREAMD_DATA_DIR": str(data)}
    cli = [sys.executable, "-m", "dreamd", "--config", str(cfg)]
    daemon = subprocess.Popen([*cli, "run"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wal = Path(f"{data}/dreamd.db-wal")

    def size() -> float:
        return wal.stat().st_size / 1e6 if wal.exists() else 0.0

    def held_line() -> str | None:
        out = subprocess.run([*cli, "status", "--json"], env=env, capture_output=True,
                             text=True).stdout
        try:
            return (json.loads(out).get("storage") or {}).get("wal_held")
        except ValueError:
            return None
    try:
        time.sleep(40)
        print(f"before the reader: WAL {size():.1f} MB")
        reader = sqlite3.connect(f"file:{data}/dreamd.db?mode=ro", uri=True,
                                 isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM frames").fetchone()
        start = time.monotonic()
        said_at = None
        while time.monotonic() - start < args.hold:
            time.sleep(15)
            t = time.monotonic() - start
            line = held_line()
            if line and said_at is None:
                said_at = t
            print(f"held {t:5.0f} s: WAL {size():6.1f} MB; status: {line or '-'}")
        peak = size()
        reader.execute("ROLLBACK")
        reader.close()
        let_go = time.monotonic()
        while size() > 16 and time.monotonic() - let_go < 180:
            time.sleep(1)
        print(f"peak {peak:.1f} MB; said after {said_at} s of holding; "
              f"back to {size():.1f} MB {time.monotonic() - let_go:.0f} s after the reader "
              f"let go")
    finally:
        daemon.terminate()
        daemon.wait(timeout=120)


if __name__ == "__main__":
    main()
