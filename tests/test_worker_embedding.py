"""The embedding worker in-process on a real ledger with the descriptor embedder (no
weights): which frames the memory learns (keyframes, midpoints when asked, never twice,
never another model's), how the backlog is shed under load, when playback comes first,
what a completed, a failed and a crashed embedding leave in the ledger."""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import text

from dreamd.ledger import transitions as tr
from dreamd.ledger.models import utcnow
from dreamd.memory import cache, descriptor
from dreamd.memory.scale import scale_for
from dreamd.workers.embedding import EmbeddingWorker, _is_midpoint
from tests.conftest import wait_for
from tests.memory_chain import close, memory_contexts  # noqa: F401 (a fixture)
from tests.test_memory import add_keyframe, picture, rows

DESCRIPTOR = '[cache]\nembedder = "descriptor"\n'


@pytest.fixture
def make(memory_contexts):
    return lambda extra=DESCRIPTOR: memory_contexts(extra)


def add_pair(ctx, k: int, n_frames: int, *, state: str = "ready") -> tuple[int, list[int]]:
    """Keyframes k and k+1 and the n in-betweens of their batch (their files too);
    returns the batch id and the in-betweens' frame ids, in t order."""
    add_keyframe(ctx, k, picture(k))
    add_keyframe(ctx, k + 1, picture(k + 1))
    ctx.cfg.frames_dir.mkdir(parents=True, exist_ok=True)
    with ctx.engine.begin() as conn:
        kids = conn.execute(text("SELECT id FROM keyframes WHERE chain_index IN (:a, :b) "
                                 "ORDER BY chain_index"), {"a": k, "b": k + 1}).scalars().all()
        ip = tr.create(conn, "interpolation", {
            "chain_index": k, "from_keyframe_id": kids[0], "to_keyframe_id": kids[1],
            "n_frames": n_frames, "divisor": 1.0})
        ids = []
        for i in range(1, n_frames + 1):
            path = ctx.cfg.frames_dir / f"i{k}_{i}.png"
            picture(100 + 10 * k + i).save(path)
            ids.append(tr.create(conn, "frame", {
                "chain_index": k, "t": i / (n_frames + 1), "kind": "inbetween",
                "interpolation_id": ip, "path": str(path)}))
        if state != "ready":
            conn.execute(text("UPDATE frames SET state = :s WHERE interpolation_id = :i"),
                         {"s": state, "i": ip})
    return ip, ids


def embedded(ctx) -> list:
    return rows(ctx, "SELECT e.id, e.frame_id, e.state, e.model, e.max_attempts, f.kind, "
                     "f.chain_index, f.t AS at FROM embeddings e JOIN frames f ON f.id = e.frame_id "
                     "ORDER BY e.id")


def history(ctx, event: str) -> list:
    return rows(ctx, "SELECT entity_id, worker, detail FROM transitions WHERE entity = "
                     "'embedding' AND event = :e ORDER BY id", e=event)


# ---------------------------------------------------------------- which frames

def test_the_midpoint_is_the_in_between_nearest_the_middle_of_its_pair():
    def row(kind, t, n):
        return kind, t, n
    # 4 in-betweens at 1/5 … 4/5: the second (2/5) is the nearest 0.5 by round(t·5)
    assert [_is_midpoint(*row("inbetween", i / 5, 4)) for i in range(1, 5)] == [
        False, True, False, False]
    assert [_is_midpoint(*row("inbetween", i / 4, 3)) for i in range(1, 4)] == [
        False, True, False]
    assert [_is_midpoint(*row("inbetween", i / 2, 1)) for i in (1,)] == [True]
    assert not _is_midpoint(*row("keyframe", 0.0, 4))
    assert not _is_midpoint(*row("inbetween", 0.5, 0))
    assert not _is_midpoint(*row("inbetween", 0.5, None))


