"""The display's modules in-process, exact enough to judge mutants (issue 16): what
status.json says and how it is written (a full disk included, on a real small tmpfs),
what `dreamd status` prints (report.py and the governor's lines), and the display
writer's playback, records and status writes on a real ledger. tests/test_display.py
has the playback scenarios (order, gaps, restarts, atomic swaps); these pin the rest.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import sqlite3
import time
from datetime import datetime, timedelta, timezone

import pytest
from rich.console import Console

from dreamd.governor import report as gov_report
from dreamd.display import status as status_json
from dreamd.cli.status import print_status
from dreamd.ledger import read_model
from tests.conftest import mount_tmpfs
from tests.test_faults_disk_full import fill


# ================================================================ status.json

def all_keys(**over):
    values = {k: i for i, k in enumerate(status_json.KEYS)}
    values.update(over)
    return values


def test_build_orders_the_keys_as_the_readme_and_refuses_missing_or_unknown_ones():
    values = all_keys(status="playing")
    built = status_json.build(**dict(reversed(list(values.items()))))
    assert list(built) == list(status_json.KEYS)
    assert built == values
    short = dict(values)
    del short["denoise"]
    with pytest.raises(ValueError) as missing:
        status_json.build(**short)
    assert str(missing.value) == "status.json keys: missing ['denoise'], unknown []"
    with pytest.raises(ValueError) as unknown:
        status_json.build(**values, bogus=1)
    assert str(unknown.value) == "status.json keys: missing [], unknown ['bogus']"


@pytest.mark.parametrize("fps, seconds", [(4.0, 10.0), (0.5, 10.0), (0.4, 12.5),
                                          (0.3, 16.7), (0.1, 50.0), (60.0, 10.0)])
def test_stale_after_is_ten_seconds_or_five_frames_whichever_is_longer(fps, seconds):
    assert status_json.stale_after(fps) == seconds


def test_now_iso_is_utc_with_milliseconds():
    text = status_json.now_iso()
    at = datetime.fromisoformat(text)
    assert text.endswith("+00:00") and len(text.split(".")[1]) == len("123+00:00")
    assert abs(at - datetime.now(timezone.utc)) < timedelta(minutes=1)


def test_write_puts_one_key_a_line_and_replaces_the_whole_file(tmp_path):
    path = tmp_path / "status.json"
    status_json.write(path, {"status": "playing", "current_prompt": "a long prompt " * 50})
    status_json.write(path, {"status": "paused", "current_prompt": "ünï"})
    raw = path.read_text(encoding="utf-8")
    assert raw.splitlines() == ["{", '  "status": "paused",',
                                '  "current_prompt": "\\u00fcn\\u00ef"', "}"]
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


@pytest.mark.parametrize("progress", [None, {}, {"keyframe": 3, "step": 2, "steps": 4,
                                                  "node": "6", "node_type": "KSampler"}])
def test_the_encoding_is_json_indented_by_two_byte_for_byte(progress):
    """status.json is encoded key by key with the C encoder (it is written at every
    frame): the bytes must be json.dumps(indent=2)'s, nested values and escapes included."""
    values = {k: None for k in status_json.KEYS}
    values.update(status="playing", frame_number=12, current_prompt='a "dream"\nof é',
                  buffer_seconds=2.5, paused=False, keyframe_progress=progress,
                  generation_time=float("nan"))
    status = status_json.build(**values)
    assert status_json.encode(status) == json.dumps(status, indent=2).encode()


def test_write_raises_an_error_that_is_not_a_full_disk(tmp_path):
    # the temp name next to a 250-character name is too long for the file system, but
    # the file itself can be opened: only a full disk may make it write in place
    path = tmp_path / ("s" * 245 + ".json")
    path.write_text("{}")
    with pytest.raises(OSError) as exc:
        status_json.write(path, {"status": "playing"})
    assert exc.value.errno == errno.ENAMETOOLONG
    assert path.read_text() == "{}"


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs with status.json on it, then filled to the last byte."""
    for disk in mount_tmpfs(tmp_path / "disk", "1m"):
        status_json.write(disk / "status.json", {"status": "playing", "problem": None,
                                                 "pad": "x" * 300})
        fill(disk)
        yield disk


def test_on_a_full_disk_status_json_is_rewritten_in_place(full_disk):
    path = full_disk / "status.json"
    shorter = {"status": "underrun", "problem": "disk full: no space left"}
    status_json.write(path, shorter)
    assert json.loads(path.read_text()) == shorter      # truncated to the new length
    assert sorted(p.name for p in full_disk.iterdir()) == ["ballast", "status.json"]
    # as long as the file's one block, to the byte: it fits, and nothing more is asked
    pad = 4096 - len(json.dumps({"status": ""}, indent=2).encode())
    block = {"status": "b" * pad}
    status_json.write(path, block)
    assert json.loads(path.read_text()) == block and path.stat().st_size == 4096


def test_a_full_disk_quota_is_a_full_disk_too(tmp_path, monkeypatch):
    # quotas do not limit root, who runs these tests: the file system's answer is staged
    path = tmp_path / "status.json"
    status_json.write(path, {"status": "playing", "pad": "x" * 300})

    def over_quota(*args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(status_json, "write_atomic", over_quota)
    status_json.write(path, {"status": "underrun"})
    assert json.loads(path.read_text()) == {"status": "underrun"}     # written in place


def test_on_a_full_disk_a_missing_or_growing_status_json_raises_the_disk_error(full_disk):
    with pytest.raises(OSError) as exc:
        status_json.write(full_disk / "other.json", {"status": "playing"})
    assert exc.value.errno == errno.ENOSPC
    before = (full_disk / "status.json").read_bytes()
    # longer than the blocks the file has: raised, and the old status left whole (a
    # short write once left the first block of the new one, padded with NULs)
    with pytest.raises(OSError) as exc:
        status_json.write(full_disk / "status.json", {"status": "p" * 200_000})
    assert exc.value.errno == errno.ENOSPC
    assert (full_disk / "status.json").read_bytes() == before
    (full_disk / "dir.json").mkdir()
    (full_disk / "ballast").write_bytes(b"")            # room again: not ENOSPC now
    with pytest.raises(IsADirectoryError):
        status_json.write(full_disk / "dir.json", {"status": "playing"})


# ================================================================ the governor's report

def gov_cfg(text: str = ""):
    from dreamd import config
    return config.parse(text)


def decision(conn, n, divisor, stretch, reason="slow_keyframes", at="2026-11-30 12:00:00.123456",
             detail='{"ms": {"1.0": 12}}'):
    conn.execute("INSERT INTO governor_decisions (at, run_id, reason, message, "
                 "interpolation_frames, resolution_divisor, stretch, fps, detail) "
                 "VALUES (?, 1, ?, ?, ?, ?, ?, 4.0, ?)",
                 (at, reason, f"{reason} message", n, divisor, stretch, detail))


@pytest.fixture
def gov_db(db_path, engine):
    from dreamd.ledger import queries
    with engine.begin() as c:
        queries.runtime(c)                  # the runtime row, as the daemon makes it
    conn = sqlite3.connect(db_path)
    yield conn, db_path
    conn.close()


def test_governor_report_without_a_ledger_is_the_users_settings():
    cfg = gov_cfg("[generation]\ninterpolation_frames = 200\nresolution_divisor = 8.0\n"
                  "[governor]\nenabled = false\nmax_interpolation_frames = 120\n"
                  "max_resolution_divisor = 4.0\n")
    assert read_model.governor(None, cfg, alive=True) == {
        "enabled": False, "interpolation_frames": 200, "resolution_divisor": 8.0,
        "stretch": 1.0, "decisions": [],
        "settings": {"interpolation_frames": 200, "resolution_divisor": 8.0,
                     "max_interpolation_frames": 200, "max_resolution_divisor": 8.0}}
    cfg = gov_cfg("[generation]\ninterpolation_frames = 6\nresolution_divisor = 1.0\n")
    g = read_model.governor(None, cfg, alive=False)
    assert g["enabled"] is True
    assert g["settings"] == {"interpolation_frames": 6, "resolution_divisor": 1.0,
                             "max_interpolation_frames": 120, "max_resolution_divisor": 4.0}


def test_governor_report_follows_the_last_decision_only_while_a_daemon_runs(gov_db):
    conn, db_path = gov_db
    decision(conn, 10, 1.5, 1.0, at="2026-11-30 12:00:00")
    decision(conn, 24, 2.0, 0.85, reason="stretch", at="2026-11-30 12:01:00", detail=None)
    conn.commit()
    cfg = gov_cfg("[generation]\ninterpolation_frames = 6\n")
    ro = read_model.connect(db_path)
    try:
        alive = read_model.governor(ro, cfg, alive=True)
        assert (alive["interpolation_frames"], alive["resolution_divisor"], alive["stretch"]) \
            == (24, 2.0, 0.85)
        assert [d["reason"] for d in alive["decisions"]] == ["stretch", "slow_keyframes"]
        assert alive["decisions"][0]["detail"] is None
        assert alive["decisions"][1]["detail"] == {"ms": {"1.0": 12}}
        assert alive["settings"]["interpolation_frames"] == 6
        stopped = read_model.governor(ro, cfg, alive=False)
        assert (stopped["interpolation_frames"], stopped["resolution_divisor"],
                stopped["stretch"]) == (6, 1.0, 1.0)
        assert len(stopped["decisions"]) == 2
    finally:
        ro.close()
    # turned off with `dreamd set governor.enabled false`: the user's N, stored as a knob
    conn.execute("""UPDATE runtime_state SET knobs = '{"governor.enabled": false,
                 "generation.interpolation_frames": 9}'""")
    conn.commit()
    ro = read_model.connect(db_path)
    try:
        off = read_model.governor(ro, cfg, alive=True)
    finally:
        ro.close()
    assert off["enabled"] is False
    assert (off["interpolation_frames"], off["resolution_divisor"], off["stretch"]) == (9, 1.0, 1.0)
    assert off["settings"]["interpolation_frames"] == 9


