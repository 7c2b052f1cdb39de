"""The janitor in-process on a real ledger and real files (issue 16), against the README:
it rescues expired leases (back to `available`, or `discarded` with the attempts used
up, recorded as `abandoned`), enforces retention, keeps the data dir within
`storage.budget_gb` (a budget too small is said once, with a size that would do),
pauses generation below `storage.min_free_gb` and resumes it by itself once 10 %
above the floor, and checkpoints the WAL. The free-space floor is tested on a small
tmpfs of its own, where the free space is exact."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import time
import types
from datetime import timedelta

import pytest
from sqlalchemy import text

from dreamd.ledger import transitions as tr
from dreamd.ledger.models import utcnow
from dreamd.storage import space
from dreamd.workers import janitor
from dreamd.workers.janitor import CHECKPOINT_EVERY, FREE_EVERY, MEASURE_EVERY, Janitor
from tests.conftest import mount_tmpfs
from tests.test_worker_planner import sql, write

GB, MB = space.GB, space.MB
FRAME_CHAIN = itertools.count()
NOFLOOR = "[storage]\nmin_free_gb = 0\nbudget_gb = 0\n"


@pytest.fixture
def make_ctx(contexts):
    return lambda config_text=NOFLOOR, path=None: contexts(config_text, path)


@pytest.fixture
def disk(tmp_path, db_path):
    """A 16 MB file system holding a copy of the migrated ledger: its free space is the
    janitor's to measure, exactly."""
    for d in mount_tmpfs(tmp_path / "disk", "16m"):
        shutil.copy(db_path, d / "dreamd.db")
        yield d / "dreamd.db"


def job(ctx, entity: str, *, lease_left: float, attempt: int = 1, max_attempts: int = 3) -> int:
    """An executing row of `entity` whose lease ends `lease_left` seconds from now."""
    if entity == "interpolation":
        a = job(ctx, "keyframe", lease_left=0)
        write(ctx, "UPDATE keyframes SET state = 'completed' WHERE id = :i", i=a)
    with ctx.engine.begin() as conn:
        if entity == "keyframe":
            rid = tr.create(conn, "keyframe", {
                "chain_index": 0, "backend": "procedural", "theme": "t", "prompt": "p",
                "seed": 1, "denoise": 0.3, "source": "seed", "width": 64, "height": 64,
                "max_attempts": max_attempts})
        elif entity == "interpolation":
            rid = tr.create(conn, "interpolation", {"chain_index": 0, "from_keyframe_id": a,
                                                    "to_keyframe_id": a, "n_frames": 4,
                                                    "max_attempts": max_attempts})
        else:
            fid = tr.create(conn, "frame", {"chain_index": 900 + next(FRAME_CHAIN),
                                            "t": 0.0, "kind": "keyframe", "path": "x.png"})
            rid = tr.create(conn, "embedding", {"frame_id": fid, "model": "m",
                                                "max_attempts": max_attempts})
        table = {"keyframe": "keyframes", "interpolation": "interpolations",
                 "embedding": "embeddings"}[entity]
        conn.execute(text(f"UPDATE {table} SET state = 'executing', attempt = :a, "
                          "lease_owner = 'dead:1:1:w', lease_expires_at = :e WHERE id = :i"),
                     {"a": attempt, "e": utcnow() + timedelta(seconds=lease_left), "i": rid})
    return rid


def state(ctx, entity: str, rid: int) -> str:
    table = {"keyframe": "keyframes", "interpolation": "interpolations",
             "embedding": "embeddings"}[entity]
    return sql(ctx, f"SELECT state FROM {table} WHERE id = :i", i=rid)[0][0]


def abandoned(ctx) -> list[tuple]:
    return [tuple(r) for r in sql(ctx, "SELECT entity, entity_id, from_state, to_state, worker "
                                       "FROM transitions WHERE event = 'abandoned' ORDER BY id")]


def shown_frames(ctx, n: int, size: int, first: int = 0) -> list[int]:
    """n shown frames in playback order, each file `size` bytes."""
    (ctx.cfg.data_dir / "frames").mkdir(exist_ok=True)
    ids = []
    with ctx.engine.begin() as conn:
        for i in range(first, first + n):
            rel = f"frames/f{i:04d}.png"
            (ctx.cfg.data_dir / rel).write_bytes(os.urandom(size))
            fid = tr.create(conn, "frame", {"chain_index": i // 4, "t": (i % 4) / 4,
                                            "kind": "inbetween", "path": rel})
            conn.execute(text("UPDATE frames SET state = 'shown' WHERE id = :i"), {"i": fid})
            ids.append(fid)
    return ids


def live_frames(ctx) -> int:
    return sql(ctx, "SELECT count(*) FROM frames WHERE state = 'shown'")[0][0]


def recorded(ctx) -> dict:
    return json.loads(sql(ctx, "SELECT storage FROM runtime_state WHERE id = 1")[0][0])


# ---------------------------------------------------------------- leases

