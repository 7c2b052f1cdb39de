"""The game guard: every `guard.check_interval_seconds` it looks for a known game (by
process name) and, when configured, another process busy on the generation GPU. When
one appears it pauses the dream, lets work in flight finish, then frees the GPU
(ComfyUI's /free on every server, the local codec and embedder off the device); once
the game has been gone for `guard.resume_after_seconds` it resumes.

Everything it does is a control row (`source: guard`, worker `guard`), applied by the
controls worker like a pause from the CLI, so the ledger says why the dream stopped.
A pause the user made is never lifted by the guard (controls.apply refuses a guard
resume of it); a user who resumes during a game is not paused again for that game.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from dreamd.guard import GUARD
from dreamd.guard.games import GameWatch
from dreamd.guard.gpu import GpuWatch
from dreamd.ledger import controls
from dreamd.workers.context import WorkerContext

log = logging.getLogger("dreamd.guard")
APPLY_WAIT = 10.0      # seconds the guard waits for its pause to be applied
FREE_WAIT = 30.0       # ...and for local work in flight to finish before it frees anyway
POLL = 0.05
# Work that holds the local models (the codec, the embedder). A keyframe in flight is
# not waited for: ComfyUI acts on /free once the prompt it is running ends, so the
# request can go at once (it went up to 10 s later while a keyframe finished)
ON_LOCAL_MODELS = ("interpolation", "embedding")


class Guard:
    def __init__(self, ctx: WorkerContext, *, games: GameWatch | None = None,
                 gpu: GpuWatch | None = None) -> None:
        self.ctx = ctx
        g = ctx.cfg.guard
        self.games = games or GameWatch(g.known_games)
        self.gpu = gpu or GpuWatch(ctx.cfg.system.gpu, g.gpu_vram_gb,
                                   g.gpu_utilization_percent)
        self.engaged: str | None = None     # the reason the guard acted on, while it lasts
        self.last_seen = 0.0                # monotonic time the reason was last seen
        self.started = False
        ctx.facts["guard"] = self.describe()

    def describe(self) -> dict[str, Any]:
        """What status.json and the TUI show about the guard."""
        g = self.ctx.cfg.guard
        return {"enabled": g.enabled, "engaged": self.engaged, "games": len(self.games.known),
                "gpu": self.gpu.state}

    # ------------------------------------------------------------ the tick
    def tick(self) -> None:
        ctx, g = self.ctx, self.ctx.cfg.guard
        if not self.started:
            self.started = True
            log.info("game guard: %s; watching %d process names, GPU %s",
                     "on" if g.enabled else "off", len(self.games.known), self.gpu.state)
            if ctx.facts.get("paused_by") == GUARD:
                # paused by the guard of an earlier run: resume once the grace has passed
                # with no game (or at once when the guard was turned off since)
                self.engaged = ctx.facts.get("pause_reason") or "a game"
                self.last_seen = time.monotonic()
        reason = self.detect() if g.enabled else None
        now = time.monotonic()
        if reason is not None:
            self.last_seen = now
            if self.engaged is None:
                self.engage(reason)
        elif self.engaged is not None and (not g.enabled
                                           or now - self.last_seen >= g.resume_after_seconds):
            self.disengage()
        ctx.facts["guard"] = self.describe()

    def detect(self) -> str | None:
        """The first known game running, else the GPU's contention, else None."""
        games = self.games.running()
        if games:
            return ", ".join(games)
        return self.gpu.contention()

    # ------------------------------------------------------------ acting
    def engage(self, reason: str) -> None:
        """Pause (unless the user already has), wait for work in flight, then free."""
        ctx = self.ctx
        self.engaged = reason
        if ctx.paused():
            log.info("game guard: %s is running; the dream is already paused (%s)", reason,
                     ctx.facts.get("pause_reason"))
        else:
            self._control("pause", {"reason": reason, "source": GUARD})
            log.warning("game guard: %s is running: pausing the dream and freeing the GPU",
                        reason)
            self._wait(ctx.paused, APPLY_WAIT)
        # the local models must not leave the device under a batch still using them
        waited = time.monotonic()
        self._wait(lambda: not any(e in ON_LOCAL_MODELS for e, _ in list(ctx.in_hand)),
                   FREE_WAIT)
        waited = time.monotonic() - waited
        if waited > 0.5:
            log.info("game guard: waited %.1f s for work in flight before freeing", waited)
        self._control("free", {"reason": reason, "source": GUARD})

    def disengage(self) -> None:
        ctx = self.ctx
        reason, self.engaged = self.engaged, None
        if ctx.paused() and ctx.facts.get("paused_by") == GUARD:
            gone = ctx.cfg.guard.resume_after_seconds
            self._control("resume", {"reason": f"{reason} ended {gone:g} s ago",
                                     "source": GUARD})
            log.info("game guard: %s ended %g s ago: resuming", reason, gone)
        else:
            log.info("game guard: %s ended; the dream stays as the user left it", reason)

    def _control(self, command: str, args: dict[str, Any]) -> None:
        with self.ctx.engine.begin() as conn:
            controls.request(conn, command, args, worker="guard")
        self.ctx.wake("controls")

    def _wait(self, done, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not done():
            if self.ctx.stopping.is_set() or time.monotonic() >= deadline:
                return False
            time.sleep(POLL)
        return True

    def close(self) -> None:
        self.gpu.close()
