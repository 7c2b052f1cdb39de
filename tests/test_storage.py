"""Storage (issue 9): every file has an owner and a limit, the data dir can move, and
reconcile never mass-deletes. Real daemons in subprocesses on real data dirs."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sqlite3
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests import invariants
from tests.conftest import (FAST_CONFIG, DaemonRunner, dreamd_cmd, mount_tmpfs, wait_for,
                            with_keys)

# Short horizons and a small budget: every kind of retention happens within seconds. A
# small cache: its members (and the rows their frames name) outlive every horizon.
TIGHT = with_keys(FAST_CONFIG, "cache", "max_size = 4") + """
max_output_frames = 10
[storage]
budget_gb = 0.012
keyframe_hours = 0.0005
frame_history_hours = 0.002
history_days = 0.0002
"""


def tree(path: Path) -> dict[str, str]:
    """Every file under path (but the ledger, whose pages change on open) -> sha256."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.name.startswith("dreamd.db"):
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def logged(data_dir: Path) -> str:
    """The daemon's log file: unlike its terminal output, never wrapped (a long data dir
    path must not split a message across lines)."""
    return "".join(p.read_text(errors="replace")
                   for p in sorted((data_dir / "logs").glob("dreamd.log*"), reverse=True))


def keyframe_files(data_dir: Path) -> int:
    return sum(1 for _ in (data_dir / "keyframes").glob("*.png"))


def owned_files(data_dir: Path) -> int:
    return sum(1 for name in ("frames", "keyframes", "injections", "thumbs")
               for p in (data_dir / name).glob("*") if p.is_file())


def rows(data_dir: Path, sql: str):
    con = sqlite3.connect(f"file:{data_dir / 'dreamd.db'}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def rows_or_none(data_dir: Path, sql: str):
    """`rows`, or None while the ledger cannot be read yet (not made, or busy)."""
    try:
        return rows(data_dir, sql)
    except sqlite3.Error:
        return None


def shown_count(data_dir: Path) -> int:
    """Frames the ledger has recorded as shown (0 before it says)."""
    got = rows_or_none(data_dir, "SELECT frames_shown FROM runtime_state")
    return (got[0][0] or 0) if got else 0


def run_until(d: DaemonRunner, predicate, what: str, timeout: float = 300) -> None:
    """Run the daemon until `predicate()` holds, then stop it with SIGTERM (a clean stop):
    a run as long as the machine needs to get there, not a fixed duration that a loaded
    one may spend before it has made anything."""
    proc = d.start()
    try:
        wait_for(predicate, timeout=timeout, what=what)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, d.output()


# ---------------------------------------------------------------- migration

def test_migration_makes_old_absolute_paths_relative(tmp_path):
    from dreamd.ledger import database

    old_dir = "/somewhere/else/data"
    data = tmp_path / "data"
    data.mkdir()
    db = data / "dreamd.db"
    database.upgrade(db, revision="0004")
    con = sqlite3.connect(db)
    con.execute("INSERT INTO keyframes (id, chain_index, state, backend, theme, prompt, "
                "negative_prompt, seed, denoise, source, input_path, path, width, height, "
                "attempt, max_attempts, scheduled_at, created_at) VALUES (1, 0, 'completed', "
                "'procedural', 't', 'p', '', 1, 0.3, 'seed', ?, ?, 64, 64, 1, 3, "
                "'2026-01-01', '2026-01-01')",
                (f"{data}/seeds/mine.png", f"{old_dir}/keyframes/k000000-1.png"))
    con.execute("INSERT INTO frames (id, chain_index, t, kind, path, state, created_at) "
                "VALUES (1, 0, 0.0, 'keyframe', ?, 'ready', '2026-01-01')",
                (f"{old_dir}/frames/000000-0000000.png",))
    con.execute("INSERT INTO injections (id, keyframe_id, kind, seed_path, reason, weight, "
                "created_at) VALUES (1, 1, 'seed', '/usr/share/seeds/a.png', 'chance', 0.5, "
                "'2026-01-01')")
    con.commit()
    con.close()
    database.upgrade(db)
    assert rows(data, "SELECT path, input_path FROM keyframes") == [
        ("keyframes/k000000-1.png", "seeds/mine.png")]
    assert rows(data, "SELECT path FROM frames") == [("frames/000000-0000000.png",)]
    # a seed outside the data dir is not the data dir's to move: it stays absolute
    assert rows(data, "SELECT seed_path FROM injections") == [("/usr/share/seeds/a.png",)]
    database.downgrade(db, "0004")
    assert rows(data, "SELECT path FROM frames") == [(f"{data}/frames/000000-0000000.png",)]


# ---------------------------------------------------------------- latents

def test_a_latent_is_named_by_its_image_and_never_stands_for_another(tmp_path):
    import torch

    from dreamd.config import Config
    from dreamd.latent.pixel import PixelCodec
    from dreamd.latent.storage import latent_meta, save_latent
    from dreamd.workers.interpolation import encode_keyframe, latent_path
    from PIL import Image

    cfg = Config()
    cfg.system.data_dir = str(tmp_path)
    ctx = SimpleNamespace(cfg=cfg)
    codec = PixelCodec()
    (tmp_path / "keyframes").mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "keyframes" / "k1.png")
    data = (tmp_path / "keyframes" / "k1.png").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    row = SimpleNamespace(id=1, path="keyframes/k1.png", sha256=sha)
    # a file at this image's name that was made from another image (a stale run, a bug)
    path = latent_path(ctx, sha, codec)
    path.parent.mkdir(parents=True)
    save_latent(path, torch.zeros(3, 64, 64), latent_meta(codec, image_sha256="f" * 64))
    latent = encode_keyframe(ctx, codec, row)
    assert float(latent[0].mean()) > 0.4, "the stale latent was used for a red image"
    # another image gets another name, whatever its row id
    other = latent_path(ctx, "0" * 64, codec)
    assert other != path and path.name.startswith(sha)


