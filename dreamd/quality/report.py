"""The dream's quality in words, for `dreamd stats` and the dashboard: the facts come
from the read model (dreamd/ledger/read_model.py `quality`), the units are those of
dreamd/quality/metrics.py (changes in 0-255 levels, colour in CIELAB, delta E).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any


def collect(conn, cfg) -> dict[str, Any] | None:
    """The read model's quality for `dreamd stats`: the last hour and since the last
    run began (`conn`: a DB-API connection to the ledger), stagnation judged with the
    floor in effect."""
    from dreamd.ledger import read_model

    run = read_model.last_run(conn)
    start = datetime.fromisoformat(str(run["started_at"])) if run else None
    floor = read_model.knobs(read_model.stored_knobs(conn), cfg)["quality.stagnation_floor"]
    return read_model.quality(conn, start=start, floor=floor.value)


def _f(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def window_lines(w: dict[str, Any], thresholds: dict[str, float]) -> list[str]:
    """A window's numbers: its segments, then its keyframes."""
    pops = (f"pops {w['pops']} (boundary >= {thresholds['pop_ratio']:g}x the typical step; "
            f"worst {_f(w['pop_max'])}x)")
    breaks = f", stagnation breaks {w['breaks']}" if "breaks" in w else ""
    return [
        f"  segments {w['segments']}: motion {_f(w['motion_avg'])} (max "
        f"{_f(w['motion_max'])}), flicker {_f(w['flicker_avg'])} (max "
        f"{_f(w['flicker_max'])}) levels a frame; {pops}",
        f"  keyframes {w['keyframes']}: change {_f(w['change_avg'])} delta E, stagnant "
        f"{w['stagnant']} (change < {thresholds['stagnant_change']:g}){breaks}; colour drift "
        f"from the reference {_f(w['drift_avg'])} (max {_f(w['drift_max'])})",
    ]


def keyframe_line(k: dict[str, Any] | None) -> str | None:
    """The newest keyframe's colour against its reference's."""
    if not k:
        return None
    ref = ""
    if k.get("reference") is not None and k.get("reference_l") is not None:
        ref = (f" against keyframe {k['reference']}'s L {_f(k['reference_l'], 1)} a "
               f"{_f(k['reference_a'], 1)} b {_f(k['reference_b'], 1)}")
    return (f"  newest keyframe {k['chain_index']}: L {_f(k['lab_l'], 1)} a {_f(k['lab_a'], 1)} "
            f"b {_f(k['lab_b'], 1)}{ref} (drift {_f(k['drift'])}); saturation "
            f"{_f(k['saturation'])}, brightness {_f(k['brightness'], 1)}, contrast "
            f"{_f(k['contrast'], 1)}")


def lines(q: dict[str, Any] | None) -> list[str]:
    """What `dreamd stats` prints of the quality (plain text)."""
    if q is None:
        return ["quality: not measured by this ledger (run `dreamd db upgrade`)"]
    t = q["thresholds"]
    out = ["quality, the last hour:", *window_lines(q["last_hour"], t)]
    if "since_start" in q:
        out += [f"quality since the last run began ({q['start'][:19]}):",
                *window_lines(q["since_start"], t)]
    newest = keyframe_line(q.get("keyframe"))
    if newest:
        out.append(newest)
    if q.get("stagnant_streak"):
        out.append(f"  the newest {q['stagnant_streak']} keyframes in a row barely changed")
    return out


def summary(q: dict[str, Any] | None) -> str | None:
    """One line for the dashboard: the last hour's numbers; None when nothing was
    measured yet (or the ledger predates the measurements)."""
    if not q or not q.get("keyframe") and not q.get("segment"):
        return None
    w = q["last_hour"]
    if not w["segments"] and not w["keyframes"]:
        return "nothing measured in the last hour"
    streak = q.get("stagnant_streak") or 0
    return (f"motion {_f(w['motion_avg'], 1)}, flicker {_f(w['flicker_avg'])}, pops "
            f"{w['pops']}/{w['segments']}, drift {_f(w['drift_avg'], 1)} (max "
            f"{_f(w['drift_max'], 1)}), change {_f(w['change_avg'], 1)}, stagnant "
            f"{w['stagnant']}" + (f" ({streak} in a row now)" if streak else "")
            + " (last hour)")
