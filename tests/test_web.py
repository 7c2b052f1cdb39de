"""The web viewer over HTTP: a real uvicorn on 127.0.0.1 serving a real ledger file and
real images; every endpoint, the token rule, the controls and path traversal."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from dreamd import config
from dreamd.errors import ConfigError
from dreamd.ledger.models import Control, Keyframe, utcnow
from dreamd.web import server as web
from tests.conftest import REPO, wait_for

KF, CT = Keyframe.__table__, Control.__table__


def png(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (16, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def add_keyframe(engine, data_dir: Path, k: int, path: str, data: bytes | None) -> str:
    """A completed keyframe row naming `path` (relative to the data dir, as the daemon
    writes it); `data` written there unless None. Returns the sha256 the row records."""
    sha = hashlib.sha256(data if data is not None else b"%d" % k).hexdigest()
    if data is not None:
        target = data_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    with engine.begin() as conn:
        conn.execute(insert(KF).values(
            chain_index=k, state="completed", backend="procedural", theme=f"theme{k}",
            prompt="p", seed=k, denoise=0.3, source="seed", path=path, sha256=sha,
            width=16, height=8, attempt=1, max_attempts=3, created_at=utcnow(),
            completed_at=utcnow()))
    return sha


STATUS = {"status": "playing", "keyframe_index": 1, "backend": "procedural", "fps": 4.0,
          "paused": False, "pause_reason": None, "buffer_seconds": 3.0,
          "buffer_target_seconds": 30.0, "daemon_status": "running",
          "last_update": "2026-12-01T00:00:00.000+00:00", "stale_after_seconds": 10.0}


def make_cfg(data_dir: Path, text: str = "") -> config.Config:
    cfg = config.parse("[web]\n" + ("" if "port" in text else "port = 0\n") + text)
    cfg.system.data_dir = str(data_dir)
    return cfg


@pytest.fixture
def site(db_path, engine):
    """A ledger with two keyframes (their images on disk), a status.json, and a viewer."""
    data_dir = db_path.parent
    shas = [add_keyframe(engine, data_dir, k, f"keyframes/k{k}.png", png((40 * k, 80, 120)))
            for k in range(2)]
    (data_dir / "output").mkdir()
    (data_dir / "output" / "status.json").write_text(json.dumps(STATUS))
    viewer = web.start(make_cfg(data_dir))
    assert viewer is not None
    yield viewer, data_dir, shas
    viewer.stop()


def get(viewer, path: str, headers: dict[str, str] | None = None, method: str = "GET",
        body: bytes | None = None) -> http.client.HTTPResponse:
    """A request with the path sent exactly as written (no client normalising `..`)."""
    host, port = viewer.url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    resp.body = resp.read()
    conn.close()
    return resp


def post(viewer, body, headers: dict[str, str] | None = None):
    return get(viewer, "/api/control", method="POST", body=json.dumps(body).encode(),
               headers={"Content-Type": "application/json", **(headers or {})})


class Events:
    """The page's event stream, read on a thread: (event, data) pairs as they come."""

    def __init__(self, viewer) -> None:
        host, port = viewer.url.split("//")[1].rstrip("/").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.conn.request("GET", "/api/events")
        self.resp = self.conn.getresponse()
        self.events: list[tuple[str, dict]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        kind = None
        try:
            for raw in self.resp:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind:
                    self.events.append((kind, json.loads(line[6:])))
        except (OSError, ValueError, AttributeError):     # closed by the test
            pass

    def of(self, kind: str) -> list[dict]:
        return [d for k, d in self.events if k == kind]

    def close(self) -> None:
        self.conn.close()


# ---------------------------------------------------------------- the page and its assets

def test_the_page_and_its_assets(site):
    viewer, _, _ = site
    page = get(viewer, "/")
    assert page.status == 200 and page.getheader("content-type").startswith("text/html")
    assert b"/assets/viewer.js" in page.body and b"/assets/viewer.css" in page.body
    assert page.getheader("cache-control") == "no-cache"
    assert page.getheader("x-content-type-options") == "nosniff"
    assert "default-src 'self'" in page.getheader("content-security-policy")
    for name, kind in (("viewer.js", "text/javascript"), ("viewer.css", "text/css")):
        asset = get(viewer, f"/assets/{name}")
        assert asset.status == 200 and asset.getheader("content-type").startswith(kind)
        again = get(viewer, f"/assets/{name}", {"If-None-Match": asset.getheader("etag")})
        assert again.status == 304
    assert get(viewer, "/assets/index.html").status == 404
    assert get(viewer, "/assets/app.py").status == 404
    assert get(viewer, "/favicon.ico").status == 204     # no icon, and no 404 in the console


def test_status_carries_the_overlay_facts(site):
    viewer, _, _ = site
    resp = get(viewer, "/api/status")
    assert resp.status == 200 and resp.getheader("cache-control") == "no-store"
    body = json.loads(resp.body)
    status = body["status"]
    assert status["status"] == "playing" and status["backend"] == "procedural"
    assert status["theme"] == "theme1"              # the keyframe on screen, from the ledger
    assert status["knobs"] == {"generation.denoise": 0.3, "display.fps": 4.0,
                               "generation.interpolation_frames": 10}
    # the page's sliders: the range and step of each knob, from the config schema
    assert status["knob_ranges"]["generation.denoise"] == {"min": 0.05, "max": 1.0,
                                                           "step": 0.05, "label": "denoise"}
    assert set(status["knob_ranges"]) == set(status["knobs"])
    assert status["web"] == {"controls": True, "exposed": False}
    assert status["age_seconds"] > 0 and body["frame"] is None


@pytest.mark.parametrize("fit", [None, "cover", "contain", "stretch"])
def test_the_page_carries_the_configured_fit_mode(db_path, fit):
    viewer = web.start(make_cfg(db_path.parent, f'fit = "{fit}"\n' if fit else ""))
    try:
        page = get(viewer, "/")
        assert f'<body data-fit="{fit or "cover"}">'.encode() in page.body
        # the ETag is the served page's: a changed fit is not answered 304 from the old one
        again = get(viewer, "/", {"If-None-Match": page.getheader("etag")})
        assert again.status == 304
    finally:
        viewer.stop()


def test_a_fit_mode_that_does_not_exist_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"web.fit.*'zoom'.*cover.*contain.*stretch"):
        config.parse('[web]\nfit = "zoom"\n')


