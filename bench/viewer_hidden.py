"""The viewer page's cost while shown against while hidden (a wallpaper app hiding it, a
background tab): one kiosk page in Debian's headless chromium (Playwright) against a
real `dreamd run`, over equal windows shown, hidden, shown again:

- network: the bytes the page received (Chromium's Network.dataReceived: the event
  stream's chunks and the frames) and the requests it made;
- the browser's CPU (every chromium process Playwright started, psutil) and the
  daemon's.

Headless chromium never hides a page by itself, so hiding is what the page sees when a
wallpaper app or a browser hides it: `document.visibilityState` "hidden" and a
`visibilitychange` event (as tests/test_web_wallpaper.py does). A real hidden page is
also throttled by the browser, so the hidden figures here are an upper bound.

    .venv/bin/python bench/viewer_hidden.py [--fps 15] [--window 20]

Results go in bench/RESULTS.md by hand, with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from web import CHROMIUM, REPO, config, read_json, wait  # noqa: E402

HIDE = """(hidden) => {
    Object.defineProperty(document, 'visibilityState',
                          {configurable: true, get: () => hidden ? 'hidden' : 'visible'});
    Object.defineProperty(document, 'hidden', {configurable: true, get: () => hidden});
    document.dispatchEvent(new Event('visibilitychange'));
}"""


def browser_cpu() -> float:
    """CPU seconds of every chromium process under this one (Playwright's driver)."""
    total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            if "chrom" in p.name().lower():
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--window", type=float, default=20.0)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    print(f"# {platform.node()}: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
          f"{args.fps:g} fps, {args.window:g} s windows")
    rows = []
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
            proc = psutil.Process(daemon.pid)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM)
                context = browser.new_context(viewport={"width": 1280, "height": 720},
                                              bypass_csp=True)
                page = context.new_page()
                received = [0]
                requests = [0]
                cdp = context.new_cdp_session(page)
                cdp.send("Network.enable")
                cdp.on("Network.dataReceived",
                       lambda e: received.__setitem__(0, received[0] + e["dataLength"]))
                page.on("request", lambda r: requests.__setitem__(0, requests[0] + 1))
                page.goto(info["url"] + "?kiosk=1")
                wait(lambda: page.evaluate("window.dreamdViewer && dreamdViewer.shown > 5"),
                     120, "frames on the page")
                for name, hidden in (("shown", False), ("hidden", True), ("shown again", False)):
                    page.evaluate(HIDE, hidden)
                    page.wait_for_timeout(2000)       # the stream closed or reopened
                    shown0 = page.evaluate("dreamdViewer.shown")
                    b0, r0, c0 = received[0], requests[0], browser_cpu()
                    d0 = sum(proc.cpu_times()[:2])
                    t0 = time.monotonic()
                    # (the sync API hands over the page's events only while it waits)
                    page.wait_for_timeout(args.window * 1000)
                    span = time.monotonic() - t0
                    b1, r1, c1 = received[0], requests[0], browser_cpu()
                    d1 = sum(proc.cpu_times()[:2])
                    rows.append((name, (b1 - b0) / span / 1024, (r1 - r0) / span,
                                 100 * (c1 - c0) / span, 100 * (d1 - d0) / span,
                                 page.evaluate("dreamdViewer.shown") - shown0))
                    print(rows[-1], flush=True)
                browser.close()
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    print("| page | KiB/s received | requests/s | browser CPU % of a core | daemon CPU % | "
          "frames shown |")
    print("|---|---|---|---|---|---|")
    for name, kib, req, bcpu, dcpu, shown in rows:
        print(f"| {name} | {kib:.1f} | {req:.2f} | {bcpu:.1f} | {dcpu:.1f} | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
