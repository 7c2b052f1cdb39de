"""Controls: requests from the CLI, the TUI or Rainmeter travel as `controls` rows
(no surface writes any other table); this worker applies them in order.

Commands: pause [reason], resume, set KEY=VALUE (a live knob; or reset KEY|all back to
the config file), theme [NAME|next],
free (ComfyUI unloads its models and frees memory: what the game guard asks for),
inject (the next keyframe the planner makes is an injection, whatever the chance).
"""

from __future__ import annotations

import difflib
import json
import logging
from typing import Any, Callable

from sqlalchemy import Connection, select

from dreamd import config
from dreamd.errors import ConfigError
from dreamd.guard import GUARD, source_of
from dreamd.ledger import queries, transitions
from dreamd.ledger.models import Control, RuntimeState, utcnow
from dreamd.workers.context import LIVE_KNOBS, WorkerContext

log = logging.getLogger("dreamd.controls")
CT = Control.__table__
COMMANDS = ("pause", "resume", "set", "theme", "free", "inject")
RESET_ALL = "all"           # `dreamd set --reset all`: every stored knob
# Seconds between looks for new controls: an indexed read of an empty result, cheap
# enough at 10 a second, so a key on the dashboard is applied within about 0.1 s.
EVERY = 0.1


def request(conn: Connection, command: str, args: dict[str, Any] | None = None, *,
            worker: str = "surface") -> int:
    """Write a control row (what every surface calls; the game guard too, with
    worker="guard" and `"source": "guard"` in its args)."""
    if command not in COMMANDS:
        raise ConfigError(f"unknown control {command!r}: expected one of {', '.join(COMMANDS)}")
    return transitions.create(conn, "control", {"command": command,
                                                "args": json.dumps(args or {})},
                              worker=worker)


def pause_source(conn: Connection) -> str | None:
    """Who made the pause in force: "guard" when the last applied pause came from the game
    guard, else "user" (dreamd/guard/__init__.py: the rule, and `dreamd status`'s copy)."""
    rt = RuntimeState.__table__
    if not conn.execute(select(rt.c.paused).where(rt.c.id == 1)).scalar():
        return None
    args = conn.execute(select(CT.c.args).where(CT.c.command == "pause",
                                               CT.c.state == "applied")
                        .order_by(CT.c.id.desc()).limit(1)).first()
    return source_of(args.args) if args else "user"


def _live_key(key: str) -> str:
    """`key` when it is a live knob, else a ConfigError that suggests the one meant."""
    if key in LIVE_KNOBS:
        return key
    known = [p for p, _ in config.key_paths()]
    if key in known:
        raise ConfigError(f"{key} cannot be set while running: live keys are "
                          f"{', '.join(sorted(LIVE_KNOBS))}")
    hint = difflib.get_close_matches(key, sorted(LIVE_KNOBS), n=1) or \
        difflib.get_close_matches(key, known, n=1)
    extra = f"; did you mean {hint[0]}?" if hint else ""
    raise ConfigError(f"unknown key {key!r}{extra} (live keys: {', '.join(sorted(LIVE_KNOBS))})")


def validate_knob(key: str, raw: str) -> Any:
    """Parse `dreamd set KEY=VALUE` the way the config file would, or raise ConfigError."""
    return config.check_key(_live_key(key), raw)


def validate_reset(key: str) -> str:
    """`dreamd set --reset KEY`: a live knob, or `all`."""
    return key if key == RESET_ALL else _live_key(key)


def checked_knobs(stored: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Stored knobs split into those that still validate and {key: why not} for the rest
    (a NaN an older dreamd let through, a range or a key that changed since)."""
    good, bad = {}, {}
    for key, value in stored.items():
        try:
            good[key] = config.check_value(_live_key(key), value)
        except ConfigError as exc:
            bad[key] = str(exc)
    return good, bad


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


def overrides(conn: Connection) -> tuple[dict[str, tuple[Any, str]], dict[str, str]]:
    """What `dreamd config show` adds to the file: {key: (value, source)} for the stored
    knobs and the `set` controls no daemon has applied yet, and {key: why} for stored
    knobs the next start will drop."""
    rt = RuntimeState.__table__
    row = conn.execute(select(rt.c.knobs).where(rt.c.id == 1)).first()   # read-only: no insert
    knobs, bad = checked_knobs(queries.knobs(row) if row is not None else {})
    out = {k: (v, "stored by `dreamd set`") for k, v in knobs.items()}
    pending = conn.execute(select(CT.c.id, CT.c.args).where(
        CT.c.state == "available", CT.c.command == "set").order_by(CT.c.id)).all()
    for row in pending:
        try:
            args = json.loads(row.args or "{}")
            if "reset" in args:
                target = validate_reset(args["reset"])
                out = {} if target == RESET_ALL else {k: v for k, v in out.items()
                                                       if k != target}
                bad = {} if target == RESET_ALL else {k: v for k, v in bad.items()
                                                      if k != target}
            else:
                value = validate_knob(args["key"], args["value"])
                out[args["key"]] = (value, f"sent by `dreamd set` (control {row.id}, "
                                           f"applied when a daemon reads it)")
        except (ConfigError, ValueError, KeyError, TypeError):
            continue        # the daemon will reject it too
    return out, bad


def tick(ctx: WorkerContext, on_knobs: Callable[[dict[str, Any]], None] | None = None,
         backend: Any = None) -> int:
    with ctx.reader.connect() as conn:
        pending = conn.execute(select(CT).where(CT.c.state == "available")
                               .order_by(CT.c.id)).all()
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
        return free(backend, ctx)
    if command == "inject":
        return inject(ctx)
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


def free(backend: Any, ctx: WorkerContext | None = None) -> dict[str, Any]:
    """Give back GPU memory: the local models (latent codec, embedder) leave the device
    and come back lazily on next use; the keyframe backend frees its own (ComfyUI's
    POST /free on every server that answers). Rejected only when no server could."""
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
