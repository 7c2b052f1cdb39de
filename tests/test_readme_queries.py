"""The documented SQL stays true (docs/ledger.md, the README's reference on the ledger):
every example query, read from there and run through
`dreamd sql`'s own read-only shell against a ledger of known contents, gives the answer
worked out by hand below; and every view in a migrated ledger is documented in the
README's Views table with exactly its columns."""

from __future__ import annotations

import re
import shutil
import sqlite3
from collections import Counter
from datetime import datetime, timedelta

import pytest
from sqlalchemy import insert, update

from dreamd.ledger import database, queries
from dreamd.ledger import transitions as tr
from dreamd.ledger.models import DaemonRun, GovernorDecision, Injection, Keyframe, Quality
from dreamd.ledger.models import utcnow
from dreamd.ledger.sql import Shell, statements
from tests.conftest import REPO
from tests.tui_ledger import prepare

README = (REPO / "docs" / "ledger.md").read_text(encoding="utf-8")   # the README's ledger part


def example_queries() -> list[str]:
    section = README.split("## Example queries", 1)[1]
    block = re.search(r"```sql\n(.*?)```", section, re.S).group(1)
    return list(statements(block.splitlines(keepends=True)))


def sql_of(statement: str) -> str:
    """The statement without its comment lines: what the answers below are keyed by."""
    return "\n".join(line for line in statement.splitlines() if not line.startswith("--"))


def documented_views() -> dict[str, list[str]]:
    table = README.split("Views:", 1)[1].split("## States", 1)[0]
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) == 3 and cells[0].startswith("`"):
            # the column names: backticked words not inside parentheses
            columns = re.sub(r"\([^()]*\)", "", cells[2])
            out[cells[0].strip("`")] = re.findall(r"`([a-z_]+)`", columns)
    return out


# ---------------------------------------------------------------- a ledger of known contents
# The README asks about a fixed afternoon ('2026-11-30 12:00' to '18:00') and about the
# last hour by SQLite's own clock, which a test cannot set: keyframes, batches, controls
# and runs are dated on DAY, frames (made and shown) relative to the real clock.

DAY = datetime(2026, 11, 30)
S = timedelta(seconds=1)


def at(hour: int, minute: int, second: float = 0) -> datetime:
    return DAY + timedelta(hours=hour, minutes=minute, seconds=second)


def stamp(when: datetime) -> str:
    """A time as the ledger stores it (SQLAlchemy's DateTime on SQLite)."""
    return when.isoformat(sep=" ", timespec="microseconds")


def keyframe(conn, chain: int, theme: str, created: datetime, *, source: str = "img2img",
             parent: int | None = None) -> int:
    """A keyframe as the planner creates it; claimed a second later."""
    kid = tr.create(conn, "keyframe", {
        "chain_index": chain, "backend": "comfyui", "theme": theme,
        "prompt": f"{theme} prompt {chain}", "negative_prompt": "", "seed": 1000 + chain,
        "denoise": 0.3, "source": source, "parent_id": parent, "width": 128, "height": 64,
        "created_at": created, "scheduled_at": created}, worker="planner",
        detail={"theme": theme})
    claim(conn, "keyframe", kid, created + S)
    return kid


def claim(conn, entity: str, row_id: int, when: datetime) -> None:
    (row,) = tr.claim(conn, entity, entity, lease_seconds=60, now=when)
    assert row.id == row_id


def completed(conn, kid: int, chain: int, when: datetime, ms: float) -> None:
    tr.complete(conn, "keyframe", kid, "keyframe", now=when, values={
        "path": f"keyframes/k{chain:05d}.png", "sha256": "0" * 64, "generation_ms": ms})


