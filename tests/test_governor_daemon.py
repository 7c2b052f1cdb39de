"""The governor in the daemon: its worker measures from a real ledger, records every
decision in `governor_decisions`, and the next batch is made with its choice; `dreamd
status` shows it; migration 0006 steps down and up; and a real `dreamd run` whose
backend and decoder are slowed on purpose (DREAMD_SLOW) stops underrunning once the
governor has settled."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from datetime import datetime

import pytest
from sqlalchemy import insert, inspect, select, text

from dreamd.ledger import database, transitions
from dreamd.ledger.models import GovernorDecision, Interpolation, Keyframe, utcnow
from tests import invariants
from tests.conftest import DaemonRunner, dreamd_cmd, worker_context
from tests.test_daemon import holds_pid_file, stop, wait_in

KF, IP, GD = Keyframe.__table__, Interpolation.__table__, GovernorDecision.__table__

CONFIG = """
[generation]
resolution = [128, 64]
interpolation_frames = 4
lease_seconds = 10.0
[display]
fps = 4.0
buffer_target_seconds = 30.0
min_buffer_seconds = 2.0
[cache]
enabled = false
[governor]
dwell_seconds = 5.0
"""


def rows(db, sql: str, *params):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def add_keyframe(conn, k: int, ms: float) -> int:
    now = utcnow()
    return conn.execute(insert(KF).values(
        chain_index=k, state="completed", backend="procedural", theme="t", prompt="p",
        seed=k, denoise=0.3, source="seed" if k == 0 else "img2img", width=128, height=64,
        path=f"keyframes/k{k}.png", generation_ms=ms, started_at=now, completed_at=now,
        created_at=now, scheduled_at=now)).inserted_primary_key[0]


@pytest.fixture
def ctx(db_path):
    yield from worker_context(db_path, CONFIG)


def test_the_worker_records_its_decision_and_the_next_batch_is_made_with_it(ctx, db_path,
                                                                           dreamd_env):
    from dreamd.governor import worker as governor

    worker = governor.GovernorWorker(ctx)
    assert governor.current(ctx) == (4, 1.0)            # nothing measured: the settings
    assert worker.tick() is None
    with ctx.engine.begin() as conn:
        ids = [add_keyframe(conn, k, 9800.0) for k in range(4)]
        # batches that took 1.6 s for their 5 frames at full size: 320 ms a frame at 4
        # fps (two: one alone would have to be twice as far off to count)
        for k in (0, 1):
            conn.execute(insert(IP).values(
                chain_index=k, from_keyframe_id=ids[k], to_keyframe_id=ids[k + 1], n_frames=4,
                divisor=1.0, state="completed", duration_ms=1600.0, codec="pixel"))
        waiting = transitions.create(conn, "interpolation", {
            "chain_index": 2, "from_keyframe_id": ids[2], "to_keyframe_id": ids[3],
            "n_frames": 4, "divisor": 1.0}, worker="test")
    decision = worker.tick()
    assert decision is not None and decision.frames > 30 and decision.divisor == 2.0
    assert governor.current(ctx) == (decision.frames, 2.0)
    with ctx.reader.connect() as conn:
        (row,) = conn.execute(select(GD)).all()
    assert row.reason == "slow_inbetweens" and row.run_id == 1
    assert (row.interpolation_frames, row.resolution_divisor) == (decision.frames, 2.0)
    assert (row.previous_frames, row.previous_divisor) == (4, 1.0)
    assert row.keyframe_seconds == 9.8 and row.inbetween_ms == 320.0 and row.fps == 4.0
    assert "keyframes take 9.8 s: morphing over" in row.message
    assert "interpolating at 1/2 size" in row.message
    assert json.loads(row.detail)["inbetween_ms_by_divisor"] == {"1": 320.0}
    assert worker.tick() is None                        # once per change

    # the batch made before the decision takes it when claimed (a segment boundary)
    with ctx.engine.begin() as conn:
        (batch,) = transitions.claim(conn, "interpolation", "test-owner", lease_seconds=30)
    assert batch.id == waiting
    claimed = governor.at_claim(ctx, batch, "test-owner")
    assert (claimed.n_frames, claimed.divisor) == (decision.frames, 2.0)
    assert rows(db_path, "SELECT n_frames, divisor FROM interpolations WHERE id = ?",
                waiting) == [(decision.frames, 2.0)]

    # dreamd status shows it, text and JSON
    env = {**dreamd_env, "DREAMD_DATA_DIR": str(db_path.parent)}
    out = subprocess.run(dreamd_cmd("status", "--json"), env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    g = json.loads(out.stdout)["governor"]
    assert g["enabled"] is True and g["decisions"][0]["reason"] == "slow_inbetweens"
    assert g["decisions"][0]["message"] == row.message
    out = subprocess.run(dreamd_cmd("status"), env={**env, "COLUMNS": "300"},
                         capture_output=True, text=True, timeout=60)
    assert "governor" in out.stdout and "slow_inbetweens" in out.stdout


def test_turned_off_live_it_gives_back_the_users_settings(ctx):
    from dreamd.governor import worker as governor

    worker = governor.GovernorWorker(ctx)
    with ctx.engine.begin() as conn:
        for k in range(4):
            add_keyframe(conn, k, 9800.0)
    assert worker.tick().reason == "slow_keyframes"
    assert governor.current(ctx)[0] > 4
    ctx.set_knobs({"governor.enabled": False})           # `dreamd set governor.enabled=false`
    assert governor.current(ctx) == (4, 1.0)             # at once, for the next batch
    decision = worker.tick()
    assert (decision.reason, decision.frames, decision.divisor) == ("off", 4, 1.0)
    # a restart goes on from the last choice only while it is on
    ctx.set_knobs({})
    again = governor.GovernorWorker(ctx)
    assert again.law.frames == 4


def test_a_restart_goes_on_from_the_last_choice(ctx):
    from dreamd.governor import worker as governor

    worker = governor.GovernorWorker(ctx)
    with ctx.engine.begin() as conn:
        for k in range(4):
            add_keyframe(conn, k, 9800.0)
    chosen = worker.tick().frames
    ctx.facts.clear()
    again = governor.GovernorWorker(ctx)
    assert again.law.frames == chosen and governor.current(ctx) == (chosen, 1.0)


def test_migration_0006_steps_down_and_up_keeping_the_other_rows(tmp_path):
    path = tmp_path / "dreamd.db"
    database.upgrade(path, "0005")
    engine = database.writer(path)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO controls (command, args, state, created_at) "
                          "VALUES ('pause', '{}', 'applied', '2026-01-01 00:00:00')"))
    engine.dispose()
    database.upgrade(path, "0006")
    engine = database.writer(path)
    with engine.begin() as conn:
        assert "governor_decisions" in inspect(conn).get_table_names()
        conn.execute(insert(GD).values(reason="slow_keyframes", message="m",
                                       interpolation_frames=44, resolution_divisor=1.0,
                                       stretch=1.0, fps=4.0, at=utcnow()))
    engine.dispose()
    database.downgrade(path, "0005")
    engine = database.writer(path)
    with engine.connect() as conn:
        assert "governor_decisions" not in inspect(conn).get_table_names()
        assert conn.execute(text("SELECT count(*) FROM controls")).scalar() == 1
    engine.dispose()
    database.upgrade(path)
    assert rows(path, "SELECT count(*) FROM governor_decisions") == [(0,)]


# ---------------------------------------------------------------- end to end

SLOW_CONFIG = """
[generation]
resolution = [128, 64]
interpolation_frames = 4
lease_seconds = 30.0
[display]
fps = 5.0
buffer_target_seconds = 12.0
min_buffer_seconds = 2.0
[cache]
enabled = false
[governor]
dwell_seconds = 5.0
max_interpolation_frames = 80
"""


def underrun_times(log: str) -> list[datetime]:
    offset = datetime.now() - datetime.utcnow()      # the log's local time -> the ledger's UTC
    return [datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f") - offset for m in re.findall(
        r"^(\S+ \S+) INFO dreamd\.display: underrun", log, re.M)]


# The run ends once the last choice has held this long, counted in what was played: the
# segments made with it, and the frames shown since the first of them (20 s at 5 fps)
SETTLED_SEGMENTS = 3
SETTLED_FRAMES = 100
# It settles early: its last change comes before this many keyframes are made (here, 10
# or so; in keyframes, not seconds, so a slower machine is not judged by its clock)
SETTLES_WITHIN_KEYFRAMES = 25


def changes(db) -> list:
    """The governor's choices of N and size (its display stretches left out)."""
    return rows(db, "SELECT at, reason, interpolation_frames, resolution_divisor "
                    "FROM governor_decisions WHERE reason NOT IN ('stretch', 'stretch_end') "
                    "ORDER BY id")


