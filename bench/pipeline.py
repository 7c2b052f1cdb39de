"""The daemon end to end on the embedded default: stage timings, production rate
against the display rate, display jitter, idle CPU and peak RSS. Not a test.

    .venv/bin/python bench/pipeline.py [--seconds 60] [--fps 4 15] [--idle-only]  (or: make bench)

For each display rate it runs `dreamd run` as a subprocess at 512x256, N=10, with
DEBUG logs (the workers' `timing` lines), then reads the ledger:
- production: frames created per second while the buffer fills (the planner's
  target is set far away so production never waits);
- jitter: |interval between consecutive shows - 1/fps|, once playback started,
  excluding underrun holds (counted separately);
- idle CPU (a run of its own, `idle()`): the buffer filled with the display at 1 fps,
  then `dreamd set display.buffer_target_seconds=1` and `display.fps=<fps>` leave it far
  above target, so nothing needs producing while playback goes on at <fps>, every
  surface on (the web viewer serving, with `--pages` pages open: none by default, each
  its event stream and every frame announced; status.json and the frame files, guard,
  janitor); the daemon's CPU time over that window / wall time, in slices (median,
  min-max: the spread says how noisy it was). The steady state by default: the window
  starts a minute after production (`--settle-seconds`) and lasts a minute
  (`--idle-seconds`), so it holds one of the janitor's once-a-minute passes, as every
  minute of playback does; `--idle-only` runs just this;
- peak RSS: VmHWM of the daemon process.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from datetime import datetime
from pathlib import Path

import psutil

CONFIG = """
[system]
log_level = "{level}"
[generation]
resolution = [512, 256]
interpolation_frames = 10
[display]
fps = {fps}
buffer_target_seconds = 3000.0
min_buffer_seconds = 5.0
max_output_frames = 100000
[web]
port = 0
"""
IDLE_WINDOWS = 4     # the idle window is measured in slices: median, and min-max for noise
FILL_FPS = 1.0       # the display rate while an idle run fills its buffer


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def timing_lines(log: str, kind: str) -> list[dict[str, float]]:
    out = []
    for line in log.splitlines():
        m = re.search(rf"timing {kind} id=\d+ (.*)$", line)
        if m:
            out.append({k: float(v) for k, v in re.findall(r"(\w+?)(?:_ms)?=([\d.]+)",
                                                            m.group(1))})
    return out


def wait_idle(db_path: Path, timeout: float) -> None:
    """Until no job row is waiting or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        busy = sum(db.execute(f"SELECT count(*) FROM {t} WHERE state IN "
                              f"('available', 'executing', 'retryable')").fetchone()[0]
                   for t in ("keyframes", "interpolations", "embeddings"))
        db.close()
        if not busy:
            time.sleep(1)
            return
        time.sleep(0.5)
    print(f"# warning: still busy after {timeout:g} s", file=sys.stderr)


def jitter(shown: list[datetime], period: float) -> tuple[list[float], int]:
    """(|interval - period| in ms for each pair of consecutive shows, underrun holds)"""
    deltas = [(b - a).total_seconds() for a, b in zip(shown, shown[1:])]
    return ([abs(d - period) * 1000 for d in deltas if d <= 1.5 * period],
            sum(1 for d in deltas if d > 1.5 * period))


