"""The dream's quality on every surface, from a real ledger of known contents: the read
model's answers (worked out by hand below), `dreamd status --json`, `dreamd stats` (text
and --json), `dreamd stats --plot` (a PNG of the stated size), the dashboard's pipeline
panel and the web viewer's /api/status."""

from __future__ import annotations

import json
import struct
import subprocess
from datetime import timedelta

import pytest
from sqlalchemy import insert

from dreamd import config
from dreamd.ledger import read_model
from dreamd.ledger.models import DaemonRun, Quality, utcnow
from tests.conftest import dreamd_cmd

Q = Quality.__table__
NOW = utcnow()
MIN = timedelta(minutes=1)

# (minutes ago, entity, chain, values): the last hour holds three segments and three
# keyframes; an older segment and keyframe (90 min ago) count only since the run began
ROWS = [
    (90, "segment", 0, dict(motion=9.0, flicker=5.0, pop=None, n_frames=5)),
    (90, "keyframe", 0, dict(change=None, drift=0.0, lab_l=50.0, lab_a=0.0, lab_b=0.0)),
    (30, "segment", 1, dict(motion=1.0, flicker=0.1, pop=0.9, boundary=1.0, n_frames=5)),
    (20, "segment", 2, dict(motion=2.0, flicker=0.2, pop=4.0, boundary=8.0, n_frames=5)),
    (10, "segment", 3, dict(motion=3.0, flicker=0.3, pop=None, n_frames=5)),
    (30, "keyframe", 1, dict(change=5.0, drift=2.0, lab_l=52.0, lab_a=0.0, lab_b=0.0)),
    (20, "keyframe", 2, dict(change=1.0, drift=4.0, lab_l=53.0, lab_a=2.0, lab_b=-2.0)),
    (10, "keyframe", 3, dict(change=0.5, drift=0.0, lab_l=40.0, lab_a=1.0, lab_b=1.0,
                              saturation=0.25, brightness=100.0, contrast=30.0)),
]
LAST_HOUR = {"segments": 3, "motion_avg": 2.0, "motion_max": 3.0, "flicker_avg": 0.2,
             "flicker_max": 0.3, "pops": 1, "pop_max": 4.0, "keyframes": 3,
             "drift_avg": 2.0, "drift_max": 4.0, "change_avg": 2.167, "stagnant": 2}
SINCE_START = {"segments": 4, "motion_avg": 3.75, "motion_max": 9.0, "flicker_avg": 1.4,
               "flicker_max": 5.0, "pops": 1, "pop_max": 4.0, "keyframes": 4,
               "drift_avg": 1.5, "drift_max": 4.0, "change_avg": 2.167, "stagnant": 2}


@pytest.fixture
def ledger(db_path, engine):
    """Keyframe rows are not needed by the quality rows (their ids may be NULL): the
    reference of keyframe 3 is keyframe row 3's own quality row, the others the first."""
    with engine.begin() as conn:
        conn.execute(insert(DaemonRun.__table__).values(
            pid=1, host="elsewhere", version="t", started_at=NOW - 100 * MIN,
            heartbeat_at=NOW - 100 * MIN, stopped_at=NOW - MIN, exit_reason="stopped"))
        for ago, entity, chain, values in ROWS:
            conn.execute(insert(Q).values(entity=entity, chain_index=chain,
                                          created_at=NOW - ago * MIN, measure_ms=1.0,
                                          **values))
    return db_path


def breaks_table(conn) -> bool:
    return read_model._has(conn, "breaks")


def test_the_read_model_answers_from_known_contents(ledger):
    conn = read_model.connect(ledger)
    try:
        q = read_model.quality(conn, NOW, start=NOW - 100 * MIN)
        extra = {"breaks": 0} if breaks_table(conn) else {}
    finally:
        conn.close()
    assert q["last_hour"] == {**LAST_HOUR, **extra}
    assert q["since_start"] == {**SINCE_START, **extra}
    assert q["segment"]["chain_index"] == 3 and q["segment"]["motion"] == 3.0
    k = q["keyframe"]
    assert (k["chain_index"], k["lab_l"], k["change"], k["contrast"]) == (3, 40.0, 0.5, 30.0)
    assert k["reference"] is None            # no reference row named: said as unknown
    assert q["stagnant_streak"] == 2         # keyframes 3 and 2; 1 changed by 5
    assert q["thresholds"] == {"pop_ratio": read_model.POP_RATIO,
                               "stagnant_change": read_model.STAGNANT_CHANGE}