def test_keyframes_are_found_once_and_midpoints_only_when_asked(make):
    ctx = make(DESCRIPTOR + "embed_midpoints = false\n[generation]\nmax_attempts = 7\n")
    _, inbetweens = add_pair(ctx, 0, 4)
    worker = EmbeddingWorker(ctx, ctx.embedders)
    assert worker.seen_frame_id == 0
    assert worker.discover(descriptor.MODEL_ID) == 2
    got = embedded(ctx)
    assert [(r.kind, r.chain_index, r.state, r.model, r.max_attempts) for r in got] == [
        ("keyframe", 0, "available", descriptor.MODEL_ID, 7),
        ("keyframe", 1, "available", descriptor.MODEL_ID, 7)]
    # every frame looked at is behind it now, the in-betweens too
    assert worker.seen_frame_id == inbetweens[-1]
    created = history(ctx, "created")
    assert [(h.worker, json.loads(h.detail)) for h in created] == [
        ("embedding", {"kind": "keyframe", "chain": 0}),
        ("embedding", {"kind": "keyframe", "chain": 1})]
    assert worker.discover(descriptor.MODEL_ID) == 0          # nothing new, nothing twice

    ctx.cfg.cache.embed_midpoints = True
    _, more = add_pair(ctx, 2, 4)
    assert worker.discover(descriptor.MODEL_ID) == 3
    new = embedded(ctx)[2:]
    assert [(r.kind, r.chain_index) for r in new] == [("keyframe", 2), ("keyframe", 3),
                                                      ("inbetween", 2)]
    assert new[2].frame_id == more[1] and new[2].at == pytest.approx(0.4)
    assert json.loads(history(ctx, "created")[-1].detail) == {"kind": "inbetween",
                                                              "chain": 2}


def test_frames_not_ready_or_shown_are_not_embedded_and_a_shown_one_is(make):
    ctx = make()
    fid = add_keyframe(ctx, 0, picture(0))
    gone = add_keyframe(ctx, 1, picture(1))
    shown = add_keyframe(ctx, 2, picture(2))
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE frames SET state = 'evicted' WHERE id = :i"), {"i": gone})
        conn.execute(text("UPDATE frames SET state = 'shown' WHERE id = :i"), {"i": shown})
    assert EmbeddingWorker(ctx, ctx.embedders).discover(descriptor.MODEL_ID) == 2
    assert [r.frame_id for r in embedded(ctx)] == [fid, shown]


def test_a_frame_with_a_row_of_this_model_is_skipped_but_another_models_row_is_not(make):
    ctx = make()
    a = add_keyframe(ctx, 0, picture(0))
    b = add_keyframe(ctx, 1, picture(1))
    c = add_keyframe(ctx, 2, picture(2))
    worker = EmbeddingWorker(ctx, ctx.embedders)          # before any row: seen nothing
    with ctx.engine.begin() as conn:
        tr.create(conn, "embedding", {"frame_id": a, "model": descriptor.MODEL_ID})
        tr.create(conn, "embedding", {"frame_id": c, "model": "open_clip/x/y"})
    assert worker.discover(descriptor.MODEL_ID) == 2
    mine = [r.frame_id for r in embedded(ctx) if r.model == descriptor.MODEL_ID]
    assert sorted(mine) == [a, b, c] and mine.count(a) == 1


def test_after_a_restart_frames_already_looked_at_are_not_looked_at_again(make):
    """A new model (or a restart) starts from the newest frame with a row of any model:
    the history is not re-embedded."""
    ctx = make()
    for k in range(3):
        add_keyframe(ctx, k, picture(k))
    with ctx.engine.begin() as conn:
        last = conn.execute(text("SELECT max(id) FROM frames")).scalar()
        tr.create(conn, "embedding", {"frame_id": last - 1, "model": "open_clip/x/y"})
    worker = EmbeddingWorker(ctx, ctx.embedders)
    assert worker.seen_frame_id == last - 1
    assert worker.discover(descriptor.MODEL_ID) == 1
    assert [r.frame_id for r in embedded(ctx) if r.model == descriptor.MODEL_ID] == [last]


# ---------------------------------------------------------------- the work

def test_a_tick_embeds_everything_due_in_batches_and_records_the_decision(make):
    ctx = make(DESCRIPTOR + "max_size = 50\n[generation]\nlease_seconds = 45.0\n")
    for k in range(9):                                  # more than two claims' worth
        add_keyframe(ctx, k, picture(k))
    assert EmbeddingWorker(ctx, ctx.embedders).tick() == 9
    done = rows(ctx, "SELECT state, model, dim, length(vector) AS n, in_cache, last_used_at, "
                     "lease_owner, attempt FROM embeddings ORDER BY id")
    assert {(d.state, d.model, d.dim, d.n, d.in_cache, d.attempt) for d in done} == {
        ("completed", descriptor.MODEL_ID, descriptor.DIM, 4 * descriptor.DIM, 1, 1)}
    assert all(d.last_used_at is not None and d.lease_owner is None for d in done)
    assert ctx.facts["cache_size"] == 9 and ctx.facts["embeddings_skipped"] == 0
    claims = history(ctx, "claimed")
    assert len(claims) == 9 and {c.worker for c in claims} == {"test:1:embedding"}
    completed = history(ctx, "completed")
    assert len(completed) == 9 and {c.worker for c in completed} == {"test:1:embedding"}
    detail = json.loads(completed[0].detail)
    assert detail["admitted"] is True and detail["ms"] >= 0