def test_governor_decisions_newest_first_limited_and_tolerant_of_bad_detail(gov_db):
    conn, db_path = gov_db
    for i in range(7):
        decision(conn, i, 1.0, 1.0, at=f"2026-11-30 12:0{i}:00",
                 detail="not json" if i == 6 else ("" if i == 5 else '{"i": %d}' % i))
    conn.commit()
    ro = read_model.connect(db_path)
    try:
        shown = read_model.decisions(ro)
        assert [d["interpolation_frames"] for d in shown] == [6, 5, 4, 3, 2]
        assert [d["detail"] for d in shown] == ["not json", None, {"i": 4}, {"i": 3}, {"i": 2}]
        assert [d["interpolation_frames"] for d in read_model.decisions(ro, limit=2)] == [6, 5]
    finally:
        ro.close()


def test_governor_report_of_a_ledger_without_its_tables(tmp_path):
    """A ledger from before revision 0006 (no governor_decisions), one without a
    runtime row, or with stored knobs that are not an object: the settings, no error."""
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE other (id INTEGER)")
    raw.commit()
    cfg = gov_cfg("[generation]\ninterpolation_frames = 5\n")
    conn = read_model.connect(path)
    try:
        assert read_model.decisions(conn) == []
        g = read_model.governor(conn, cfg, alive=True)
        assert (g["enabled"], g["interpolation_frames"], g["decisions"]) == (True, 5, [])
        raw.execute("CREATE TABLE runtime_state (id INTEGER, knobs TEXT)")
        for knobs in (None, "[1, 2]", "{not json", '{"governor.enabled": false}'):
            raw.execute("DELETE FROM runtime_state")
            raw.execute("INSERT INTO runtime_state VALUES (1, ?)", (knobs,))
            raw.commit()
            g = read_model.governor(conn, cfg, alive=True)
            assert g["enabled"] is (knobs is None or "governor" not in knobs), knobs
    finally:
        conn.close()
        raw.close()


def test_governor_lines_off_on_and_stretched():
    settings = {"interpolation_frames": 6, "resolution_divisor": 1.0,
                "max_interpolation_frames": 120, "max_resolution_divisor": 4.0}
    assert gov_report.lines(None) == [] and gov_report.lines({}) == []
    off = {"enabled": False, "settings": settings, "decisions": []}
    assert gov_report.lines(off) == [
        "[bold]governor[/]   off: your settings, 6 in-betweens at full size"]
    on = {"enabled": True, "interpolation_frames": 6, "resolution_divisor": 1.0,
          "stretch": 1.0, "settings": settings, "decisions": []}
    assert gov_report.lines(on) == [
        "[bold]governor[/]   on: 6 in-betweens at full size (yours: 6 at full size; up to "
        "120 and 1/4 size)", "  no change so far: your settings keep up"]
    from datetime import datetime as dt
    at = dt(2026, 11, 30, 12, 1, 2, 345678)
    changed = dict(on, interpolation_frames=24, resolution_divisor=2.0, stretch=0.85,
                   decisions=[{"at": at, "reason": "stretch", "message": "buffer low"},
                              {"at": "2026-11-30 12:00:00.000001", "reason": "headroom",
                               "message": "keeping up"}])
    assert gov_report.lines(changed) == [
        "[bold]governor[/]   on: 24 in-betweens at 1/2 size, display at 85 % (yours: 6 at "
        "full size; up to 120 and 1/4 size)",
        "  2026-11-30 12:01:02  stretch: buffer low",
        "  2026-11-30 12:00:00  headroom: keeping up"]


# ================================================================ `dreamd status`

def render(report: dict, *, ansi: bool = False) -> list[str]:
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=ansi,
                      color_system="standard" if ansi else None)
    print_status(report, console)
    return [line.rstrip() for line in out.getvalue().splitlines()]


def marks(report: dict) -> list[list[str]]:
    """The escape codes of each line in a terminal: what its markup asked for, and
    nothing more where it turns Rich's highlighter off (no cyan digits, no URL style)."""
    return [re.findall(r"\x1b\[[0-9;]*m", line) for line in render(report, ansi=True)]


BOLD, RED, GREEN, YELLOW, END = "\x1b[1m", "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[0m"

BASE = {"data_dir": "/home/u/dreamd", "database": "/home/u/dreamd/dreamd.db",
        "revision": "0008", "head": "0008"}


def test_status_of_a_data_dir_never_used():
    assert render(dict(BASE, revision=None)) == [
        "data dir   /home/u/dreamd",
        "ledger     /home/u/dreamd/dreamd.db (not created yet: start the daemon or run "
        "`dreamd db upgrade`)",
        "daemon     never run"]


