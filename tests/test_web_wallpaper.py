"""The viewer as a wallpaper, in Debian's chromium driven by Playwright against a real
`dreamd run`: a hidden page fetches nothing and comes back at the frame on screen now;
each fit mode at 16:9 and 21:9, several pages side by side; a paused dream (and one
restarted paused) shows its last frame, never black. Slow (daemons, a browser).

Headless chromium never hides a page by itself (a minimised window or a background tab
stays "visible" there), so hiding is what a wallpaper app's or a browser's hiding looks
like to the page: `document.visibilityState` becomes "hidden" and `visibilitychange`
fires. What the page then does (its stream, its requests) is real and counted here.
"""

from __future__ import annotations

import io
import signal

import numpy as np
import pytest
from PIL import Image

from tests.conftest import DaemonRunner, wait_for
from tests.test_web_browser import browser, start, viewer, wait_js  # noqa: F401 (fixture)
from tests.test_web_daemon import cli, status_json

pytestmark = pytest.mark.slow

HIDE = """(hidden) => {
    Object.defineProperty(document, 'visibilityState',
                          {configurable: true, get: () => hidden ? 'hidden' : 'visible'});
    Object.defineProperty(document, 'hidden', {configurable: true, get: () => hidden});
    document.dispatchEvent(new Event('visibilitychange'));
}"""
SIZES = {"16:9": (1280, 720), "21:9": (1680, 720)}
FITS = ("cover", "contain", "stretch")


def open_page(browser, url: str, size: tuple[int, int]):  # noqa: F811
    # the page's CSP forbids eval, which Playwright's wait_for_function(string) uses
    context = browser.new_context(viewport={"width": size[0], "height": size[1]},
                                  bypass_csp=True)
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.goto(url)
    return pg


def frame_number(daemon: DaemonRunner) -> int:
    return status_json(daemon.data_dir).get("frame_number") or 0


