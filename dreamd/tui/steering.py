"""What the dashboard's keys ask for: each key is one `controls` row, written through
dreamd.ledger.controls.request like every other surface's (the daemon validates and
applies it, or rejects it with a reason the dashboard shows).

A step of a knob starts from its effective value (stored by `dreamd set`, else the
config file's) and stays inside the range the config allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dreamd.config import stepped_knobs

# The dashboard's keys step the knobs the config schema gives a step (dreamd/config.py),
# by that step and within the schema's range: action "KNOB+" or "KNOB-".
UP, DOWN = "+", "-"


@dataclass(frozen=True)
class Request:
    command: str
    args: dict[str, Any]
    label: str               # what the dashboard says it sent


def stepped(value: Any, step: float, low: float, high: float) -> Any:
    """value + step inside [low, high]; integers stay integers, and a rate below one
    frame a second halves instead of stepping past the bottom."""
    if isinstance(step, int):
        return int(min(high, max(low, int(value) + step)))
    value = float(value)
    if step < 0 and value + step < 1.0 and abs(step) >= 1.0:
        new = value / 2
    else:
        new = value + step
    return round(min(high, max(low, new)), 2)


def for_action(action: str, *, paused: bool, knob) -> Request:
    """The control a key sends. `knob(path)` gives a live knob's effective value."""
    if action == "pause":
        if paused:
            return Request("resume", {}, "resume")
        return Request("pause", {"reason": "paused from the dashboard"}, "pause")
    if action == "theme":
        return Request("theme", {"name": "next"}, "next theme")
    if action == "inject":
        return Request("inject", {}, "inject now")
    if action == "free":
        return Request("free", {}, "free GPU memory")
    key, sign = action[:-1], action[-1:]
    steps = stepped_knobs()
    if key in steps and sign in (UP, DOWN):
        step, low, high = steps[key]
        value = stepped(knob(key), step if sign == UP else -step, low, high)
        return Request("set", {"key": key, "value": str(value)}, f"{key}={value}")
    raise ValueError(f"unknown dashboard action {action!r}")


class Sender:
    """Writes control rows through one write engine, kept for the dashboard's life (a
    new engine and connection per key cost more than the write itself)."""

    def __init__(self, db_path) -> None:
        self.db_path = db_path
        self.engine = None

    def warm(self) -> None:
        """Import the write path and open its engine now, before the first key (importing
        SQLAlchemy takes a good part of a second on a busy machine)."""
        from dreamd.ledger import database
        from dreamd.ledger import controls  # noqa: F401

        if self.engine is None and database.current_revision(self.db_path) is not None:
            self.engine = database.writer(self.db_path)
            with self.engine.connect():
                pass

    def send(self, request: Request) -> int:
        """Write the control row (a short BEGIN IMMEDIATE; waits out a busy ledger for
        the writer's busy timeout). Returns its id."""
        from dreamd.errors import LedgerError
        from dreamd.ledger import database
        from dreamd.ledger.controls import request as control

        if self.engine is None:
            if database.current_revision(self.db_path) is None:
                raise LedgerError(f"no ledger at {self.db_path} yet: start the daemon first")
            self.engine = database.writer(self.db_path)
        with self.engine.begin() as conn:
            return control(conn, request.command, request.args)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None
