"""The viewer in a real browser: Debian's chromium driven by Playwright against a real
`dreamd run` on the embedded default. Slow (daemon starts, a browser); CI runs them,
and there a missing chromium is a failure, not a skip (`.ci/run` installs it)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.conftest import FAST_CONFIG, DaemonRunner, free_port, machine_cannot, wait_for
from tests.test_web_daemon import web_info

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.slow


def _unavailable(why: str) -> None:
    machine_cannot(f"{why} (.ci/run installs chromium)")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        _unavailable(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is missing (pip install -e '.[dev]')")
    with sync_playwright() as p:
        # the system's chromium: Playwright never downloads a browser here
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    # the page's CSP forbids eval, which Playwright's wait_for_function(string) uses
    context = browser.new_context(viewport={"width": 800, "height": 400}, bypass_csp=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors
    yield pg
    context.close()


def viewer(pg, key: str):
    return pg.evaluate(f"window.dreamdViewer && window.dreamdViewer.{key}")


def wait_js(pg, expression: str, seconds: float = 60) -> None:
    pg.wait_for_function(expression, timeout=seconds * 1000)


def start(daemon: DaemonRunner, seconds: int = 300):
    proc = daemon.start("--duration", str(seconds))
    url = wait_for(lambda: web_info(daemon.data_dir), 90, what="web.json")["url"]
    return proc, url


def test_the_page_plays_shows_status_and_pauses(daemon: DaemonRunner, page):
    proc, url = start(daemon)
    page.goto(url)
    # a frame shows: decoded into a layer, fading in or on screen
    wait_js(page, "window.dreamdViewer && dreamdViewer.shown >= 1", 90)
    shown = page.evaluate("""Array.from(document.querySelectorAll('#stage img'))
        .filter(i => i.complete && i.naturalWidth > 0 && i.src.includes('/frames/')).length""")
    assert shown >= 1
    # the frame changes
    first = viewer(page, "frameId")
    wait_js(page, f"dreamdViewer.frameId !== {first}", 60)

    # the overlay shows the status
    wait_js(page, "document.getElementById('f-backend').textContent.includes('procedural')")
    assert page.locator("#overlay").is_visible()
    assert page.text_content("#f-state") in ("playing", "buffering", "underrun")
    assert page.text_content("#f-theme") in ("ethereal", "cathedral", "signal")
    assert page.text_content("#f-keyframe").isdigit()
    assert page.text_content("#f-paused") == "no"
    assert page.text_content("#f-buffer").endswith(("s of 3 s", "(buffering)"))

    # pause: a control row, the status says so, and playback holds
    page.click("#c-pause")
    db = daemon.db()
    try:
        def pause_rows():
            with db.connect() as conn:
                return conn.execute(text("SELECT args, state FROM controls WHERE "
                                         "command = 'pause'")).all()
        rows = wait_for(pause_rows, 30, what="the pause control")
        assert json.loads(rows[0].args) == {"reason": "paused from the web viewer"}
        wait_for(lambda: pause_rows()[0].state == "applied", 30, what="the pause applied")
    finally:
        db.dispose()
    wait_js(page, "document.getElementById('f-paused').textContent"
                  ".startsWith('yes: paused from the web viewer')", 30)
    assert page.text_content("#c-pause") == "resume"
    page.wait_for_timeout(1000)                # a frame already on its way may land
    held = viewer(page, "shown")
    page.wait_for_timeout(3000)
    assert viewer(page, "shown") == held       # 3 s at 10 fps: 30 frames had it played

    page.click("#c-pause")                     # resume: it plays on
    wait_js(page, f"dreamdViewer.shown > {held}", 60)

    # a slider per knob the config schema steps, with the schema's range and step; moving
    # one sends a control the daemon applies, and the page shows the value in effect
    wait_js(page, "document.querySelectorAll('#knobs input[type=range]').length === 3", 30)
    slider = "#knobs input[data-key='generation.denoise']"
    assert [page.get_attribute(slider, a) for a in ("min", "max", "step")] == \
        ["0.05", "1", "0.05"]
    page.evaluate(f"""(() => {{ const i = document.querySelector("{slider}");
        i.value = 0.55; i.dispatchEvent(new Event('change')); }})()""")
    db = daemon.db()
    try:
        def set_rows():
            with db.connect() as conn:
                return conn.execute(text("SELECT args, state FROM controls WHERE "
                                         "command = 'set'")).all()
        wait_for(lambda: [(json.loads(a), st) for a, st in set_rows()] ==
                 [({"key": "generation.denoise", "value": "0.55"}, "applied")], 30,
                 what="the slider's control applied")
    finally:
        db.dispose()
    wait_js(page, f"document.querySelector(\"{slider}\").value === '0.55'", 30)

    # the overlay hides and comes back
    page.click("#hide")
    assert not page.locator("#overlay").is_visible() and page.locator("#show").is_visible()
    page.keyboard.press("h")
    assert page.locator("#overlay").is_visible()

    # kiosk: the dream only, no overlay, no controls, no cursor
    kiosk = page.context.new_page()
    kiosk.goto(url + "?kiosk=1")
    wait_js(kiosk, "window.dreamdViewer && dreamdViewer.shown >= 1", 60)
    assert not kiosk.locator("#overlay").is_visible()
    assert not kiosk.locator("#controls").is_visible()
    assert not kiosk.locator("#show").is_visible()
    assert kiosk.evaluate("getComputedStyle(document.body).cursor") == "none"
    kiosk.keyboard.press("h")
    assert not kiosk.locator("#overlay").is_visible()
    assert page.errors == []

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    # a clean stop: the page says at once that the daemon is not running
    wait_js(page, "document.getElementById('notice').textContent.startsWith('not running')", 30)


def test_the_page_survives_a_daemon_restart(dreamd_env, tmp_path, page):
    port = free_port()
    daemon = DaemonRunner(dreamd_env, tmp_path, FAST_CONFIG.replace("port = 0 ",
                                                                    f"port = {port} "))
    proc, url = start(daemon)
    page.goto(url)
    wait_js(page, "window.dreamdViewer && dreamdViewer.shown >= 2", 90)
    assert page.locator("#notice").is_hidden()

    proc.kill()                                # gone without a word (SIGKILL)
    proc.wait(timeout=30)
    last = viewer(page, "frameId")
    wait_js(page, "document.getElementById('notice').textContent === 'reconnecting…'", 30)
    assert page.locator("#notice").is_visible()
    # away longer than status.json's stale_after_seconds (10 s): "not running"
    wait_js(page, "document.getElementById('notice').textContent.startsWith('not running')", 40)

    proc2, url2 = start(daemon)
    assert url2 == url
    wait_js(page, "document.getElementById('notice').hidden === true", 120)
    wait_js(page, f"dreamdViewer.frameId > {last}", 90)       # new frames, same page
    assert page.errors == []
    proc2.send_signal(signal.SIGTERM)
    assert proc2.wait(timeout=60) == 0
