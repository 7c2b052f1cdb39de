"""What `dreamd status` says of the governor, in words: whether it is on, the N and
interpolation size batches are made with now, and its last decisions with their
reasons (the facts come from the read model, dreamd/ledger/read_model.py `governor`).
"""

from __future__ import annotations

from typing import Any

from dreamd.governor.law import size_words


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
