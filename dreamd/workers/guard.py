"""The guard: every `guard.check_interval_seconds` it asks its rules whether the dream
should pause: a known game or another process busy on the GPU (dreamd/guard/games.py,
gpu.py), a full-screen window in front, the battery, a locked session (presence.py,
through the platform layer senses.py). Each rule's action is keep, pause or free (pause,
interrupt the keyframe in flight and give the GPU back). Reasons combine in
dreamd/guard/reasons.py: the pause lasts while any is held, each for its delay after its
cause was last seen; then the guard resumes.

Everything it does is a control row (`source: guard`, worker `guard`), applied by the
controls worker like a pause from the CLI, so the ledger says why the dream stopped.
A pause the user made is never lifted by the guard (controls.apply refuses a guard
resume of it); a user who resumes during a reason is not paused again for it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from dreamd.guard import GUARD, presence
from dreamd.guard.games import GameWatch
from dreamd.guard.gpu import GpuWatch
from dreamd.guard.reasons import Change, Reasons, Sensed
from dreamd.guard.senses import Senses, for_platform
from dreamd.ledger import controls
from dreamd.workers.context import WorkerContext

log = logging.getLogger("dreamd.guard")
APPLY_WAIT = 10.0      # seconds the guard waits for its pause to be applied
FREE_WAIT = 30.0       # ...and for local work in flight to finish before it frees anyway
POLL = 0.05
# Work that holds the local models (the codec, the embedder): they leave the device only
# once no batch uses them. A keyframe in flight is not waited for: it is interrupted.
ON_LOCAL_MODELS = ("interpolation", "embedding")
# rule -> the config key of its action and the part of the platform it reads
PRESENCE = {"fullscreen": ("on_fullscreen", "fullscreen"), "battery": ("on_battery", "battery"),
            "saver": ("on_battery_saver", "saver"), "locked": ("on_locked", "locked")}


class Guard:
    def __init__(self, ctx: WorkerContext, *, games: GameWatch | None = None,
                 gpu: GpuWatch | None = None, senses: Senses | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ctx = ctx
        g = ctx.cfg.guard
        self.games = games or GameWatch(g.known_games)
        self.gpu = gpu or GpuWatch(ctx.cfg.system.gpu, g.gpu_vram_gb,
                                   g.gpu_utilization_percent)
        self.senses = senses or for_platform()
        self.clock = clock
        self.reasons = Reasons()
        self.ignore = presence.ignore_list(g.fullscreen_ignore)
        # the platform parts a rule that is not `keep` needs, and this platform reads
        self.want = frozenset(part for rule, (key, part) in PRESENCE.items()
                              if getattr(g, key) != "keep") & self.senses.can
        self.started = False
        ctx.facts["guard"] = self.describe()

    def describe(self) -> dict[str, Any]:
        """What the guard holds and watches (ctx.facts["guard"], for the logs and tests)."""
        g = self.ctx.cfg.guard
        return {"enabled": g.enabled, "engaged": self.reasons.words(),
                "reasons": {r: h.action for r, h in self.reasons.held.items()},
                "games": len(self.games.known), "gpu": self.gpu.state,
                "presence": f"{self.senses.name}: {', '.join(sorted(self.want)) or 'nothing'}"}

    # ------------------------------------------------------------ the tick
    def tick(self) -> None:
        ctx, g = self.ctx, self.ctx.cfg.guard
        now = self.clock()
        sensed = self.sense() if g.enabled else {}
        if not self.started:
            self.started = True
            log.info("guard: %s; watching %d process names, GPU %s, presence %s",
                     "on" if g.enabled else "off", len(self.games.known), self.gpu.state,
                     self.describe()["presence"])
            if ctx.facts.get("paused_by") == GUARD and not sensed:
                # paused by the guard of an earlier run and no cause seen now: resume once
                # the game's grace has passed with none (or at once when the guard was
                # turned off since). A cause seen now simply takes the pause over.
                self.reasons.hold("earlier", Sensed(
                    ctx.facts.get("pause_reason") or "a reason of the last run", "pause",
                    g.resume_after_seconds), now)
        change = self.reasons.update(sensed, now) if g.enabled else self.reasons.clear()
        if change.added:
            self.engage(change)
        elif change.words is None and change.ended:
            self.disengage(change)
        elif change.words != change.before:
            self.reword(change)
        ctx.facts["guard"] = self.describe()

    def sense(self) -> dict[str, Sensed]:
        """Every rule whose cause is there now (rules set to keep are not asked)."""
        g = self.ctx.cfg.guard
        out: dict[str, Sensed] = {}
        if g.on_game != "keep":
            games = self.games.running()
            if games:
                out["game"] = Sensed("a game: " + ", ".join(games), g.on_game,
                                     g.resume_after_seconds)
            else:
                busy = self.gpu.contention()
                if busy:
                    out["gpu"] = Sensed(busy, g.on_game, g.resume_after_seconds)
        if not self.want:
            return out
        look = self.senses.look(self.want)
        found = {"fullscreen": presence.fullscreen(look, self.ignore),
                 "battery": presence.on_battery(look), "saver": presence.battery_saver(look),
                 "locked": presence.locked(look)}
        for rule, (key, part) in PRESENCE.items():
            action = getattr(g, key)
            if found[rule] and action != "keep" and part in self.want:
                out[rule] = Sensed(found[rule], action, g.presence_resume_seconds)
        return out

    # ------------------------------------------------------------ acting
    def engage(self, change: Change) -> None:
        """Pause (unless the user already has), free when a new reason asks for it."""
        ctx = self.ctx
        new = "; ".join(h.text for h in change.added)
        if ctx.paused() and ctx.facts.get("paused_by") != GUARD:
            log.info("guard: %s; the dream is already paused (%s)", new,
                     ctx.facts.get("pause_reason"))
        elif ctx.paused():
            if change.words != ctx.facts.get("pause_reason"):
                self._control("pause", {"reason": change.words, "source": GUARD})
            log.info("guard: %s; still paused, now for: %s", new, change.words)
        else:
            self._control("pause", {"reason": change.words, "source": GUARD})
            log.warning("guard: %s: pausing the dream%s", new,
                        " and freeing the GPU" if change.frees else "")
        if change.frees:
            self.free(new)

    def free(self, reason: str) -> None:
        """The keyframe in flight interrupted and the backend's memory freed at once (a
        control row the controls worker applies right after the pause); the local models
        (codec, embedder) leave the device once no batch uses them."""
        ctx = self.ctx
        self._control("free", {"reason": reason, "source": GUARD, "interrupt": True})
        self._wait(ctx.paused, APPLY_WAIT)      # no new batch is claimed after this
        waited = time.monotonic()
        self._wait(lambda: not any(e in ON_LOCAL_MODELS for e, _ in list(ctx.in_hand)),
                   FREE_WAIT)
        waited = time.monotonic() - waited
        if waited > 0.5:
            log.info("guard: waited %.1f s for work in flight before freeing the local "
                     "models", waited)
        for holder in (ctx.codecs, ctx.embedders):
            if holder is not None and hasattr(holder, "release"):
                holder.release()

    def disengage(self, change: Change) -> None:
        ctx = self.ctx
        ended = "; ".join(h.ended() for h in change.ended)
        if ctx.paused() and ctx.facts.get("paused_by") == GUARD:
            self._control("resume", {"reason": ended, "source": GUARD})
            log.info("guard: %s: resuming", ended)
        else:
            log.info("guard: %s; the dream stays as the user left it", ended)

    def reword(self, change: Change) -> None:
        """Reasons remain but changed (one ended, a second game started): the guard's
        pause says what it is for now."""
        ctx = self.ctx
        if (ctx.paused() and ctx.facts.get("paused_by") == GUARD
                and change.words != ctx.facts.get("pause_reason")):
            self._control("pause", {"reason": change.words, "source": GUARD})
        if change.ended:
            log.info("guard: %s; still paused for: %s",
                     "; ".join(h.ended() for h in change.ended), change.words)

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
        self.senses.close()