def test_status_of_a_live_daemon_with_everything_to_show():
    report = dict(
        BASE, revision="0007", alive=True, web_url="http://127.0.0.1:8765/",
        last_run={"id": 3, "pid": 4242, "host": "box", "started_at": "2026-11-30 12:00:00",
                  "heartbeat_at": "2026-11-30 12:05:00", "stopped_at": None},
        paused=True, pause_reason=None, paused_by="guard",
        buffer={"seconds": 2.5, "frames": 10, "fps": 4.0, "target_seconds": 30.0},
        in_progress={"chain_index": 6, "state": "executing", "attempt": 2, "theme": "signal",
                     "started_at": None},
        playhead={"chain_index": 5, "t": 0.25, "frames_shown": 812, "underruns": 3},
        counts={"frames": {"ready": 8, "shown": 2}, "keyframes": {}})
    assert render(report) == [
        "data dir   /home/u/dreamd",
        "ledger     /home/u/dreamd/dreamd.db at revision 0007 (head is 0008: run "
        "`dreamd db upgrade`)",
        "daemon     alive: run 3 pid 4242 on box, started 2026-11-30 12:00:00, heartbeat "
        "2026-11-30 12:05:00",
        "viewer     http://127.0.0.1:8765/  (`dreamd open`)",
        "paused     yes: no reason given (`dreamd resume` resumes)",
        "             by the guard: it resumes by itself once every reason is gone",
        "buffer     2.5 s ahead (10 frames at 4 fps) of a 30 s target",
        "making     keyframe 6 (executing, attempt 2, theme signal)",
        "playhead   keyframe 5 t=0.250, 812 frames shown, 3 underruns",
        "        rows per state",
        " table     ┃ states",
        "━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━",
        " frames    │ ready 8, shown 2",
        " keyframes │ -"]
    ansi = "\n".join(render(report, ansi=True))
    assert "\x1b[32malive\x1b[0m" in ansi and "\x1b[33mhead is \x1b[0m" in ansi
    assert marks(report)[3:8] == [[BOLD, END]] * 2 + [[]] + [[BOLD, END]] * 2


def test_status_of_a_stopped_daemon():
    report = dict(
        BASE, alive=False, paused=True, pause_reason="eldenring.exe", paused_by="user",
        last_run={"id": 1, "pid": 99, "host": "h", "started_at": "s", "heartbeat_at": "b",
                  "stopped_at": "e", "exit_reason": "SIGTERM"},
        in_progress={"chain_index": 2, "state": "available", "attempt": 0, "theme": "t",
                     "started_at": "2026-11-30 12:00:00"},
        playhead={"chain_index": None, "t": None, "frames_shown": 0, "underruns": 0})
    lines = render(report)
    assert lines[1:] == [
        "ledger     /home/u/dreamd/dreamd.db at revision 0008",
        "daemon     not running: run 1 pid 99 on h, started s, heartbeat b, stopped e (SIGTERM)",
        "paused     yes: eldenring.exe (`dreamd resume` resumes)",
        "making     keyframe 2 (available, attempt 0, theme t, started 2026-11-30 12:00:00)"]
    assert "\x1b[31mnot running\x1b[0m" in "\n".join(render(report, ansi=True))


def test_status_shows_each_comfyui_server():
    health = {
        "status": "fallback", "fallback": "procedural", "updated_at": "2026-11-30 12:00:00",
        "error": "no server has the checkpoint",
        "servers": [
            {"url": "http://a:8188", "healthy": True, "last_ok": "12:00:01", "supervised": True},
            {"url": "http://b:8188", "healthy": False, "failures": 3,
             "benched_until": "12:01:00", "last_error": "connection refused"},
            {"url": "http://c:8188", "healthy": False},
            {"url": "http://d:8188", "healthy": True, "set_aside": "no checkpoint x.safetensors",
             "checkpoints": ["y.safetensors", "z.safetensors"]},
            {"url": "http://e:8188", "healthy": True, "set_aside": "no node KSampler"},
            {"url": "http://f:8188", "healthy": True}],
        "supervisor": {"state": "running", "pid": 777, "restarts_last_hour": 2, "last_exit": 0}}
    lines = render(dict(BASE, comfyui=health))
    assert lines[3:] == [
        "comfyui    fallback (fallback: procedural), as of 2026-11-30 12:00:00 UTC",
        "  stopped: no server has the checkpoint",
        "  http://a:8188  healthy (supervised), last answer 12:00:01",
        "  http://b:8188  unhealthy, 3 failures, benched until 12:01:00: connection refused",
        "  http://c:8188  unhealthy",
        "  http://d:8188  set aside: no checkpoint x.safetensors (its checkpoints: "
        "y.safetensors, z.safetensors)",
        "  http://e:8188  set aside: no node KSampler (its checkpoints: none)",
        "  http://f:8188  healthy",
        "  supervisor: running, pid 777, 2 restarts in the last hour, last exit 0"]
    ansi = "\n".join(render(dict(BASE, comfyui=health), ansi=True))
    assert "\x1b[33mfallback\x1b[0m" in ansi and "\x1b[32mhealthy\x1b[0m" in ansi
    assert "\x1b[31munhealthy\x1b[0m" in ansi and "\x1b[31mset aside\x1b[0m" in ansi
    assert "\x1b[31mstopped:\x1b[0m" in ansi
    assert marks(dict(BASE, comfyui=health))[4:] == [
        [RED, END], [GREEN, END], [RED, END], [RED, END], [RED, END], [RED, END],
        [GREEN, END], []]
    quiet = {"status": "down", "updated_at": "t", "supervisor": {"state": "starting"}}
    assert render(dict(BASE, comfyui=quiet))[3:] == [
        "comfyui    down, as of t UTC",
        "  supervisor: starting, pid -, 0 restarts in the last hour"]
    for state, colour in (("ok", 32), ("starting", 33), ("fallback", 33), ("down", 31),
                          ("error", 31)):
        ansi = "\n".join(render(dict(BASE, comfyui={"status": state, "updated_at": "t"}),
                                ansi=True))
        assert f"\x1b[{colour}m{state}\x1b[0m" in ansi, state


def test_status_shows_storage_against_the_budget_and_what_was_moved_aside():
    mb = 1024 * 1024
    storage = {"total": 400 * mb + 50 * mb, "budget": 1024 * mb, "free": 5 * 1024 * mb,
               "floor": 1024 * mb, "low": "free space 0.9 GB is below the floor 1.0 GB",
               "parts": {"frames": 200 * mb, "keyframes": 100 * mb, "ledger": 512,
                         "thumbnails": 100 * mb - 512, "orphaned-1": 30 * mb,
                         "orphaned-2": 20 * mb}}
    assert render(dict(BASE, storage=storage))[3:] == [
        "storage    400.0 MB of a 1.0 GB budget, 5.0 GB free on the disk (floor 1.0 GB)",
        "  generation paused: free space 0.9 GB is below the floor 1.0 GB",
        "  frames 200.0 MB, keyframes 100.0 MB, thumbnails 100.0 MB, ledger 512 B",
        "  moved aside 50.0 MB in orphaned-1, orphaned-2: not this ledger's files; delete "
        "them when you are sure"]
    ansi = "\n".join(render(dict(BASE, storage=storage), ansi=True))
    assert "\x1b[33mgeneration paused:\x1b[0m" in ansi and "\x1b[33mmoved aside\x1b[0m" in ansi
    assert marks(dict(BASE, storage=storage))[3:] == [[BOLD, END], [YELLOW, END], [],
                                                      [YELLOW, END]]
    bare = {"total": 2048, "budget": 0, "free": None, "floor": 0, "parts": {}}
    assert render(dict(BASE, storage=bare))[3:] == [
        "storage    2.0 kB (no budget), n/a free on the disk"]
    assert render(dict(BASE, storage={}))[3:] == []
    assert render(dict(BASE, storage={"free": 10}))[3:] == [
        "storage    0 B (no budget), 10 B free on the disk"]


