"""What `dreamd status` (and the TUI) show of the governor: whether it is on, the N and
interpolation size batches are made with now, and its last decisions with their
reasons. Read with the sqlite3 module alone, like dreamd/ledger/glance.py, from
`governor_decisions` (dreamd/governor/worker.py writes it).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from dreamd.governor.law import size_words

SHOWN = 5       # decisions listed


def report(conn: sqlite3.Connection | None, cfg, alive: bool) -> dict[str, Any]:
    """{"enabled", "interpolation_frames", "resolution_divisor", "stretch", "settings",
    "decisions"}: what the next batches use (the last decision's choice while a daemon
    runs, else the user's settings, which the next start begins from unless the last
    choice still fits), and the last decisions, newest first."""
    g = cfg.generation
    stored = _stored_knobs(conn)
    enabled = bool(stored.get("governor.enabled", cfg.governor.enabled))
    n = stored.get("generation.interpolation_frames", g.interpolation_frames)
    out: dict[str, Any] = {
        "enabled": enabled, "interpolation_frames": n, "resolution_divisor": g.resolution_divisor,
        "stretch": 1.0,
        "settings": {"interpolation_frames": n, "resolution_divisor": g.resolution_divisor,
                     "max_interpolation_frames": max(n, cfg.governor.max_interpolation_frames),
                     "max_resolution_divisor": max(g.resolution_divisor,
                                                   cfg.governor.max_resolution_divisor)},
        "decisions": decisions(conn)}
    last = out["decisions"][0] if out["decisions"] else None
    if enabled and alive and last is not None:
        out.update(interpolation_frames=last["interpolation_frames"],
                   resolution_divisor=last["resolution_divisor"], stretch=last["stretch"])
    return out


def decisions(conn: sqlite3.Connection | None, limit: int = SHOWN) -> list[dict[str, Any]]:
    if conn is None or not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                        "AND name = 'governor_decisions'").fetchone():
        return []        # no ledger yet, or one from before revision 0006
    rows = conn.execute("SELECT * FROM governor_decisions ORDER BY id DESC LIMIT ?",
                        (limit,)).fetchall()
    out = []
    for r in rows:
        d = dict(r)
        try:
            d["detail"] = json.loads(d["detail"]) if d["detail"] else None
        except json.JSONDecodeError:
            pass
        out.append(d)
    return out


def _stored_knobs(conn: sqlite3.Connection | None) -> dict[str, Any]:
    if conn is None:
        return {}
    try:
        row = conn.execute("SELECT knobs FROM runtime_state WHERE id = 1").fetchone()
        knobs = json.loads(row[0]) if row and row[0] else {}
    except (sqlite3.Error, json.JSONDecodeError):
        return {}
    return knobs if isinstance(knobs, dict) else {}


def lines(g: dict[str, Any] | None) -> list[str]:
    """The text `dreamd status` prints (Rich markup)."""
    if not g:
        return []
    s = g["settings"]
    if not g["enabled"]:
        return [f"[bold]governor[/]   off: your settings, {s['interpolation_frames']} "
                f"in-betweens at {size_words(s['resolution_divisor'])}"]
    now = (f"{g['interpolation_frames']} in-betweens at {size_words(g['resolution_divisor'])}"
           + (f", display at {g['stretch'] * 100:.0f} %" if g["stretch"] < 1 else ""))
    out = [f"[bold]governor[/]   on: {now} (yours: {s['interpolation_frames']} at "
           f"{size_words(s['resolution_divisor'])}; up to {s['max_interpolation_frames']} "
           f"and {size_words(s['max_resolution_divisor'])})"]
    for d in g["decisions"]:
        out.append(f"  {str(d['at'])[:19]}  {d['reason']}: {d['message']}")
    if not g["decisions"]:
        out.append("  no change so far: your settings keep up")
    return out