def run(fps: float, seconds: float, idle_seconds: float, level: str = "INFO") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        cfg = Path(tmp) / "dreamd.toml"
        cfg.write_text(CONFIG.format(fps=fps, level=level))
        env = {**os.environ, "DREAMD_DATA_DIR": str(data)}
        dreamd = [sys.executable, "-m", "dreamd", "--config", str(cfg)]
        proc = subprocess.Popen([*dreamd, "run", "--duration", str(seconds + idle_seconds + 600)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ps = psutil.Process(proc.pid)
        peak = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            peak = max(peak, ps.memory_info().rss)
            time.sleep(0.5)
        # stop producing: the buffer is now far above the target
        subprocess.run([*dreamd, "set", "display.buffer_target_seconds=1"], env=env,
                       check=True, capture_output=True)
        producing_until = datetime.utcnow()
        # in-flight work (and the embedding backlog: production too) finishes first
        wait_idle(data / "dreamd.db", timeout=300)
        time.sleep(idle_seconds)          # the idle cost is measured in a run of its own
        try:
            hwm = int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{proc.pid}/status")
                                .read_text()).group(1)) * 1024
        except (OSError, AttributeError):
            hwm = peak
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        log = (data / "logs" / "dreamd.log").read_text()
        db = sqlite3.connect(f"file:{data / 'dreamd.db'}?mode=ro", uri=True)
        created = [datetime.fromisoformat(r[0]) for r in db.execute(
            "SELECT created_at FROM frames ORDER BY created_at")]
        shown = [datetime.fromisoformat(r[0]) for r in db.execute(
            "SELECT shown_at FROM frames WHERE shown_at IS NOT NULL ORDER BY shown_at")]
        db.close()

    span = (created[-1] - created[0]).total_seconds() if len(created) > 1 else float("nan")
    window = [c for c in created if (c - created[0]).total_seconds() <= seconds - 10]
    production = (len(window) - 1) / max(1e-9, (window[-1] - created[0]).total_seconds())
    period = 1 / fps
    # playback starts after min_buffer; skip the first few shows
    busy, holds = jitter([t for t in shown[5:] if t <= producing_until], period)
    kf, ip, dp = (timing_lines(log, k) for k in ("keyframe", "interpolation", "display"))
    frames = sum(t.get("frames", 0) for t in ip) or 1
    return {
        "fps": fps, "frames_created": len(created), "production_fps": production,
        "keyframe_ms": statistics.median(t["generate"] for t in kf) if kf else float("nan"),
        "keyframe_write_ms": statistics.median(t["write"] for t in kf) if kf else float("nan"),
        "interp_ms_per_frame": sum(t.get("encode", 0) + t.get("slerp", 0) + t.get("decode", 0)
                                   for t in ip) / frames,
        "interp_write_ms_per_frame": sum(t.get("write", 0) for t in ip) / frames,
        "ledger_ms_per_frame": (sum(t.get("ledger", 0) for t in ip) / frames
                                + (statistics.mean(t["ledger"] for t in dp) if dp else 0)),
        # (the output files go with a frame at most every STATUS_GAP: not in every line)
        "display_write_ms": statistics.median(w) if (w := [t["write"] for t in dp
                                                            if "write" in t]) else float("nan"),
        "jitter_p50_ms": pct(busy, 50), "jitter_p99_ms": pct(busy, 99),
        "jitter_max_ms": max(busy) if busy else float("nan"),
        "shows": len(shown), "underrun_holds": holds,
        "peak_rss_mb": hwm / 2**20, "created_span_s": span,
    }


def cpu_slices(ps: psutil.Process, seconds: float) -> list[float]:
    """The process's CPU (% of one core) over `seconds`, in IDLE_WINDOWS slices."""
    out = []
    for _ in range(IDLE_WINDOWS):
        before, w0 = ps.cpu_times(), time.monotonic()
        time.sleep(seconds / IDLE_WINDOWS)
        after, w1 = ps.cpu_times(), time.monotonic()
        out.append(100 * ((after.user + after.system) - (before.user + before.system))
                   / (w1 - w0))
    return out