def test_status_shows_the_governor():
    cfg = gov_cfg("[generation]\ninterpolation_frames = 6\n")
    g = read_model.governor(None, cfg, alive=False)
    assert render(dict(BASE, governor=g))[3:] == [
        "governor   on: 6 in-betweens at full size (yours: 6 at full size; up to 120 and "
        "1/4 size)", "  no change so far: your settings keep up"]
    assert marks(dict(BASE, governor=g))[3:] == [[BOLD, END], []]


# ================================================================ the display writer

from sqlalchemy import text  # noqa: E402

from dreamd.conditions import DISK_FULL, LEDGER_BUSY  # noqa: E402
from dreamd.display import writer as writer_mod  # noqa: E402
from dreamd.display.writer import RECORD_EVERY, DisplayWriter  # noqa: E402
from tests.conftest import WriteLock, worker_context  # noqa: E402
from tests.test_display import add_segment, shown  # noqa: E402


class Clock:
    """The writer's clock, moved by the test: throttles and retries judged without
    sleeping (wall-clock time.time() stays real: it only stamps the viewer's news)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(writer_mod, "time", c)
    return c


@pytest.fixture
def wctx(db_path, clock):
    yield from worker_context(db_path, "[display]\nfps = 10.0\nmin_buffer_seconds = 0.3\n"
                                       "buffer_target_seconds = 5.0\n")


def frame_ticks(w, clock, n: int, fps: float = 10.0) -> None:
    """`n` ticks as the display's clock makes them, 1/fps apart: status.json is written
    with each frame only when frames are at least STATUS_GAP apart."""
    for _ in range(n):
        clock.now += 1 / fps
        w.tick()


def st(ctx) -> dict:
    return json.loads((ctx.cfg.output_dir / "status.json").read_text())


def gone(ctx) -> None:
    (ctx.cfg.output_dir / "status.json").unlink()


def written(ctx) -> bool:
    return (ctx.cfg.output_dir / "status.json").exists()


def set_themes(ctx) -> None:
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE keyframes SET theme = 'theme ' || chain_index"))


def test_write_status_says_every_key(wctx, clock):
    ctx = wctx
    ctx.started_monotonic = clock.now - 3600 * 1.23456
    ctx.facts.update(generation_time=12.34567, codec="taesd", cache_size=17,
                     comfyui_status="ok", storage_low="free space below the floor",
                     pause_reason="eldenring.exe", paused_by="guard",
                     keyframe_progress={"keyframe": 3, "step": 4})
    ctx.set_knobs({"generation.interpolation_frames": 0, "generation.denoise": 0.45,
                   "display.buffer_target_seconds": 7.5})
    ctx.conditions.report(LEDGER_BUSY, "test")
    w = DisplayWriter(ctx)
    w.write_status(3.0, 1)
    s = st(ctx)
    assert datetime.fromisoformat(s.pop("last_update")).tzinfo is not None
    assert s == {
        "status": "starting", "frame_number": 0, "keyframe_index": None,
        "generation_time": 12.346, "current_mode": "keyframes", "backend": "procedural",
        "codec": "taesd", "current_prompt": None, "cache_size": 17, "buffer_seconds": 0.33,
        "buffer_target_seconds": 7.5, "is_buffering": True, "fps": 3.0, "paused": False,
        "pause_reason": "eldenring.exe", "uptime_hours": 1.2346, "daemon_status": "running",
        "comfyui_status": "ok",
        "problem": "ledger busy: another process holds the ledger's write lock (a sqlite3 "
                   "session, a backup?); playback goes on from frames already made, the "
                   "ledger catches up when it is free; free space below the floor",
        "stale_after_seconds": 10.0, "theme": None,
        "paused_by": None,                 # only while paused
        "keyframe_progress": {"keyframe": 3, "step": 4}, "denoise": 0.45}
    ctx.facts["paused"] = True
    ctx.set_knobs({"generation.interpolation_frames": 1})
    w.write_status(0.1, 0)
    s = st(ctx)
    assert (s["status"], s["paused"], s["paused_by"], s["current_mode"]) == \
        ("paused", True, "guard", "hybrid")
    assert (s["fps"], s["buffer_seconds"], s["stale_after_seconds"]) == (0.1, 0.0, 50.0)
    w.write_status(0.1, 0, daemon_status="stopped", state="stopped")
    assert (st(ctx)["status"], st(ctx)["daemon_status"]) == ("stopped", "stopped")


def test_write_status_defaults_before_anything_is_known(wctx):
    ctx = wctx
    w = DisplayWriter(ctx)
    w.write_status(10.0, 0)
    s = st(ctx)
    assert list(s) == list(status_json.KEYS)
    assert (s["generation_time"], s["codec"], s["cache_size"], s["comfyui_status"],
            s["problem"], s["pause_reason"], s["paused_by"], s["keyframe_progress"],
            s["current_mode"], s["denoise"]) == \
        (0.0, None, 0, "n/a", None, None, None, None, "hybrid", 0.3)


def test_playback_buffers_plays_and_counts_each_underrun_once(wctx, clock):
    ctx = wctx
    ctx.cfg.governor.stretch = False
    w = DisplayWriter(ctx)
    w.tick()
    assert (st(ctx)["status"], st(ctx)["frame_number"], st(ctx)["is_buffering"]) == \
        ("buffering", 0, True)
    add_segment(ctx, 0, 1)                   # 2 frames: the first is shown at once
    w.tick()
    s = st(ctx)
    assert (s["status"], s["frame_number"], s["buffer_seconds"]) == ("buffering", 1, 0.1)
    assert shown(ctx) == [(0, 0.0)]
    for _ in range(2):                       # 0.1 s ahead < 0.3 s: it waits
        w.tick()
        s = st(ctx)
        assert (s["status"], s["buffer_seconds"], s["frame_number"]) == ("buffering", 0.1, 1)
    gone(ctx)
    w.tick()                                 # waiting, nothing changed: not rewritten yet
    assert not written(ctx)
    clock.now += RECORD_EVERY                # (>= STATUS_EVERY: rewritten; a batch is due)
    w.tick()
    assert (st(ctx)["status"], st(ctx)["buffer_seconds"]) == ("buffering", 0.1)
    add_segment(ctx, 1, 1)                   # 3 frames = 0.3 s: enough
    seen = []
    for _ in range(3):
        frame_ticks(w, clock, 1)
        s = st(ctx)
        seen.append((s["status"], s["frame_number"], s["buffer_seconds"], s["is_buffering"]))
    assert seen == [("playing", 2, 0.2, False), ("playing", 3, 0.1, False),
                    ("playing", 4, 0.0, False)]
    # recorded: the first frame at once, the one that began playback at once, the
    # rest with the next record (RECORD_EVERY) or the underrun that follows
    assert shown(ctx) == [(0, 0.0), (0, 0.5)]
    assert w.record() and shown(ctx) == [(0, 0.0), (0, 0.5), (1, 0.0), (1, 0.5)]
    for _ in range(3):                       # one underrun, however long
        w.tick()
        s = st(ctx)
        assert (s["status"], s["is_buffering"], s["buffer_seconds"]) == ("underrun", True, 0.0)
    rt = ctx.runtime()
    assert (rt.underruns, rt.frames_shown, rt.playhead_chain_index, rt.playhead_t) == \
        (1, 4, 1, 0.5)
    add_segment(ctx, 2, 0)                   # one frame: not enough, still an underrun
    w.tick()
    assert (st(ctx)["status"], st(ctx)["frame_number"]) == ("underrun", 1 + 3)
    add_segment(ctx, 3, 1)                   # 3 frames ahead: playing again
    frame_ticks(w, clock, 3)
    assert st(ctx)["status"] == "playing" and w.record() and len(shown(ctx)) == 7
    w.tick()
    assert ctx.runtime().underruns == 2      # a second episode counts again
    assert st(ctx)["status"] == "underrun"


def test_a_ready_later_segment_is_no_buffer_while_an_earlier_one_is_made(wctx):
    ctx = wctx
    add_segment(ctx, 0, 3, batch_state="available")
    add_segment(ctx, 1, 5)                   # 0.6 s counted ahead, but not playable yet
    w = DisplayWriter(ctx)
    for _ in range(3):
        w.tick()
    assert st(ctx)["status"] == "buffering" and shown(ctx) == []
    assert ctx.runtime().underruns == 0


def test_an_underrun_counts_the_frames_ready_past_the_gap_afresh(wctx, clock):
    """The buffer is counted twice a second; the tick that meets an underrun counts
    again, so its status has the frames of a later segment made since the last count
    (here within the same instant of the set clock)."""
    ctx = wctx
    ctx.cfg.governor.stretch = False
    add_segment(ctx, 0, 2)                   # 3 frames = 0.3 s: playing at once
    w = DisplayWriter(ctx)
    w.tick()
    add_segment(ctx, 1, 3, batch_state="executing")     # being made: a gap
    add_segment(ctx, 2, 3)                   # 4 frames ready past it, not counted yet
    frame_ticks(w, clock, 2)
    assert (st(ctx)["status"], st(ctx)["buffer_seconds"]) == ("playing", 0.0)
    assert sum(clock.slept) < 0.5            # no recount due by the clock
    w.tick()
    s = st(ctx)
    assert (s["status"], s["buffer_seconds"]) == ("underrun", 0.4)
    assert len(shown(ctx)) == 3


def test_the_stretch_slows_playback_on_a_low_buffer(wctx):
    ctx = wctx
    changes = []
    w = DisplayWriter(ctx)
    w.pacer.on_change = lambda: changes.append(ctx.facts["stretch"])
    add_segment(ctx, 0, 9)                   # 10 frames = 1 s ahead
    for _ in range(4):
        w.tick()
    assert "stretch" not in ctx.facts        # above the low mark: full rate
    for _ in range(5):
        w.tick()
    assert changes and changes[-1] < 1.0 and ctx.facts["stretch"] < 1.0


def test_each_frame_is_swapped_in_with_the_one_before_and_announced(wctx, clock, caplog):
    ctx = wctx
    add_segment(ctx, 0, 2)
    add_segment(ctx, 1, 2)
    set_themes(ctx)
    with ctx.engine.begin() as conn:         # as the interpolation worker stores them
        conn.execute(text("UPDATE frames SET path = substr(path, :n)"),
                     {"n": len(str(ctx.cfg.data_dir)) + 2})
    out = ctx.cfg.output_dir
    news = []
    w = DisplayWriter(ctx)
    w.on_shown = lambda *a: news.append(a)
    with caplog.at_level("DEBUG", logger="dreamd.display"):
        w.tick()
    # the timing line bench/pipeline.py reads
    assert re.search(r"timing display id=\d+ write_ms=[0-9.]+ ledger_ms=[0-9.]+", caplog.text)
    assert not (out / "previous_frame.png").exists()
    assert (st(ctx)["current_prompt"], st(ctx)["theme"], st(ctx)["keyframe_index"]) == \
        ("prompt 0", "theme 0", 0)
    frames = sorted(ctx.cfg.frames_dir.glob("*.png"))
    by_name = {p.name: p.read_bytes() for p in frames}
    frame_ticks(w, clock, 3)
    assert (st(ctx)["current_prompt"], st(ctx)["theme"], st(ctx)["keyframe_index"]) == \
        ("prompt 1", "theme 1", 1)              # the new keyframe's, from its first frame
    frame_ticks(w, clock, 1)
    assert (out / "current_frame.png").read_bytes() == by_name["1-1.png"]
    assert (out / "previous_frame.png").read_bytes() == by_name["1-0.png"]
    assert (st(ctx)["current_prompt"], st(ctx)["theme"], st(ctx)["keyframe_index"]) == \
        ("prompt 1", "theme 1", 1)
    with ctx.reader.connect() as conn:
        ids = [r.id for r in conn.execute(text(
            "SELECT id FROM frames ORDER BY chain_index, t"))][:5]
    assert all(os.path.isabs(n[3]) and os.path.exists(n[3]) for n in news)
    assert [(n[0], n[1], round(n[2], 4), os.path.basename(n[3])) for n in news] == [
        (ids[0], 0, 0.0, "0-0.png"), (ids[1], 0, 0.3333, "0-1.png"),
        (ids[2], 0, 0.6667, "0-2.png"), (ids[3], 1, 0.0, "1-0.png"),
        (ids[4], 1, 0.3333, "1-1.png")]
    assert all(abs(n[4] - time.time()) < 60 for n in news)
    assert w.record()                        # the frames since the last record
    with ctx.reader.connect() as conn:
        rows = conn.execute(text(
            "SELECT entity_id, from_state, to_state, worker, event FROM transitions "
            "WHERE entity = 'frame' AND to_state = 'shown' ORDER BY id")).fetchall()
        shown_at = conn.execute(text("SELECT count(*) FROM frames WHERE state = 'shown' "
                                     "AND shown_at IS NOT NULL")).scalar()
    assert [tuple(r) for r in rows] == [(i, "ready", "shown", "display", "shown") for i in ids]
    assert shown_at == 5
    rt = ctx.runtime()
    assert (rt.playhead_frame_id, rt.playhead_chain_index, rt.frames_shown) == (ids[4], 1, 5)


def test_a_restart_mid_segment_names_the_prompt_on_screen(wctx, clock):
    ctx = wctx
    add_segment(ctx, 0, 5)
    set_themes(ctx)
    w = DisplayWriter(ctx)
    frame_ticks(w, clock, 2)
    assert w.flush(timeout=1.0)              # as the daemon's stop does
    w.close()
    again = DisplayWriter(ctx)               # same chain as the playhead, prompt unknown
    frame_ticks(again, clock, 2)
    s = st(ctx)
    assert (s["current_prompt"], s["theme"], s["frame_number"]) == ("prompt 0", "theme 0", 4)
    assert again.record() and shown(ctx)[-1] == (0, 0.5)


def test_a_keyframe_not_completed_names_no_prompt(wctx):
    ctx = wctx
    add_segment(ctx, 0, 2)
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE keyframes SET state = 'executing' WHERE chain_index = 0"))
    w = DisplayWriter(ctx)
    w.tick()
    assert (st(ctx)["current_prompt"], st(ctx)["theme"]) == (None, None)


def test_pause_holds_playback_and_writes_status_when_it_changes_or_twice_a_second(wctx, clock):
    ctx = wctx
    add_segment(ctx, 0, 4)
    w = DisplayWriter(ctx)
    w.tick()
    ctx.facts.update(paused=True, pause_reason="a game")
    w.tick()
    assert (st(ctx)["status"], st(ctx)["paused"], st(ctx)["buffer_seconds"]) == \
        ("paused", True, 0.4)
    gone(ctx)
    clock.now += 0.25
    w.tick()
    assert not written(ctx)                  # nothing changed, written 0.25 s ago
    clock.now += 0.25
    w.tick()
    assert st(ctx)["status"] == "paused" and shown(ctx) == [(0, 0.0)]
    gone(ctx)
    ctx.conditions.report(DISK_FULL, "test")  # a change: written at once
    w.tick()
    assert st(ctx)["problem"].startswith("disk full: ")
    ctx.facts["paused"] = False
    w.tick()
    assert st(ctx)["status"] == "playing" and w.record() and len(shown(ctx)) == 2


def test_the_heartbeat_writes_only_when_the_ticks_have_not_for_half_a_second(wctx, clock):
    ctx = wctx
    add_segment(ctx, 0, 4)
    w = DisplayWriter(ctx)
    w.tick()
    gone(ctx)
    clock.now += 0.25
    w.status_heartbeat()
    assert not written(ctx)
    clock.now += 0.25
    w.status_heartbeat()
    s = st(ctx)                              # the buffer counted from the ledger
    assert (s["status"], s["buffer_seconds"], s["fps"]) == ("playing", 0.4, 10.0)
    ctx.set_knobs({"display.fps": 2.0})
    clock.now += 0.5
    w.status_heartbeat()
    assert (st(ctx)["fps"], st(ctx)["buffer_seconds"]) == (2.0, 2.0)


def test_the_buffer_is_recounted_twice_a_second_and_counted_down_between(wctx, clock):
    ctx = wctx
    add_segment(ctx, 0, 5)
    w = DisplayWriter(ctx)
    w.tick()
    frame_ticks(w, clock, 2)
    assert st(ctx)["buffer_seconds"] == 0.3
    add_segment(ctx, 1, 3)                   # 4 more frames, not counted yet
    frame_ticks(w, clock, 1)
    assert st(ctx)["buffer_seconds"] == 0.2
    clock.now += 0.5
    w.tick()
    assert st(ctx)["buffer_seconds"] == 0.5  # recounted: 1 + 4 ahead after this frame


def test_frames_shown_on_a_busy_ledger_are_recorded_when_it_is_free(wctx, clock, db_path):
    ctx = wctx
    add_segment(ctx, 0, 5)
    w = DisplayWriter(ctx)
    w.tick()
    with WriteLock(db_path):
        w.tick()
        w.tick()
        assert w.record() is False           # tried at 1000.0: the next try at 1000.5
        clock.now += 2.5                     # busy, but not for long: not a problem yet
        w.tick()
        assert st(ctx)["problem"] is None and st(ctx)["frame_number"] == 4
        clock.now += 0.5                     # failing for 3 s: now it is
        assert w.record() is False
        w._status_maybe(10.0, force=True)
        assert st(ctx)["problem"].startswith("ledger busy: ")
        # the buffer counted from the playhead on screen, not the ledger's
        assert (st(ctx)["frame_number"], st(ctx)["buffer_seconds"]) == (4, 0.2)
    assert shown(ctx) == [(0, 0.0)]
    assert w.record() is False               # the next try waits RECORD_RETRY
    clock.now += 0.25
    assert w.record() is False and len(shown(ctx)) == 1
    clock.now += 0.25
    assert w.record() is True
    assert shown(ctx) == [(0, 0.0), (0, 1 / 6), (0, 2 / 6), (0, 3 / 6)]
    rt = ctx.runtime()
    assert (rt.frames_shown, rt.playhead_chain_index, rt.playhead_t) == (4, 0, 0.5)
    with ctx.reader.connect() as conn:      # recorded late, with the times really shown
        times = conn.execute(text(
            "SELECT f.shown_at, t.at FROM frames f JOIN transitions t ON t.entity = 'frame' "
            "AND t.entity_id = f.id AND t.to_state = 'shown' ORDER BY f.id")).fetchall()
    assert len(times) == 4 and all(shown_at == at for shown_at, at in times)
    assert times[1][0] < times[2][0] < times[3][0]
    w._status_maybe(10.0, force=True)
    assert st(ctx)["problem"] is None
    assert w.record() is True                # nothing left: no write at all


def test_flush_at_a_stop_tries_until_its_timeout(wctx, clock, db_path):
    ctx = wctx
    add_segment(ctx, 0, 3)
    w = DisplayWriter(ctx)
    w.tick()
    assert w.flush(0.0) is True and clock.slept == []
    with WriteLock(db_path):
        w.tick()
        assert w.flush(1.0) is False         # tries at 0, 0.5 and 1.0 s
        assert clock.slept == [0.5, 0.5]
    assert w.flush(0.0) is True             # no wait for the retry time: a last try now
    assert len(shown(ctx)) == 2


def test_a_disk_full_output_dir_is_reported_not_raised(db_path, clock, tmp_path, caplog):
    for disk in mount_tmpfs(tmp_path / "out", "1m"):
        for ctx in worker_context(db_path, f"[display]\nfps = 10.0\nmin_buffer_seconds = 0.3\n"
                                           f"output_dir = \"{disk}\"\n"):
            add_segment(ctx, 0, 3)
            w = DisplayWriter(ctx)
            fill(disk)
            with caplog.at_level("WARNING", logger="dreamd"):
                w.tick()                     # the frame cannot be copied onto the disk
            assert ctx.conditions.active(DISK_FULL)
            assert "display: disk full ([Errno 28] No space left on device" in caplog.text
            ctx.conditions.clear()
            caplog.clear()
            clock.now += 0.5
            with caplog.at_level("WARNING", logger="dreamd"):
                w.status_heartbeat()         # the frame is tried again; status.json fails too
            assert "display: disk full ([Errno 28] No space left on device" in caplog.text
            assert ctx.conditions.active(DISK_FULL) and not (disk / "status.json").exists()
            (disk / "ballast").unlink()
            ctx.conditions.clear()
            w.tick()                         # room again: the frame on screen is written
            assert w.record() and shown(ctx)[-1] == (0, 0.25)
            assert st(ctx)["frame_number"] == 2
            assert (disk / "current_frame.png").read_bytes() == \
                (ctx.cfg.frames_dir / "0-1.png").read_bytes()


def test_an_error_that_is_no_condition_of_the_machine_is_raised(wctx):
    ctx = wctx
    add_segment(ctx, 0, 2)
    for p in ctx.cfg.frames_dir.glob("0-0.png"):
        p.unlink()
    w = DisplayWriter(ctx)
    with pytest.raises(FileNotFoundError):
        w.tick()


def test_the_display_gives_up_on_a_busy_ledger_in_a_fraction_of_a_second(wctx, db_path):
    ctx = wctx
    w = DisplayWriter(ctx)
    with w.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 150
    w.close()


def test_stale_temp_files_in_the_output_dir_are_swept_and_said(wctx, caplog):
    ctx = wctx
    out = ctx.cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / ".status.json.1.2.tmp").write_bytes(b"{")
    with caplog.at_level("INFO", logger="dreamd.display"):
        DisplayWriter(ctx)
    assert f"removed 1 stale temp file(s) from {out}" in caplog.text
    assert list(out.iterdir()) == []


def test_a_frame_is_on_screen_before_the_ledger_records_it(wctx, monkeypatch):
    """The crash tests hold the display at `frame-displayed` (DREAMD_HOLD_AT): the frame
    is swapped in, its record not yet written."""
    import threading
    ctx = wctx
    add_segment(ctx, 0, 2)
    data = ctx.cfg.data_dir
    monkeypatch.setenv("DREAMD_HOLD_AT", "frame-displayed")
    w = DisplayWriter(ctx)
    (data / "arm-frame-displayed").write_text("")
    ticking = threading.Thread(target=w.tick)
    ticking.start()
    try:
        deadline = time.monotonic() + 60
        while not (data / "held-at-frame-displayed").exists():
            assert time.monotonic() < deadline and ticking.is_alive(), "never held"
            time.sleep(0.01)
        assert (ctx.cfg.output_dir / "current_frame.png").read_bytes() == \
            (ctx.cfg.frames_dir / "0-0.png").read_bytes()
        assert shown(ctx) == []
    finally:
        (data / "held-at-frame-displayed").unlink(missing_ok=True)
        ticking.join(timeout=60)
    assert shown(ctx) == [(0, 0.0)]


def test_on_a_full_output_disk_status_json_says_so_in_place(db_path, clock, tmp_path):
    """The frame cannot be swapped in, but status.json (rewritten in place) says what is
    wrong, with the buffer the tick counted; a second failing tick at once rewrites
    nothing. The dream goes on meanwhile (the viewer is told of each frame, the ledger
    records them), and the files catch up as soon as there is room."""
    for disk in mount_tmpfs(tmp_path / "out", "1m"):
        for ctx in worker_context(db_path, f"[display]\nfps = 10.0\nmin_buffer_seconds = 0.3\n"
                                           f"output_dir = \"{disk}\"\n"):
            add_segment(ctx, 0, 5)
            w = DisplayWriter(ctx)
            w.tick()
            assert (st(ctx)["status"], st(ctx)["problem"], st(ctx)["buffer_seconds"]) == \
                ("playing", None, 0.5)
            first = (disk / "current_frame.png").read_bytes()
            fill(disk)
            add_segment(ctx, 1, 3)           # made since the last count: not counted yet
            frame_ticks(w, clock, 1)
            s = st(ctx)
            assert s["problem"].startswith("disk full: ") and s["frame_number"] == 2
            assert (s["status"], s["buffer_seconds"]) == ("playing", 0.4)
            assert (disk / "current_frame.png").read_bytes() == first
            raw = (disk / "status.json").read_bytes()
            time.sleep(0.002)                # a rewrite would have a new last_update
            w.tick()
            assert (disk / "status.json").read_bytes() == raw
            (disk / "ballast").unlink()
            ctx.conditions.clear()
            frame_ticks(w, clock, 1)
            frames = ctx.cfg.frames_dir
            assert (disk / "current_frame.png").read_bytes() == (frames / "0-3.png").read_bytes()
            assert (disk / "previous_frame.png").read_bytes() == first
            assert st(ctx)["frame_number"] == 4 and st(ctx)["problem"] is None
            assert w.record() and shown(ctx) == [(0, 0.0), (0, 1 / 6), (0, 2 / 6), (0, 3 / 6)]


def test_a_restart_waits_for_the_minimum_buffer_before_it_plays_on(wctx):
    """Only a ledger that never played starts with its first frame at once: a restart
    goes on from the playhead once min_buffer_seconds are ready."""
    ctx = wctx
    add_segment(ctx, 0, 2)
    w = DisplayWriter(ctx)
    for _ in range(3):
        w.tick()
    assert w.flush(timeout=1.0)              # as the daemon's stop does
    add_segment(ctx, 1, 0)                   # one frame: 0.1 s < 0.3 s
    again = DisplayWriter(ctx)
    again.tick()
    assert len(shown(ctx)) == 3 and st(ctx)["status"] == "buffering"
    add_segment(ctx, 2, 1)
    again.tick()                             # the first frame after a wait: recorded at once
    assert shown(ctx)[3:] == [(1, 0.0)] and st(ctx)["status"] == "playing"


def test_a_resume_shows_at_the_next_tick(wctx, clock):
    ctx = wctx
    add_segment(ctx, 0, 4)
    w = DisplayWriter(ctx)
    w.tick()
    ctx.facts["paused"] = True
    w.tick()
    ctx.facts["paused"] = False              # resumed: playback goes on at the next tick
    clock.now += 0.5
    w.status_heartbeat()
    assert (st(ctx)["status"], st(ctx)["paused"]) == ("paused", False)
    w.tick()
    assert st(ctx)["status"] == "playing" and w.record() and len(shown(ctx)) == 2


def test_underruns_on_a_busy_ledger_are_all_counted_later(wctx, clock, db_path):
    ctx = wctx
    add_segment(ctx, 0, 2)
    w = DisplayWriter(ctx)
    for _ in range(3):
        w.tick()
    with WriteLock(db_path):
        w.tick()                             # underrun 1: not recorded, next try in 0.5 s
    add_segment(ctx, 1, 2)                   # (the clock stands still: no try meanwhile)
    for _ in range(3):
        w.tick()
    w.tick()                                 # underrun 2, both waiting
    assert st(ctx)["status"] == "underrun" and ctx.runtime().underruns == 0
    clock.now += 0.5
    assert w.record() is True
    rt = ctx.runtime()
    assert (rt.underruns, rt.frames_shown) == (2, 6)


def test_status_json_is_there_from_the_start_in_a_new_output_dir(db_path, clock, tmp_path):
    """display.output_dir may name a folder that does not exist yet, parents and all;
    the heartbeat writes status.json before the first tick (readers see `starting`)."""
    out = tmp_path / "skins" / "dream" / "output"
    for ctx in worker_context(db_path, f"[display]\noutput_dir = \"{out}\"\n"):
        w = DisplayWriter(ctx)
        w.status_heartbeat()
        s = json.loads((out / "status.json").read_text())
        assert (s["status"], s["frame_number"], s["is_buffering"]) == ("starting", 0, True)


def test_a_ledger_busy_from_the_first_frame_is_no_problem_for_three_seconds(wctx, clock,
                                                                             db_path):
    ctx = wctx
    add_segment(ctx, 0, 3)
    w = DisplayWriter(ctx)
    with WriteLock(db_path):
        w.tick()                             # on screen; its record waits
        s = st(ctx)
        assert (s["frame_number"], s["problem"]) == (1, None)
    clock.now += 0.5
    w.tick()                                 # the record kept while it was busy goes in
    assert shown(ctx) == [(0, 0.0)]          # first; this frame waits for its batch
    assert w.record() and shown(ctx) == [(0, 0.0), (0, 0.25)]


# ---------------------------------------------------------------- what a frame costs

def test_the_output_files_come_with_each_frame_but_at_most_every_status_gap(db_path, clock):
    """At 15 fps (frames 67 ms apart) the output files are written with every other
    frame, never sooner than STATUS_GAP after the last, and together: current_frame.png
    is the frame status.json counts, previous_frame.png the one the file held before (the
    one a reader of the files saw last). A change of state is written at once, with the
    frame on screen."""
    for ctx in worker_context(db_path, "[display]\nfps = 15.0\nmin_buffer_seconds = 0.3\n"):
        ctx.cfg.governor.stretch = False
        add_segment(ctx, 0, 14)
        frames = {p.name: p.read_bytes() for p in ctx.cfg.frames_dir.glob("*.png")}
        out = ctx.cfg.output_dir

        def files() -> tuple[int, str, str | None]:
            def name(p):
                return next((n for n, b in frames.items() if b == p.read_bytes()), None) \
                    if p.exists() else None
            return (st(ctx)["frame_number"], name(out / "current_frame.png"),
                    name(out / "previous_frame.png"))

        w = DisplayWriter(ctx)
        w.tick()
        seen = [files()]
        for _ in range(8):
            frame_ticks(w, clock, 1, fps=15.0)
            seen.append(files())
        numbers = [n for n, _cur, _prev in seen[1:]]
        assert numbers == [1, 3, 3, 5, 5, 7, 7, 9] or numbers == [2, 2, 4, 4, 6, 6, 8, 8]
        assert w.frames_shown == 9
        for n, cur, prev in seen:
            assert cur == f"0-{n - 1}.png"
        published = sorted(set(seen))
        assert published[0][2] is None and all(
            prev == before[1] for before, (_n, _cur, prev) in zip(published, published[1:]))
        ctx.facts["paused"] = True            # a change: written at once
        w.tick()
        assert (st(ctx)["status"], files()[:2]) == ("paused", (9, "0-8.png"))


def test_frames_are_recorded_in_batches_and_at_once_when_playback_stops(wctx, clock):
    """While frames play the ledger is written every RECORD_EVERY seconds (one
    transaction for the frames since the last); an underrun writes what is waiting at
    once, with the frames' own shown_at times."""
    ctx = wctx
    ctx.cfg.governor.stretch = False
    add_segment(ctx, 0, 14)                  # 15 frames
    w = DisplayWriter(ctx)
    counts = []
    for _ in range(15):
        frame_ticks(w, clock, 1)
        counts.append(len(shown(ctx)))
    # the first frame at once, then the ones since, once RECORD_EVERY (1 s, 10 frames
    # at 10 fps) has passed: two writes in fifteen frames
    every = round(RECORD_EVERY * 10)
    first, second = sorted(set(counts))
    assert first == 1 and counts.index(second) in (every, every + 1) and second >= every
    frame_ticks(w, clock, 1)                 # underrun: what waits is written now
    assert len(shown(ctx)) == 15 and ctx.runtime().frames_shown == 15
    with ctx.reader.connect() as conn:
        at = [r[0] for r in conn.execute(text(
            "SELECT shown_at FROM frames ORDER BY chain_index, t"))]
        logged = conn.execute(text("SELECT count(*) FROM transitions WHERE entity = 'frame' "
                                   "AND to_state = 'shown'")).scalar()
    assert at == sorted(at) and len(set(at)) == 15 and logged == 15
    # the swaps skip the look for the same file, and the unlink after the rename: none
    # of their temp names is left behind
    from dreamd.storage import files
    assert [p.name for p in ctx.cfg.output_dir.iterdir() if files.is_temp(p)] == []