def test_a_hidden_page_fetches_nothing_and_comes_back_at_the_current_frame(
        daemon: DaemonRunner, browser):  # noqa: F811
    proc, url = start(daemon)
    page = open_page(browser, url + "?kiosk=1", SIZES["16:9"])
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    closed: list[str] = []
    page.on("requestfailed", lambda r: closed.append(r.url))   # a stream the page closed
    wait_js(page, "window.dreamdViewer && dreamdViewer.shown >= 2", 90)
    assert viewer(page, "streams") == 1

    page.evaluate(HIDE, True)
    assert viewer(page, "hidden") is True and viewer(page, "connected") is False
    wait_for(lambda: any("/api/events" in u for u in closed), 30,
             what="the event stream closed")
    seen, shown = len(requests), viewer(page, "shown")
    # the dream goes on: 20 frames (2 s at 10 fps) shown by the daemon while hidden
    start_frame = frame_number(daemon)
    wait_for(lambda: frame_number(daemon) >= start_frame + 20, 60,
             what="the daemon showing 20 frames")
    assert requests[seen:] == [], "a hidden page asked for something"
    assert viewer(page, "shown") == shown

    now = frame_number(daemon)
    page.evaluate(HIDE, False)
    # one new stream, whose first frame event is the frame on screen now: the page jumps
    # there instead of replaying what it missed
    wait_js(page, f"dreamdViewer.shown > {shown}", 60)
    assert viewer(page, "streams") == 2
    frames = [u for u in requests[seen:] if "/frames/" in u]
    assert len(frames) >= 1 and [u for u in requests[seen:] if "/api/events" in u]
    first = page.evaluate("dreamdViewer.frameId")
    db = daemon.db()
    try:
        from sqlalchemy import text

        def recorded() -> bool:     # the display records what it showed every 0.5 s
            with db.connect() as conn:
                return conn.execute(text("SELECT shown_at FROM frames WHERE id = :i"),
                                    {"i": first}).scalar() is not None
        wait_for(recorded, 60, what="the frame recorded as shown in the ledger")
        with db.connect() as conn:
            ordinal = conn.execute(text(
                "SELECT count(*) FROM frames WHERE shown_at <= "
                "(SELECT shown_at FROM frames WHERE id = :i)"), {"i": first}).scalar()
    finally:
        db.dispose()
    # the first frame the page showed again was on screen at or after the moment it was
    # shown (frame_number counts the frames shown since the ledger began, as does the
    # ordinal), not one of those it missed
    assert ordinal >= now, (ordinal, now)
    wait_js(page, f"dreamdViewer.frameId !== {first}", 60)    # and it plays on
    assert page.errors == []
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def expected(frame: Image.Image, fit: str, size: tuple[int, int]) -> np.ndarray:
    """What `fit` makes of `frame` in a window of `size` (CSS object-fit)."""
    w, h = size
    if fit == "stretch":
        return np.asarray(frame.resize((w, h), Image.BILINEAR), dtype=np.float32)
    scale = (max if fit == "cover" else min)(w / frame.width, h / frame.height)
    sw, sh = round(frame.width * scale), round(frame.height * scale)
    scaled = frame.resize((sw, sh), Image.BILINEAR)
    canvas = Image.new("RGB", (w, h), (0, 0, 0))
    canvas.paste(scaled, ((w - sw) // 2, (h - sh) // 2))
    return np.asarray(canvas, dtype=np.float32)


def screen(page) -> np.ndarray:
    # the crossfade over: the frame on screen is the one layer left opaque
    wait_js(page, "document.getAnimations().length === 0", 30)
    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"),
                      dtype=np.float32)


def on_screen(page) -> Image.Image:
    """The frame the page shows, fetched from the viewer as the page fetched it."""
    src = page.evaluate("new URL(dreamdViewer.url, location.href).href")
    return Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")


def closest_fit(page, size: tuple[int, int]) -> tuple[str, dict[str, float]]:
    shot, frame = screen(page), on_screen(page)
    errors = {fit: float(np.abs(shot - expected(frame, fit, size)).mean()) for fit in FITS}
    return min(errors, key=errors.get), errors


def test_fit_modes_side_by_side_and_the_last_frame_held_through_a_pause(
        daemon: DaemonRunner, browser):  # noqa: F811
    proc, url = start(daemon, 400)
    pages = {(fit, ratio): open_page(browser, f"{url}?kiosk=1&fit={fit}", size)
             for fit in FITS for ratio, size in SIZES.items()}
    # every page plays at once (one per monitor): each shows new frames while all are open
    for pg in pages.values():
        wait_js(pg, "window.dreamdViewer && dreamdViewer.shown >= 1", 90)
    counts = {key: viewer(pg, "shown") for key, pg in pages.items()}
    for key, pg in pages.items():
        wait_js(pg, f"dreamdViewer.shown >= {counts[key] + 3}", 60)
        assert viewer(pg, "fit") == key[0]

    # paused: the last frame stays on every page (no new one comes to replace it)
    env = daemon.env
    assert cli(env, "--config", str(daemon.config), "pause").returncode == 0
    wait_for(lambda: status_json(daemon.data_dir).get("status") == "paused", 60,
             what="the daemon paused")
    for (fit, ratio), pg in pages.items():
        size = SIZES[ratio]
        # the box is the window; where the picture lies in it is object-fit's doing
        box = pg.evaluate("""Array.from(document.querySelectorAll('#stage img'))
            .map(i => [i.getBoundingClientRect().width, i.getBoundingClientRect().height,
                       getComputedStyle(i).objectFit])""")
        assert {tuple(b) for b in box} == {
            (size[0], size[1], {"stretch": "fill"}.get(fit, fit))}
        best, errors = closest_fit(pg, size)
        assert best == fit, f"{fit} at {ratio}: the screen looks like {best}: {errors}"
        assert errors[fit] < 12, errors       # of 255: scaling filters differ a little
        shot = screen(pg)
        bars = shot[:30].max() if ratio == "16:9" else shot[:, :100].max()
        # contain letterboxes a 2:1 frame at 16:9 (bars above and below) and pillarboxes
        # it at 21:9 (bars left and right); cover and stretch fill the window
        assert (bars == 0) == (fit == "contain"), (fit, ratio, bars)
        assert pg.errors == []

    # a daemon restarted while paused shows no frame at all: a page opened then still
    # gets the one on screen (current_frame.png), not black
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    held = np.asarray(Image.open(daemon.data_dir / "output" / "current_frame.png")
                      .convert("RGB"), dtype=np.float32)
    for pg in pages.values():
        pg.context.close()
    proc, url = start(daemon, 300)
    wait_for(lambda: status_json(daemon.data_dir).get("status") == "paused", 60,
             what="the restarted daemon, paused")
    late = open_page(browser, url + "?kiosk=1", SIZES["16:9"])
    wait_js(late, "window.dreamdViewer && dreamdViewer.shown >= 1", 60)
    best, errors = closest_fit(late, SIZES["16:9"])
    assert best == "cover" and errors["cover"] < 12, errors
    assert np.array_equal(np.asarray(on_screen(late), dtype=np.float32), held)
    assert screen(late).mean() > 10                       # not black
    assert late.errors == []
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