def test_with_nothing_leased_the_rescue_takes_no_write_lock(make_ctx, db_path):
    """Every 5 s on a dream with nothing to make: a read finds no leased row, and the
    write transaction is not begun (another process holding the lock is not waited on)."""
    from tests.conftest import WriteLock

    ctx = make_ctx()
    job(ctx, "keyframe", lease_left=-5)
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE keyframes SET state = 'completed'"))
    with WriteLock(db_path):
        assert janitor.rescue_all(ctx) == 0


def test_expired_leases_are_rescued_and_live_ones_kept(make_ctx, caplog):
    ctx = make_ctx()
    k_dead = job(ctx, "keyframe", lease_left=-5)
    k_live = job(ctx, "keyframe", lease_left=300)
    k_used = job(ctx, "keyframe", lease_left=-5, attempt=3, max_attempts=3)
    i_dead = job(ctx, "interpolation", lease_left=-1)
    e_dead = job(ctx, "embedding", lease_left=-1)
    e_mine = job(ctx, "embedding", lease_left=-1)
    ctx.in_hand.add(("embedding", e_mine))        # ours: a busy ledger kept it from renewal
    ctx.in_hand.add(("keyframe", e_mine + 1000))  # another entity's id: spares nothing here
    caplog.set_level(logging.WARNING, logger="dreamd")
    assert janitor.rescue_all(ctx) == 4
    assert [state(ctx, "keyframe", i) for i in (k_dead, k_live, k_used)] == [
        "available", "executing", "discarded"]
    assert (state(ctx, "interpolation", i_dead), state(ctx, "embedding", e_dead),
            state(ctx, "embedding", e_mine)) == ("available", "available", "executing")
    assert abandoned(ctx) == [
        ("keyframe", k_dead, "executing", "available", "janitor"),
        ("keyframe", k_used, "executing", "discarded", "janitor"),
        ("interpolation", i_dead, "executing", "available", "janitor"),
        ("embedding", e_dead, "executing", "available", "janitor")]
    assert [r.getMessage() for r in caplog.records] == [
        f"1 keyframe row(s) abandoned by a dead worker -> available: [{k_dead}]",
        f"1 keyframe row(s) abandoned by a dead worker -> discarded: [{k_used}]",
        f"1 interpolation row(s) abandoned by a dead worker -> available: [{i_dead}]",
        f"1 embedding row(s) abandoned by a dead worker -> available: [{e_dead}]"]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert janitor.rescue_all(ctx) == 0                   # nothing left to rescue


def test_at_start_every_lease_is_abandoned(make_ctx):
    """README: at start the daemon rescues every lease left by a dead run."""
    ctx = make_ctx()
    live = job(ctx, "keyframe", lease_left=300)
    mine = job(ctx, "embedding", lease_left=300)
    ctx.in_hand.add(("embedding", mine))
    assert janitor.rescue_all(ctx, everything=True) == 2
    assert (state(ctx, "keyframe", live), state(ctx, "embedding", mine)) == (
        "available", "available")
    assert [e[-1] for e in abandoned(ctx)] == ["startup", "startup"]


def test_the_log_names_the_first_ten_rows(make_ctx, caplog):
    ctx = make_ctx()
    ids = [job(ctx, "embedding", lease_left=-1) for _ in range(12)]
    caplog.set_level(logging.WARNING, logger="dreamd")
    assert janitor.rescue_all(ctx) == 12
    assert [r.getMessage() for r in caplog.records] == [
        f"12 embedding row(s) abandoned by a dead worker -> available: {ids[:10]}"]


def test_a_tick_rescues_and_measures(make_ctx):
    ctx = make_ctx()
    dead = job(ctx, "interpolation", lease_left=-1)
    Janitor(ctx).tick()
    assert state(ctx, "interpolation", dead) == "available"
    assert recorded(ctx)["low"] is None and recorded(ctx)["budget"] == 0


# ---------------------------------------------------------------- retention

def test_enforce_retention_evicts_shown_frames_beyond_max_output_frames(make_ctx):
    ctx = make_ctx()
    ctx.set_knobs({"display.max_output_frames": 3})
    ids = shown_frames(ctx, 7, 100)
    assert janitor.enforce_retention(ctx) == 4
    kept = [r[0] for r in sql(ctx, "SELECT id FROM frames WHERE state = 'shown' ORDER BY id")]
    assert kept == ids[4:]
    assert sorted(p.name for p in (ctx.cfg.data_dir / "frames").iterdir()) == [
        "f0004.png", "f0005.png", "f0006.png"]
    assert janitor.enforce_retention(ctx) == 0


# ---------------------------------------------------------------- the WAL

