"""The stagnation breaker: when keyframes stop changing (each one's change from the
previous, as the recorder measured it, below `quality.stagnation_floor` for
`quality.stagnation_keyframes` in a row), the planner makes the next
`quality.breaker_keyframes` keyframes at `quality.breaker_denoise`, then returns to the
user's `generation.denoise`. Each break is a `breaks` row made with its first keyframe;
the planner reads from the ledger alone whether a break is under way, so a restarted
daemon finishes one it had begun.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Connection, insert, text

from dreamd.ledger.models import Break as BreakModel, utcnow

log = logging.getLogger("dreamd.quality")
BR = BreakModel.__table__

LAST_BREAK_SQL = text(
    "SELECT chain_index, keyframes, denoise FROM breaks ORDER BY id DESC LIMIT 1")
# the newest measured keyframes before the one being planned, newest first
RECENT_CHANGES_SQL = text(
    "SELECT chain_index, change FROM quality WHERE entity = 'keyframe' "
    "AND chain_index >= :since AND chain_index < :k ORDER BY chain_index DESC LIMIT :n")


@dataclass(frozen=True)
class Break:
    """A break that starts with the keyframe being planned (to be recorded with it)."""

    keyframes: int
    denoise: float
    user_denoise: float
    stagnant: int
    change: float
    floor: float

    def detail(self) -> dict:
        return {"break": "stagnation", "denoise": self.denoise,
                "user_denoise": self.user_denoise, "change": round(self.change, 3)}


def denoise_for(ctx, k: int, user_denoise: float) -> tuple[float, Break | None]:
    """The denoise of keyframe `k` and, when a break starts with it, the Break to record
    (`record`, in the transaction that creates the keyframe). Within a break: its
    denoise (never below the user's); otherwise the user's. Never fails the plan."""
    try:
        with ctx.reader.connect() as conn:
            return _decide(ctx, conn, k, user_denoise)
    except Exception:       # the breaker must never stop the chain
        log.exception("keyframe %d: the stagnation check failed; the user's denoise", k)
        return user_denoise, None


def _decide(ctx, conn: Connection, k: int, user: float) -> tuple[float, Break | None]:
    last = conn.execute(LAST_BREAK_SQL).first()
    if last is not None and last.chain_index <= k < last.chain_index + last.keyframes:
        return max(user, last.denoise), None            # under way
    n = int(ctx.knob("quality.stagnation_keyframes"))
    if n <= 0:
        return user, None
    floor = float(ctx.knob("quality.stagnation_floor"))
    # only keyframes made after the last break count: its own were made at its denoise
    since = last.chain_index + last.keyframes if last is not None else -1
    rows = conn.execute(RECENT_CHANGES_SQL, {"since": since, "k": k, "n": n}).all()
    stagnant = (len(rows) == n
                and all(r.chain_index == k - 1 - i for i, r in enumerate(rows))   # unbroken
                and all(r.change is not None and r.change < floor for r in rows))
    if not stagnant:
        return user, None
    denoise = max(user, float(ctx.knob("quality.breaker_denoise")))
    brk = Break(int(ctx.knob("quality.breaker_keyframes")), denoise, user, n,
                max(r.change for r in rows), floor)
    log.info("keyframe %d: the chain has stopped changing (%d keyframes in a row changed "
             "less than %.2f, at most %.2f): the next %d keyframes at denoise %.2f instead "
             "of %.2f", k, n, floor, brk.change, brk.keyframes, denoise, user)
    return denoise, brk


def record(conn: Connection, keyframe_id: int, chain_index: int, brk: Break | None) -> None:
    """The `breaks` row, in the transaction that creates the break's first keyframe."""
    if brk is None:
        return
    conn.execute(insert(BR).values(
        keyframe_id=keyframe_id, chain_index=chain_index, reason="stagnation",
        keyframes=brk.keyframes, denoise=brk.denoise, user_denoise=brk.user_denoise,
        stagnant=brk.stagnant, change=brk.change, floor=brk.floor, created_at=utcnow()))