# ---------------------------------------------------------------- retention

def retention_caught_up(data_dir: Path) -> bool:
    """More than 30 keyframes kept, some of their images pruned and some of their rows
    (past the history horizon) deleted: every kind of retention has been at work."""
    got = rows_or_none(data_dir, "SELECT (SELECT count(*) FROM keyframes WHERE state = "
                                 "'completed'), (SELECT count(*) FROM keyframes WHERE "
                                 "pruned_at IS NOT NULL), (SELECT max(id) FROM keyframes), "
                                 "(SELECT count(*) FROM keyframes)")
    if not got:
        return False
    completed, pruned, made, kept = got[0]
    return completed > 30 and pruned > 0 and made is not None and kept < made


@pytest.mark.slow
def test_retention_keeps_every_kind_within_its_limits(dreamd_env, tmp_path):
    """The daemon runs until every kind of retention has been at work (not for 40 s, in
    which a loaded machine may make fewer than 30 keyframes), then ten seconds more in
    which the budget must hold at every look."""
    from dreamd.storage import space

    def used() -> int:
        u = space.measure(d.data_dir)
        return u.total - u.parts.get("logs", 0)

    d = DaemonRunner(dreamd_env, tmp_path, TIGHT)
    proc = d.start()
    try:
        wait_for(lambda: retention_caught_up(d.data_dir), timeout=400, interval=1,
                 what="more than 30 keyframes kept and retention at work")
        samples = []
        for _ in range(5):          # the budget holds from here on, look after look
            time.sleep(2)
            samples.append(used())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, d.output()
    facts = invariants.check(d.data_dir)
    invariants.distinct_frame_files(d.data_dir)
    assert facts["keyframes"] > 30
    data = d.data_dir
    # keyframe images went (thumbnails stayed), latents and blends are few
    pruned = rows(data, "SELECT count(*) FROM keyframes WHERE pruned_at IS NOT NULL")[0][0]
    assert pruned > 0
    thumbs = rows(data, "SELECT thumb_path FROM keyframes WHERE thumb_path IS NOT NULL")
    assert thumbs and all((data / t).exists() for (t,) in thumbs)
    # latents of finished batches go within a janitor tick: a few ticks' worth stay
    assert len(list((data / "latents").glob("*"))) < max(10, facts["keyframes"] // 4)
    # rows past their horizon were pruned
    made = rows(data, "SELECT max(id) FROM keyframes")[0][0]
    kept = rows(data, "SELECT count(*) FROM keyframes")[0][0]
    assert kept < made, "no keyframe row was pruned"
    # transitions more than 20 s older than the daemon's stop (its clock, not the time
    # this test gets round to looking): the horizon is 17 s, the janitor's tick 5 s
    assert rows(data, "SELECT count(*) FROM transitions WHERE at < datetime((SELECT "
                      "max(stopped_at) FROM daemon_runs), '-20 seconds')")[0][0] < 200
    # the budget (12 MB) holds once retention has caught up, ledger and WAL included
    assert max(samples) < 12 * 1024 ** 2 * 1.2, samples
    # no frame ahead of the playhead was deleted: every ready frame has its file
    for (p,) in rows(data, "SELECT path FROM frames WHERE state = 'ready'"):
        assert (data / p).exists()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["retention-frames-evicted", "retention-images-pruned"])