def test_a_frame_gone_before_its_batch_is_recorded_is_skipped_with_a_warning(wctx, clock,
                                                                              caplog):
    ctx = wctx
    add_segment(ctx, 0, 4)
    w = DisplayWriter(ctx)
    frame_ticks(w, clock, 3)
    victim = w.pending[0][0]
    with ctx.engine.begin() as conn:         # evicted meanwhile (retention, a reset)
        conn.execute(text("UPDATE frames SET state = 'evicted' WHERE id = :i"), {"i": victim})
    with caplog.at_level("WARNING", logger="dreamd.display"):
        assert w.record()
    assert f"frame {victim}: no longer ready" in caplog.text
    assert len(shown(ctx)) == 2 and ctx.runtime().frames_shown == 3


def test_the_frames_to_show_are_read_once_per_segment_or_recount_not_per_frame(wctx, clock):
    ctx = wctx
    ctx.cfg.governor.stretch = False
    add_segment(ctx, 0, 9)                   # 10 frames
    add_segment(ctx, 1, 9)
    w = DisplayWriter(ctx)
    w.tick()
    reads: list[str] = []
    w.look().set_trace_callback(reads.append)
    frame_ticks(w, clock, 4)                 # 0.4 s: no recount, segment 0 read already
    assert reads == []
    frame_ticks(w, clock, 11)                # recounts due at 0.5 s and 1.0 s, segment 1
    # 15 frames shown and nothing made meanwhile: the next frame looked for once (the
    # segment that ran out), the buffer never counted again (the newest id is the one
    # of the last count, so the count counted down stands)
    assert sum("LIMIT 1" in r and "FROM frames" in r for r in reads) == 1
    assert not [r for r in reads if r.startswith("SELECT count(*) FROM frames")]
    assert sum(r.startswith("SELECT max(id) FROM frames") for r in reads) >= 2
    assert st(ctx)["buffer_seconds"] == 0.4             # 20 - 16 shown
    add_segment(ctx, 2, 9)                   # 10 more: the next recount counts them
    reads.clear()
    frame_ticks(w, clock, 6)
    assert [r for r in reads if r.startswith("SELECT count(*) FROM frames")]
    assert st(ctx)["buffer_seconds"] == pytest.approx(1.4 - 0.6 + 0.0, abs=0.11)
    assert w.record() and len(shown(ctx)) == 22
    order = shown(ctx)
    assert order == sorted(order)


