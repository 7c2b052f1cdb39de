"""Every surface reads the dream through one read model (dreamd/ledger/read_model.py), so
the same question gets the same answer everywhere: one ledger prepared in several
states (a daemon running here, one running on another host, stopped, gone stale, paused
by the game guard, by the guard's presence rules for two reasons, a ledger another
process holds locked), and `dreamd status --json` (a real subprocess), the dashboard's
reading, the web viewer's `/api/status` (a real server on 127.0.0.1), status.json
(written by the display writer, as the daemon writes it) and the Rainmeter skin (its
WebParser expression applied to that status.json) asked the same questions."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import insert, text

from dreamd import config
from dreamd.ledger.models import DaemonRun, Frame, Keyframe, RuntimeState, utcnow
from tests.conftest import WriteLock, close_worker_context, dreamd_cmd, open_worker_context
from tests.test_rainmeter import child_value, pcre_to_python, webparser
from tests.test_rainmeter import skin as rainmeter_skin

CONFIG = """
[web]
port = 0
[display]
fps = 4.0
buffer_target_seconds = 20.0
[generation]
denoise = 0.3
interpolation_frames = 6
"""
KNOBS = ("generation.denoise", "display.fps", "generation.interpolation_frames")


@dataclass
class State:
    name: str
    host: str                       # the daemon's host as its run row says
    beat_age: float                 # seconds since its heartbeat
    stopped: bool = False
    paused_by: str | None = None    # None | user | guard
    knobs: dict[str, Any] | None = None
    locked: bool = False            # another process holds the write lock while we ask
    reason: str | None = None       # the pause's reason, when not the default one


STATES = [
    State("running here", socket.gethostname(), 1.0, knobs={"display.fps": 5.0}),
    State("running on another host", "another-host", 2.0),
    State("stopped", socket.gethostname(), 40.0, stopped=True,
          knobs={"generation.denoise": 0.45}),
    State("stale", socket.gethostname(), 90.0),
    State("paused by the guard", socket.gethostname(), 1.0, paused_by="guard",
          knobs={"generation.interpolation_frames": 12}),
    State("paused by the guard for presence", socket.gethostname(), 1.0, paused_by="guard",
          reason="a full-screen window: vlc.exe; on battery"),
    State("paused by the user, ledger busy", socket.gethostname(), 1.0, paused_by="user",
          locked=True),
]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def prepare(engine, state: State) -> None:
    """The ledger as a daemon in `state` left it: a chain of keyframes, ready frames ahead
    of the playhead, a keyframe being made, the run row, the pause and stored knobs."""
    now = utcnow()
    with engine.begin() as conn:
        kf = Keyframe.__table__
        for c in range(3):
            conn.execute(insert(kf).values(
                chain_index=c, backend="procedural", theme="ethereal", prompt="p", seed=c,
                denoise=0.3, source="img2img", width=64, height=64, state="completed",
                path=f"keyframes/k{c}.png", completed_at=now))
        conn.execute(insert(kf).values(
            chain_index=3, backend="procedural", theme="signal", prompt="p", seed=3,
            denoise=0.3, source="img2img", width=64, height=64, state="executing",
            attempt=1, started_at=now))
        for c in range(3):
            for i in range(4):
                conn.execute(insert(Frame.__table__).values(
                    chain_index=c, t=i / 4, kind="keyframe" if i == 0 else "inbetween",
                    path=f"frames/{c}-{i}.png", state="shown" if (c, i) < (0, 2) else "ready",
                    created_at=now))
        conn.execute(insert(DaemonRun.__table__).values(
            pid=os.getpid() if state.host == socket.gethostname() else dead_pid(),
            host=state.host, version="0.1.0", backend="procedural",
            started_at=now - timedelta(minutes=10),
            heartbeat_at=now - timedelta(seconds=state.beat_age),
            stopped_at=now - timedelta(seconds=state.beat_age) if state.stopped else None,
            exit_reason="signal SIGTERM" if state.stopped else None))
        conn.execute(insert(RuntimeState.__table__).values(
            id=1, playhead_chain_index=0, playhead_t=0.25, frames_shown=2, underruns=0,
            paused=int(state.paused_by is not None),
            pause_reason=state.reason or {"guard": "a game: bg3.exe",
                                          "user": "mine"}.get(state.paused_by),
            knobs=json.dumps(state.knobs or {})))
        if state.paused_by:
            args = {"reason": "x", "source": "guard"} if state.paused_by == "guard" else {}
            conn.execute(text("INSERT INTO controls (command, args, state, created_at) "
                              "VALUES ('pause', :a, 'applied', :t)"),
                         {"a": json.dumps(args), "t": now})


def write_status_json(db_path: Path, state: State) -> None:
    """status.json as the display writer writes it for this state (the daemon's own
    knobs and pause, restored from the ledger the way `dreamd run` restores them)."""
    from dreamd.display.writer import DisplayWriter
    from dreamd.workers import controls

    ctx = open_worker_context(db_path, CONFIG)
    try:
        controls.restore(ctx)
        display = DisplayWriter(ctx)
        with ctx.reader.connect() as conn:
            ahead = display.buffered(conn)
        display.write_status(ctx.knob("display.fps"), ahead,
                             **({"daemon_status": "stopped", "state": "stopped"}
                                if state.stopped else {}))
        display.close()
    finally:
        close_worker_context(ctx)
    if state.beat_age > 30 and not state.stopped:     # a hung or killed daemon's file
        path = db_path.parent / "output" / "status.json"
        data = json.loads(path.read_text())
        old = utcnow() - timedelta(seconds=state.beat_age)
        data["last_update"] = old.isoformat(timespec="milliseconds") + "+00:00"
        path.write_text(json.dumps(data))


def answers(db_path: Path, env: dict[str, str], cfg_file: Path) -> dict[str, dict[str, Any]]:
    """The same questions put to every surface: {surface: {question: answer}}."""
    from dreamd.tui.reading import Reader
    from dreamd.web import server as web

    cli = json.loads(subprocess.run(dreamd_cmd("--config", str(cfg_file), "status", "--json"),
                                    env=env, capture_output=True, text=True, timeout=120,
                                    check=True).stdout)
    raw = (db_path.parent / "output" / "status.json").read_text(encoding="utf-8")
    status_file = json.loads(raw)
    sections = rainmeter_skin()
    match = pcre_to_python(webparser(sections)[0]).search(raw)
    assert match, f"the skin's expression does not match status.json:\n{raw}"

    def skin_says(measure: str) -> str:
        return child_value(match, sections[measure])
    cfg = config.load(cfg_file, data_dir=db_path.parent)
    snap = Reader(cfg).read(with_gpu=False)
    viewer = web.start(cfg, quiet=True)
    assert viewer is not None
    try:
        page = requests.get(viewer.url + "api/status", timeout=30).json()["status"]
    finally:
        viewer.stop()

    def alive_by_file(s: dict[str, Any], age: float) -> bool:
        return s["daemon_status"] == "running" and age <= s["stale_after_seconds"]

    return {
        "dreamd status": {
            "alive": cli["alive"], "paused": cli["paused"], "pause_reason": cli["pause_reason"],
            "paused_by": cli["paused_by"], "buffer_seconds": cli["buffer"]["seconds"],
            "fps": cli["buffer"]["fps"], "buffer_target": cli["buffer"]["target_seconds"],
            "making": cli["in_progress"]["chain_index"],
            **{k: cli["knobs"][k]["value"] for k in KNOBS}},
        "dashboard": {
            "alive": snap.daemon.alive, "paused": snap.paused,
            "pause_reason": snap.pause_reason, "paused_by": snap.found.pause.by,
            "buffer_seconds": snap.buffer_seconds, "fps": snap.fps,
            "buffer_target": snap.buffer_target, "making": snap.in_progress["chain_index"],
            **{k: snap.knobs[k] for k in KNOBS}},
        "web viewer": {
            "alive": alive_by_file(page, page["age_seconds"]), "paused": page["paused"],
            "pause_reason": page["pause_reason"], "paused_by": page["paused_by"],
            "buffer_seconds": page["buffer_seconds"], "fps": page["fps"],
            "buffer_target": page["buffer_target_seconds"],
            "generation.denoise": page["knobs"]["generation.denoise"],
            "display.fps": page["knobs"]["display.fps"],
            "generation.interpolation_frames":
                page["knobs"]["generation.interpolation_frames"]},
        "status.json": {
            "paused": status_file["paused"], "pause_reason": status_file["pause_reason"],
            "paused_by": status_file["paused_by"],
            "buffer_seconds": status_file["buffer_seconds"], "fps": status_file["fps"],
            "buffer_target": status_file["buffer_target_seconds"],
            "generation.denoise": status_file["denoise"]},
        "Rainmeter skin": {
            "paused": skin_says("MeasurePaused") == "true",
            "pause_reason": skin_says("MeasurePauseReason") or None,
            "paused_by": skin_says("MeasurePausedBy") or None},
    }


@pytest.mark.parametrize("state", STATES, ids=[s.name for s in STATES])
def test_every_surface_gives_the_same_answers(state, db_path, engine, dreamd_env, tmp_path):
    cfg_file = tmp_path / "dreamd.toml"
    cfg_file.write_text(CONFIG)
    env = {**dreamd_env, "DREAMD_DATA_DIR": str(db_path.parent)}
    prepare(engine, state)
    write_status_json(db_path, state)
    if state.locked:
        with WriteLock(db_path):
            got = answers(db_path, env, cfg_file)
    else:
        got = answers(db_path, env, cfg_file)
    reference = got["dreamd status"]
    for surface, said in got.items():
        for question, answer in said.items():
            assert answer == reference[question], (
                f"{state.name}: {surface} says {question} = {answer!r}, dreamd status says "
                f"{reference[question]!r}")
    # and what they agree on is right
    expect_alive = not state.stopped and state.beat_age < 30
    assert reference["alive"] is expect_alive
    assert reference["paused_by"] == state.paused_by
    if state.reason:
        assert reference["pause_reason"] == state.reason
    fps = (state.knobs or {}).get("display.fps", 4.0)
    assert reference["buffer_seconds"] == round(10 / fps, 2)     # 10 ready after (0, 0.25)
    assert reference["making"] == 3
    for key, value in (state.knobs or {}).items():
        assert reference[key] == value