def test_kill_in_the_middle_of_a_retention_pass(dreamd_env, tmp_path, point):
    d = DaemonRunner(dreamd_env, tmp_path, TIGHT)
    proc = d.start(extra_env={"DREAMD_PAUSE_AT": point})
    marker = d.data_dir / f"paused-at-{point}"
    wait_for(marker.exists, timeout=300, what="a retention pass between its rows and files")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    marker.unlink()
    out = d.run(8)
    assert out.returncode == 0, out.stdout
    # what the killed pass left (files of rows it had retired) is deleted, not moved aside
    assert "retired_files" in logged(d.data_dir)
    assert not list(d.data_dir.glob("orphaned-*")), out.stdout
    invariants.check(d.data_dir)
    invariants.distinct_frame_files(d.data_dir)


# ---------------------------------------------------------------- a data dir that moves

@pytest.mark.slow
def test_mv_and_cp_of_a_stopped_data_dir_play_on(dreamd_env, tmp_path):
    d = DaemonRunner(dreamd_env, tmp_path)
    run_until(d, lambda: shown_count(d.data_dir) >= 10, "ten frames shown")
    before = invariants.check(d.data_dir)
    original = tree(d.data_dir)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(d.data_dir), str(copy)], check=True)
    moved = tmp_path / "moved"
    d.data_dir.rename(moved)
    assert tree(moved) == original

    for where in (copy, moved):
        if where is moved:
            # the copy's run left the original alone
            assert tree(moved) == original
        files_before = owned_files(where)
        shown_before = shown_count(where)
        env = {**dreamd_env, "DREAMD_DATA_DIR": str(where)}
        r = DaemonRunner(env, tmp_path / where.name, FAST_CONFIG)
        r.config = d.config
        # until it has shown more, from where it was: a run of fixed length might spend
        # itself starting on a loaded machine
        run_until(r, lambda at=where, was=shown_before: shown_count(at) > was + 5,
                  "playback going on")
        assert "moved them aside" not in logged(where)
        assert not list(where.glob("orphaned-*"))
        after = invariants.check(where)
        # it played on from its playhead, not from the start
        assert after["shown"][:len(before["shown"])] == before["shown"]
        assert len(after["shown"]) > len(before["shown"])
        assert owned_files(where) >= files_before * 0.5
    assert tree(moved) != original      # it played on too


