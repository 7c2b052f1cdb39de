"""The README's SQL stays true: every example query runs, through `dreamd sql`'s own
read-only shell, against a real ledger holding a short dream (tests/tui_ledger.py); and
every view in a migrated ledger is documented in the README's Views table with exactly
its columns."""

from __future__ import annotations

import re
import sqlite3

import pytest

from dreamd.ledger.sql import Shell, statements
from tests.conftest import REPO
from tests.tui_ledger import prepare

README = (REPO / "README.md").read_text(encoding="utf-8")


def example_queries() -> list[str]:
    section = README.split("### Example queries", 1)[1]
    block = re.search(r"```sql\n(.*?)```", section, re.S).group(1)
    return list(statements(block.splitlines(keepends=True)))


def documented_views() -> dict[str, list[str]]:
    table = README.split("Views:", 1)[1].split("### States", 1)[0]
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) == 3 and cells[0].startswith("`"):
            # the column names: backticked words not inside parentheses
            columns = re.sub(r"\([^()]*\)", "", cells[2])
            out[cells[0].strip("`")] = re.findall(r"`([a-z_]+)`", columns)
    return out


@pytest.fixture(scope="module")
def ledger(tmp_path_factory, ledger_template):
    d = tmp_path_factory.mktemp("readme") / "data"
    db = prepare(d, ledger_template)
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO controls (command, args, state, created_at, applied_at) VALUES "
                 "('inject', '{}', 'applied', '2026-11-30 12:03:00.000000', "
                 "'2026-11-30 12:03:00.040000')")
    conn.execute("UPDATE injections SET reason = 'requested'")
    conn.commit()
    conn.close()
    return db


def test_the_readme_has_example_queries():
    assert len(example_queries()) >= 12


@pytest.mark.parametrize("query", example_queries(), ids=lambda q: q.splitlines()[0][:60])
def test_each_example_query_runs(ledger, query):
    shell = Shell(ledger)
    try:
        columns, rows = shell.execute(query)
        assert columns
        list(rows)
    finally:
        shell.close()


def test_the_new_views_answer_what_the_readme_says(ledger):
    shell = Shell(ledger)
    try:
        _, rows = shell.execute("SELECT command, state, latency_ms FROM control_log")
        assert list(rows) == [("inject", "applied", 40.0)]
        _, rows = shell.execute("SELECT chain_index, injection, injection_reason, picture "
                                "FROM keyframe_history WHERE chain_index IN (0, 4)")
        assert list(rows) == [(0, None, None, "thumbs/k00000.jpg"),
                              (4, "cache", "requested", "keyframes/k00004.png")]
        _, rows = shell.execute("SELECT minute, keyframes, frames_made, frames_shown "
                                "FROM throughput_per_minute")
        assert list(rows) == [("2026-11-30 12:00", 3, 6, 0), ("2026-11-30 12:01", 3, 9, 8),
                              ("2026-11-30 12:02", 0, 1, 0)]
        _, rows = shell.execute('SELECT "table", state, rows FROM pipeline_counts '
                                "WHERE \"table\" = 'frames' ORDER BY state")
        assert list(rows) == [("frames", "ready", 8), ("frames", "shown", 8)]
    finally:
        shell.close()


def test_every_view_is_documented_with_its_columns(ledger):
    conn = sqlite3.connect(ledger)
    try:
        views = [r[0] for r in conn.execute("SELECT name FROM sqlite_master "
                                            "WHERE type = 'view' ORDER BY name")]
        actual = {v: [r[1] for r in conn.execute(f"PRAGMA table_info({v})")] for v in views}
    finally:
        conn.close()
    documented = documented_views()
    assert sorted(documented) == sorted(actual)
    for view, columns in actual.items():
        assert documented[view] == columns, view