def test_the_vector_stored_is_the_frames_own_and_a_near_copy_stays_out(make):
    ctx = make(DESCRIPTOR + "max_size = 5\n")
    threshold = scale_for(descriptor.MODEL_ID, ctx.cfg.cache).admission
    add_keyframe(ctx, 0, picture(3))
    add_keyframe(ctx, 1, picture(3))                     # the same picture again
    worker = EmbeddingWorker(ctx, ctx.embedders)
    assert worker.tick() == 2
    got = rows(ctx, "SELECT id, vector, in_cache, last_used_at FROM embeddings ORDER BY id")
    want = descriptor.describe(picture(3))
    assert np.allclose(cache.from_blob(got[0].vector), want, atol=1e-6)
    assert (got[0].in_cache, got[1].in_cache) == (1, 0)
    assert got[1].last_used_at is None                  # not a member: never "used"
    detail = json.loads(history(ctx, "completed")[1].detail)
    assert detail["admitted"] is False and detail["nearest"] == got[0].id
    assert detail["similarity"] > threshold
    assert ctx.facts["cache_size"] == 1


def test_the_admission_threshold_is_read_on_the_models_scale(make):
    """Two different pictures a little alike (0.22): both join at the descriptor's own
    threshold (0.55), the configured 0.2 keeps the second one out."""
    ctx = make(DESCRIPTOR + "similarity_threshold = 0.2\n")
    add_keyframe(ctx, 0, picture(5))
    add_keyframe(ctx, 1, picture(10))
    EmbeddingWorker(ctx, ctx.embedders).tick()
    assert [r.in_cache for r in rows(ctx, "SELECT in_cache FROM embeddings ORDER BY id")] == [
        1, 0]


def test_nothing_is_embedded_when_the_memory_is_off_paused_or_stopping(make):
    for i, setup in enumerate(("off", "paused", "stopping")):
        ctx = make(DESCRIPTOR + ("enabled = false\n" if setup == "off" else ""))
        worker = EmbeddingWorker(ctx, ctx.embedders)
        add_keyframe(ctx, 100 + i, picture(1))
        if setup == "paused":
            ctx.facts["paused"] = True
        if setup == "stopping":
            ctx.stopping.set()
        assert worker.tick() == 0
        assert rows(ctx, "SELECT count(*) FROM embeddings WHERE state = 'completed'")[0][0] == 0
        if setup != "paused":
            assert ctx.embedders.loaded() is None       # the model was not even built
        close(ctx)


def test_a_missing_image_fails_for_good_and_the_others_are_embedded(make):
    ctx = make()
    fid = add_keyframe(ctx, 0, picture(0))
    add_keyframe(ctx, 1, picture(1))
    with ctx.engine.begin() as conn:
        path = conn.execute(text("SELECT path FROM keyframes WHERE chain_index = 0")).scalar()
    (ctx.cfg.keyframes_dir / path.rsplit("/", 1)[-1]).unlink()
    assert EmbeddingWorker(ctx, ctx.embedders).tick() == 1
    got = rows(ctx, "SELECT frame_id, state, error FROM embeddings ORDER BY id")
    assert [(g.frame_id, g.state) for g in got] == [(fid, "discarded"), (fid + 1, "completed")]
    assert got[0].error.startswith(f"image of frame {fid}: ")
    assert "No such file" in got[0].error
    assert json.loads(history(ctx, "failed")[0].detail)["why"] == "permanent"


class Broken:
    """An embedder that fails like a model out of memory."""

    model_id, dim = "broken/1", 4

    def embed(self, images):
        raise RuntimeError(f"out of memory for {len(images)} images")

    def close(self):
        pass


class Only:
    def __init__(self, embedder):
        self.embedder = embedder

    def get(self):
        return self.embedder


