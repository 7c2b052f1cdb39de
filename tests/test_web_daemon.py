"""The viewer in a real `dreamd run` (slow: a daemon start costs 10-15 s here): the URL printed, in `dreamd status` and opened by
`dreamd open`; a port in use leaves the dream playing; a request flood does not stall
the display writer."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import FAST_CONFIG, DaemonRunner, dreamd_cmd, wait_for


def web_info(data_dir: Path) -> dict | None:
    try:
        return json.loads((data_dir / "web.json").read_text())
    except (OSError, ValueError):
        return None


def status_json(data_dir: Path) -> dict:
    try:
        return json.loads((data_dir / "output" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def cli(env, *args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(dreamd_cmd(*args), env={**env, **(extra or {})}, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.slow
def test_the_url_is_printed_shown_by_status_and_opened(daemon: DaemonRunner, dreamd_env,
                                                       tmp_path):
    proc = daemon.start("--duration", "120")
    info = wait_for(lambda: web_info(daemon.data_dir), 60, what="web.json")
    url = info["url"]
    assert url.startswith("http://127.0.0.1:") and info["pid"] == proc.pid
    wait_for(lambda: f"web viewer: {url}" in daemon.output(), 30, what="the URL in the output")
    env = {**dreamd_env, "COLUMNS": "200"}
    wait_for(lambda: json.loads(cli(env, "status", "--json").stdout)["alive"], 30,
             what="an alive daemon")
    assert json.loads(cli(env, "status", "--json").stdout)["web_url"] == url
    assert url in cli(env, "status").stdout

    # `dreamd open` goes through the webbrowser module, which honours $BROWSER
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" >> {opened}\n')
    browser.chmod(browser.stat().st_mode | stat.S_IEXEC)
    for args, expected in ((("open",), url), (("open", "--kiosk"), url + "?kiosk=1")):
        done = cli(env, *args, extra={"BROWSER": str(browser)})
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == expected
    assert opened.read_text().split() == [url, url + "?kiosk=1"]

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert web_info(daemon.data_dir) is None
    assert json.loads(cli(env, "status", "--json").stdout)["web_url"] is None
    gone = cli(env, "open", extra={"BROWSER": str(browser)})
    assert gone.returncode == 1 and "no web viewer is running" in gone.stderr
    assert "dreamd run" in gone.stderr


@pytest.mark.slow
def test_a_port_in_use_is_a_warning_and_the_dream_goes_on(dreamd_env, tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        daemon = DaemonRunner(dreamd_env, tmp_path, FAST_CONFIG.replace(
            "port = 0 ", f"port = {port} "))
        done = daemon.run(15)
    finally:
        holder.close()
    assert done.returncode == 0, done.stdout
    out = " ".join(done.stdout.split())
    assert f"web viewer off for this run: 127.0.0.1 port {port} is in use" in out
    assert "the dream goes on" in out and "web viewer: http" not in out
    assert status_json(daemon.data_dir)["frame_number"] > 0
    assert web_info(daemon.data_dir) is None


@pytest.mark.slow
def test_web_disabled_serves_nothing(dreamd_env, tmp_path):
    daemon = DaemonRunner(dreamd_env, tmp_path, FAST_CONFIG.replace(
        "port = 0 ", "enabled = false\nport = 0 "))
    done = daemon.run(8)
    assert done.returncode == 0, done.stdout
    assert "web viewer" not in done.stdout and web_info(daemon.data_dir) is None


@pytest.mark.slow
def test_a_request_flood_does_not_stall_the_display(daemon: DaemonRunner):
    proc = daemon.start("--duration", "180")
    info = wait_for(lambda: web_info(daemon.data_dir), 60, what="web.json")
    port = info["port"]
    wait_for(lambda: status_json(daemon.data_dir).get("status") == "playing", 90,
             what="playback")
    before = status_json(daemon.data_dir)["frame_number"]
    counts = {"ok": 0, "busy": 0, "error": 0}
    lock = threading.Lock()
    flooding = threading.Event()
    flooding.set()

    def flood() -> None:
        # bounded: at most 400 requests per thread, and only while the test says so
        paths = ["/", "/api/status", "/api/history", "/assets/viewer.js", "/frames/" + "0" * 64
                 + ".png"]
        for i in range(400):
            if not flooding.is_set():
                return
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", paths[i % len(paths)])
                status = conn.getresponse().status
                conn.close()
                key = "busy" if status == 503 else "ok"
            except OSError:
                key = "error"
            with lock:
                counts[key] += 1

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(24)]
    for t in threads:
        t.start()
    try:
        # the display keeps showing frames while the server is flooded
        wait_for(lambda: status_json(daemon.data_dir).get("frame_number", 0) >= before + 40,
                 120, what="40 frames shown during the flood")
        assert any(t.is_alive() for t in threads), "the flood ended before the check"
    finally:
        flooding.clear()
        for t in threads:
            t.join(60)
    assert counts["ok"] > 100, counts
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/api/status")
    assert conn.getresponse().status == 200       # and the server still answers
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