def test_a_viewer_started_after_a_frame_was_shown_offers_that_frame(db_path, engine):
    """A daemon restarted while paused shows no new frame: a page opened then still gets
    the frame on screen (current_frame.png), never black."""
    from sqlalchemy import update

    from dreamd.ledger import queries
    from dreamd.ledger.models import RuntimeState

    data_dir = db_path.parent
    (data_dir / "output").mkdir()
    data = png((200, 30, 90))
    (data_dir / "output" / "current_frame.png").write_bytes(data)
    with engine.begin() as conn:
        queries.runtime(conn)
        conn.execute(update(RuntimeState.__table__).values(
            playhead_frame_id=41, playhead_chain_index=3, playhead_t=0.5, paused=1))
    viewer = web.start(make_cfg(data_dir))
    try:
        frame = json.loads(get(viewer, "/api/status").body)["frame"]
        assert frame["id"] == 41 and frame["chain"] == 3 and frame["t"] == 0.5
        assert frame["url"] == f"/frames/{hashlib.sha256(data).hexdigest()}.png"
        assert get(viewer, frame["url"]).body == data
        events = Events(viewer)
        try:
            wait_for(lambda: events.of("frame"), 30, what="the frame for a new page")
            assert events.of("frame")[0]["id"] == 41
        finally:
            events.close()
    finally:
        viewer.stop()


