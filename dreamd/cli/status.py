"""Human-readable `dreamd status` with Rich (the `--json` form is the same dict)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_status(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    alive = report.get("alive")
    run = report.get("last_run")
    console.print(f"[bold]data dir[/]   {report['data_dir']}")
    rev, head = report.get("revision"), report.get("head")
    if rev is None:
        console.print(f"[bold]ledger[/]     {report['database']} [yellow](not created yet: "
                      f"start the daemon or run `dreamd db upgrade`)[/]")
    else:
        note = "" if rev == head else f" [yellow](head is {head}: run `dreamd db upgrade`)[/]"
        console.print(f"[bold]ledger[/]     {report['database']} at revision {rev}{note}")
    if run:
        state = "[green]alive[/]" if alive else "[red]not running[/]"
        console.print(f"[bold]daemon[/]     {state}: run {run['id']} pid {run['pid']} on "
                      f"{run['host']}, started {run['started_at']}, heartbeat "
                      f"{run['heartbeat_at']}"
                      + (f", stopped {run['stopped_at']} ({run['exit_reason']})"
                         if run.get("stopped_at") else ""))
    else:
        console.print("[bold]daemon[/]     never run")
    if report.get("web_url"):
        console.print(f"[bold]viewer[/]     {report['web_url']}  (`dreamd open`)", highlight=False)
    if report.get("paused"):
        console.print(f"[bold]paused[/]     yes: {report.get('pause_reason') or 'no reason given'}"
                      f" (`dreamd resume` resumes)", highlight=False)
        if report.get("paused_by") == "guard":
            console.print("             by the guard: it resumes by itself once every "
                          "reason is gone", highlight=False)
    buffer = report.get("buffer")
    if buffer:
        console.print(f"[bold]buffer[/]     {buffer['seconds']:g} s ahead ({buffer['frames']} "
                      f"frames at {buffer['fps']:g} fps) of a {buffer['target_seconds']:g} s "
                      f"target", highlight=False)
    making = report.get("in_progress")
    if making:
        since = f", started {making['started_at']}" if making.get("started_at") else ""
        console.print(f"[bold]making[/]     keyframe {making['chain_index']} "
                      f"({making['state']}, attempt {making['attempt']}, theme "
                      f"{making['theme']}{since})", highlight=False)
    playhead = report.get("playhead")
    if playhead and playhead.get("chain_index") is not None:
        console.print(f"[bold]playhead[/]   keyframe {playhead['chain_index']} t="
                      f"{playhead['t']:.3f}, {playhead['frames_shown']} frames shown, "
                      f"{playhead['underruns']} underruns")
    _print_comfyui(report.get("comfyui"), console)
    _print_storage(report.get("storage"), console)
    from dreamd.governor.report import lines as governor_lines
    for line in governor_lines(report.get("governor")):
        console.print(line, highlight=False)
    counts = report.get("counts") or {}
    if counts:
        table = Table(title="rows per state", show_edge=False)
        table.add_column("table")
        table.add_column("states")
        for name, states in counts.items():
            text = ", ".join(f"{s} {n}" for s, n in states.items()) or "-"
            table.add_row(name, text)
        console.print(table)


def _print_comfyui(health: dict[str, Any] | None, console: Console) -> None:
    """Each ComfyUI server's health, as the daemon last recorded it."""
    if not health:
        return
    colour = {"ok": "green", "fallback": "yellow", "starting": "yellow"}.get(
        health.get("status"), "red")
    line = f"[bold]comfyui[/]    [{colour}]{health.get('status')}[/]"
    if health.get("fallback") == "procedural":
        line += " (fallback: procedural)"
    console.print(line + f", as of {health.get('updated_at')} UTC")
    if health.get("error"):
        console.print(f"  [red]stopped:[/] {health['error']}")
    for s in health.get("servers") or []:
        mark = "[green]healthy[/]" if s.get("healthy") else "[red]unhealthy[/]"
        if s.get("set_aside"):
            mark = "[red]set aside[/]"
        text = f"  {s.get('url')}  {mark}"
        if s.get("supervised"):
            text += " (supervised)"
        if s.get("set_aside"):      # answers, but cannot run the workflow; the others dream
            have = ", ".join(s.get("checkpoints") or []) or "none"
            console.print(text + f": {s['set_aside']} (its checkpoints: {have})",
                          highlight=False)
            continue
        if not s.get("healthy"):
            if s.get("failures"):
                text += f", {s['failures']} failures"
            if s.get("benched_until"):
                text += f", benched until {s['benched_until']}"
            if s.get("last_error"):
                text += f": {s['last_error']}"
        elif s.get("last_ok"):
            text += f", last answer {s['last_ok']}"
        console.print(text, highlight=False)
    sup = health.get("supervisor")
    if sup:
        console.print(f"  supervisor: {sup.get('state')}, pid {sup.get('pid') or '-'}, "
                      f"{sup.get('restarts_last_hour', 0)} restarts in the last hour"
                      + (f", last exit {sup['last_exit']}" if sup.get("last_exit") is not None
                         else ""), highlight=False)


def _print_storage(storage: dict[str, Any] | None, console: Console) -> None:
    """The data dir's size by part against the budget, and the disk's free space."""
    if not storage:
        return
    from dreamd.storage.space import ORPHANED_PREFIX, human

    parts = storage.get("parts") or {}
    budget, total = storage.get("budget") or 0, storage.get("total") or 0
    orphaned = sum(v for k, v in parts.items() if k.startswith(ORPHANED_PREFIX))
    line = f"[bold]storage[/]    {human(total - orphaned)}"
    line += f" of a {human(budget)} budget" if budget else " (no budget)"
    line += f", {human(storage.get('free'))} free on the disk"
    if storage.get("floor"):
        line += f" (floor {human(storage['floor'])})"
    console.print(line, highlight=False)
    if storage.get("low"):
        console.print(f"  [yellow]generation paused:[/] {storage['low']}", highlight=False)
    if storage.get("wal_held"):
        console.print(f"  [yellow]ledger held:[/] {storage['wal_held']}", highlight=False)
    shown = ", ".join(f"{k} {human(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])
                      if not k.startswith(ORPHANED_PREFIX))
    if shown:
        console.print(f"  {shown}", highlight=False)
    if orphaned:
        console.print(f"  [yellow]moved aside[/] {human(orphaned)} in "
                      f"{', '.join(k for k in parts if k.startswith(ORPHANED_PREFIX))}: not this "
                      f"ledger's files; delete them when you are sure", highlight=False)