def test_next_frames_are_the_next_one_and_the_rest_of_its_segment(wctx):
    from dreamd.ledger import read_model

    ctx = wctx
    add_segment(ctx, 0, 2)
    add_segment(ctx, 1, 2)
    conn = read_model.connect(ctx.cfg.db_path)
    try:
        first = read_model.next_frames(conn, None, None)
        assert [(f.chain_index, round(f.pos, 3)) for f in first] == [
            (0, 0.0), (0, 0.333), (0, 0.667)]
        assert [(f.chain_index, round(f.pos, 3)) for f in
                read_model.next_frames(conn, 0, 0.5)] == [(0, 0.667)]
        assert [f.chain_index for f in read_model.next_frames(conn, 0, 0.9)] == [1, 1, 1]
        assert read_model.next_frames(conn, 1, 0.9) == []
    finally:
        conn.close()


def test_temp_names_are_unique_per_call_and_per_process(tmp_path):
    """No system call per name (the display makes three a frame): a token drawn once per
    process, made again in a forked child, and a counter."""
    import os
    from pathlib import Path

    from dreamd.storage import files

    names = {files._tmp_name(str(tmp_path / "status.json")) for _ in range(1000)}
    assert len(names) == 1000 and all(n.endswith(".tmp") for n in names)
    assert all(files.is_temp(Path(n)) for n in names)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                      # the child: its names carry its own token
        os.write(write, files._tmp_name(str(tmp_path / "status.json")).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 4096).decode()
    os.close(read)
    os.close(write)
    assert child not in names and child.split(".")[3:5] != next(iter(names)).split(".")[3:5]