def test_a_failing_embedder_leaves_the_rows_to_retry_with_its_error(make):
    ctx = make(DESCRIPTOR + "[generation]\nmax_attempts = 3\n")
    add_keyframe(ctx, 0, picture(0))
    add_keyframe(ctx, 1, picture(1))
    worker = EmbeddingWorker(ctx, Only(Broken()))
    assert worker.tick() == 0
    got = rows(ctx, "SELECT state, error, model, scheduled_at FROM embeddings ORDER BY id")
    assert [(g.state, g.model) for g in got] == [("retryable", "broken/1")] * 2
    assert {g.error for g in got} == {"RuntimeError: out of memory for 2 images"}
    assert all(str(g.scheduled_at) > str(utcnow().replace(tzinfo=None)) for g in got)
    assert [json.loads(h.detail)["why"] for h in history(ctx, "failed")] == ["will retry"] * 2
    assert ctx.in_hand == set()


def claimed_then_taken(ctx):
    """A keyframe's embedding claimed by this worker, then rescued by the janitor
    meanwhile (another owner has it now): (the worker, the row it holds)."""
    add_keyframe(ctx, 0, picture(0))
    worker = EmbeddingWorker(ctx, ctx.embedders)
    worker.discover(descriptor.MODEL_ID)
    with ctx.engine.begin() as conn:
        (row,) = tr.claim(conn, "embedding", "test:1:embedding", lease_seconds=30)
        conn.execute(text("UPDATE embeddings SET lease_owner = 'other' WHERE id = :i"),
                     {"i": row.id})
    return worker, row


def test_a_row_whose_lease_was_lost_is_not_completed_by_the_late_worker(make):
    ctx = make()
    worker, row = claimed_then_taken(ctx)
    assert worker.process(ctx.embedders.get(), [row], "test:1:embedding") == 0
    assert rows(ctx, "SELECT state, vector FROM embeddings")[0] == ("executing", None)
    # and a failure of a row it no longer holds is not written either
    worker._fail(row, "test:1:embedding", "late", permanent=True)
    assert rows(ctx, "SELECT state, error FROM embeddings")[0] == ("executing", None)


def test_rows_taken_by_another_writer_between_the_look_and_the_claim_end_the_tick(make,
                                                                                 monkeypatch):
    """The race made certain: `has_due` sees work, another writer claims it before this
    worker can; the tick ends with what it did (0), it does not spin or answer None."""
    from dreamd.workers import embedding

    ctx = make()
    add_keyframe(ctx, 0, picture(0))
    real = embedding.read_model.has_due

    def seen_then_taken(conn, entity):
        due = real(conn, entity)
        with ctx.engine.begin() as other:
            tr.claim(other, entity, "another:1:embedding", limit=100, lease_seconds=30)
        return due

    monkeypatch.setattr(embedding.read_model, "has_due", seen_then_taken)
    worker = EmbeddingWorker(ctx, ctx.embedders)
    assert worker.tick() == 0
    assert rows(ctx, "SELECT state, lease_owner FROM embeddings") == [
        ("executing", "another:1:embedding")]


# ---------------------------------------------------------------- under load

def test_the_backlog_past_the_limit_sheds_midpoints_first_then_the_oldest(make):
    ctx = make(DESCRIPTOR + "embed_midpoints = true\nmax_backlog = 3\n")
    add_pair(ctx, 0, 4)                     # keyframes 0, 1 and the pair's midpoint
    add_pair(ctx, 2, 3)                     # keyframes 2, 3 and its midpoint
    worker = EmbeddingWorker(ctx, ctx.embedders)
    ctx.facts["embeddings_skipped"] = 2      # earlier sheds of this run add up
    assert worker.discover(descriptor.MODEL_ID) == 6
    assert worker.shed() == 3
    assert ctx.facts["embeddings_skipped"] == 5
    got = embedded(ctx)
    assert [(r.kind, r.chain_index) for r in got if r.state == "cancelled"] == [
        ("keyframe", 0), ("inbetween", 0), ("inbetween", 2)]
    assert [(r.kind, r.chain_index) for r in got if r.state == "available"] == [
        ("keyframe", 1), ("keyframe", 2), ("keyframe", 3)]
    skipped = rows(ctx, "SELECT t.worker, t.detail, e.completed_at FROM transitions t JOIN "
                        "embeddings e ON e.id = t.entity_id WHERE t.entity = 'embedding' "
                        "AND t.event = 'skipped' ORDER BY t.id")
    assert len(skipped) == 3 and {s.worker for s in skipped} == {"embedding"}
    assert {s.detail for s in skipped} == {"skipped under load"}
    assert all(s.completed_at is not None for s in skipped)
    # exactly at the limit: nothing more is shed
    assert worker.shed() == 0 and ctx.facts["embeddings_skipped"] == 5