# ---------------------------------------------------------------- frames

def test_a_frame_is_announced_and_served_by_its_content_address(site, tmp_path):
    viewer, data_dir, _ = site
    events = Events(viewer)
    try:
        wait_for(lambda: events.of("status"), 30, what="the first status event")
        frames = []
        for i in range(3):
            data = png((10 * i, 200, 30))
            path = data_dir / "frames" / f"f{i}.png"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            viewer.announce(100 + i, 7, i / 3, path, 1_700_000_000.0 + i)
            frames.append(data)
            wait_for(lambda: len(events.of("frame")) > i, 30, what=f"frame event {i}")
        announced = events.of("frame")
        assert [e["id"] for e in announced] == [100, 101, 102]
        assert announced[0]["swapped_at"] == 1_700_000_000_000.0 and announced[0]["chain"] == 7
        for event, data in zip(announced, frames):
            assert event["url"] == f"/frames/{hashlib.sha256(data).hexdigest()}.png"
            resp = get(viewer, event["url"])
            assert resp.status == 200 and resp.body == data
            assert resp.getheader("content-type") == "image/png"
            assert "immutable" in resp.getheader("cache-control")
        current = json.loads(get(viewer, "/api/status").body)["frame"]
        assert current["id"] == 102
    finally:
        events.close()
    # a new page hears the current frame at once
    late = Events(viewer)
    try:
        wait_for(lambda: late.of("frame"), 30, what="the current frame for a new page")
        assert late.of("frame")[0]["id"] == 102
    finally:
        late.close()
    assert get(viewer, "/frames/" + "0" * 64 + ".png").status == 404
    assert get(viewer, "/frames/not-a-sha.png").status == 404


def test_only_the_last_frames_stay_in_memory(site):
    from dreamd.web.hub import KEEP_FRAMES

    viewer, data_dir, _ = site
    n = KEEP_FRAMES + 4
    events = Events(viewer)
    try:
        for i in range(n):
            path = data_dir / f"f{i}.png"
            path.write_bytes(png((i, i, i)))
            viewer.announce(i, 0, 0.0, path, 0.0)
        # a page that is behind loses the oldest events, never the newest
        wait_for(lambda: events.of("frame") and events.of("frame")[-1]["id"] == n - 1, 30,
                 what="the newest frame")
    finally:
        events.close()
    assert len(viewer.hub.frames) == KEEP_FRAMES
    first = hashlib.sha256((data_dir / "f0.png").read_bytes()).hexdigest()
    assert get(viewer, f"/frames/{first}.png").status == 404
    assert get(viewer, events.of("frame")[-1]["url"]).status == 200


def test_the_status_watch_sleeps_while_no_page_listens_and_wakes_for_one(site):
    """While no page listens the viewer's status watch waits for one (no look at
    status.json, no wake-up of the viewer's loop); a page that comes hears a status
    change as before, and the watch sleeps again when the last page leaves."""
    viewer, data_dir, _ = site
    hub = viewer.hub
    assert hub.listened is not None and not hub.listened.is_set()
    for _ in range(2):                        # the second time: after the last page left
        events = Events(viewer)
        try:
            wait_for(lambda: events.of("status"), 30, what="the first status event")
            assert hub.listened.is_set()
            changed = {**STATUS, "status": "paused", "paused": True}
            (data_dir / "output" / "status.json").write_text(json.dumps(changed))
            wait_for(lambda: any(e["status"] == "paused" for e in events.of("status")), 30,
                     what="the change, told by the watch")
        finally:
            events.close()
            (data_dir / "output" / "status.json").write_text(json.dumps(STATUS))
        wait_for(lambda: not hub.subscribers, 30, what="the page gone")
        assert not hub.listened.is_set()