def test_a_ledger_without_measurements_says_nothing_was_measured(db_path):
    conn = read_model.connect(db_path)
    try:
        q = read_model.quality(conn)
    finally:
        conn.close()
    assert q["last_hour"]["segments"] == 0 and q["last_hour"]["motion_avg"] is None
    assert (q["keyframe"], q["segment"], q["stagnant_streak"]) == (None, None, 0)
    from dreamd.quality.report import lines, summary
    assert summary(q) is None
    assert "segments 0: motion n/a" in "\n".join(lines(q))


def test_status_json_carries_the_last_hour(ledger, dreamd_env):
    out = subprocess.run(dreamd_cmd("status", "--json"), env=dreamd_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    q = json.loads(out.stdout)["quality"]
    assert {k: q["last_hour"][k] for k in LAST_HOUR} == LAST_HOUR


def test_stats_says_the_numbers_and_draws_them(ledger, dreamd_env, tmp_path):
    out = subprocess.run(dreamd_cmd("stats", "--json"), env=dreamd_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    q = json.loads(out.stdout)["quality"]
    assert {k: q["last_hour"][k] for k in LAST_HOUR} == LAST_HOUR
    assert {k: q["since_start"][k] for k in SINCE_START} == SINCE_START

    png = tmp_path / "plots" / "health.png"
    out = subprocess.run(dreamd_cmd("stats", "--plot", str(png)), env=dreamd_env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "quality, the last hour:" in text
    assert ("segments 3: motion 2.00 (max 3.00), flicker 0.20 (max 0.30) levels a frame; "
            "pops 1 (boundary >= 3x the typical step; worst 4.00x)") in text
    assert "keyframes 3: change 2.17 delta E, stagnant 2 (change < 2.3)" in text
    assert "colour drift from the reference 2.00 (max 4.00)" in text
    assert "segments 4: motion 3.75 (max 9.00)" in text          # since the run began
    assert "newest keyframe 3: L 40.0 a 1.0 b 1.0 (drift 0.00)" in text
    assert "the newest 2 keyframes in a row barely changed" in text
    assert f"wrote {png}" in text
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1100, 1400)


def test_the_plot_of_an_empty_ledger_is_drawn_too(db_path, dreamd_env, tmp_path):
    png = tmp_path / "empty.png"
    out = subprocess.run(dreamd_cmd("stats", "--json", "--plot", str(png)), env=dreamd_env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    json.loads(out.stdout)                                     # the JSON stays JSON
    assert f"wrote {png}" in out.stderr
    assert struct.unpack(">II", png.read_bytes()[16:24]) == (1100, 1400)


def test_the_dashboard_shows_the_last_hour(ledger):
    from rich.console import Console

    from dreamd.tui import gpu, panels
    from dreamd.tui.reading import Reader

    cfg = config.load(None, ledger.parent)
    reader = Reader(cfg, now=lambda: NOW, gpu_reader=lambda: gpu.Reading((), "none"))
    try:
        snap = reader.read()
    finally:
        reader.close()
    assert snap.problem is None
    assert {k: snap.quality["last_hour"][k] for k in LAST_HOUR} == LAST_HOUR
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(panels.pipeline(snap))
    row = [line for line in console.export_text().splitlines() if line.startswith("quality")]
    assert [" ".join(r.split()) for r in row] == [
        "quality motion 2.0, flicker 0.20, pops 1/3, drift 2.0 (max 4.0), change 2.2, "
        "stagnant 2 (2 in a row now) (last hour)"]


def test_the_viewer_status_carries_a_quality_object(ledger):
    import http.client

    from dreamd.web import server as web

    (ledger.parent / "output").mkdir()
    (ledger.parent / "output" / "status.json").write_text(json.dumps({
        "status": "playing", "keyframe_index": 3, "last_update": NOW.isoformat() + "+00:00"}))
    cfg = config.parse("[web]\nport = 0\n")
    cfg.system.data_dir = str(ledger.parent)
    viewer = web.start(cfg)
    assert viewer is not None
    try:
        host, port = viewer.url.split("//")[1].rstrip("/").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/api/status")
        body = json.loads(conn.getresponse().read())["status"]
        conn.close()
    finally:
        viewer.stop()
    assert {k: body["quality"]["last_hour"][k] for k in LAST_HOUR} == LAST_HOUR
    assert body["quality"]["keyframe"]["chain_index"] == 3