def test_the_wal_is_checkpointed_once_a_minute(make_ctx, db_path):
    ctx = make_ctx()
    jan = Janitor(ctx)

    def main_file() -> str:
        return hashlib.sha256(db_path.read_bytes()).hexdigest()

    jan.tick()                      # measures: writes runtime_state into the WAL
    before = main_file()
    jan.last_checkpoint = time.monotonic() - CHECKPOINT_EVERY / 2
    shown_frames(ctx, 3, 10, first=0)   # more in the WAL
    jan.tick()
    assert main_file() == before    # half a minute: still all in the WAL
    jan.last_checkpoint = time.monotonic() - 60.5
    jan.tick()
    assert main_file() != before    # copied into the database file
    assert time.monotonic() - jan.last_checkpoint < CHECKPOINT_EVERY / 2
    after = main_file()
    shown_frames(ctx, 3, 10, first=100)
    jan.tick()
    assert main_file() == after     # the minute starts again


def test_the_heartbeat_is_this_runs(make_ctx):
    ctx = make_ctx()
    old = utcnow() - timedelta(hours=1)
    for rid in (1, 2):
        write(ctx, "INSERT INTO daemon_runs (id, pid, host, version, started_at, heartbeat_at)"
                   " VALUES (:i, 1, 'h', 'v', :t, :t)", i=rid, t=old)
    start = utcnow()
    janitor.heartbeat(ctx)
    beats = dict(sql(ctx, "SELECT id, heartbeat_at FROM daemon_runs"))
    assert beats[1] >= start.isoformat(sep=" ") and beats[2] == old.isoformat(sep=" ")


# ---------------------------------------------------------------- the budget

def test_the_data_dir_is_walked_once_a_minute(make_ctx):
    ctx = make_ctx("[storage]\nmin_free_gb = 0\nbudget_gb = 1.5\n")
    jan = Janitor(ctx)
    jan.storage()                                          # the first tick measures
    first = recorded(ctx)
    assert first["budget"] == int(1.5 * GB) and first["floor"] == 0 and first["low"] is None
    assert first["parts"]["ledger"] > 0 and "frames" not in first["parts"]
    assert set(first) == {"total", "parts", "files", "free", "budget", "floor", "low",
                          "wal_held"}
    shown_frames(ctx, 2, 1000)
    jan.measured_at = time.monotonic() - (MEASURE_EVERY - 2)
    jan.storage()
    assert "frames" not in recorded(ctx)["parts"]          # not yet
    jan.measured_at = time.monotonic() - (MEASURE_EVERY + 0.5)
    jan.storage()
    assert recorded(ctx)["parts"]["frames"] == 2000 and recorded(ctx)["files"]["frames"] == 2


def test_over_budget_the_oldest_shown_frames_go_until_it_fits(make_ctx):
    """README: over storage.budget_gb the oldest deletable files go first (shown frames
    down to the last 10); once under, nothing more."""
    ctx = make_ctx()
    ids = shown_frames(ctx, 30, 10_000)
    managed = space.measure(ctx.cfg.data_dir).managed
    ctx.cfg.storage.budget_gb = (managed - 25_000) / GB   # 3 frames' worth over
    jan = Janitor(ctx)
    jan.storage()                                          # measures, then deletes
    kept = [r[0] for r in sql(ctx, "SELECT id FROM frames WHERE state = 'shown' ORDER BY id")]
    assert kept == ids[3:]
    assert not (ctx.cfg.data_dir / "frames/f0002.png").exists()
    assert (ctx.cfg.data_dir / "frames/f0003.png").exists()
    for _ in range(3):                                     # under budget now: no more
        jan.storage()
    assert live_frames(ctx) == 27


def test_each_storage_pass_logs_its_timing_for_the_benches(make_ctx, caplog, monkeypatch):
    """bench/churn.py reads `timing janitor id=0 storage_ms=… freed=…` debug lines."""
    ctx = make_ctx()
    ctx.set_knobs({"display.max_output_frames": 1})
    shown_frames(ctx, 3, 1000)
    jan = Janitor(ctx)
    caplog.set_level(logging.INFO, logger="dreamd")
    jan.storage()
    assert [r for r in caplog.records if r.getMessage().startswith("timing")] == []
    shown_frames(ctx, 3, 1000, first=10)
    caplog.set_level(logging.DEBUG, logger="dreamd")
    ticks = iter([50.0, 50.0625])                 # the pass takes 62.5 ms on a set clock
    monkeypatch.setattr(janitor, "time", types.SimpleNamespace(
        monotonic=time.monotonic, perf_counter=lambda: next(ticks)))
    jan.storage()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("timing")]
    assert lines == ["timing janitor id=0 storage_ms=62.50 freed=3000"]
    # and what the pass did, for whoever reads the debug log
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retention")]
    assert len(said) == 1 and said[0].startswith("retention: PassReport(frames=3, ")
    assert said[0].endswith(", freed=3000)")


def budget_said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "storage.budget_gb" in r.getMessage()]


