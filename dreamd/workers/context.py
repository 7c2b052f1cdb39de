"""What every worker shares: the config, the ledger's write engine, the run's
identity, the stop flag, live knobs, and lease renewal while work runs outside a
transaction. The workers themselves keep no durable state: it is all in the ledger.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from sqlalchemy import Engine

from dreamd.conditions import Conditions, classify
from dreamd.config import Config, live_knobs
from dreamd.ledger import queries, read_model, transitions
from dreamd.workers.look import Look

log = logging.getLogger("dreamd.workers")



@dataclass
class WorkerContext:
    cfg: Config
    engine: Engine                              # writes: BEGIN IMMEDIATE
    reader: Engine                              # reads: mode=ro, never blocks the writers
    run_id: int
    owner: str                                  # "<host>:<pid>:<run id>", prefix of lease owners
    stopping: threading.Event = field(default_factory=threading.Event)
    started_monotonic: float = 0.0
    # Facts workers report for status.json (not durable: derived again after a restart).
    facts: dict[str, Any] = field(default_factory=dict)
    # Conditions of the machine (ledger busy, disk full…): logged once, shown in status.json.
    conditions: Conditions = field(default_factory=Conditions)
    # Wakes a worker's tick now instead of at its next interval (set by the daemon):
    # one stage finishing starts the next, so a keyframe does not wait for a poll.
    wake: Callable[[str], None] = field(default=lambda name: None)
    # Lazily built models the planner shares with their workers (None in tests that do
    # without): the codec (injection blends in latent space) and the embedder.
    codecs: Any = None                          # dreamd.workers.interpolation.Codecs
    embedders: Any = None                       # dreamd.memory.embedder.Embedders
    # Rows a worker of this process has claimed and not yet finished: the janitor never
    # rescues them, even when a busy ledger kept their lease from being renewed.
    in_hand: set[tuple[str, int]] = field(default_factory=set)
    # Postpones a full or read-only ledger could not record: {(entity, id): (owner,
    # error)}. The janitor writes them once it can (dreamd.conditions.settle_postpones)
    # and spares the rows meanwhile, so the job gets its attempt back, not an expiry.
    owed_postpones: dict[tuple[str, int], tuple[str, str]] = field(default_factory=dict)
    _knobs: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _looks: dict[str, Look] = field(default_factory=dict)

    def lease_owner(self, worker: str) -> str:
        return f"{self.owner}:{worker}"

    # ------------------------------------------------------------ live knobs
    def knob(self, path: str) -> Any:
        """A config value, overridden by `dreamd set` while the daemon runs. No lock:
        set_knobs replaces the dict whole, never changes it in place (the display asks
        several times a frame)."""
        knobs = self._knobs
        if path in knobs:
            return knobs[path]
        section, name = path.split(".")
        return getattr(getattr(self.cfg, section), name)

    def set_knobs(self, knobs: dict[str, Any]) -> None:
        with self._lock:
            self._knobs = {k: v for k, v in knobs.items() if k in live_knobs()}

    def paused(self) -> bool:
        return bool(self.facts.get("paused"))

    def may_claim(self) -> bool:
        return not self.stopping.is_set() and not self.paused()

    def may_generate(self) -> bool:
        """Keyframes and in-betweens write files: not below the free-space floor (the
        janitor sets `storage_low`; playback goes on from the buffer meanwhile)."""
        return self.may_claim() and not self.facts.get("storage_low")

    # ------------------------------------------------------------ idle reads
    def look(self, worker: str, timeout: float | None = None) -> Look:
        """The worker's own kept read-only connection, for the questions its idle ticks
        ask every few seconds (dreamd/workers/look.py); `timeout`: its busy timeout in
        seconds when it is made (the display's is short: it has frames to show)."""
        look = self._looks.get(worker)
        if look is None:
            with self._lock:
                look = self._looks.get(worker)
                if look is None:
                    look = self._looks[worker] = (Look(self.cfg.db_path) if timeout is None
                                                  else Look(self.cfg.db_path, timeout))
        return look

    def close_looks(self) -> None:
        with self._lock:
            looks, self._looks = list(self._looks.values()), {}
        for look in looks:
            look.close()

    # ------------------------------------------------------------ leases
    @contextmanager
    def holding(self, entity: str, ids: Iterable[int]) -> Iterator[None]:
        """Rows this process is working on, while the body runs: the janitor never
        rescues them, and the game guard waits for them before it frees the models."""
        held = {(entity, i) for i in ids}
        self.in_hand.update(held)
        try:
            yield
        finally:
            self.in_hand.difference_update(held)

    @contextmanager
    def lease(self, entity: str, row_id: int, owner: str) -> Iterator[None]:
        """Renew the lease on one claimed row while the body runs (HTTP or torch work)."""
        seconds = self.cfg.generation.lease_seconds
        done = threading.Event()

        def renew() -> None:
            while not done.wait(seconds / 3):
                try:
                    with self.engine.begin() as conn:
                        held = transitions.heartbeat(conn, entity, [row_id], owner,
                                                     lease_seconds=seconds)
                    if not held:
                        log.warning("%s %s: lease lost while working", entity, row_id)
                        return
                except Exception as exc:  # a busy ledger must not kill the work itself
                    kind = classify(exc)
                    if kind:
                        self.conditions.report(kind, f"{entity} {row_id}", exc)
                    else:
                        log.exception("%s %s: lease renewal failed", entity, row_id)

        thread = threading.Thread(target=renew, name=f"lease-{entity}-{row_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=1)

    def runtime(self):
        with self.reader.connect() as conn:
            return queries.runtime(conn)


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the body's wall time, in ms, to timings[name] (for the `timing` debug lines
    that bench/pipeline.py reads)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + (time.perf_counter() - start) * 1000


def log_timing(logger: logging.Logger, kind: str, row_id: int, timings: dict[str, float],
               **extra: object) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        fields = " ".join(f"{k}_ms={v:.2f}" for k, v in timings.items())
        more = " ".join(f"{k}={v}" for k, v in extra.items())
        logger.debug("timing %s id=%d %s %s", kind, row_id, fields, more)


def drain(ctx: WorkerContext, entity: str, work: Callable[[Any, str], int], *,
          blocked: Callable[[], bool] = lambda: False) -> int:
    """A worker's tick: claim due rows of `entity` one at a time and work each, until
    none are due (or the daemon stops, pauses, or `blocked()` says to wait). An idle
    tick costs one read on the worker's kept read-only connection, never the write lock."""
    done = 0
    owner = ctx.lease_owner(entity)
    allowed = ctx.may_generate if entity in ("keyframe", "interpolation") else ctx.may_claim
    while allowed() and not blocked():
        with ctx.look(entity).reading() as conn:
            if not read_model.has_due(conn, entity):
                break
        with ctx.engine.begin() as conn:
            rows = transitions.claim(conn, entity, owner,
                                     lease_seconds=ctx.cfg.generation.lease_seconds)
        if not rows:
            break
        with ctx.holding(entity, [rows[0].id]):
            done += work(rows[0], owner)
    return done