def test_stopping_says_bye_to_every_page(db_path):
    viewer = web.start(make_cfg(db_path.parent))
    events = Events(viewer)
    wait_for(lambda: events.of("status"), 30, what="the first status event")
    viewer.stop()
    wait_for(lambda: events.of("bye"), 30, what="bye")
    events.thread.join(30)
    assert not events.thread.is_alive()     # the stream ended: nothing holds the stop
    assert not (db_path.parent / web.WEB_FILE).exists()


# ---------------------------------------------------------------- keyframes and traversal

def test_history_serves_the_keyframes_it_lists(site):
    viewer, data_dir, shas = site
    resp = get(viewer, "/api/history")
    listed = json.loads(resp.body)["keyframes"]
    assert [k["keyframe"] for k in listed] == [1, 0]
    assert [k["url"] for k in listed] == [f"/keyframes/{shas[1]}.png", f"/keyframes/{shas[0]}.png"]
    image = get(viewer, listed[0]["url"])
    assert image.status == 200 and image.body == (data_dir / "keyframes/k1.png").read_bytes()
    assert "immutable" in image.getheader("cache-control")


def test_keyframes_outside_the_keyframes_folder_or_behind_symlinks_are_404(site, engine,
                                                                          tmp_path):
    viewer, data_dir, _ = site
    secret = b"not for the page"
    outside = tmp_path / "secret.png"
    outside.write_bytes(secret)
    (data_dir / "keyframes" / "link.png").symlink_to(outside)
    (data_dir / "linked").symlink_to(tmp_path)                 # a symlinked folder
    (data_dir / "keyframes" / "sub").mkdir()
    (data_dir / "keyframes" / "sub" / "via").symlink_to(tmp_path, target_is_directory=True)
    (data_dir / "dreamd-copy.png").write_bytes(secret)        # in the data dir, not keyframes/
    rows = [("keyframes/link.png", None), ("../secret.png", None), (str(outside), None),
            ("linked/secret.png", None), ("keyframes/sub/via/secret.png", None),
            ("keyframes/../dreamd-copy.png", None), ("dreamd-copy.png", None)]
    for i, (path, _) in enumerate(rows):
        with engine.begin() as conn:
            sha = hashlib.sha256(secret).hexdigest()
            conn.execute(insert(KF).values(
                chain_index=50 + i, state="completed", backend="procedural", theme="x",
                prompt="p", seed=0, denoise=0.3, source="seed", path=path, sha256=sha,
                width=16, height=8, attempt=1, max_attempts=3, created_at=utcnow()))
        resp = get(viewer, f"/keyframes/{sha}.png")
        assert resp.status == 404, path
        with engine.begin() as conn:
            conn.execute(KF.delete().where(KF.c.chain_index == 50 + i))


def test_a_keyframe_file_that_changed_is_not_served_under_the_old_hash(site):
    viewer, data_dir, shas = site
    (data_dir / "keyframes/k0.png").write_bytes(png((1, 2, 3)))
    assert get(viewer, f"/keyframes/{shas[0]}.png").status == 404