def test_a_budget_too_small_is_said_once_with_a_size_that_would_do(make_ctx, caplog):
    """Over the budget twice in a row with nothing freed in between: said once, naming
    the size that would do; said again only after the data dir fitted in between."""
    ctx = make_ctx("[storage]\nmin_free_gb = 0\nbudget_gb = 1\n")
    with open(ctx.cfg.data_dir / "big.bin", "wb") as f:   # sparse: costs no disk
        f.truncate(int(3.1 * GB))
    shown_frames(ctx, 14, 1000)
    caplog.set_level(logging.WARNING, logger="dreamd")
    jan = Janitor(ctx)
    jan.measure()
    assert budget_said(caplog) == []                      # the first time over: not yet
    jan.storage()                                         # frees the 4 deletable frames
    assert live_frames(ctx) == 10
    jan.storage()                                         # frees nothing: the 4 still count
    jan.measure()
    assert budget_said(caplog) == []                      # something was freed meanwhile
    jan.storage()                                         # nothing left to free
    jan.measure()
    said = budget_said(caplog)
    assert len(said) == 1
    m = re.fullmatch(r"the data dir is 3\.1 GB, over storage\.budget_gb \(1\.0 GB\), and "
                     r"nothing more can be deleted: the rest is the ledger \((\d+\.\d) kB\) "
                     r"and what playback still needs; raise storage\.budget_gb to at least "
                     r"4\.7", said[0])
    assert m and float(m[1]) > 0, said[0]
    for _ in range(2):
        jan.storage()
        jan.measure()
    assert len(budget_said(caplog)) == 1                  # once
    ctx.cfg.storage.budget_gb = 4.0
    jan.measure()                                         # fits: the next time is news
    ctx.cfg.storage.budget_gb = 1.0
    jan.measure()
    jan.measure()
    assert len(budget_said(caplog)) == 2
    assert live_frames(ctx) == 10                         # what playback needs stays


def test_a_tiny_budget_asks_for_at_least_a_tenth_of_a_gb(make_ctx, caplog):
    ctx = make_ctx("[storage]\nmin_free_gb = 0\nbudget_gb = 0.00001\n")
    caplog.set_level(logging.WARNING, logger="dreamd")
    jan = Janitor(ctx)
    jan.measure()
    jan.measure()
    assert budget_said(caplog)[0].endswith("raise storage.budget_gb to at least 0.1")


# ---------------------------------------------------------------- the free-space floor

def floor_at(ctx, nbytes: int) -> None:
    ctx.cfg.storage.min_free_gb = nbytes / GB


def measured(make_ctx, disk):
    """A janitor on the small disk, its first measurement made: (ctx, janitor, what it
    woke, the free bytes)."""
    ctx = make_ctx(NOFLOOR, path=disk)
    woken = []
    ctx.wake = woken.append
    jan = Janitor(ctx)
    jan.measure()
    return ctx, jan, woken, space.free_bytes(ctx.cfg.data_dir)


