"""The finished command line, on the prepared ledger (tests/tui_ledger.py), checked by
what it prints: `dreamd history` (-n, --since, formats), `dreamd sql` with several
statements in one argument, `dreamd status` (pause reason, keyframe in progress,
buffer), `dreamd inject`."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone

import pytest

from dreamd.cli import main
from tests.tui_ledger import prepare


@pytest.fixture
def data_dir(tmp_path, ledger_template, monkeypatch):
    d = tmp_path / "data"
    prepare(d, ledger_template)
    monkeypatch.setenv("DREAMD_DATA_DIR", str(d))
    monkeypatch.delenv("DREAMD_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("COLUMNS", "200")
    return d


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_history_tsv_is_the_newest_n_oldest_first(data_dir, capsys):
    code, out, _ = run(capsys, "history", "-n", "3", "--format", "tsv")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "keyframe\tstate\ttheme\tattempt\tms\tcreated_at\tcompleted_at"
    assert [line.split("\t")[:3] for line in lines[1:]] == [
        ["4", "completed", "cathedral"], ["5", "completed", "cathedral"],
        ["6", "executing", "signal"]]
    assert lines[1].split("\t")[4:] == ["84.0", "2026-11-30 12:01:20.000000",
                                        "2026-11-30 12:01:22.000000"]


def test_history_since_a_time_and_a_duration(data_dir, capsys):
    code, out, _ = run(capsys, "history", "--since", "2026-11-30 12:01:00", "--format", "json")
    assert code == 0
    assert [r["keyframe"] for r in json.loads(out)] == [3, 4, 5, 6]
    # with an offset: 13:01:30+01:00 is 12:01:30 UTC
    code, out, _ = run(capsys, "history", "--since", "2026-11-30T13:01:30+01:00",
                       "--format", "json")
    assert [r["keyframe"] for r in json.loads(out)] == [5, 6]
    # a duration back from now: the prepared dream is older than a day… but not older
    # than the days since 2026-11-30
    days = (datetime.now(timezone.utc).replace(tzinfo=None) - datetime(2026, 11, 30)).days
    code, out, _ = run(capsys, "history", "--since", "1h", "--format", "json")
    assert json.loads(out) == []
    code, out, _ = run(capsys, "history", "--since", f"{days + 2}d", "-n", "2",
                       "--format", "json")
    assert [r["keyframe"] for r in json.loads(out)] == [5, 6]


def test_history_table_and_refusals(data_dir, capsys):
    code, out, _ = run(capsys, "history")
    assert code == 0
    assert "cathedral" in out and "signal" in out and "ethereal" in out
    for bad in (["-n", "-1"], ["--since", "yesterday"], ["--format", "xml"]):
        with pytest.raises(SystemExit) as exit_:
            main(["history", *bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert {"-n": "expected a number >= 0", "--since": "expected a duration (90s, 10m",
                "--format": "invalid choice"}[bad[0]] in err


def test_sql_runs_several_statements_in_one_argument(data_dir, capsys):
    code, out, err = run(capsys, "sql", "SELECT count(*) AS k FROM keyframes; "
                         "SELECT 'a;b' AS s; SELECT max(chain_index) AS m FROM frames",
                         "--format", "tsv")
    assert (code, err) == (0, "")
    assert out.splitlines() == ["k", "7", "s", "a;b", "m", "5"]
    code, out, err = run(capsys, "sql", "SELECT 1 AS one; DELETE FROM keyframes")
    assert code == 2 and "DELETE is not allowed" in err
    assert "one" in out                        # the statement before ran


def test_status_shows_pause_reason_keyframe_in_progress_and_buffer(data_dir, capsys):
    conn = sqlite3.connect(data_dir / "dreamd.db")
    conn.execute("UPDATE runtime_state SET paused = 1, pause_reason = 'a game is running'")
    conn.commit()
    conn.close()
    code, out, _ = run(capsys, "status")
    assert code == 0
    lines = {line.split(None, 1)[0]: line for line in out.splitlines() if line.strip()}
    assert lines["paused"] == ("paused     yes: a game is running (`dreamd resume` resumes)")
    assert lines["buffer"] == "buffer     2 s ahead (8 frames at 4 fps) of a 30 s target"
    assert lines["making"].startswith("making     keyframe 6 (executing, attempt 1, theme "
                                      "signal, started 2026-11-30 12:02:01")
    assert "not running: run 1 pid 4242 on testhost" in lines["daemon"]
    code, out, _ = run(capsys, "status", "--json")
    report = json.loads(out)
    assert report["pause_reason"] == "a game is running"
    assert report["in_progress"]["chain_index"] == 6
    assert report["buffer"] == {"frames": 8, "seconds": 2.0, "target_seconds": 30.0,
                                "fps": 4.0}
    assert report["counts"]["frames"] == {"ready": 8, "shown": 8}


def test_status_buffer_follows_the_stored_fps_knob(data_dir, capsys):
    conn = sqlite3.connect(data_dir / "dreamd.db")
    conn.execute("""UPDATE runtime_state SET knobs = '{"display.fps": 8.0}'""")
    conn.commit()
    conn.close()
    _, out, _ = run(capsys, "status", "--json")
    assert json.loads(out)["buffer"]["seconds"] == 1.0


def test_inject_writes_its_control(data_dir, capsys):
    code, out, _ = run(capsys, "inject")
    assert code == 0 and out.startswith("control 1: inject (no daemon is running")
    conn = sqlite3.connect(data_dir / "dreamd.db")
    assert conn.execute("SELECT command, args, state FROM controls").fetchall() == \
        [("inject", "{}", "available")]
    conn.close()
