"""The viewer in a real `dreamd run` (slow: a daemon start costs 10-15 s here): the URL printed, in `dreamd status` and opened by
`dreamd open`; a port in use leaves the dream playing; a request flood does not stall
the display writer."""

from __future__ import annotations

import http.client
import json
import socket
import sqlite3
import stat
import subprocess
import threading
from datetime import datetime
from pathlib import Path

import pytest

from dreamd.ledger.models import utcnow
from tests.conftest import FAST_CONFIG, DaemonRunner, dreamd_cmd, wait_for
from tests.test_daemon import RUN_DEADLINE, run_until, stop, wait_in


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
    proc = daemon.start()
    info = wait_in(daemon, lambda: web_info(daemon.data_dir), "web.json")
    url = info["url"]
    assert url.startswith("http://127.0.0.1:") and info["pid"] == proc.pid
    wait_in(daemon, lambda: f"web viewer: {url}" in daemon.output(), "the URL in the output")
    env = {**dreamd_env, "COLUMNS": "200"}
    wait_in(daemon, lambda: json.loads(cli(env, "status", "--json").stdout)["alive"],
            "an alive daemon")
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

    stop(daemon, proc)
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
        # the viewer starts (or says why not) before the first frame: run until one
        run_until(daemon, lambda: status_json(daemon.data_dir).get("frame_number", 0) > 0,
                  "a frame shown")
    finally:
        holder.close()
    out = " ".join(daemon.output().split())
    assert f"web viewer off for this run: 127.0.0.1 port {port} is in use" in out
    assert "the dream goes on" in out and "web viewer: http" not in out
    assert status_json(daemon.data_dir)["frame_number"] > 0
    assert web_info(daemon.data_dir) is None


@pytest.mark.slow
def test_web_disabled_serves_nothing(dreamd_env, tmp_path):
    daemon = DaemonRunner(dreamd_env, tmp_path, FAST_CONFIG.replace(
        "port = 0 ", "enabled = false\nport = 0 "))
    # the viewer would start before the first frame: run until one
    run_until(daemon, lambda: status_json(daemon.data_dir).get("frame_number", 0) > 0,
              "a frame shown")
    assert "web viewer" not in daemon.output() and web_info(daemon.data_dir) is None


def shown_between(data_dir: Path, began, ended=None) -> int:
    """Frames the display showed after `began` (and up to `ended`), from the ledger."""
    con = sqlite3.connect(f"file:{data_dir / 'dreamd.db'}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute("SELECT count(*) FROM frames WHERE shown_at > ? AND shown_at <= ?",
                           (str(began), str(ended or datetime.max))).fetchone()[0]
    finally:
        con.close()


FLOOD_THREADS = 24
FRAMES_UNDER_FLOOD = 40
ANSWERS_UNDER_FLOOD = 100


# serial: the flood and the display share this machine's two cores with nothing else
@pytest.mark.slow
@pytest.mark.serial
def test_a_request_flood_does_not_stall_the_display(daemon: DaemonRunner):
    """24 clients ask without pause until the display has shown 40 frames and the server
    has answered 100 requests, all counted from the moment every client has had an
    answer: however fast either side is, the frames were shown while the flood ran."""
    proc = daemon.start()
    info = wait_in(daemon, lambda: web_info(daemon.data_dir), "web.json")
    port = info["port"]
    wait_in(daemon, lambda: status_json(daemon.data_dir).get("status") == "playing", "playback")
    answers: list[list[tuple[object, str]]] = [[] for _ in range(FLOOD_THREADS)]
    flooding = threading.Event()
    flooding.set()

    def flood(mine: list) -> None:
        # until the test says stop (a list's append is atomic: no lock between clients)
        paths = ["/", "/api/status", "/api/history", "/assets/viewer.js", "/frames/" + "0" * 64
                 + ".png"]
        i = 0
        while flooding.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", paths[i % len(paths)])
                status = conn.getresponse().status
                conn.close()
                key = "busy" if status == 503 else "ok"
            except OSError:
                key = "error"
            mine.append((utcnow(), key))
            i += 1

    def ok_since(began) -> int:
        return sum(1 for mine in answers for at, key in list(mine) if key == "ok" and at > began)

    threads = [threading.Thread(target=flood, args=(mine,), daemon=True) for mine in answers]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(answers), RUN_DEADLINE, what="an answer to every client")
        began = utcnow()          # the flood at full strength from here on
        # the display keeps showing frames while the server is flooded
        try:
            wait_for(lambda: shown_between(daemon.data_dir, began) >= FRAMES_UNDER_FLOOD
                     and ok_since(began) >= ANSWERS_UNDER_FLOOD, RUN_DEADLINE,
                     what=f"{FRAMES_UNDER_FLOOD} frames shown and {ANSWERS_UNDER_FLOOD} "
                          f"answers during the flood")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {shown_between(daemon.data_dir, began)} frames, "
                                 f"{ok_since(began)} answers; {status_json(daemon.data_dir)}"
                                 ) from None
        # every client was still asking: the frames were shown under the whole flood
        assert all(t.is_alive() for t in threads), "a flooding client died"
        ended = utcnow()
    finally:
        flooding.clear()
        for t in threads:
            t.join(60)
    assert shown_between(daemon.data_dir, began, ended) >= FRAMES_UNDER_FLOOD
    counts = {k: sum(1 for mine in answers for _, key in mine if key == k)
              for k in ("ok", "busy", "error")}
    assert counts["ok"] >= ANSWERS_UNDER_FLOOD, counts
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/api/status")
    assert conn.getresponse().status == 200       # and the server still answers
    stop(daemon, proc)
