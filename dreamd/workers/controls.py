"""The controls worker: applies the `controls` rows the surfaces write
(dreamd/ledger/controls.py: what they may ask, and how they ask), in order, and
records each as applied or rejected with the reason.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any, Callable

from sqlalchemy import select

from dreamd.errors import ConfigError
from dreamd.guard import GUARD
from dreamd.ledger import queries, read_model, transitions
from dreamd.ledger.controls import (CT, RESET_ALL, checked_knobs, pause_source,
                                    validate_knob, validate_reset)
from dreamd.ledger.models import utcnow
from dreamd.workers.context import WorkerContext

log = logging.getLogger("dreamd.controls")
# Seconds between looks for new controls: an indexed read of an empty result on a kept
# connection (the display's clock makes it, on its frames' wake-ups where it can, and
# wakes the controls job when one waits), so a key on the dashboard, `dreamd pause` or a
# knob is applied within about a quarter of a second.
EVERY = 0.25
APPLY_EVERY = 5.0   # the controls job's own interval: a fallback, it is woken at once


def restore(ctx: WorkerContext) -> None:
    """At start: pause state and live knobs survive a restart (they are in the ledger).
    A stored knob that no longer validates is dropped with one warning, for good:
    starting must never depend on a value the config file itself would refuse."""
    rt = ctx.runtime()
    ctx.facts["paused"] = bool(rt.paused)
    ctx.facts["pause_reason"] = rt.pause_reason
    with ctx.reader.connect() as conn:
        ctx.facts["paused_by"] = pause_source(conn)
    knobs, bad = checked_knobs(queries.knobs(rt))
    if bad:
        for key, why in bad.items():
            log.warning("stored knob %s dropped: %s", key, why)
        with ctx.engine.begin() as conn:
            queries.update_runtime(conn, knobs=json.dumps(knobs, sort_keys=True))
    ctx.set_knobs(knobs)


# A look that finds nothing, several times a second: through SQLAlchemy (a pooled connection,
# a statement) it cost ~250 us of CPU, 1 % of a core; a kept read-only sqlite3
# connection asks the same in ~6 us. Rows are then read the usual way.
PROBE_SQL = "SELECT 1 FROM controls WHERE state = 'available' LIMIT 1"
PENDING = select(CT).where(CT.c.state == "available").order_by(CT.c.id)


def _none_waiting(ctx: WorkerContext, who: str) -> bool:
    """True when surely no control waits; False when one may (or the look failed). On
    `who`'s kept connection (the display's clock and the controls job each have one:
    they may ask at the same moment); a failed one is opened again at the next look."""
    try:
        with ctx.look(who, timeout=1.0).reading() as conn:
            # fetchall: the statement runs to its end, so no read snapshot stays open
            return not conn.execute(PROBE_SQL).fetchall()
    except (sqlite3.Error, OSError):
        return False


def waiting(ctx: WorkerContext) -> bool:
    """True when a control may wait to be applied (the display's clock asks every
    EVERY seconds); never raises."""
    return not _none_waiting(ctx, "controls-look")


def tick(ctx: WorkerContext, on_knobs: Callable[[dict[str, Any]], None] | None = None,
         backend: Any = None) -> int:
    if _none_waiting(ctx, "controls"):
        return 0
    with ctx.reader.connect() as conn:
        pending = conn.execute(PENDING).all()
    for row in pending:
        try:
            args = json.loads(row.args or "{}")
            changes = apply(ctx, row.command, args, backend)
            with ctx.engine.begin() as conn:
                if changes:
                    queries.update_runtime(conn, **changes)
                transitions.transition(conn, "control", row.id, "available", "applied",
                                       worker="controls", values={"applied_at": utcnow()})
            log.info("control %d applied: %s %s", row.id, row.command, args)
        except (ConfigError, ValueError, KeyError) as exc:
            with ctx.engine.begin() as conn:
                transitions.transition(conn, "control", row.id, "available", "rejected",
                                       worker="controls", values={"error": str(exc),
                                                                  "applied_at": utcnow()})
            log.warning("control %d rejected: %s %s: %s", row.id, row.command, row.args, exc)
            continue
        if row.command == "set" and on_knobs:
            on_knobs(dict(ctx._knobs))
    return len(pending)


def apply(ctx: WorkerContext, command: str, args: dict[str, Any],
          backend: Any = None) -> dict[str, Any]:
    """Act on one control; returns the runtime_state columns to change."""
    if command == "free":
        if args.get("interrupt"):       # the guard's: at once, the local models after
            return free(backend, None, interrupt=True)
        return free(backend, ctx)
    if command == "inject":
        return inject(ctx)
    if command == "stop":
        return stop(ctx, args)
    if command == "pause":
        reason = str(args.get("reason") or "paused by user")
        ctx.facts["paused"], ctx.facts["pause_reason"] = True, reason
        ctx.facts["paused_by"] = GUARD if args.get("source") == GUARD else "user"
        return {"paused": 1, "pause_reason": reason}
    if command == "resume":
        if args.get("source") == GUARD and ctx.facts.get("paused_by") != GUARD:
            # a pause the user made (before or during the game) is theirs to lift
            raise ValueError("the dream was paused by the user, not by the game guard: "
                             "the guard never undoes that (`dreamd resume` does)")
        ctx.facts["paused"], ctx.facts["pause_reason"] = False, None
        ctx.facts["paused_by"] = None
        return {"paused": 0, "pause_reason": None}
    if command == "set":
        if "reset" in args:         # back to the config file's value
            target = validate_reset(args["reset"])
            knobs = {} if target == RESET_ALL else {k: v for k, v in ctx._knobs.items()
                                                    if k != target}
        else:
            key, value = args["key"], validate_knob(args["key"], args["value"])
            knobs = {**ctx._knobs, key: value}
        ctx.set_knobs(knobs)
        return {"knobs": json.dumps(knobs, sort_keys=True)}
    if command == "theme":
        names = [t.name for t in ctx.cfg.prompts.themes]
        rt = ctx.runtime()
        target = args.get("name") or "next"
        if target == "next":
            return {"theme_index": rt.theme_index + 1}
        if target not in names:
            raise ConfigError(f"no theme named {target!r}: themes are {', '.join(names)}")
        # the planner picks themes[(k // rotation_interval + theme_index) % n]:
        # choose the offset that makes the next keyframe's theme the one asked for
        from dreamd.ledger.models import Keyframe
        with ctx.reader.connect() as conn:
            last = conn.execute(select(Keyframe.__table__.c.chain_index)
                                .order_by(Keyframe.__table__.c.chain_index.desc())
                                .limit(1)).scalar()
        k_next = 0 if last is None else last + 1
        rotation = ctx.knob("prompts.rotation_interval")
        return {"theme_index": (names.index(target) - k_next // rotation) % len(names)}
    raise ValueError(f"unknown control {command!r}")


def inject(ctx: WorkerContext) -> dict[str, Any]:
    """Ask for an injection at the next keyframe the planner makes (reason `requested`:
    no warm-up, cooldown or chance stands in its way). Rejected when the memory cannot
    inject at all, with the key that says so."""
    c = ctx.cfg.cache
    if not c.enabled:
        raise ValueError("the aesthetic memory is off (cache.enabled = false): nothing "
                         "to inject")
    if not c.injections:
        raise ValueError("injections are off (cache.injections = false)")
    ctx.facts["inject_requested"] = True
    return {}


def stop(ctx: WorkerContext, args: dict[str, Any]) -> dict[str, Any]:
    """Ask the daemon to stop, as a stop signal would (dreamd/daemon.py reads the fact
    in its wait and records `exit_reason` from it). Only the run it was sent to obeys:
    a stop left waiting by a daemon that died must not end the next one at its start."""
    run = args.get("run")
    if run is not None and run != ctx.run_id:
        raise ValueError(f"meant for daemon run {run}, which is gone; this is run "
                         f"{ctx.run_id}")
    ctx.facts["stop_requested"] = str(args.get("reason") or "stopped by `dreamd stop`")
    return {}


def free(backend: Any, ctx: WorkerContext | None = None, *,
         interrupt: bool = False) -> dict[str, Any]:
    """Give back GPU memory: the local models (latent codec, embedder) leave the device
    and come back lazily on next use; the keyframe backend frees its own (ComfyUI's
    POST /free on every server that answers). Rejected only when no server could.
    `interrupt` (the guard's): the keyframe in flight is stopped first (ComfyUI's
    /interrupt; the in-process model at its next step), and postponed by its worker."""
    cut = getattr(backend, "interrupt", None) if interrupt else None
    if cut is not None:
        stopped = cut()
        if stopped:
            log.info("free: interrupted the keyframe in flight (%s)", stopped)
    for holder in (getattr(ctx, "codecs", None), getattr(ctx, "embedders", None)):
        if holder is not None and hasattr(holder, "release"):
            holder.release()
    release = getattr(backend, "free", None)
    if release is None:
        log.info("free: the %s backend holds no server memory", getattr(backend, "name", "?"))
        return {}
    results = release()
    failed = {url: err for url, err in results.items() if err}
    if failed and len(failed) == len(results):
        raise ValueError("no ComfyUI server freed its memory: "
                         + "; ".join(f"{u}: {e}" for u, e in failed.items()))
    for url, err in failed.items():
        log.warning("free: ComfyUI at %s did not: %s", url, err)
    return {}
