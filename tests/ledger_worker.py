"""A ledger worker in a separate process, for the claim and crash tests.

    python -m tests.ledger_worker DB OWNER OUT            claim one at a time until none left,
                                                           complete each, append ids to OUT
    python -m tests.ledger_worker DB OWNER OUT --meet DIR N
                                        the same, but after its first claim wait until N
                                        workers (itself included) have made theirs, then
                                        go on with a short pause after each claim
    python -m tests.ledger_worker DB OWNER OUT --hold N   claim N rows, print "held", sleep
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

PAUSE = 0.001       # seconds between claims once met: the lock is free for the others

from dreamd.ledger import database, transitions


def main() -> None:
    db, owner, out = sys.argv[1:4]
    engine = database.writer(db)
    if "--hold" in sys.argv:
        n = int(sys.argv[sys.argv.index("--hold") + 1])
        with engine.begin() as conn:
            rows = transitions.claim(conn, "keyframe", owner, lease_seconds=1.0, limit=n)
        with open(out, "w") as f:
            f.write("\n".join(str(r.id) for r in rows))
        print("held", flush=True)
        time.sleep(600)
        return
    meet = None
    if "--meet" in sys.argv:
        i = sys.argv.index("--meet")
        meet = (Path(sys.argv[i + 1]), int(sys.argv[i + 2]))
    claimed = []
    while True:
        with engine.begin() as conn:
            rows = transitions.claim(conn, "keyframe", owner, lease_seconds=30)
            for r in rows:
                transitions.complete(conn, "keyframe", r.id, owner)
        if not rows:
            break
        claimed.extend(r.id for r in rows)
        if meet is not None:
            folder, peers = meet
            if len(claimed) == 1:
                (folder / f"{owner}.first").touch()
                deadline = time.monotonic() + 120
                while len(list(folder.glob("*.first"))) < peers:
                    if time.monotonic() > deadline:
                        sys.exit(3)
                    time.sleep(0.005)
            time.sleep(PAUSE)
    with open(out, "w") as f:
        f.write("\n".join(map(str, claimed)))


if __name__ == "__main__":
    main()