@pytest.mark.slow
def test_a_deleted_ledger_moves_files_aside_never_deletes(dreamd_env, tmp_path):
    from dreamd.storage.reconcile import ORPHANS_DELETED_MAX

    d = DaemonRunner(dreamd_env, tmp_path)
    # more files than a reconcile deletes as a few orphans: then it must move them aside
    # (a fixed 6 s run made fewer on a loaded machine, and they were deleted as orphans)
    run_until(d, lambda: owned_files(d.data_dir) > ORPHANS_DELETED_MAX + 10,
              f"more than {ORPHANS_DELETED_MAX + 10} files")
    files = {p.name for n in ("frames", "keyframes") for p in (d.data_dir / n).glob("*.png")}
    for p in d.data_dir.glob("dreamd.db*"):
        p.unlink()
    out = d.run(5)
    assert out.returncode == 0, out.stdout
    assert "moved them aside" in logged(d.data_dir)
    assert "nothing was deleted" in logged(d.data_dir)
    aside = list(d.data_dir.glob("orphaned-*"))
    assert len(aside) == 1
    kept = {p.name for p in aside[0].rglob("*.png")}
    assert files <= kept, "a file of the old run was deleted"
    invariants.check(d.data_dir)


@pytest.mark.slow
def test_a_ledger_from_another_data_dir_takes_no_file_for_its_own(dreamd_env, tmp_path):
    (tmp_path / "a-cfg").mkdir()
    a = DaemonRunner({**dreamd_env, "DREAMD_DATA_DIR": str(tmp_path / "a" / "data")},
                     tmp_path / "a-cfg", FAST_CONFIG)
    run_until(a, lambda: keyframe_files(a.data_dir) >= 3, "three keyframes of a")
    b = DaemonRunner(dreamd_env, tmp_path)
    run_until(b, lambda: keyframe_files(b.data_dir) >= 3, "three keyframes of b")
    b_files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
               for p in (b.data_dir / "keyframes").glob("*.png")}
    for p in b.data_dir.glob("dreamd.db*"):
        p.unlink()
    shutil.copy(a.data_dir / "dreamd.db", b.data_dir / "dreamd.db")
    out = b.run(5)
    assert out.returncode == 0, out.stdout
    assert "moved them aside" in logged(b.data_dir)
    assert "nothing was deleted" in logged(b.data_dir)
    aside = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in next(b.data_dir.glob("orphaned-*")).rglob("keyframes/*.png")}
    assert b_files and b_files.items() <= aside.items()
    invariants.check(b.data_dir)
    invariants.distinct_frame_files(b.data_dir)


@pytest.mark.slow
def test_a_garbage_ledger_deletes_nothing(dreamd_env, tmp_path):
    d = DaemonRunner(dreamd_env, tmp_path)
    run_until(d, lambda: keyframe_files(d.data_dir) >= 2, "two keyframes")
    before = tree(d.data_dir)
    for p in d.data_dir.glob("dreamd.db-*"):
        p.unlink()
    (d.data_dir / "dreamd.db").write_bytes(b"this is not a database" * 100)
    out = d.run(3)
    assert out.returncode != 0
    assert "dreamd.db" in out.stdout
    after = tree(d.data_dir)
    assert {k: v for k, v in before.items() if not k.startswith(("logs", "output"))} == \
        {k: v for k, v in after.items() if not k.startswith(("logs", "output"))}


# ---------------------------------------------------------------- the free-space floor

@pytest.fixture
def small_disk(tmp_path):
    yield from mount_tmpfs(tmp_path / "disk", "48m")


