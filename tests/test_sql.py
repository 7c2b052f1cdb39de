"""`dreamd sql` is read-only by construction and bounded (issue 10, item 9): the attacks
from the issue leave the ledger and the file system as they were, a runaway query stops
at its time bound, and a huge result streams in bounded memory."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, dreamd_cmd


@pytest.fixture
def ledger(dreamd_env) -> Path:
    subprocess.run(dreamd_cmd("db", "upgrade"), env=dreamd_env, check=True,
                   capture_output=True)
    db = Path(dreamd_env["DREAMD_DATA_DIR"]) / "dreamd.db"
    sql(dreamd_env, "SELECT 1")          # readers' -shm/-wal exist from here on
    return db


def sql(env, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(dreamd_cmd("sql", *args), env=env, capture_output=True, text=True,
                          timeout=120, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def snapshot(db: Path, *folders: Path) -> tuple:
    """The ledger's bytes and schema, and every file under `folders`."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name"
                              ).fetchall()
        rows = conn.execute("SELECT count(*) FROM transitions").fetchone()
    finally:
        conn.close()
    files = sorted(str(p) for f in folders for p in f.rglob("*"))
    return hashlib.sha256(db.read_bytes()).hexdigest(), schema, rows, files


def attacks(db: Path, tmp: Path) -> list[tuple[str, str]]:
    """(script, what the refusal names): the issue's, then their plain cousins."""
    w = f"ATTACH '{db}' AS w;"
    return [
        (f"{w} DROP TABLE w.transitions;", "ATTACH"),
        (f"{w} CREATE TABLE w.x(a);", "ATTACH"),
        (f"{w} DROP VIEW w.frame_history;", "ATTACH"),
        (f"ATTACH '{tmp / 'x.db'}' AS x;", "ATTACH"),
        (f"VACUUM INTO '{tmp / 'copy.db'}';", "VACUUM"),
        ("VACUUM;", "VACUUM"),
        ("DROP TABLE transitions;", "DROP"),
        ("CREATE TABLE x(a);", "CREATE"),
        ("CREATE TEMP TABLE x(a);", "CREATE"),
        ("DROP VIEW frame_history;", "DROP"),
        ("ALTER TABLE frames ADD COLUMN z;", "ALTER TABLE"),
        ("INSERT INTO controls (command, args, state) VALUES ('pause', '{}', 'available');",
         "INSERT"),
        ("DELETE FROM transitions;", "DELETE"),
        ("PRAGMA user_version = 7;", "PRAGMA user_version"),
        ("PRAGMA journal_mode = DELETE;", "PRAGMA journal_mode"),
        ("BEGIN IMMEDIATE;", "BEGIN"),
        ("SELECT load_extension('x');", "load_extension"),
    ]


@pytest.mark.slow
def test_attacks_change_nothing(dreamd_env, ledger, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    before = snapshot(ledger, ledger.parent, outside)
    for script, named in attacks(ledger, outside):
        first = script.split(";")[0]
        proc = sql(dreamd_env, first)                     # one statement as an argument
        assert proc.returncode == 2, (script, proc.stdout, proc.stderr)
        assert re.fullmatch(r"dreamd sql is read-only: .* is not allowed\n", proc.stderr), \
            proc.stderr
        assert named in proc.stderr, (script, proc.stderr)
        piped = sql(dreamd_env, stdin=script)             # the whole script on stdin
        assert piped.returncode == 2 and "Traceback" not in piped.stderr, piped.stderr
        assert snapshot(ledger, ledger.parent, outside) == before, script


def test_queries_and_views_still_work(dreamd_env, ledger):
    """Every example query in docs/ledger.md, and every view, passes the authorizer."""
    readme = (REPO / "docs" / "ledger.md").read_text(encoding="utf-8")
    block = readme.split("## Example queries", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    queries = [q.strip() for q in block.split(";") if q.strip()]
    assert len(queries) >= 5
    queries += ["SELECT * FROM frame_history", "SELECT * FROM keyframe_timing",
                "SELECT * FROM injection_log", "PRAGMA table_info(frames)",
                "SELECT name FROM pragma_table_info('keyframes')",
                "SELECT * FROM json_each('[1, 2]')", "PRAGMA user_version",
                "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r LIMIT 3) "
                "SELECT sum(x) FROM r"]
    for q in queries:
        proc = sql(dreamd_env, q)
        assert proc.returncode == 0, (q, proc.stderr)


def test_a_runaway_query_stops_at_the_time_bound(dreamd_env, ledger):
    runaway = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) " \
              "SELECT count(*) FROM r"
    proc = sql(dreamd_env, runaway, "--timeout", "1")
    assert proc.returncode == 2
    assert proc.stderr == "dreamd sql: stopped after 1 s (--timeout SECONDS raises the " \
                          "bound, 0 removes it)\n"


MILLION = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r LIMIT 1000000) " \
          "SELECT x, 'row ' || x AS label FROM r"