def test_below_the_floor_generation_pauses_said_once(make_ctx, disk, caplog):
    ctx, jan, woken, free = measured(make_ctx, disk)
    floor_at(ctx, free + 2 * MB)
    caplog.set_level(logging.INFO, logger="dreamd")
    jan.measure()
    low = ctx.facts["storage_low"]
    m = re.fullmatch(r"low disk space: (\d+\.\d) MB free on the data dir's disk, below the "
                     r"floor of (\d+\.\d) MB \(storage\.min_free_gb\)", low or "")
    assert m and float(m[2]) == round((free + 2 * MB) / MB, 1), low
    assert recorded(ctx)["low"] == low and recorded(ctx)["floor"] == int((free + 2 * MB))
    assert ctx.may_generate() is False and ctx.may_claim() is True
    # the deficit: back to 10 % (at least 1 MB) above the floor
    floor = free + 2 * MB
    assert abs(jan.over - (floor + floor // 10 - free)) < 32 * 1024
    jan.measure()
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"{low}: generation paused, playback goes on from the buffer; it resumes "
                    "by itself when there is room (free space or lower storage.min_free_gb)"]
    assert woken == []


def test_it_resumes_by_itself_only_once_clear_of_the_floor(make_ctx, disk, caplog):
    """Hysteresis: generation resumes 10 % (at least 1 MB) above the floor, not at it."""
    ctx, jan, woken, free = measured(make_ctx, disk)
    assert 12 * MB < free < 16 * MB                   # a band of 1.2 - 1.6 MB over the floor
    floor_at(ctx, free - MB)                          # above the floor, within the band
    jan.measure()
    assert ctx.facts["storage_low"] is None and jan.over == 0   # never low: not paused
    floor_at(ctx, free + MB // 2)
    jan.measure()
    assert ctx.facts["storage_low"]
    caplog.set_level(logging.INFO, logger="dreamd")
    caplog.clear()
    floor = free - MB
    floor_at(ctx, floor)                              # above the floor, inside the band
    jan.measure()
    assert ctx.facts["storage_low"] and woken == []
    assert abs(jan.over - (floor + floor // 10 - free)) < 32 * 1024
    assert recorded(ctx)["low"] == ctx.facts["storage_low"]
    floor_at(ctx, free - 3 * MB)                      # clear of it
    jan.measure()
    assert ctx.facts["storage_low"] is None and recorded(ctx)["low"] is None
    assert woken == ["planner"] and jan.over == 0
    assert [r.getMessage() for r in caplog.records] == ["disk space is back: generation resumes"]
    jan.measure()
    assert woken == ["planner"]                       # said and woken once


def test_a_small_floor_resumes_a_megabyte_above_it(make_ctx, disk):
    ctx = make_ctx(NOFLOOR, path=disk)
    jan = Janitor(ctx)
    free = space.free_bytes(ctx.cfg.data_dir)
    floor_at(ctx, 4 * MB)
    ctx.facts["storage_low"] = "low disk space"      # paused before
    jan.measure()
    assert ctx.facts["storage_low"] is None           # 4 MB + 1 MB < free
    floor_at(ctx, free - MB // 2)
    jan.measure()
    assert ctx.facts["storage_low"] is None           # not low before: the floor itself


class SetClock:
    """The janitor's monotonic clock, set by the test; and every walk of the data dir and
    every look at the free space counted (the real ones still run)."""

    def __init__(self, monkeypatch, at: float = 1000.0) -> None:
        self.at, self.walks, self.free_looks = at, 0, 0
        monkeypatch.setattr(janitor, "time", types.SimpleNamespace(
            monotonic=lambda: self.at, perf_counter=time.perf_counter))
        walk, free = space.measure, space.free_bytes

        def counted_walk(*args, **kwargs):
            self.walks += 1
            return walk(*args, **kwargs)

        def counted_free(*args, **kwargs):
            self.free_looks += 1
            return free(*args, **kwargs)

        monkeypatch.setattr(space, "measure", counted_walk)
        monkeypatch.setattr(space, "free_bytes", counted_free)

    def storage_at(self, jan: Janitor, at: float) -> None:
        self.at = at
        jan.storage()


def ballast(disk, nbytes: int) -> None:
    """Take nbytes of the small disk's free space (a file the janitor may not delete)."""
    (disk.parent / "ballast").write_bytes(b"\0" * nbytes)


def test_with_room_to_spare_only_the_free_space_is_looked_at_between_walks(
        make_ctx, disk, monkeypatch):
    """The walk (a stat per file) once a minute; between walks a look at the free space
    alone every FREE_EVERY, and no walk while it is clear of the resume mark."""
    ctx = make_ctx(NOFLOOR, path=disk)
    clock = SetClock(monkeypatch)
    floor_at(ctx, 4 * MB)                     # resumes at 5 MB; the disk has ~14 MB free
    jan = Janitor(ctx)
    clock.storage_at(jan, 1000.0)             # the first tick walks
    assert (clock.walks, clock.free_looks) == (1, 1)   # the walk reads the free space itself
    first = recorded(ctx)
    shown_frames(ctx, 2, 1000)
    for at in range(5, 60, 5):                # a tick every 5 s, as the daemon's
        clock.storage_at(jan, 1000.0 + at)
    assert clock.walks == 1                   # no walk in the minute
    assert clock.free_looks == 1 + 3          # looks at 15, 30 and 45 s
    assert recorded(ctx) == first             # the status keeps the last walk's sizes
    assert ctx.facts["storage_low"] is None
    clock.storage_at(jan, 1000.0 + MEASURE_EVERY)
    assert clock.walks == 2 and recorded(ctx)["parts"]["frames"] == 2000
    # the walk reset the free-space clock too: the next look is FREE_EVERY after it
    clock.storage_at(jan, 1000.0 + MEASURE_EVERY + FREE_EVERY - 1)
    assert (clock.walks, clock.free_looks) == (2, 5)


def test_with_no_floor_the_free_space_is_not_looked_at_between_walks(make_ctx, monkeypatch):
    ctx = make_ctx()                          # min_free_gb = 0
    clock = SetClock(monkeypatch)
    jan = Janitor(ctx)
    for at in range(0, 60, 5):
        clock.storage_at(jan, 1000.0 + at)
    assert (clock.walks, clock.free_looks) == (1, 1)


def test_a_drop_below_the_floor_pauses_generation_within_free_every(
        make_ctx, disk, monkeypatch, caplog):
    """The floor reacts as fast as when the data dir was walked every 15 s: the look at
    the free space finds it under the floor, and the walk and the decision come at once,
    said as before; while paused it is measured every FREE_EVERY, and it resumes by itself."""
    ctx = make_ctx(NOFLOOR, path=disk)
    woken = []
    ctx.wake = woken.append
    clock = SetClock(monkeypatch)
    free = space.free_bytes(ctx.cfg.data_dir)
    floor = free - 4 * MB                     # ~10 MB: resumes 1 MB above it
    floor_at(ctx, floor)
    jan = Janitor(ctx)
    clock.storage_at(jan, 1000.0)
    assert clock.walks == 1 and ctx.facts["storage_low"] is None
    caplog.set_level(logging.INFO, logger="dreamd")
    ballast(disk, 5 * MB)                     # ~1 MB under the floor now
    clock.storage_at(jan, 1000.0 + FREE_EVERY - 5)
    assert clock.walks == 1 and ctx.facts["storage_low"] is None   # not looked at yet
    clock.storage_at(jan, 1000.0 + FREE_EVERY)
    assert clock.walks == 2
    low = ctx.facts["storage_low"]
    assert low and low.startswith("low disk space: ") and low.endswith(
        f"below the floor of {space.human(floor)} (storage.min_free_gb)")
    assert ctx.may_generate() is False and recorded(ctx)["low"] == low
    assert abs(jan.over - (space.resume_mark(floor) - recorded(ctx)["free"])) < 1
    assert [r.getMessage() for r in caplog.records] == [
        f"{low}: generation paused, playback goes on from the buffer; it resumes by itself "
        "when there is room (free space or lower storage.min_free_gb)"]
    clock.storage_at(jan, 1000.0 + 2 * FREE_EVERY)    # paused: measured again, said once
    assert clock.walks == 3 and ctx.facts["storage_low"] == low and len(caplog.records) == 1
    (disk.parent / "ballast").unlink()
    clock.storage_at(jan, 1000.0 + 2 * FREE_EVERY + 5)
    assert clock.walks == 3 and ctx.facts["storage_low"]     # the next look decides
    clock.storage_at(jan, 1000.0 + 3 * FREE_EVERY)
    assert clock.walks == 4 and ctx.facts["storage_low"] is None and woken == ["planner"]
    assert caplog.records[-1].getMessage() == "disk space is back: generation resumes"
    clock.storage_at(jan, 1000.0 + 4 * FREE_EVERY)    # clear of the mark: no walk again
    assert clock.walks == 4


def test_near_the_floor_it_is_walked_every_free_every_but_not_paused(
        make_ctx, disk, monkeypatch):
    """Above the floor but under the resume mark generation goes on, as before; the walk
    comes at each look so that a drop under the floor is decided by it at once."""
    ctx = make_ctx(NOFLOOR, path=disk)
    clock = SetClock(monkeypatch)
    free = space.free_bytes(ctx.cfg.data_dir)
    floor = free - 4 * MB
    floor_at(ctx, floor)
    jan = Janitor(ctx)
    clock.storage_at(jan, 1000.0)
    ballast(disk, 3 * MB + MB // 2)           # ~0.5 MB above the floor, under its mark
    for k in (1, 2, 3):
        clock.storage_at(jan, 1000.0 + k * FREE_EVERY)
        assert clock.walks == 1 + k
    assert ctx.facts["storage_low"] is None and jan.over == 0
    assert floor < recorded(ctx)["free"] < space.resume_mark(floor)


def test_freeing_space_below_the_floor_resumes_without_waiting_for_a_walk(make_ctx, disk):
    """Below the floor retention deletes what it may (shown frames down to the last 10);
    once that clears the band, generation resumes in the same tick."""
    ctx = make_ctx(NOFLOOR, path=disk)
    woken = []
    ctx.wake = woken.append
    shown_frames(ctx, 16, 300 * 1024)
    jan = Janitor(ctx)
    jan.measure()
    free = space.free_bytes(ctx.cfg.data_dir)
    floor_at(ctx, free + 200 * 1024)          # deficit 1.2 MB: 5 frames (1.5 MB) clear it
    jan.measured_at = float("-inf")
    jan.storage()
    assert live_frames(ctx) == 11
    assert ctx.facts["storage_low"] is None and woken == ["planner"]
    assert recorded(ctx)["low"] is None


def test_at_the_floor_exactly_is_not_below_it_and_resuming_is_at_10_percent_above(
        make_ctx, disk):
    """README: below the floor generation pauses; it resumes once 10 % above it. Both
    boundaries to the byte, on a disk whose free space does not move meanwhile."""
    ctx = make_ctx(NOFLOOR, path=disk)
    jan = Janitor(ctx)
    jan.measure()
    free = space.free_bytes(ctx.cfg.data_dir)
    floor_at(ctx, free)                       # at the floor: not below it
    jan.measure()
    assert recorded(ctx)["free"] == free      # what the janitor compared
    assert ctx.facts["storage_low"] is None
    free = space.free_bytes(ctx.cfg.data_dir)
    floor_at(ctx, free + 1)
    jan.measure()
    assert ctx.facts["storage_low"]
    free = space.free_bytes(ctx.cfg.data_dir)
    floor = next(f for f in range(free * 10 // 11 - 20, free) if f + f // 10 == free and f % 10)
    floor_at(ctx, floor)                      # free is exactly floor + floor // 10
    jan.measure()
    assert recorded(ctx)["free"] == free
    assert ctx.facts["storage_low"] is None   # resumed


def test_a_data_dir_that_vanished_is_measured_as_nothing(make_ctx, tmp_path):
    """A data dir gone under a running daemon (deleted, its disk unmounted): the
    measurement has no free space to compare with the floor and says nothing is low."""
    ctx = make_ctx("[storage]\nmin_free_gb = 1\nbudget_gb = 0\n")
    ctx.cfg.system.data_dir = str(tmp_path / "gone")
    jan = Janitor(ctx)
    jan.measure()
    assert ctx.facts["storage_low"] is None and jan.over == 0
    assert (recorded(ctx)["free"], recorded(ctx)["total"], recorded(ctx)["low"]) == (
        None, 0, None)


def test_the_size_that_would_do_is_rounded_to_a_tenth(make_ctx, caplog):
    """1.5 times what the dream holds, to a tenth of a GB (4.647 is "4.6", not "4.7")."""
    ctx = make_ctx("[storage]\nmin_free_gb = 0\nbudget_gb = 1\n")
    have = space.measure(ctx.cfg.data_dir).managed
    with open(ctx.cfg.data_dir / "big.bin", "wb") as f:   # sparse: costs no disk
        f.truncate(int((4.647 - 0.05) / 1.5 * GB) - have)
    caplog.set_level(logging.WARNING, logger="dreamd")
    jan = Janitor(ctx)
    jan.measure()
    jan.measure()
    assert budget_said(caplog)[0].endswith("raise storage.budget_gb to at least 4.6")


def test_an_unrecorded_measurement_is_not_an_error(make_ctx, db_path, caplog):
    """A ledger that cannot be written now (busy, read-only): the measurement still
    counts (the floor, the budget); recording it waits for the next one."""
    from dreamd.ledger import database

    ctx = make_ctx("[storage]\nmin_free_gb = 0\nbudget_gb = 0\n")
    writer, ctx.engine = ctx.engine, database.reader(db_path)
    caplog.set_level(logging.DEBUG, logger="dreamd.janitor")
    try:
        Janitor(ctx).measure()
    finally:
        ctx.engine.dispose()
        ctx.engine = writer
    said = [r for r in caplog.records if r.getMessage() == "storage usage not recorded"]
    assert len(said) == 1 and said[0].exc_info and said[0].exc_info[0] is not None
    assert sql(ctx, "SELECT storage FROM runtime_state")[0][0] is None


def test_a_deficit_of_one_byte_counts_for_the_budget_check(make_ctx, disk, caplog):
    """Over budget twice in a row with nothing freed: whatever the last measurement
    asked to free, down to a byte, makes the second one news."""
    ctx = make_ctx(NOFLOOR, path=disk)
    jan = Janitor(ctx)
    jan.measure()
    free = space.free_bytes(ctx.cfg.data_dir)
    floor = next(f for f in range(free * 10 // 11 - 20, free) if f + f // 10 == free + 1)
    floor_at(ctx, floor)
    ctx.facts["storage_low"] = "low disk space"        # paused: resumes 10 % above
    ctx.cfg.storage.budget_gb = space.measure(ctx.cfg.data_dir).managed / GB   # just fits
    caplog.set_level(logging.WARNING, logger="dreamd")
    jan.measure()
    assert jan.over == 1 and budget_said(caplog) == []
    jan.measure()                                      # the ledger grew a little: over
    assert len(budget_said(caplog)) == 1


def test_a_postpone_a_full_ledger_refused_is_written_later_and_costs_no_attempt(make_ctx, disk):
    """The disk fills while a keyframe is made: its image cannot be written, nor can the
    ledger record the postpone. The janitor writes it once there is room, before any
    rescue, so the keyframe gets its attempt back instead of losing it to an expiry."""
    from dreamd.backends.procedural import ProceduralBackend
    from dreamd.workers import keyframe
    from tests.test_faults_disk_full import fill
    from tests.test_worker_keyframe import plan

    class FillsTheDisk(ProceduralBackend):
        def generate(self, request):
            made = super().generate(request)
            fill(disk.parent)
            return made

    ctx = make_ctx(path=disk)
    kid = plan(ctx, 0)
    assert keyframe.tick(ctx, FillsTheDisk()) == 0
    owner = ctx.lease_owner("keyframe")
    assert ctx.owed_postpones == {("keyframe", kid): (owner, ctx.owed_postpones[
        ("keyframe", kid)][1])} and ctx.owed_postpones[("keyframe", kid)][1].startswith(
        "disk full: ")
    assert sql(ctx, "SELECT state, attempt, lease_owner FROM keyframes") == \
        [("executing", 1, owner)]                     # as the full ledger left it
    (disk.parent / "ballast").unlink()                # room again, and the lease ran out
    write(ctx, "UPDATE keyframes SET lease_expires_at = :e", e=utcnow() - timedelta(seconds=1))
    Janitor(ctx).tick()
    assert ctx.owed_postpones == {}
    assert sql(ctx, "SELECT state, attempt, error LIKE 'disk full: %' FROM keyframes") == \
        [("retryable", 0, 1)]                         # postponed: the attempt given back
    assert abandoned(ctx) == []
    assert [r.event for r in sql(ctx, "SELECT event FROM transitions WHERE entity = "
                                      "'keyframe' ORDER BY id")] == \
        ["created", "claimed", "postponed"]


def test_a_row_whose_postpone_is_owed_is_not_rescued(make_ctx):
    ctx = make_ctx()
    owed = job(ctx, "interpolation", lease_left=-5)
    dead = job(ctx, "interpolation", lease_left=-5)
    ctx.owed_postpones[("interpolation", owed)] = ("dead:1:1:w", "disk full: test")
    ctx.owed_postpones[("keyframe", dead)] = ("dead:1:1:w", "disk full: test")  # not this one
    assert janitor.rescue_all(ctx) == 1
    assert (state(ctx, "interpolation", owed), state(ctx, "interpolation", dead)) == (
        "executing", "available")


# ---------------------------------------------------------------- a reader holding the WAL

def test_a_reader_holding_the_ledger_is_said_and_its_wal_given_back(contexts, db_path, caplog):
    """An open sqlite3 session in a transaction keeps the daemon's checkpoints from
    folding the WAL back: said once after WAL_HELD_AFTER (log, status.json's problem,
    the recorded storage), and the space given back once it lets go. A set clock: the
    janitor is told the time of each checkpoint."""
    import sqlite3

    from dreamd.storage import space
    from dreamd.workers import janitor as jan

    caplog.set_level(logging.INFO, logger="dreamd.janitor")
    ctx = contexts()
    j = jan.Janitor(ctx)

    def write(n: int) -> None:
        for _ in range(n):
            with ctx.engine.begin() as conn:
                conn.execute(text("INSERT INTO controls (command, args, state, created_at) "
                                  "VALUES ('pause', :a, 'rejected', '2030-01-01')"),
                             {"a": "x" * 4000})

    write(5)
    j.checkpoint(now=0.0)
    assert "wal_held" not in ctx.facts
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN")
    holder.execute("SELECT count(*) FROM controls").fetchone()    # a snapshot, held
    try:
        write(3000)                                  # past the auto-checkpoint: it cannot fold
        grown = space.wal_bytes(db_path)
        assert grown > 2 * 4000 * 1000
        j.checkpoint(now=1000.0)
        j.checkpoint(now=1000.0 + jan.WAL_HELD_AFTER - 1)
        assert "wal_held" not in ctx.facts          # not for long enough yet
        j.checkpoint(now=1000.0 + jan.WAL_HELD_AFTER)
        said = ctx.facts["wal_held"]
        assert said.startswith("a reader has held the ledger since ") and "close that reader" \
            in said and space.human(grown)[:-3] in said
        write(1000)                                  # it goes on growing: said as it is
        j.checkpoint(now=1000.0 + 5 * jan.WAL_HELD_AFTER)
        now_said = ctx.facts["wal_held"]
        assert now_said != said and space.human(space.wal_bytes(db_path))[:-3] in now_said
        assert [r.getMessage() for r in caplog.records
                if "a reader has held" in r.getMessage()] == [f"{said}; the space comes "
                                                            f"back by itself once it lets go"]
        j.measure()
        with ctx.reader.connect() as conn:
            recorded = json.loads(conn.execute(text("SELECT storage FROM runtime_state"))
                                  .scalar())
        assert recorded["wal_held"] == now_said and recorded["parts"]["ledger"] >= grown
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    j.checkpoint(now=1000.0 + 6 * jan.WAL_HELD_AFTER)
    assert "wal_held" not in ctx.facts
    assert space.wal_bytes(db_path) == 0            # truncated at once
    assert any("let go of the ledger" in r.getMessage() for r in caplog.records)
    write(5)
    assert space.wal_bytes(db_path) < 1024 * 1024


def test_between_keyframes_a_pass_evicts_shown_frames_only(make_ctx, monkeypatch):
    """The whole retention pass when a keyframe was made since the last one, or every
    FULL_PASS_EVERY; the passes between (a dream with nothing to make, playing on) only
    evict shown frames, the one thing playback alone adds to."""
    from dreamd.storage import retention

    calls: dict[str, int] = {"prune_latents": 0, "evict_frames": 0}
    for name in calls:
        real = getattr(retention, name)
        monkeypatch.setattr(retention, name, lambda *a, _n=name, _r=real, **k:
                            calls.__setitem__(_n, calls[_n] + 1) or _r(*a, **k))
    now = [1000.0]
    monkeypatch.setattr(janitor, "time", types.SimpleNamespace(
        monotonic=lambda: now[0], perf_counter=time.perf_counter))
    ctx = make_ctx()
    j = Janitor(ctx)
    seen = []
    for step in ("first", "nothing new", "a keyframe", "nothing new", "a minute later"):
        if step == "a keyframe":
            job(ctx, "keyframe", lease_left=60)
        if step == "a minute later":
            now[0] += janitor.FULL_PASS_EVERY
        now[0] += 5
        j.storage()
        seen.append((calls["prune_latents"], calls["evict_frames"]))
    assert seen == [(1, 1), (1, 2), (2, 3), (2, 4), (3, 5)]
