"""Behaviour that mutation testing (bench/MUTATION.md) found no test judging: each test
names the survivors it kills. Real ledgers and files; times on set clocks."""

from __future__ import annotations

import json
import types

import pytest
from sqlalchemy import event, text

from dreamd.errors import StaleTransitionError
from dreamd.ledger import transitions as tr
from dreamd.ledger.queries import dbapi
from dreamd.ledger import controls as ledger_controls
from dreamd.workers import controls, embedding, keyframe
from dreamd.workers.embedding import EmbeddingWorker
from dreamd.governor.worker import GovernorWorker
from tests.comfyui_double import ComfyUIDouble
from tests.memory_chain import memory_contexts  # noqa: F401 (a fixture)
from tests.test_governor_daemon import CONFIG as GOVERNOR_CONFIG
from tests.test_memory import add_keyframe, picture, rows
from tests.test_worker_keyframe import CKPT, comfyui, plan, row
from tests.test_worker_keyframe import CONFIG as KEYFRAME_CONFIG


def set_clock(monkeypatch, module, *readings: float) -> None:
    """`module.time.perf_counter` reads these, in order, and nothing more."""
    ticks = iter(readings)
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))


def unordered_reads_reversed(engine) -> None:
    """SQLite's `reverse_unordered_selects` on every connection of `engine`: a SELECT
    without ORDER BY then scans its table or index backwards, so a query that leans on
    the scan's order instead of saying it gives the rows the other way round."""
    event.listen(engine, "connect",
                 lambda dbapi, _: dbapi.execute("PRAGMA reverse_unordered_selects = ON"))
    engine.dispose()        # connections opened before it are let go


# ---------------------------------------------------------------- recorded durations

def test_the_embedding_time_recorded_is_the_batchs_duration_per_frame(
        memory_contexts, monkeypatch):  # noqa: F811 (the fixture imported above)
    """Kills embedding `process__mutmut_72` (x 1001): a second for four frames is
    exactly 250.0 ms each on a set clock."""
    ctx = memory_contexts('[cache]\nembedder = "descriptor"\n')
    for k in range(4):                                  # one claim: BATCH is 4
        add_keyframe(ctx, k, picture(k))
    set_clock(monkeypatch, embedding, 100.0, 101.0)
    assert EmbeddingWorker(ctx, ctx.embedders).tick() == 4
    done = rows(ctx, "SELECT detail FROM transitions WHERE entity = 'embedding' "
                     "AND to_state = 'completed'")
    assert [json.loads(d.detail)["ms"] for d in done] == [250.0] * 4


# ---------------------------------------------------------------- the ledger's verbs

def test_failing_a_row_that_is_gone_is_a_stale_transition(engine):
    """Kills transitions `x_fail__mutmut_26` (`row.attempt if row or True`): the backoff
    of a vanished row must not be read from it; the workers catch StaleTransitionError,
    not AttributeError."""
    with engine.begin() as conn, pytest.raises(StaleTransitionError):
        tr.fail(conn, "keyframe", 12345, "w", "boom")


def test_a_keyframe_still_held_for_an_owed_postpone_keeps_its_prompt_id_and_server(
        contexts):
    """Kills keyframe `x_process__mutmut_15` and `x__server_recorder__mutmut_5` (the
    UPDATE by lease owner alone). A worker can hold two rows: one whose postpone the
    ledger could not take (owed, settled by the janitor later) and the next it claimed.
    The new row's prompt id and server must not land on the owed one, which would then
    re-attach to another keyframe's prompt."""
    ctx = contexts(KEYFRAME_CONFIG)
    owed, nxt = plan(ctx, 0, backend="comfyui"), plan(ctx, 1, backend="comfyui")
    owner = ctx.lease_owner("keyframe")
    with ctx.engine.begin() as conn:
        (held,) = tr.claim(conn, "keyframe", owner, lease_seconds=600)
    assert held.id == owed
    ctx.owed_postpones[("keyframe", owed)] = (owner, "read-only: the ledger")
    with ComfyUIDouble(checkpoints=[CKPT]) as double:
        backend = comfyui(ctx, [double.url])
        try:
            assert keyframe.tick(ctx, backend) == 1
        finally:
            backend.close()
    made = row(ctx, nxt)
    assert made.state == "completed" and made.prompt_id and made.server == double.url
    r = row(ctx, owed)
    assert (r.state, r.prompt_id, r.server) == ("executing", None, None)


# ---------------------------------------------------------------- memory a daemon keeps

def test_the_governor_keeps_at_most_2000_buffer_samples_however_long_it_runs(contexts):
    """Kills governor `xǁGovernorWorkerǁ__init____mutmut_3` (the samples unbounded: at a
    tick every 2 s, 43,200 more a day for a trend that reads the last minute or so) and
    `_4` (2001). 2000 ticks are over an hour, more than the longest trend window."""
    ctx = contexts(GOVERNOR_CONFIG)
    worker = GovernorWorker(ctx)
    with ctx.reader.connect() as conn:
        for i in range(2050):
            worker.measure(dbapi(conn), 1000.0 + 2 * i)
    assert len(worker.samples) <= 2000
    assert worker.samples[-1][0] == 1000.0 + 2 * 2049        # the newest are the ones kept


# ---------------------------------------------------------------- orders said in SQL

def test_a_rows_history_is_oldest_first_whatever_order_sqlite_scans_in(engine):
    """Kills transitions `x_history__mutmut_3` (ORDER BY id dropped)."""
    with engine.begin() as conn:
        kid = tr.create(conn, "keyframe", {
            "chain_index": 0, "backend": "test", "theme": "t", "prompt": "p", "seed": 0,
            "denoise": 0.3, "source": "img2img", "width": 8, "height": 8})
        tr.claim(conn, "keyframe", "w", lease_seconds=60)
    unordered_reads_reversed(engine)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA reverse_unordered_selects")).scalar() == 1
        states = [h.to_state for h in tr.history(conn, "keyframe", kid)]
    assert states == ["available", "executing"]


def test_controls_are_applied_in_the_order_sent_whatever_order_sqlite_scans_in(contexts):
    """Kills controls `x_tick__mutmut_3` (ORDER BY id dropped): the later `set` wins."""
    ctx = contexts()
    with ctx.engine.begin() as conn:
        for fps in ("10", "12"):
            ledger_controls.request(conn, "set", {"key": "display.fps", "value": fps})
    unordered_reads_reversed(ctx.reader)
    assert controls.tick(ctx) == 2
    assert ctx.knob("display.fps") == 12


def test_pending_sets_are_shown_in_the_order_sent_whatever_order_sqlite_scans_in(contexts):
    """Kills controls `x_overrides__mutmut_19` (ORDER BY id dropped): `dreamd config show`
    names the later of two pending values."""
    ctx = contexts()
    with ctx.engine.begin() as conn:
        for fps in ("10", "12"):
            ledger_controls.request(conn, "set", {"key": "display.fps", "value": fps})
    unordered_reads_reversed(ctx.reader)
    with ctx.reader.connect() as conn:
        out, _ = ledger_controls.overrides(conn)
    assert out["display.fps"][0] == 12