def test_a_row_claimed_meanwhile_is_not_shed(make):
    ctx = make(DESCRIPTOR + "max_backlog = 1\n")
    add_keyframe(ctx, 0, picture(0))
    worker = EmbeddingWorker(ctx, ctx.embedders)
    worker.discover(descriptor.MODEL_ID)
    with ctx.engine.begin() as conn:
        tr.claim(conn, "embedding", "test:1:embedding", lease_seconds=30)
    assert worker.shed() == 0
    assert rows(ctx, "SELECT state FROM embeddings")[0][0] == "executing"


def test_playback_short_of_frames_comes_first(make):
    """Under load means fewer ready frames ahead than min_buffer_seconds · fps (live
    knobs); an empty chain (nothing made yet) is not under load."""
    ctx = make(DESCRIPTOR + "[display]\nfps = 2.0\n")
    worker = EmbeddingWorker(ctx, ctx.embedders)
    ctx.cfg.display.min_buffer_seconds = 5.0
    assert not worker.under_load()                      # no frame at all yet
    for k in range(4):
        add_keyframe(ctx, k, picture(k))
    ctx.cfg.display.min_buffer_seconds = 2.0           # 4 needed, 4 ahead
    assert not worker.under_load()
    ctx.set_knobs({"display.fps": 2.5})                 # 5 needed
    assert worker.under_load()
    assert worker.tick() == 0
    assert {r.state for r in embedded(ctx)} == {"available"}   # found, but waiting
    ctx.set_knobs({"display.min_buffer_seconds": 1.5})  # 3.75 needed
    assert not worker.under_load()
    assert worker.tick() == 4


def test_a_restarted_worker_reads_the_cache_size_and_keeps_the_skipped_count(make):
    ctx = make(DESCRIPTOR + "max_size = 2\n")
    for k in range(3):
        add_keyframe(ctx, k, picture(k))
    EmbeddingWorker(ctx, ctx.embedders).tick()
    ctx.facts.clear()
    ctx.facts["embeddings_skipped"] = 4
    EmbeddingWorker(ctx, ctx.embedders)
    assert ctx.facts == {"embeddings_skipped": 4, "cache_size": 2}


class Watching:
    """The descriptor, noting what the ledger and the process say while it works."""

    def __init__(self, ctx, embedder):
        self.ctx, self.embedder, self.seen = ctx, embedder, []
        self.model_id, self.dim = embedder.model_id, embedder.dim

    def get(self):
        return self

    def embed(self, images):
        self.seen.append((sorted(self.ctx.in_hand), rows(
            self.ctx, "SELECT id, state, lease_owner, lease_expires_at FROM embeddings "
                      "ORDER BY id")))
        return self.embedder.embed(images)


def test_rows_in_work_are_leased_for_the_configured_time_and_held_in_hand(make):
    """While a batch is embedded its rows are leased (lease_seconds) and in the
    process's hands: the janitor leaves them alone, and the game guard waits for them
    before it takes the embedder off the GPU."""
    ctx = make(DESCRIPTOR + "[generation]\nlease_seconds = 600.0\n")
    for k in range(5):
        add_keyframe(ctx, k, picture(k))
    watching = Watching(ctx, ctx.embedders.get())
    worker = EmbeddingWorker(ctx, watching)
    assert worker.tick() == 5
    (first, second) = watching.seen                     # two claims: 4, then 1
    assert first[0] == [("embedding", i) for i in (1, 2, 3, 4)]
    assert second[0] == [("embedding", 5)]
    soon = utcnow().replace(tzinfo=None) + timedelta(seconds=500)
    leased = [r for r in first[1] if r.state == "executing"]
    assert [r.id for r in leased] == [1, 2, 3, 4]
    assert all(r.lease_owner == "test:1:embedding" and str(r.lease_expires_at) > str(soon)
               for r in leased)
    assert ctx.in_hand == set()                         # given back once done


def test_paths_relative_to_the_data_dir_are_found_there(make):
    """The ledger keeps paths relative to the data dir (a moved data dir still works)."""
    ctx = make()
    fid = add_keyframe(ctx, 0, picture(0))
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE keyframes SET path = 'keyframes/k000000.png'"))
        conn.execute(text("UPDATE frames SET path = 'keyframes/k000000.png'"))
    assert EmbeddingWorker(ctx, ctx.embedders).tick() == 1
    (got,) = rows(ctx, "SELECT frame_id, state, vector FROM embeddings")
    assert (got.frame_id, got.state) == (fid, "completed")
    assert np.allclose(cache.from_blob(got.vector), descriptor.describe(picture(0)), atol=1e-6)