class Page(threading.Thread):
    """What an open viewer page asks of the daemon: its event stream, and each frame
    announced on it (as viewer.js does; the browser's own CPU is bench/web.py's)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.base = urllib.parse.urlsplit(url)
        self.frames = 0
        self.conn: http.client.HTTPConnection | None = None

    def run(self) -> None:
        host, port = self.base.hostname, self.base.port
        self.conn = http.client.HTTPConnection(host, port, timeout=60)
        getter = http.client.HTTPConnection(host, port, timeout=60)
        self.conn.request("GET", "/api/events")
        kind = None
        try:
            for raw in self.conn.getresponse():
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind == "frame":
                    getter.request("GET", json.loads(line[6:])["url"])
                    getter.getresponse().read()
                    self.frames += 1
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            pass                                        # closed, or the daemon stopped

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def idle(fps: float, fill_seconds: float, idle_seconds: float, pages: int = 0,
         settle_seconds: float = 0.0) -> dict:
    """The daemon's CPU with a full buffer at `fps`, nothing to produce, every surface on
    (the web viewer, status.json, the guard, the janitor). The buffer fills with the
    display at FILL_FPS (at 15 fps a busy 2-core machine produces little faster than it
    plays, so the buffer would never be full), then the display goes to `fps` and the
    target to 1 s: the buffer stays far above it for the whole window. The window starts
    `settle_seconds` after the last job row is done: what production leaves behind (the
    janitor's whole retention pass and checkpoint of the WAL the filling grew, once a
    minute at most) is not the cost of playing from a full buffer."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        cfg = Path(tmp) / "dreamd.toml"
        cfg.write_text(CONFIG.format(fps=FILL_FPS, level="INFO"))
        env = {**os.environ, "DREAMD_DATA_DIR": str(data)}
        dreamd = [sys.executable, "-m", "dreamd", "--config", str(cfg)]
        proc = subprocess.Popen([*dreamd, "run", "--duration",
                                 str(fill_seconds + idle_seconds + 600)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ps = psutil.Process(proc.pid)
        time.sleep(fill_seconds)
        for knob in ("display.buffer_target_seconds=1", f"display.fps={fps:g}"):
            subprocess.run([*dreamd, "set", knob], env=env, check=True, capture_output=True)
        wait_idle(data / "dreamd.db", timeout=300)
        time.sleep(settle_seconds)
        db = sqlite3.connect(f"file:{data / 'dreamd.db'}?mode=ro", uri=True)
        count = "SELECT count(*) FROM frames"
        made_before = db.execute(count).fetchone()[0]
        ahead = db.execute("SELECT count(*) FROM frames WHERE state = 'ready'").fetchone()[0]
        viewers = [Page(json.loads((data / "web.json").read_text())["url"])
                   for _ in range(pages)]
        for v in viewers:
            v.start()
        time.sleep(1 if viewers else 0)                  # connected, first frame fetched
        idle_from = datetime.utcnow()
        slices = cpu_slices(ps, idle_seconds)
        idle_to = datetime.utcnow()
        fetched = sum(v.frames for v in viewers)
        for v in viewers:
            v.close()
        made_during = db.execute(count).fetchone()[0] - made_before
        shown = [datetime.fromisoformat(r[0]) for r in db.execute(
            "SELECT shown_at FROM frames WHERE shown_at IS NOT NULL ORDER BY shown_at")]
        db.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    quiet, _ = jitter([t for t in shown if idle_from <= t <= idle_to], 1 / fps)
    if made_during:
        print(f"# warning: {made_during} frames made during the idle window at {fps:g} fps",
              file=sys.stderr)
    return {"idle_cpu_pct": statistics.median(slices), "idle_cpu_min": min(slices),
            "idle_cpu_max": max(slices), "idle_ready_frames": ahead,
            "idle_frames_made": made_during, "idle_frames_fetched": fetched,
            "quiet_jitter_p50_ms": pct(quiet, 50), "quiet_jitter_p99_ms": pct(quiet, 99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=40.0, help="production + playback phase")
    ap.add_argument("--fill-seconds", type=float, default=80.0,
                    help="an idle run's filling phase (display at FILL_FPS)")
    ap.add_argument("--idle-seconds", type=float, default=60.0, help="idle CPU window")
    ap.add_argument("--settle-seconds", type=float, default=60.0,
                    help="idle runs: seconds between the last job done and the window (60: "
                         "after the janitor's once-a-minute passes that production leaves; "
                         "a 60 s window then holds one of each, as every minute does)")
    ap.add_argument("--fps", type=float, nargs="+", default=[4.0, 15.0])
    ap.add_argument("--pages", type=int, default=0,
                    help="viewer pages open during the idle window (event stream + frames; "
                         "1: what a page open costs on top)")
    ap.add_argument("--idle-only", action="store_true",
                    help="only the idle runs (the CPU with a full buffer), not production")
    args = ap.parse_args()
    import torch
    print(f"# {platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, torch {torch.__version__}, "
          f"load {os.getloadavg()[0]:.1f}")
    idles = [idle(fps, args.fill_seconds, args.idle_seconds, args.pages, args.settle_seconds)
             for fps in args.fps]
    if args.idle_only:
        print("| measure | " + " | ".join(f"{fps:g} fps" for fps in args.fps) + " |")
        print("|---|" + "---|" * len(args.fps))
        print(f"| daemon CPU % of one core, buffer full (median of {IDLE_WINDOWS} slices, "
              "min-max) | " + " | ".join(f"{r['idle_cpu_pct']:.2f} ({r['idle_cpu_min']:.2f}-"
                                         f"{r['idle_cpu_max']:.2f})" for r in idles) + " |")
        print("| frames ready / made in the window / fetched by the pages | " + " | ".join(
            f"{r['idle_ready_frames']} / {r['idle_frames_made']} / {r['idle_frames_fetched']}"
            for r in idles) + " |")
        return
    # INFO runs for playback, CPU and memory; one DEBUG run for the stage timings
    # (its per-frame log lines cost CPU of their own)
    results = [{**run(fps, args.seconds, 0), **r} for fps, r in zip(args.fps, idles)]
    timed = run(args.fps[0], args.seconds, 5, level="DEBUG")
    for r in results:
        for k in ("keyframe_ms", "keyframe_write_ms", "interp_ms_per_frame",
                  "interp_write_ms_per_frame", "ledger_ms_per_frame", "display_write_ms"):
            r[k] = timed[k]
    rows = [
        ("keyframe generate ms (median; DEBUG run)", "keyframe_ms", "{:.0f}"),
        ("keyframe PNG write ms (median)", "keyframe_write_ms", "{:.1f}"),
        ("interpolation ms per frame (encode+slerp+decode)", "interp_ms_per_frame", "{:.1f}"),
        ("in-between PNG write ms per frame", "interp_write_ms_per_frame", "{:.1f}"),
        ("ledger ms per frame (create + show)", "ledger_ms_per_frame", "{:.2f}"),
        ("display swap ms (median, 2 copies)", "display_write_ms", "{:.2f}"),
        ("produced frames/s while filling", "production_fps", "{:.1f}"),
        ("production / display rate", None, None),
        ("display jitter p50 ms, while producing", "jitter_p50_ms", "{:.2f}"),
        ("display jitter p99 ms, while producing", "jitter_p99_ms", "{:.2f}"),
        ("display jitter max ms, while producing", "jitter_max_ms", "{:.2f}"),
        ("display jitter p50 ms, buffer full, nothing to produce", "quiet_jitter_p50_ms",
         "{:.2f}"),
        ("display jitter p99 ms, buffer full, nothing to produce", "quiet_jitter_p99_ms",
         "{:.2f}"),
        ("frames shown / underrun holds", None, None),
        ("daemon CPU % of one core, buffer full, nothing to produce (median of "
         f"{IDLE_WINDOWS} slices, min-max)", "idle_cpu_pct", "{:.2f}"),
        ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ]
    print("| measure | " + " | ".join(f"{r['fps']:g} fps" for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for label, key, fmt in rows:
        if label.startswith("production /"):
            cells = [f"{r['production_fps'] / r['fps']:.1f}x" for r in results]
        elif key == "idle_cpu_pct":
            cells = [f"{r['idle_cpu_pct']:.2f} ({r['idle_cpu_min']:.2f}-{r['idle_cpu_max']:.2f})"
                     for r in results]
        elif label.startswith("frames shown"):
            cells = [f"{r['shows']} / {r['underrun_holds']}" for r in results]
        else:
            cells = [fmt.format(r[key]) for r in results]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