TRAVERSALS = [
    "/../dreamd.db", "/assets/../dreamd.db", "/assets/..%2f..%2fdreamd.db",
    "/assets/%2e%2e/%2e%2e/dreamd.db", "/assets/..%5cdreamd.db", "/frames/../dreamd.db",
    "/frames/..%2Fdreamd.db", "/frames/%2e%2e%2fdreamd.db.png", "/keyframes/..%2fk0.png",
    "/keyframes/%2Fetc%2Fpasswd", "//etc/passwd", "/assets//etc/passwd",
    "/assets/%2Fetc%2Fpasswd", "/keyframes/k0.png", "/keyframes/../keyframes/k0.png",
    "/assets/viewer.js/../../dreamd.db", "/static/viewer.js", "/dreamd/web/app.py",
    "/output/status.json", "/web-token", "/assets/%00viewer.js",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_traversal_attempts_get_404(site, path):
    viewer, data_dir, _ = site
    (data_dir / web.TOKEN_FILE).write_text("sekrit\n")
    resp = get(viewer, path)
    assert resp.status == 404, (path, resp.status)
    assert b"sekrit" not in resp.body and b"SQLite" not in resp.body


def test_read_only_endpoints_never_write(site, db_path):
    viewer, _, shas = site

    def snapshot():
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in db_path.parent.iterdir() if p.is_file() and not p.name.endswith("-shm")}
        files.update({f"{p.parent.name}/{p.name}": p.stat().st_mtime_ns
                      for d in ("keyframes", "output") for p in (db_path.parent / d).iterdir()})
        return files

    before = snapshot()
    for path in ["/", "/assets/viewer.js", "/assets/viewer.css", "/api/status", "/api/history",
                 f"/keyframes/{shas[0]}.png", "/frames/" + "a" * 64 + ".png", *TRAVERSALS]:
        get(viewer, path)
    events = Events(viewer)
    wait_for(lambda: events.of("status"), 30, what="a status event")
    events.close()
    assert snapshot() == before


# ---------------------------------------------------------------- controls

def controls(engine) -> list:
    with engine.connect() as conn:
        return conn.execute(select(CT.c.command, CT.c.args, CT.c.state).order_by(CT.c.id)).all()


def test_controls_become_control_rows(site, engine):
    viewer, _, _ = site
    sent = [{"command": "pause"}, {"command": "resume"}, {"command": "theme", "name": "next"},
            {"command": "set", "key": "generation.denoise", "value": 0.45},
            {"command": "set", "key": "display.fps", "value": 12},
            {"command": "set", "key": "generation.interpolation_frames", "value": "6"}]
    for body in sent:
        resp = post(viewer, body)
        assert resp.status == 200, resp.body
        assert isinstance(json.loads(resp.body)["control"], int)
    rows = controls(engine)
    assert [(r.command, json.loads(r.args), r.state) for r in rows] == [
        ("pause", {"reason": "paused from the web viewer"}, "available"),
        ("resume", {}, "available"), ("theme", {"name": "next"}, "available"),
        ("set", {"key": "generation.denoise", "value": "0.45"}, "available"),
        ("set", {"key": "display.fps", "value": "12"}, "available"),
        ("set", {"key": "generation.interpolation_frames", "value": "6"}, "available")]


@pytest.mark.parametrize("body,status,words", [
    ({"command": "set", "key": "generation.denoise", "value": 7}, 400, "generation.denoise"),
    ({"command": "set", "key": "display.fps", "value": "fast"}, 400, "display.fps"),
    ({"command": "set", "key": "storage.budget_gb", "value": 1}, 400, "dreamd set"),
    ({"command": "free"}, 400, "unknown command"),
    ({"command": "theme", "name": "nope"}, 400, "no theme named"),
    (["pause"], 400, "JSON object"),
])
def test_bad_controls_are_refused_with_a_reason_and_write_nothing(site, engine, body, status,
                                                                 words):
    viewer, _, _ = site
    resp = post(viewer, body)
    assert resp.status == status
    assert words in json.loads(resp.body)["error"]
    assert controls(engine) == []