def run_measured(env, args: list[str], out) -> tuple[int, int]:
    """(exit code, peak resident memory in MiB) of one `dreamd sql` writing to `out`.
    The tests pass `--timeout 0`: they measure memory, and a loaded machine may take more
    than the default 30 s for a million rows.

    Read from /proc (VmHWM of the process's own memory after exec): the rusage of a
    child started by vfork counts the parent's peak too, and pytest's is large."""
    proc = subprocess.Popen(dreamd_cmd("sql", *args), env=env, stdout=out,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    status = Path(f"/proc/{proc.pid}/status")
    peak = 0
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) // 1024)
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    return proc.returncode, peak


def test_a_million_rows_in_a_table_show_the_first_thousand(dreamd_env, ledger, tmp_path):
    out = tmp_path / "out.txt"
    with out.open("w") as f:
        rc, peak = run_measured(dreamd_env, [MILLION, "--timeout", "0"], f)
    text = out.read_text()
    assert rc == 0
    assert "row 1000 " in text and "row 1001 " not in text
    assert text.rstrip().endswith("… 999000 more rows not shown (--max-rows N shows more, 0 "
                                  "all of them)")
    assert peak < 100, f"{peak} MiB"


@pytest.mark.slow
def test_a_million_rows_stream_in_json(dreamd_env, ledger, tmp_path):
    out = tmp_path / "out.json"
    with out.open("w") as f:
        rc, peak = run_measured(dreamd_env, [MILLION, "--format", "json", "--timeout", "0"], f)
    assert rc == 0
    with out.open() as f:
        lines = f.readlines()                             # [, one row a line, ]
    assert len(lines) == 1_000_002 and lines[0] == "[\n" and lines[-1] == "]\n"
    assert json.loads(lines[-2]) == {"x": 1_000_000, "label": "row 1000000"}
    assert peak < 100, f"{peak} MiB"


def test_max_rows_and_formats(dreamd_env, ledger):
    q = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r LIMIT 12) " \
        "SELECT x, x * 2 AS y FROM r"
    js = sql(dreamd_env, q, "--format", "json")
    assert js.returncode == 0 and json.loads(js.stdout)[11] == {"x": 12, "y": 24}
    assert json.loads(sql(dreamd_env, "SELECT 1 WHERE 0", "--format", "json").stdout) == []
    tsv = sql(dreamd_env, q, "--format", "tsv", "--max-rows", "5")
    assert tsv.stdout.splitlines() == ["x\ty", *(f"{i}\t{2 * i}" for i in range(1, 6))]
    assert tsv.stderr == "dreamd sql: 7 more rows not shown (--max-rows N shows more, 0 all " \
                         "of them)\n"
    table = sql(dreamd_env, q, "--max-rows", "0")
    assert " 12 " in table.stdout and "not shown" not in table.stdout
    for flag, value in (("--timeout", "nan"), ("--timeout", "-1"), ("--max-rows", "-5")):
        bad = sql(dreamd_env, q, flag, value)
        assert bad.returncode == 2 and "expected a number >= 0" in bad.stderr