def test_a_batch_whose_images_are_all_gone_embeds_nothing(make):
    ctx = make()
    for k in range(2):
        add_keyframe(ctx, k, picture(k))
    for f in ctx.cfg.keyframes_dir.iterdir():
        f.unlink()
    assert EmbeddingWorker(ctx, ctx.embedders).tick() == 0
    assert {r.state for r in embedded(ctx)} == {"discarded"}


def test_a_missing_image_of_a_row_taken_meanwhile_is_not_failed_by_the_late_worker(make):
    ctx = make()
    worker, row = claimed_then_taken(ctx)
    for f in ctx.cfg.keyframes_dir.iterdir():
        f.unlink()
    assert worker.process(ctx.embedders.get(), [row], "test:1:embedding") == 0
    assert rows(ctx, "SELECT state, lease_owner, error FROM embeddings")[0] == (
        "executing", "other", None)


class Slow(Watching):
    """Embeds only once the lease of the rows it was given has been renewed."""

    def embed(self, images):
        def lease():
            return rows(self.ctx, "SELECT lease_expires_at FROM embeddings "
                                  "WHERE state = 'executing'")
        first = lease()
        wait_for(lambda: lease() != first, timeout=10, what="the lease renewed")
        return self.embedder.embed(images)


def test_the_lease_is_renewed_while_a_slow_model_works(make):
    ctx = make()
    ctx.cfg.generation.lease_seconds = 0.3       # renewed every 0.1 s
    add_keyframe(ctx, 0, picture(0))
    worker = EmbeddingWorker(ctx, Slow(ctx, ctx.embedders.get()))
    assert worker.tick() == 1
    assert rows(ctx, "SELECT state FROM embeddings")[0][0] == "completed"


class Rescued(Watching):
    """Fails after the janitor has given its rows to another owner (lease expired)."""

    def embed(self, images):
        with self.ctx.engine.begin() as conn:
            conn.execute(text("UPDATE embeddings SET lease_owner = 'other'"))
        raise RuntimeError("too late")


def test_a_failure_after_the_rows_were_taken_away_leaves_them_to_their_new_owner(make):
    ctx = make()
    add_keyframe(ctx, 0, picture(0))
    assert EmbeddingWorker(ctx, Rescued(ctx, ctx.embedders.get())).tick() == 0
    assert rows(ctx, "SELECT state, lease_owner, error FROM embeddings")[0] == (
        "executing", "other", None)


class Timed(Watching):
    """Takes at least 0.2 s for a batch."""

    def embed(self, images):
        time.sleep(0.2)
        return self.embedder.embed(images)


def test_the_time_recorded_is_per_frame_of_the_batch(make):
    ctx = make()
    for k in range(4):
        add_keyframe(ctx, k, picture(k))
    worker = EmbeddingWorker(ctx, Timed(ctx, ctx.embedders.get()))
    start = time.perf_counter()
    assert worker.tick() == 4
    wall_ms = (time.perf_counter() - start) * 1000
    ms = [json.loads(h.detail)["ms"] for h in history(ctx, "completed")]
    assert len(set(ms)) == 1 and isinstance(ms[0], float) and ms[0] == round(ms[0], 1)
    # one batch of four: at least a quarter of the 0.2 s, at most a quarter of the tick
    assert 50.0 <= ms[0] <= wall_ms / 4 + 0.05


def test_the_oldest_row_is_shed_whenever_it_was_scheduled(make, caplog):
    """Oldest by creation, not by when it was (re)scheduled: a retried row keeps its age."""
    ctx = make(DESCRIPTOR + "max_backlog = 2\n")
    for k in range(3):
        add_keyframe(ctx, k, picture(k))
    worker = EmbeddingWorker(ctx, ctx.embedders)
    worker.discover(descriptor.MODEL_ID)
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE embeddings SET scheduled_at = datetime('now', "
                          "printf('-%d minutes', id))"))
    with caplog.at_level(logging.INFO, logger="dreamd.embedding"):
        assert worker.shed() == 1
        assert [(r.chain_index, r.state) for r in embedded(ctx)] == [
            (0, "cancelled"), (1, "available"), (2, "available")]
        assert worker.shed() == 0                      # at the limit: quiet
    assert [r.getMessage() for r in caplog.records] == [
        "embedding: skipped 1 frame(s) under load (backlog 3 > 2)"]