def test_cross_site_and_non_json_posts_are_refused(site, engine):
    viewer, _, _ = site
    evil = post(viewer, {"command": "pause"}, {"Origin": "http://evil.example"})
    assert evil.status == 403
    form = get(viewer, "/api/control", method="POST", body=b"command=pause",
               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status == 415
    rebound = get(viewer, "/api/status", {"Host": "evil.example"})
    assert rebound.status == 400                # a DNS name rebound to 127.0.0.1
    assert get(viewer, "/api/control").status == 405
    assert controls(engine) == []
    same = post(viewer, {"command": "pause"}, {"Origin": viewer.url.rstrip("/")})
    assert same.status == 200


def test_controls_off_refuses_them(db_path, engine):
    viewer = web.start(make_cfg(db_path.parent, "controls = false\n"))
    try:
        assert post(viewer, {"command": "pause"}).status == 403
        assert json.loads(get(viewer, "/api/status").body)["status"]["web"]["controls"] is False
    finally:
        viewer.stop()
    assert controls(engine) == []


# ---------------------------------------------------------------- exposed: the token rule

def test_an_exposed_viewer_needs_the_token_for_every_control(db_path, engine, capfd):
    # 127.0.0.2 is loopback to the machine but not to the config: it needs web.expose,
    # like 0.0.0.0, without serving anything to the network during the test
    cfg = make_cfg(db_path.parent, 'host = "127.0.0.2"\nexpose = true\n')
    viewer = web.start(cfg)
    try:
        token_file = db_path.parent / web.TOKEN_FILE
        token = token_file.read_text().strip()
        assert len(token) >= 24 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert token in capfd.readouterr().err          # printed once, at creation
        assert viewer.url.startswith("http://127.0.0.2:")
        assert post(viewer, {"command": "pause"}).status == 401
        assert post(viewer, {"command": "pause"}, {"X-Dreamd-Token": "wrong"}).status == 401
        assert controls(engine) == []
        ok = post(viewer, {"command": "pause"}, {"X-Dreamd-Token": token})
        assert ok.status == 200
        for body in ({"command": "resume"}, {"command": "theme"},
                     {"command": "set", "key": "display.fps", "value": 5}):
            assert post(viewer, body).status == 401
        assert [r.command for r in controls(engine)] == ["pause"]
        # read-only endpoints need no token; the page learns it is exposed
        status = json.loads(get(viewer, "/api/status").body)["status"]
        assert status["web"]["exposed"] is True
        assert get(viewer, "/").status == 200
    finally:
        viewer.stop()
    again = web.start(cfg)                              # the same token, not printed again
    try:
        assert token_file.read_text().strip() == token
        assert token not in capfd.readouterr().err
    finally:
        again.stop()


def test_binding_beyond_loopback_needs_an_explicit_setting():
    with pytest.raises(ConfigError, match=r"web.host = '0.0.0.0' is invalid.*web.expose = true"):
        config.parse('[web]\nhost = "0.0.0.0"\n')
    config.parse('[web]\nhost = "0.0.0.0"\nexpose = true\n')
    with pytest.raises(ConfigError, match=r"web.port = 70000 is invalid: expected a value "
                                          r"between 0 and 65535"):
        config.parse("[web]\nport = 70000\n")


# ---------------------------------------------------------------- starting

def test_a_port_in_use_is_one_warning_and_no_viewer(db_path, caplog):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        with caplog.at_level(logging.WARNING, logger="dreamd.web"):
            viewer = web.start(make_cfg(db_path.parent, f"port = {port}\n"))
        assert viewer is None
        [record] = [r for r in caplog.records if r.name == "dreamd.web"]
        assert f"port {port} is in use" in record.getMessage()
        assert "web.port" in record.getMessage() and "the dream goes on" in record.getMessage()
    finally:
        holder.close()


def test_disabled_means_no_server(db_path):
    assert web.start(make_cfg(db_path.parent, "enabled = false\n")) is None
    assert not (db_path.parent / web.WEB_FILE).exists()


def test_the_viewer_does_not_import_torch():
    probe = ("import sys, dreamd.web.server, dreamd.web.app, dreamd.web.controls, "
             "dreamd.web.hub, uvicorn, sse_starlette; "
             "print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"


def test_the_assets_ship_with_the_package():
    from importlib import resources

    text = (REPO / "pyproject.toml").read_text()
    assert '"dreamd.web.static"' in text and \
        '"dreamd.web.static" = ["*.html", "*.js", "*.css"]' in text
    folder = resources.files("dreamd.web") / "static"
    assert {p.name for p in folder.iterdir()} >= {"index.html", "viewer.js", "viewer.css"}