def batch(conn, chain: int, from_id: int, to_id: int, when: datetime, codec: str,
          ms: float) -> int:
    """The interpolation batch a completed keyframe creates: two in-betweens, run at once."""
    bid = tr.create(conn, "interpolation", {
        "chain_index": chain, "from_keyframe_id": from_id, "to_keyframe_id": to_id,
        "n_frames": 2, "divisor": 1.0, "created_at": when, "scheduled_at": when},
        worker="keyframe")
    claim(conn, "interpolation", bid, when + S)
    tr.complete(conn, "interpolation", bid, "interpolation", now=when + 2 * S,
                values={"codec": codec, "duration_ms": ms})
    return bid


def measured(conn, when: datetime, chain: int, *, keyframe_id: int | None = None,
             interpolation_id: int | None = None, **values) -> None:
    """A quality row as the recorder writes it (dreamd/quality/recorder.py)."""
    conn.execute(insert(Quality.__table__).values(
        entity="keyframe" if keyframe_id else "segment", chain_index=chain,
        keyframe_id=keyframe_id, interpolation_id=interpolation_id, created_at=when,
        measure_ms=1.0, **values))


def frame(conn, chain: int, t: float, made: datetime, keyframe_id: int,
          shown: datetime | None = None, evicted: datetime | None = None) -> int:
    fid = tr.create(conn, "frame", {
        "chain_index": chain, "t": t, "kind": "keyframe" if t == 0 else "inbetween",
        "keyframe_id": keyframe_id if t == 0 else None,
        "path": f"frames/f{chain:05d}_{t:.4f}.png", "created_at": made}, worker="interpolation")
    if shown:
        tr.transition(conn, "frame", fid, "ready", "shown", worker="display", now=shown,
                      values={"shown_at": shown})
    if evicted:
        tr.transition(conn, "frame", fid, "shown", "evicted", worker="janitor", now=evicted,
                      values={"evicted_at": evicted})
    return fid


def control(conn, command: str, args: str, created: datetime, to: str | None = None,
            after_ms: float = 0, error: str | None = None) -> None:
    cid = tr.create(conn, "control", {"command": command, "args": args, "created_at": created})
    if to:
        values = {"applied_at": created + timedelta(milliseconds=after_ms)}
        if error:
            values["error"] = error
        tr.transition(conn, "control", cid, "available", to, worker="controls",
                      values=values, now=values["applied_at"])


def decision(conn, when: datetime, reason: str, n: int, divisor: float, stretch: float,
             message: str) -> None:
    conn.execute(insert(GovernorDecision.__table__).values(
        at=when, run_id=2, reason=reason, message=message, interpolation_frames=n,
        resolution_divisor=divisor, stretch=stretch, fps=10.0))


