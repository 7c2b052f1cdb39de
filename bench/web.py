"""The web viewer's costs, measured against a real `dreamd run` and real headless
chromium pages (Debian's, driven by Playwright):

- latency from the display writer's swap (`current_frame.png` replaced) to the page
  starting to show that frame (decoded and fading in), as the page records it;
- the CPU of the daemon process and of the viewer's server thread with 0, 1 and 5
  pages open;
- one page's JS heap (after a forced GC) over a long run.

    .venv/bin/python bench/web.py [--fps 15] [--window 60] [--heap-minutes 10]

Results go in bench/RESULTS.md by hand, with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def config(fps: float) -> str:
    return f"""
[web]
port = 0
[generation]
resolution = [256, 128]
interpolation_frames = 14
[display]
fps = {fps}
buffer_target_seconds = 20.0
min_buffer_seconds = 5.0
"""


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def cpu(proc: psutil.Process, thread_id: int) -> tuple[float, float]:
    """(process CPU seconds, server thread CPU seconds) so far."""
    t = proc.cpu_times()
    thread = next((th for th in proc.threads() if th.id == thread_id), None)
    return t.user + t.system, (thread.user_time + thread.system_time) if thread else 0.0


def window(proc, thread_id, status_path: Path, seconds: float) -> dict:
    frames0 = read_json(status_path).get("frame_number", 0)
    c0, w0, t0 = *cpu(proc, thread_id), time.monotonic()
    time.sleep(seconds)
    c1, w1, t1 = *cpu(proc, thread_id), time.monotonic()
    frames1 = read_json(status_path).get("frame_number", 0)
    span = t1 - t0
    return {"seconds": round(span, 1), "daemon_cpu_percent": round(100 * (c1 - c0) / span, 1),
            "server_thread_cpu_percent": round(100 * (w1 - w0) / span, 2),
            "frames_per_second": round((frames1 - frames0) / span, 2)}


def latencies(page) -> list[float]:
    return [x for x in page.evaluate("dreamdViewer.latencies") if x is not None]


def summary(values: list[float]) -> dict:
    if not values:
        return {}
    values = sorted(values)
    q = lambda p: values[min(len(values) - 1, int(p * len(values)))]   # noqa: E731
    return {"n": len(values), "p50_ms": round(q(0.5)), "p95_ms": round(q(0.95)),
            "max_ms": round(values[-1]), "mean_ms": round(statistics.fmean(values))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--heap-minutes", type=float, default=10.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    results: dict = {"fps": args.fps}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        cfg = Path(tmp) / "dreamd.toml"
        cfg.write_text(config(args.fps))
        env = {**os.environ, "DREAMD_DATA_DIR": str(data)}
        log = open(Path(tmp) / "daemon.out", "w")
        daemon = subprocess.Popen([sys.executable, "-m", "dreamd", "--config", str(cfg), "run"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            info = wait(lambda: read_json(data / "web.json"), 120, "web.json")
            status_path = data / "output" / "status.json"
            wait(lambda: read_json(status_path).get("status") == "playing", 180, "playback")
            proc, tid = psutil.Process(daemon.pid), info["thread_id"]
            time.sleep(10)
            results["no_page"] = window(proc, tid, status_path, args.window)
            print("no page", results["no_page"], flush=True)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM)
                pages = []
                for n in (1, 5):
                    while len(pages) < n:
                        pg = browser.new_context(viewport={"width": 1024, "height": 512}) \
                            .new_page()
                        pg.goto(info["url"])
                        pages.append(pg)
                    wait(lambda: all(pg.evaluate("dreamdViewer.shown") > 5 for pg in pages),
                         120, "frames on every page")
                    for pg in pages:
                        pg.evaluate("dreamdViewer.latencies.fill(null)")
                    results[f"{n}_pages"] = window(proc, tid, status_path, args.window)
                    results[f"{n}_pages"]["latency"] = summary(
                        [x for pg in pages for x in latencies(pg)])
                    print(n, "pages", results[f"{n}_pages"], flush=True)
                for pg in pages[1:]:
                    pg.context.close()
                page = pages[0]
                cdp = page.context.new_cdp_session(page)
                heap = []
                start = time.monotonic()
                for minute in range(int(args.heap_minutes) + 1):
                    cdp.send("HeapProfiler.collectGarbage")
                    used = cdp.send("Runtime.getHeapUsage")["usedSize"]
                    metrics = {m["name"]: m["value"]
                               for m in cdp.send("Performance.getMetrics")["metrics"]} \
                        if minute else {}
                    if minute == 0:
                        cdp.send("Performance.enable")
                        metrics = {m["name"]: m["value"]
                                   for m in cdp.send("Performance.getMetrics")["metrics"]}
                    heap.append({"minute": minute, "heap_used_bytes": used,
                                 "frames_shown": page.evaluate("dreamdViewer.shown"),
                                 "dom_nodes": metrics.get("Nodes"),
                                 "listeners": metrics.get("JSEventListeners")})
                    print("heap", heap[-1], flush=True)
                    if minute < int(args.heap_minutes):
                        time.sleep(max(0.0, start + 60 * (minute + 1) - time.monotonic()))
                results["heap"] = heap
                results["heap_latency"] = summary(latencies(page))
                browser.close()
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
