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
import sqlite3
import time
from datetime import datetime, timedelta, timezone

import pytest
from rich.console import Console

from dreamd.display import governor as gov_report
from dreamd.display import status as status_json
from dreamd.display.report import print_status
from dreamd.ledger import glance
from tests.conftest import mount_tmpfs


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
        with open(disk / "ballast", "wb", buffering=0) as f:
            for size in (1 << 16, 1 << 10, 1):
                try:
                    while True:
                        f.write(b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
        yield disk


def test_on_a_full_disk_status_json_is_rewritten_in_place(full_disk):
    path = full_disk / "status.json"
    shorter = {"status": "underrun", "problem": "disk full: no space left"}
    status_json.write(path, shorter)
    assert json.loads(path.read_text()) == shorter      # truncated to the new length
    assert sorted(p.name for p in full_disk.iterdir()) == ["ballast", "status.json"]


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
    assert gov_report.report(None, cfg, alive=True) == {
        "enabled": False, "interpolation_frames": 200, "resolution_divisor": 8.0,
        "stretch": 1.0, "decisions": [],
        "settings": {"interpolation_frames": 200, "resolution_divisor": 8.0,
                     "max_interpolation_frames": 200, "max_resolution_divisor": 8.0}}
    cfg = gov_cfg("[generation]\ninterpolation_frames = 6\nresolution_divisor = 1.0\n")
    g = gov_report.report(None, cfg, alive=False)
    assert g["enabled"] is True
    assert g["settings"] == {"interpolation_frames": 6, "resolution_divisor": 1.0,
                             "max_interpolation_frames": 120, "max_resolution_divisor": 4.0}


def test_governor_report_follows_the_last_decision_only_while_a_daemon_runs(gov_db):
    conn, db_path = gov_db
    decision(conn, 10, 1.5, 1.0, at="2026-11-30 12:00:00")
    decision(conn, 24, 2.0, 0.85, reason="stretch", at="2026-11-30 12:01:00", detail=None)
    conn.commit()
    cfg = gov_cfg("[generation]\ninterpolation_frames = 6\n")
    ro = glance.connect(db_path)
    try:
        alive = gov_report.report(ro, cfg, alive=True)
        assert (alive["interpolation_frames"], alive["resolution_divisor"], alive["stretch"]) \
            == (24, 2.0, 0.85)
        assert [d["reason"] for d in alive["decisions"]] == ["stretch", "slow_keyframes"]
        assert alive["decisions"][0]["detail"] is None
        assert alive["decisions"][1]["detail"] == {"ms": {"1.0": 12}}
        assert alive["settings"]["interpolation_frames"] == 6
        stopped = gov_report.report(ro, cfg, alive=False)
        assert (stopped["interpolation_frames"], stopped["resolution_divisor"],
                stopped["stretch"]) == (6, 1.0, 1.0)
        assert len(stopped["decisions"]) == 2
    finally:
        ro.close()
    # turned off with `dreamd set governor.enabled false`: the user's N, stored as a knob
    conn.execute("""UPDATE runtime_state SET knobs = '{"governor.enabled": false,
                 "generation.interpolation_frames": 9}'""")
    conn.commit()
    ro = glance.connect(db_path)
    try:
        off = gov_report.report(ro, cfg, alive=True)
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
    ro = glance.connect(db_path)
    try:
        shown = gov_report.decisions(ro)
        assert [d["interpolation_frames"] for d in shown] == [6, 5, 4, 3, 2]
        assert [d["detail"] for d in shown] == ["not json", None, {"i": 4}, {"i": 3}, {"i": 2}]
        assert [d["interpolation_frames"] for d in gov_report.decisions(ro, limit=2)] == [6, 5]
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
    conn = glance.connect(path)
    try:
        assert gov_report.decisions(conn) == []
        g = gov_report.report(conn, cfg, alive=True)
        assert (g["enabled"], g["interpolation_frames"], g["decisions"]) == (True, 5, [])
        raw.execute("CREATE TABLE runtime_state (id INTEGER, knobs TEXT)")
        for knobs in (None, "[1, 2]", "{not json", '{"governor.enabled": false}'):
            raw.execute("DELETE FROM runtime_state")
            raw.execute("INSERT INTO runtime_state VALUES (1, ?)", (knobs,))
            raw.commit()
            g = gov_report.report(conn, cfg, alive=True)
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
        "buffer     2.5 s ahead (10 frames at 4 fps) of a 30 s target",
        "making     keyframe 6 (executing, attempt 2, theme signal)",
        "             by the game guard: it resumes by itself once the game has been gone "
        "guard.resume_after_seconds",
        "playhead   keyframe 5 t=0.250, 812 frames shown, 3 underruns",
        "        rows per state",
        " table     ┃ states",
        "━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━",
        " frames    │ ready 8, shown 2",
        " keyframes │ -"]
    ansi = "\n".join(render(report, ansi=True))
    assert "\x1b[32malive\x1b[0m" in ansi and "\x1b[33mhead is \x1b[0m" in ansi


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
    storage = {"total": 300 * mb + 50 * mb, "budget": 1024 * mb, "free": 5 * 1024 * mb,
               "floor": 1024 * mb, "low": "free space 0.9 GB is below the floor 1.0 GB",
               "parts": {"frames": 200 * mb, "keyframes": 100 * mb, "ledger": 512,
                         "orphaned-1": 30 * mb, "orphaned-2": 20 * mb}}
    assert render(dict(BASE, storage=storage))[3:] == [
        "storage    300.0 MB of a 1.0 GB budget, 5.0 GB free on the disk (floor 1.0 GB)",
        "  generation paused: free space 0.9 GB is below the floor 1.0 GB",
        "  frames 200.0 MB, keyframes 100.0 MB, ledger 512 B",
        "  moved aside 50.0 MB in orphaned-1, orphaned-2: not this ledger's files; delete "
        "them when you are sure"]
    ansi = "\n".join(render(dict(BASE, storage=storage), ansi=True))
    assert "\x1b[33mgeneration paused:\x1b[0m" in ansi and "\x1b[33mmoved aside\x1b[0m" in ansi
    bare = {"total": 2048, "budget": 0, "free": None, "floor": 0, "parts": {}}
    assert render(dict(BASE, storage=bare))[3:] == [
        "storage    2.0 kB (no budget), n/a free on the disk"]
    assert render(dict(BASE, storage={}))[3:] == []


def test_status_shows_the_governor():
    cfg = gov_cfg("[generation]\ninterpolation_frames = 6\n")
    g = gov_report.report(None, cfg, alive=False)
    assert render(dict(BASE, governor=g))[3:] == [
        "governor   on: 6 in-betweens at full size (yours: 6 at full size; up to 120 and "
        "1/4 size)", "  no change so far: your settings keep up"]