def build(conn, recent: datetime) -> None:
    """The dream, in the order the daemon lives it. `recent`: a whole minute of the real
    clock ten minutes ago; `old` three hours before it."""
    old = recent - timedelta(hours=3)
    conn.execute(insert(DaemonRun.__table__).values(
        id=1, pid=4242, host="testhost", version="0.1.0", backend="comfyui",
        started_at=at(11, 28), heartbeat_at=at(12, 20), stopped_at=at(12, 20, 0.5),
        exit_reason="signal SIGTERM"))
    conn.execute(insert(DaemonRun.__table__).values(    # still running (or died unseen)
        id=2, pid=4343, host="testhost", version="0.1.0", backend="comfyui",
        started_at=at(12, 25), heartbeat_at=at(18, 2, 30)))
    k40 = keyframe(conn, 40, "ethereal", at(11, 29), source="seed")
    completed(conn, k40, 40, at(11, 30), 100.0)
    measured(conn, at(11, 30), 40, keyframe_id=k40, change=None, drift=0.0)
    k41 = keyframe(conn, 41, "ethereal", at(11, 59), parent=k40)
    completed(conn, k41, 41, at(12, 0), 204.6)             # on the afternoon's first instant
    measured(conn, at(12, 0), 41, keyframe_id=k41, change=6.0, drift=2.0)
    b40 = batch(conn, 40, k40, k41, at(12, 0, 1), "pixel", 150.0)
    measured(conn, at(12, 0, 3), 40, interpolation_id=b40, motion=1.5, flicker=0.1)
    control(conn, "set", '{"key": "display.fps", "value": 12}', at(12, 10), "applied", 250)
    control(conn, "set", '{"key": "generation.denoise", "value": 2}', at(12, 11), "rejected",
            40, error="generation.denoise: 2 is out of range (0 to 1)")
    decision(conn, at(12, 26), "draining", 2, 1.0, 1.0, "the buffer drains: 2 in-betweens")
    # keyframe 42 times out once, is retried, and completes; its error does not stay
    k42 = keyframe(conn, 42, "cathedral", at(12, 29), parent=k41)
    tr.fail(conn, "keyframe", k42, "keyframe", "ComfyUI timed out", backoff_seconds=2,
            now=at(12, 29, 31))
    claim(conn, "keyframe", k42, at(12, 29, 40))
    completed(conn, k42, 42, at(12, 30), 90.0)
    measured(conn, at(12, 30), 42, keyframe_id=k42, change=1.5, drift=4.0)    # stagnant
    b41 = batch(conn, 41, k41, k42, at(12, 30, 1), "vae", 301.0)
    measured(conn, at(12, 30, 3), 41, interpolation_id=b41, motion=2.5, flicker=0.3,
             boundary=10.0, pop=5.0)                                            # a pop
    decision(conn, at(12, 40), "stretch", 2, 1.0, 0.8, "the buffer is low: 80 %")
    k43 = keyframe(conn, 43, "cathedral", at(17, 58), source="injection", parent=k42)
    conn.execute(insert(Injection.__table__).values(
        keyframe_id=k43, kind="cache", similarity=0.41, reason="requested", weight=0.6,
        created_at=at(17, 58)))
    control(conn, "inject", "{}", at(17, 57, 59), "applied", 1500)
    completed(conn, k43, 43, at(17, 59), 110.0)
    measured(conn, at(17, 59), 43, keyframe_id=k43, change=8.0, drift=1.0)
    b42 = batch(conn, 42, k42, k43, at(17, 59, 1), "vae", 250.0)
    measured(conn, at(17, 59, 3), 42, interpolation_id=b42, motion=2.0, flicker=0.2,
             boundary=2.0, pop=0.89)
    k44 = keyframe(conn, 44, "signal", at(18, 0), source="injection", parent=k43)
    conn.execute(insert(Injection.__table__).values(
        keyframe_id=k44, kind="cache", similarity=0.2, reason="chance", weight=0.5,
        created_at=at(18, 0)))
    completed(conn, k44, 44, at(18, 0, 30), 300.0)          # just after the afternoon
    measured(conn, at(18, 0, 30), 44, keyframe_id=k44, change=2.0, drift=0.0)  # stagnant
    b43 = batch(conn, 43, k43, k44, at(18, 0, 31), "pixel", 120.0)
    measured(conn, at(18, 0, 33), 43, interpolation_id=b43, motion=1.0, flicker=0.05,
             boundary=4.5, pop=3.0)                              # a pop: 3x counts
    decision(conn, at(18, 0, 40), "stretch_end", 2, 1.0, 1.0, "back at 10 fps")
    k45 = keyframe(conn, 45, "signal", at(18, 1), parent=k44)
    tr.fail(conn, "keyframe", k45, "keyframe", "workflow rejected", permanent=True,
            now=at(18, 1, 5))
    k46 = keyframe(conn, 46, "signal", at(18, 2), parent=k44)
    tr.fail(conn, "keyframe", k46, "keyframe", "ComfyUI timed out", backoff_seconds=2,
            now=at(18, 2, 30))
    control(conn, "pause", "{}", at(18, 3))                 # not applied yet
    # retention took keyframe 42's image; its thumbnail stays
    conn.execute(update(Keyframe.__table__).where(Keyframe.__table__.c.id == k42)
                 .values(pruned_at=at(18, 5), thumb_path="thumbs/k00042.jpg"))
    # frames: chain 41's long gone but its last, shown after a pause; 42 playing
    third = 1 / 3
    frame(conn, 41, 0.0, old, k41, shown=old + 10 * S, evicted=old + 30 * S)
    frame(conn, 41, third, old + S, k41, shown=old + 20 * S, evicted=old + 30 * S)
    frame(conn, 41, 2 * third, old + 2 * S, k41, shown=recent + 5 * S)
    frame(conn, 42, 0.0, recent + S, k42, shown=recent + 10 * S)
    playhead = frame(conn, 42, third, recent + 2 * S, k42, shown=recent + 70 * S)
    frame(conn, 42, 2 * third, recent + 3 * S, k42)
    for i, t in enumerate((0.0, third, 2 * third)):
        frame(conn, 43, t, recent + (61 + i) * S, k43)
    frame(conn, 44, 0.0, recent + 64 * S, k44)
    queries.update_runtime(conn, playhead_frame_id=playhead, playhead_chain_index=42,
                           playhead_t=third, frames_shown=5)