def made_after(db, change) -> list:
    """Batches created after a change, the first left out: it may have been created while
    the change was being published (between its row and the workers seeing it)."""
    return rows(db, "SELECT id, chain_index, n_frames, divisor FROM interpolations "
                    "WHERE state = 'completed' AND created_at > ? ORDER BY chain_index",
                change[0])[1:]


def shown_since(db, batch_id: int) -> int:
    """Frames shown from the first frame of a batch on screen on (0 before it is)."""
    return rows(db, "SELECT count(*) FROM frames WHERE shown_at >= (SELECT min(shown_at) "
                    "FROM frames WHERE interpolation_id = ?)", batch_id)[0][0]


def settled(db) -> bool:
    """Segments made after the last change have played: SETTLED_SEGMENTS of them (the
    playhead is past them), SETTLED_FRAMES frames since the first; the governor held its
    choice all that time (a change meanwhile starts the count again)."""
    try:
        made = changes(db)
        playhead = rows(db, "SELECT playhead_chain_index FROM runtime_state")
    except sqlite3.OperationalError:
        return False                               # no ledger (or no tables) yet
    if not made or not playhead or playhead[0][0] is None:
        return False
    late = made_after(db, made[-1])
    return (sum(b[1] < playhead[0][0] for b in late) >= SETTLED_SEGMENTS
            and shown_since(db, late[0][0]) >= SETTLED_FRAMES)


