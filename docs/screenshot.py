"""Take docs/viewer.png, the README's picture of the web viewer: a real `dreamd run` on
the embedded default in a temporary data dir, Debian's chromium (Playwright), and a
screenshot once the overlay shows the status and the history.

    .venv/bin/python docs/screenshot.py [--out docs/viewer.png]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = """
[web]
port = 0
[generation]
resolution = [512, 256]
interpolation_frames = 6
[display]
fps = 4.0
buffer_target_seconds = 6.0
min_buffer_seconds = 2.0
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "viewer.png")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        data, cfg = Path(tmp) / "data", Path(tmp) / "dreamd.toml"
        cfg.write_text(CONFIG)
        daemon = subprocess.Popen([sys.executable, "-m", "dreamd", "--config", str(cfg), "run",
                                   "--duration", "300"],
                                  env={**os.environ, "DREAMD_DATA_DIR": str(data)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not (data / "web.json").exists():
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit("the daemon did not start its viewer")
                time.sleep(0.2)
            url = json.loads((data / "web.json").read_text())["url"]
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium")
                page = browser.new_page(viewport={"width": 1024, "height": 512})
                page.goto(url)
                page.wait_for_selector("#history img", timeout=120_000)
                time.sleep(25)          # a few keyframes in: the history strip fills
                page.goto(url)
                page.wait_for_selector("#history img:nth-child(6)", timeout=120_000)
                time.sleep(3)
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