@pytest.mark.slow
def test_under_the_free_space_floor_generation_pauses_and_resumes(dreamd_env, tmp_path,
                                                                  small_disk):
    data = small_disk / "data"
    env = {**dreamd_env, "DREAMD_DATA_DIR": str(data)}
    d = DaemonRunner(env, tmp_path, FAST_CONFIG.replace("buffer_target_seconds = 3.0",
                                                        "buffer_target_seconds = 8.0")
                     + "[storage]\nmin_free_gb = 0.02\nbudget_gb = 0\n")
    proc = d.start()
    try:
        status = data / "output" / "status.json"

        def shown() -> int:
            try:
                return json.loads(status.read_text())["frame_number"]
            except (OSError, ValueError, KeyError):
                return 0

        def clock() -> datetime | None:
            """The daemon's clock as it last wrote status.json (rewritten twice a second;
            on a full disk in place, so a look may find it torn: None)."""
            try:
                return datetime.fromisoformat(json.loads(status.read_text())["last_update"])
            except (OSError, ValueError, KeyError):
                return None

        wait_for(lambda: shown() > 20, timeout=300, what="playback")
        ballast = small_disk / "ballast"
        free = shutil.disk_usage(small_disk).free
        with open(ballast, "wb") as f:                       # leave ~10 MB: under the floor
            f.write(b"\0" * max(0, free - 10 * 1024 ** 2))
        wait_for(lambda: "low disk space" in logged(data), timeout=120, what="the floor noticed")
        made = rows(data, "SELECT count(*) FROM keyframes")[0][0]
        at = shown()
        noticed = wait_for(clock, timeout=60, what="status.json readable")
        # playback goes on, and generation stays paused for 4 s of the daemon's own time
        # (its status.json clock: a loaded machine cannot shorten that window, and no
        # assertion waits on a fixed sleep of the test's)
        wait_for(lambda: shown() > at, timeout=120, what="playback under the floor")
        wait_for(lambda: (clock() or noticed) >= noticed + timedelta(seconds=4), timeout=120,
                 what="4 s of the daemon's time under the floor")
        assert rows(data, "SELECT count(*) FROM keyframes")[0][0] <= made + 1
        st = subprocess.run(dreamd_cmd("status", "--json"), env=env, capture_output=True,
                            text=True, timeout=120)
        assert "low disk space" in (json.loads(st.stdout)["storage"]["low"] or "")
        assert "low disk space" in (json.loads(status.read_text())["problem"] or "")
        ballast.unlink()
        wait_for(lambda: "generation resumes" in logged(data), timeout=120, what="resume")
        wait_for(lambda: rows(data, "SELECT count(*) FROM keyframes")[0][0] > made + 2,
                 timeout=120, what="new keyframes")
        assert logged(data).count("low disk space: ") == 1, "said more than once"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:      # a failed assertion must not leave a daemon behind
            proc.kill()
            proc.wait(timeout=30)
    invariants.check(data)
    assert not rows(data, "SELECT count(*) FROM keyframes WHERE state = 'discarded'")[0][0]


def test_comfyuis_log_is_rotated_when_the_supervisor_starts(tmp_path, monkeypatch):
    from dreamd.backends.comfyui import supervisor

    monkeypatch.setattr(supervisor, "LOG_MAX_BYTES", 1000)
    log = tmp_path / "comfyui.log"
    log.write_bytes(b"old run\n" * 200)
    supervisor.rotate_log(log)
    assert not log.exists() and (tmp_path / "comfyui.log.1").read_bytes().startswith(b"old run")
    log.write_bytes(b"small")
    supervisor.rotate_log(log)
    assert log.read_bytes() == b"small"


def test_a_budget_too_small_for_what_the_dream_needs_is_said_once(db_path, caplog):
    """Over budget with nothing left to delete (here: the ledger alone is larger): one
    warning naming storage.budget_gb and a size that would do; nothing the dream needs
    is deleted, and a budget raised later clears it."""
    import logging

    from dreamd.workers.janitor import Janitor
    from tests.conftest import worker_context

    gen = worker_context(db_path, "[storage]\nbudget_gb = 0.00001\n")
    ctx = next(gen)
    try:
        jan = Janitor(ctx)
        with caplog.at_level(logging.WARNING, logger="dreamd"):
            for _ in range(4):
                jan.measure()
                jan.storage()
        said = [r.getMessage() for r in caplog.records if "storage.budget_gb" in r.getMessage()]
        assert len(said) == 1, said
        assert "nothing more can be deleted" in said[0] and "at least 0.1" in said[0]
        assert db_path.exists()
        ctx.cfg.storage.budget_gb = 2.0
        jan.measure()
        assert jan.stuck_over is False and jan.over == 0
    finally:
        gen.close()