@pytest.mark.slow
def test_a_slow_backend_and_decoder_stop_underrunning_once_the_governor_settles(
        dreamd_env, tmp_path):
    """Keyframes 2 s slower and in-betweens 0.25 s slower a frame at full size than the
    embedded default: at N = 4 and 5 fps that is 5 frames per ~3 s against 5 shown a
    second. The governor must morph longer and interpolate smaller, then hold. The run
    lasts until it has held its last choice for a few segments, however long the
    machine takes to get there; what is judged is in the ledger and the log, in order."""
    d = DaemonRunner(dreamd_env, tmp_path, SLOW_CONFIG)
    db = d.data_dir / "dreamd.db"
    proc = d.start(extra_env={"DREAMD_SLOW": "keyframe=2.0,inbetween=0.25"})
    try:
        wait_in(d, lambda: holds_pid_file(d, proc), "the daemon's pid file")
        wait_in(d, lambda: settled(db), f"the governor to hold a choice for "
                f"{SETTLED_SEGMENTS} segments and {SETTLED_FRAMES} frames", timeout=400)
    finally:
        stop(d, proc)
    made = changes(db)
    # longer morphs for the slow keyframes, a smaller size for the slow decoder
    assert made and made[-1][2] > 4 and made[-1][3] > 1.0, made
    assert all(4 <= n <= 80 and 1.0 <= div <= 4.0 for _, _, n, div in made)
    (before_last,), = rows(db, "SELECT count(*) FROM keyframes WHERE state = 'completed' "
                               "AND completed_at < ?", made[-1][0])
    assert before_last <= SETTLES_WITHIN_KEYFRAMES, made          # it settles early…
    # …and the batches after its last change are made with its choice
    n, divisor = made[-1][2], made[-1][3]
    late = made_after(db, made[-1])
    assert len(late) >= SETTLED_SEGMENTS and {(b[2], b[3]) for b in late} == {(n, divisor)}, \
        (made, late)
    # no underrun once what was made before the last change has played: from the first
    # frame of those batches on screen (every earlier frame comes before it)
    (first_late,), = rows(db, "SELECT min(shown_at) FROM frames WHERE interpolation_id = ?",
                          late[0][0])
    assert first_late is not None, f"batch {late[0]} never shown"
    log = (d.data_dir / "logs" / "dreamd.log").read_text()
    underruns = underrun_times(log)
    after = [u for u in underruns if u > datetime.fromisoformat(first_late)]
    assert after == [], (made, first_late, underruns)
    # the log's underruns are the ledger's
    assert rows(db, "SELECT underruns FROM runtime_state") == [(len(underruns),)]
    invariants.check(d.data_dir)


# ---------------------------------------------------------------- every codec, every size

@pytest.mark.parametrize("kind", ["pixel", "taesd", "sd-vae"])
def test_every_codec_works_at_every_size_the_governor_may_choose(tmp_path, kind):
    """The interpolation worker builds the chosen codec at a batch's divisor
    (choose.at_divisor): every size of the ladder gives frames of the keyframe's size,
    and latents of different sizes never pass for one another."""
    import torch

    from dreamd.governor.law import LADDER
    from dreamd.latent.choose import at_divisor, choose_codec
    from dreamd.latent.storage import latent_meta, reusable
    from tests.conftest_codecs import diffusers_kl, diffusers_tiny, save, save_taesd_pair, tensors

    path = None
    if kind == "taesd":
        path = save_taesd_pair(tmp_path, diffusers_tiny())[1]
    elif kind == "sd-vae":
        path = save(tmp_path / "vae.safetensors", tensors(diffusers_kl()))
    base, _ = choose_codec(kind, path=path, device="cpu", precision="fp32")
    images = torch.rand(2, 3, 64, 128, generator=torch.Generator().manual_seed(0))
    metas = []
    for divisor in LADDER[:5]:
        codec = at_divisor(base, divisor)
        out = codec.decode(codec.encode(images))
        assert out.shape == images.shape, (kind, divisor)
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        metas.append((codec, latent_meta(codec)))
    for i, (codec, _) in enumerate(metas):
        assert [reusable(meta, codec) for _, meta in metas] == [j == i for j in range(len(metas))]