def answers(recent: datetime) -> dict[str, tuple[list[str], list[tuple]]]:
    """Each README query (its SQL) -> its columns and rows, worked out from `build`.
    The keys are the README's SQL as written there, long lines included."""
    old, later = recent - timedelta(hours=3), recent + timedelta(minutes=1)
    third = 1 / 3
    minutes: dict[str, tuple[int, int, int]] = {}
    for minute, counts in (     # throughput_per_minute: keyframes, frames made, shown
            ("2026-11-30 11:30", (1, 0, 0)), ("2026-11-30 12:00", (1, 0, 0)),
            ("2026-11-30 12:30", (1, 0, 0)), ("2026-11-30 17:59", (1, 0, 0)),
            ("2026-11-30 18:00", (1, 0, 0)), (f"{old:%Y-%m-%d %H:%M}", (0, 3, 2)),
            (f"{recent:%Y-%m-%d %H:%M}", (0, 3, 2)), (f"{later:%Y-%m-%d %H:%M}", (0, 4, 1))):
        # summed: run on that very afternoon, the real clock's minutes meet DAY's
        minutes[minute] = tuple(map(sum, zip(minutes.get(minute, (0, 0, 0)), counts)))
    per_second = {0: 0.0, 1: 0.02, 2: 0.03, 3: 0.05, 4: 0.07}     # round(n / 60, 2)
    return {
        """SELECT theme, count(*) AS keyframes, round(avg(generation_ms)) AS ms
FROM keyframes WHERE state = 'completed' GROUP BY theme;""":
            (["theme", "keyframes", "ms"],
             [("ethereal", 2, 152.0), ("cathedral", 2, 100.0), ("signal", 1, 300.0)]),

        """SELECT f.chain_index, f.t, f.path, k.prompt
FROM runtime_state r JOIN frames f ON f.id = r.playhead_frame_id
JOIN keyframes k ON k.chain_index = f.chain_index AND k.state = 'completed';""":
            (["chain_index", "t", "path", "prompt"],
             [(42, third, "frames/f00042_0.3333.png", "cathedral prompt 42")]),

        """SELECT count(*) AS ready_ahead FROM frames f, runtime_state r
WHERE f.state = 'ready' AND (f.chain_index, f.t) > (r.playhead_chain_index, r.playhead_t);""":
            (["ready_ahead"], [(5,)]),             # 42 at 2/3, 43 at 0, 1/3, 2/3, 44 at 0

        """SELECT at, from_state, to_state, event, worker, detail FROM transitions
WHERE entity = 'keyframe' AND entity_id = (SELECT id FROM keyframes WHERE chain_index = 42)
ORDER BY id;""":
            (["at", "from_state", "to_state", "event", "worker", "detail"], [
                (stamp(at(12, 29)), None, "available", "created", "planner",
                 '{"theme": "cathedral"}'),
                (stamp(at(12, 29, 1)), "available", "executing", "claimed", "keyframe",
                 '{"attempt": 1}'),
                (stamp(at(12, 29, 31)), "executing", "retryable", "failed", "keyframe",
                 '{"error": "ComfyUI timed out", "why": "will retry"}'),
                (stamp(at(12, 29, 40)), "retryable", "available", "staged", "keyframe", None),
                (stamp(at(12, 29, 40)), "available", "executing", "claimed", "keyframe",
                 '{"attempt": 2}'),
                (stamp(at(12, 30)), "executing", "completed", "completed", "keyframe", None)]),

        """SELECT chain_index, state, attempt, error FROM keyframes WHERE error IS NOT NULL;""":
            (["chain_index", "state", "attempt", "error"],
             [(45, "discarded", 1, "workflow rejected"),
              (46, "retryable", 1, "ComfyUI timed out")]),

        """SELECT chain_index, n_frames, codec, round(duration_ms / (n_frames + 1)) AS ms_per_frame
FROM interpolations WHERE state = 'completed' ORDER BY duration_ms DESC LIMIT 5;""":
            (["chain_index", "n_frames", "codec", "ms_per_frame"],
             [(41, 2, "vae", 100.0), (42, 2, "vae", 83.0), (40, 2, "pixel", 50.0),
              (43, 2, "pixel", 40.0)]),

        """SELECT strftime('%H:%M', shown_at) AS minute, count(*) FROM frames
WHERE shown_at > datetime('now', '-1 hour') GROUP BY minute;""":
            (["minute", "count(*)"], [(f"{recent:%H:%M}", 2), (f"{later:%H:%M}", 1)]),

        """SELECT chain_index, theme, completed_at, coalesce(thumb_path, path) AS picture
FROM keyframes WHERE completed_at BETWEEN '2026-11-30 12:00' AND '2026-11-30 18:00';""":
            (["chain_index", "theme", "completed_at", "picture"],
             [(41, "ethereal", stamp(at(12, 0)), "keyframes/k00041.png"),
              (42, "cathedral", stamp(at(12, 30)), "thumbs/k00042.jpg"),
              (43, "cathedral", stamp(at(17, 59)), "keyframes/k00043.png")]),

        """SELECT at, reason, interpolation_frames AS n, resolution_divisor AS divisor, stretch, message
FROM governor_decisions ORDER BY id DESC LIMIT 10;""":
            (["at", "reason", "n", "divisor", "stretch", "message"],
             [(stamp(at(18, 0, 40)), "stretch_end", 2, 1.0, 1.0, "back at 10 fps"),
              (stamp(at(12, 40)), "stretch", 2, 1.0, 0.8, "the buffer is low: 80 %"),
              (stamp(at(12, 26)), "draining", 2, 1.0, 1.0,
               "the buffer drains: 2 in-betweens")]),

        """SELECT id, pid, started_at, stopped_at, exit_reason FROM daemon_runs ORDER BY id;""":
            (["id", "pid", "started_at", "stopped_at", "exit_reason"],
             [(1, 4242, stamp(at(11, 28)), stamp(at(12, 20, 0.5)), "signal SIGTERM"),
              (2, 4343, stamp(at(12, 25)), None, None)]),

        """SELECT * FROM throughput_per_minute ORDER BY minute DESC LIMIT 10;""":
            (["minute", "keyframes", "frames_made", "frames_shown", "fps_made", "fps_shown"],
             [(minute, k, made, shown, per_second[made], per_second[shown])
              for minute, (k, made, shown) in sorted(minutes.items(), reverse=True)]),

        """SELECT * FROM pipeline_counts;""":
            (["table", "state", "rows"],
             [("keyframes", "completed", 5), ("keyframes", "discarded", 1),
              ("keyframes", "retryable", 1), ("interpolations", "completed", 4),
              ("frames", "evicted", 2), ("frames", "ready", 5), ("frames", "shown", 3),
              ("controls", "applied", 2), ("controls", "available", 1),
              ("controls", "rejected", 1)]),

        """SELECT chain_index, injection, theme, picture FROM keyframe_history
WHERE injection_reason = 'requested';""":
            (["chain_index", "injection", "theme", "picture"],
             [(43, "cache", "cathedral", "keyframes/k00043.png")]),

        # hours of DAY: 11:00 only keyframe 40 (the first: no change, no segment yet)
        """SELECT hour, segments, motion_avg, flicker_max, pops, drift_max, change_avg, stagnant
FROM quality_per_hour ORDER BY hour;""":
            (["hour", "segments", "motion_avg", "flicker_max", "pops", "drift_max",
              "change_avg", "stagnant"],
             [("2026-11-30 11:00", 0, None, None, 0, 0.0, None, 0),
              ("2026-11-30 12:00", 2, 2.0, 0.3, 1, 4.0, 3.75, 1),
              ("2026-11-30 17:00", 1, 2.0, 0.2, 0, 1.0, 8.0, 0),
              ("2026-11-30 18:00", 1, 1.0, 0.05, 1, 0.0, 2.0, 1)]),

        """SELECT chain_index, round(pop, 1) AS pop, round(boundary, 1) AS boundary,
       round(motion, 2) AS motion, created_at
FROM quality WHERE entity = 'segment' AND pop >= 3 ORDER BY pop DESC LIMIT 5;""":
            (["chain_index", "pop", "boundary", "motion", "created_at"],
             [(41, 5.0, 10.0, 2.5, stamp(at(12, 30, 3))),
              (43, 3.0, 4.5, 1.0, stamp(at(18, 0, 33)))]),

        """SELECT command, args, state, error, latency_ms FROM control_log ORDER BY control_id DESC LIMIT 10;""":
            (["command", "args", "state", "error", "latency_ms"],
             [("pause", "{}", "available", None, None),
              ("inject", "{}", "applied", None, 1500.0),
              ("set", '{"key": "generation.denoise", "value": 2}', "rejected",
               "generation.denoise: 2 is out of range (0 to 1)", 40.0),
              ("set", '{"key": "display.fps", "value": 12}', "applied", None, 250.0)]),
    }


