"""The dashboard's panels as Rich renderables made from a Snapshot: plain functions,
so the app only places them (and tests can read them as text)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from dreamd.quality.report import summary as quality_summary
from dreamd.tui.reading import Snapshot

STATE_ORDER = ("available", "executing", "retryable", "completed", "discarded", "cancelled",
               "ready", "shown", "evicted", "applied", "rejected")


SPARKS = "▁▂▃▄▅▆▇█"


def gauge(value: float, top: float, width: int) -> str:
    """A bar `width` cells wide, filled to value/top (eighths of a cell)."""
    eighths = round(max(0.0, min(1.0, value / top if top else 0.0)) * width * 8)
    full, part = divmod(eighths, 8)
    bar = "█" * full + ("▏▎▍▌▋▊▉"[part - 1] if part else "")
    return bar + "·" * (width - len(bar))


def sparkline(samples: list[float], top: float, width: int) -> str:
    """The last `width` samples as block heights from 0 to `top` (not to their own
    maximum: an empty buffer looks empty)."""
    recent = samples[-width:]
    if not recent:
        return ""
    top = top or max(recent) or 1.0
    return "".join(SPARKS[min(7, max(0, round(v / top * 7)))] for v in recent)


def buffer(snap: Snapshot, samples: list[float] = (), width: int = 40) -> Group:
    ahead, target = snap.buffer_seconds, snap.buffer_target
    if ahead is None:
        return Group(Text("buffer: unknown", style="dim"))
    line = Text.assemble(("ahead ", "bold"), f"{ahead:.1f} s",
                         f" of {target:g} s target" if target else "",
                         f" at {snap.fps:g} fps" if snap.fps else "")
    status = snap.status.get("status") if snap.status else None
    if status:
        line.append(f"  ({status})", style="yellow" if status in ("underrun", "buffering",
                                                                  "paused") else "green")
    share = f" {min(999, round(100 * ahead / target))}%" if target else ""
    width = max(8, width - 1)
    bar = Text(gauge(ahead, target or ahead, max(4, width - len(share))), style="green")
    bar.append(share)
    spark = Text(sparkline(list(samples), target or 0.0, width), style="cyan")
    return Group(line, bar, spark)


def pipeline(snap: Snapshot) -> Table:
    t = Table.grid(padding=(0, 1))
    t.add_column(style="bold", no_wrap=True)
    t.add_column()
    for name, states in snap.counts.items():
        order = sorted(states, key=lambda s: (STATE_ORDER.index(s) if s in STATE_ORDER
                                              else 99, s))
        t.add_row(name, ", ".join(f"{s} {states[s]}" for s in order) or "-")
    rate = "-" if snap.keyframes_per_minute is None else f"{snap.keyframes_per_minute:g}"
    t.add_row("keyframes", f"{rate} a minute (last 10 min)")
    produced = "-" if snap.produced_fps is None else f"{snap.produced_fps:g}"
    shown = "-" if snap.shown_fps is None else f"{snap.shown_fps:g}"
    t.add_row("frames/s", f"produced {produced} (last min), shown {shown}")
    t.add_row("underruns", "-" if snap.underruns is None else str(snap.underruns))
    t.add_row("backend", f"{snap.backend or '-'}, codec {snap.codec or '-'}")
    problem = (snap.status or {}).get("problem")    # status.json's: a condition, a fallback
    if problem:
        t.add_row("problem", Text(problem, style="red"))
    if snap.in_progress:
        p = snap.in_progress
        t.add_row("making", f"keyframe {p['chain_index']} ({p['state']}, attempt "
                            f"{p['attempt']}, {p['theme']})")
    progress = (snap.status or {}).get("keyframe_progress") or (snap.status or {}).get("progress")
    if progress:
        t.add_row("progress", progress_text(progress))
    if snap.governor:
        g = snap.governor
        t.add_row("governor", f"{g['message']} (N {g['interpolation_frames']}, divisor "
                              f"{g['resolution_divisor']:g}, at {str(g['at'])[11:19]})")
    quality = quality_summary(snap.quality)
    if quality:
        t.add_row("quality", quality)
    for line in comfyui_lines(snap.comfyui):
        t.add_row("comfyui", line)
    return t


def progress_text(progress: Any) -> str:
    """status.json's keyframe_progress (the ComfyUI prompt running): keyframe, node, step."""
    if isinstance(progress, str):
        return progress
    if isinstance(progress, dict) and "node" in progress:
        text = (f"keyframe {progress.get('keyframe')}: "
                f"{progress.get('node_type') or 'node ' + str(progress.get('node'))}")
        if progress.get("step"):
            text += f", step {progress['step']} of {progress.get('steps')}"
        return text
    return json.dumps(progress, default=str)


def comfyui_lines(health: dict[str, Any] | None) -> list[Text]:
    if not health:
        return []
    out = [Text(f"{health.get('status')}" + (f": {health['error']}" if health.get("error")
                                              else ""))]
    for s in health.get("servers") or []:
        ok = s.get("healthy")
        line = Text(f"{s.get('url')} ")
        if s.get("set_aside"):     # answers, but cannot run the workflow (issue 14)
            line.append("set aside", style="red")
            have = ", ".join(s.get("checkpoints") or []) or "none"
            out.append(line.append(f": {s['set_aside']} (its checkpoints: {have})"))
            continue
        line.append("healthy" if ok else "down", style="green" if ok else "red")
        if not ok and s.get("last_error"):
            line.append(f": {s['last_error']}")
        out.append(line)
    return out


def gpu(snap: Snapshot) -> Table | Text:
    reading = snap.gpu
    if reading is None:
        return Text("GPU: not read yet", style="dim")
    if not reading.devices:
        return Text(reading.problem or "no NVIDIA GPU", style="dim")
    t = Table.grid(padding=(0, 1))
    for d in reading.devices:
        util = "-" if d.utilisation is None else f"{d.utilisation}%"
        temp = "-" if d.temperature is None else f"{d.temperature}°C"
        t.add_row(f"[bold]{d.index}[/] {d.name}",
                  f"VRAM {d.used_mb / 1024:.1f}/{d.total_mb / 1024:.1f} GB, util {util}, {temp}")
    return t


def said(content: Any) -> Any:
    """What a panel's content says, comparable: the text of every cell of a table, the
    text and styles of a Text, or the string itself."""
    if isinstance(content, Table):
        return tuple(tuple(said(c) for c in col._cells) for col in content.columns)
    if isinstance(content, Text):
        return content.plain, tuple(content.spans), str(content.style)
    return content


def history_row(h: dict[str, Any]) -> tuple[str, ...]:
    source = h["source"] or "-"
    if h.get("injection"):
        source = f"{h['injection']} ({h['injection_reason']})"
    ms = "-" if h["generation_ms"] is None else f"{h['generation_ms']:.0f}"
    return (str(h["chain_index"]), h["theme"] or "-", f"{h['denoise']:.2f}", source,
            h["backend"] or "-", ms, h["state"])


def events(rows: list[dict[str, Any]]) -> Text:
    """One line per transition, newest first: time, row, change, event, detail."""
    out = Text(no_wrap=True, overflow="crop")
    for i, e in enumerate(rows):
        if i:
            out.append("\n")
        out.append(str(e["at"])[11:19], style="dim")
        out.append(f" {e['entity']} {e['entity_id']} ", style="bold")
        out.append(f"{e['from_state'] or '(new)'} → {e['to_state']}")
        if e["event"] and e["event"] not in ("created",):
            out.append(f" {e['event']}", style="cyan")
        if e["detail"]:
            out.append(f" {e['detail'][:60]}", style="dim")
    return out
