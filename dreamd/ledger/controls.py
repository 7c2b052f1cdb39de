"""Controls as the surfaces send them: every surface (the CLI, the dashboard, the web
viewer, the Rainmeter skin, and the game guard) asks the daemon for something by writing
one `controls` row through `request`; the daemon's controls worker
(dreamd/workers/controls.py) applies them in order. Also here: what a control may say
(`validate_knob`, `validate_reset`), which stored knobs still hold (`checked_knobs`),
who made the pause in force, and what `dreamd config show` adds to the file.

Commands: pause [reason], resume, set KEY=VALUE (a live knob; or reset KEY|all back to
the config file), theme [NAME|next], free (the backends unload their models and free
memory: what the game guard asks for), inject (the next keyframe the planner makes is an
injection, whatever the chance), stop {"run": RUN_ID} (`dreamd stop`, the dashboard, the
skin: that run stops cleanly, as on SIGTERM; a later run rejects it, so a stop sent to a
daemon that died never stops the next one).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, select

from dreamd import config
from dreamd.errors import ConfigError
from dreamd.ledger import queries, read_model, transitions
from dreamd.ledger.models import Control, RuntimeState

CT = Control.__table__
COMMANDS = ("pause", "resume", "set", "theme", "free", "inject", "stop")
RESET_ALL = "all"           # `dreamd set --reset all`: every stored knob


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
    """Who made the pause in force: "guard" or "user", None when not paused (the read
    model's rule, dreamd/ledger/read_model.py `pause`, asked on this transaction)."""
    rt = RuntimeState.__table__
    row = conn.execute(select(rt.c.paused).where(rt.c.id == 1)).first()
    return read_model.pause({"paused": row.paused} if row else None, queries.dbapi(conn)).by


def validate_knob(key: str, raw: str) -> Any:
    """Parse `dreamd set KEY=VALUE` the way the config file would, or raise ConfigError."""
    return config.check_key(config.live_key(key), raw)


def validate_reset(key: str) -> str:
    """`dreamd set --reset KEY`: a live knob, or `all`."""
    return key if key == RESET_ALL else config.live_key(key)


# stored knobs split into those that still validate and {key: why not} (the read model's)
checked_knobs = read_model.check_stored


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