@pytest.fixture(scope="module")
def known(tmp_path_factory, ledger_template):
    """(ledger path, its answers): a ledger holding `build`'s dream."""
    db = tmp_path_factory.mktemp("readme-known") / "dreamd.db"
    shutil.copy(ledger_template, db)
    recent = utcnow().replace(second=0, microsecond=0) - timedelta(minutes=10)
    engine = database.writer(db)
    try:
        with engine.begin() as conn:
            build(conn, recent)
    finally:
        engine.dispose()
    return db, answers(recent)


def test_the_readme_has_example_queries():
    assert len(example_queries()) >= 12


def test_every_example_query_has_its_answer_here(known):
    """A query added, changed or removed in the README fails here until its answer is
    worked out again."""
    _, expected = known
    assert sorted(sql_of(q) for q in example_queries()) == sorted(expected)


@pytest.mark.parametrize("query", example_queries(), ids=lambda q: q.splitlines()[0][:60])
def test_each_example_query_gives_its_answer(known, query):
    db, expected = known
    assert sql_of(query) in expected, "a README query without its answer in this test"
    columns, rows = expected[sql_of(query)]
    shell = Shell(db)
    try:
        got_columns, got = shell.execute(query)
        got = list(got)
    finally:
        shell.close()
    assert got_columns == columns
    if "ORDER BY" in query:
        assert got == rows
    else:                                   # no order asked for: the same rows, any order
        assert Counter(got) == Counter(rows)


# ---------------------------------------------------------------- the views

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
