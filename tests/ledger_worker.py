"""A ledger worker in a separate process, for the claim and crash tests.

    python -m tests.ledger_worker DB OWNER OUT            claim one at a time until none left,
                                                           complete each, append ids to OUT
    python -m tests.ledger_worker DB OWNER OUT --hold N   claim N rows, print "held", sleep
"""

from __future__ import annotations

import sys
import time

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
    claimed = []
    while True:
        with engine.begin() as conn:
            rows = transitions.claim(conn, "keyframe", owner, lease_seconds=30)
            for r in rows:
                transitions.complete(conn, "keyframe", r.id, owner)
        if not rows:
            break
        claimed.extend(r.id for r in rows)
    with open(out, "w") as f:
        f.write("\n".join(map(str, claimed)))


if __name__ == "__main__":
    main()
