"""Each verb of the state machine, its whole effect: the row's columns and the
`transitions` entry it appends (event, worker, detail), written from the README's
lifecycle table. Mutation testing (`make mutate`) found these unchecked: a lease that
expired the moment it was granted, a default backoff that ignored the attempt, a
release that touched rows in other states, a postpone that kept the attempt."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from dreamd.errors import IllegalTransitionError, StaleTransitionError
from dreamd.ledger import transitions as tr
from dreamd.ledger.models import Keyframe, utcnow
from tests.test_ledger import make_keyframes

KF = Keyframe.__table__


def row(conn, kid):
    return conn.execute(select(KF).where(KF.c.id == kid)).one()


def last(conn, kid):
    return tr.history(conn, "keyframe", kid)[-1]


def test_a_claim_leases_for_lease_seconds_from_now_and_counts_the_attempt(engine):
    (kid,) = make_keyframes(engine, 1)
    now = utcnow()
    with engine.begin() as conn:
        (claimed,) = tr.claim(conn, "keyframe", "w1", lease_seconds=42, now=now)
        r = row(conn, kid)
        entry = last(conn, kid)
    assert claimed.id == kid
    assert (r.state, r.attempt, r.lease_owner) == ("executing", 1, "w1")
    assert r.lease_expires_at == now + timedelta(seconds=42)
    assert r.started_at == now
    assert (entry.event, entry.worker, entry.from_state, entry.to_state, entry.at) == \
        ("claimed", "w1", "available", "executing", now)
    assert json.loads(entry.detail) == {"attempt": 1}


def test_a_lease_is_not_rescued_before_it_expires_and_is_at_the_instant_after(engine):
    (kid,) = make_keyframes(engine, 1)
    now = utcnow()
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=10, now=now)
        assert tr.rescue(conn, "keyframe", now=now + timedelta(seconds=9)) == \
            {"available": [], "discarded": []}
        assert tr.rescue(conn, "keyframe", now=now + timedelta(seconds=10)) == \
            {"available": [], "discarded": []}         # expires after, not at, the instant
        assert tr.rescue(conn, "keyframe", now=now + timedelta(seconds=10, microseconds=1)) \
            == {"available": [kid], "discarded": []}
        r, entry = row(conn, kid), last(conn, kid)
    assert (r.state, r.lease_owner, r.lease_expires_at, r.error) == \
        ("available", None, None, "abandoned: lease expired")
    assert r.scheduled_at == now + timedelta(seconds=10, microseconds=1)
    assert r.attempt == 1                  # an abandoned attempt counts (crash loops end)
    assert (entry.event, entry.worker) == ("abandoned", "janitor")
    assert json.loads(entry.detail) == {"attempt": 1}


def test_claims_stage_due_retries_first_recorded_by_the_claimer(engine):
    (kid,) = make_keyframes(engine, 1)
    now = utcnow()
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=30, now=now)
        tr.fail(conn, "keyframe", kid, "w", "boom", backoff_seconds=5, now=now)
        assert not tr.has_due(conn, "keyframe", now=now + timedelta(seconds=4))
        assert tr.has_due(conn, "keyframe", now=now + timedelta(seconds=5))
        (again,) = tr.claim(conn, "keyframe", "w2", lease_seconds=30,
                            now=now + timedelta(seconds=5))
        staged = [h for h in tr.history(conn, "keyframe", kid) if h.event == "staged"]
    assert again.attempt == 2
    assert [(h.worker, h.from_state, h.to_state) for h in staged] == \
        [("w2", "retryable", "available")]


def test_has_due_sees_only_available_or_retryable_rows_that_are_due(engine):
    now = utcnow()
    with engine.begin() as conn:
        assert not tr.has_due(conn, "keyframe", now=now)
    (kid,) = make_keyframes(engine, 1, scheduled_at=now + timedelta(seconds=30))
    with engine.begin() as conn:
        assert not tr.has_due(conn, "keyframe", now=now)
        assert tr.has_due(conn, "keyframe", now=now + timedelta(seconds=30))
        tr.claim(conn, "keyframe", "w", lease_seconds=30, now=now + timedelta(seconds=30))
        assert not tr.has_due(conn, "keyframe", now=now + timedelta(seconds=60))


def test_heartbeat_renews_from_now_only_the_owners_executing_rows(engine):
    a, b, c = make_keyframes(engine, 3)
    now = utcnow()
    later = now + timedelta(seconds=20)
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=30, limit=2, now=now)   # a, b
        tr.complete(conn, "keyframe", b, "w", now=now)
        assert tr.heartbeat(conn, "keyframe", [], "w", lease_seconds=30) == 0
        assert tr.heartbeat(conn, "keyframe", [a, b, c], "w", lease_seconds=30, now=later) == 1
        rows = {r.id: r for r in conn.execute(select(KF)).all()}
    assert rows[a].lease_expires_at == later + timedelta(seconds=30)
    assert rows[b].lease_expires_at is None and rows[b].state == "completed"
    assert rows[c].lease_expires_at is None and rows[c].state == "available"


def test_complete_clears_the_lease_and_records_its_detail(engine):
    (kid,) = make_keyframes(engine, 1)
    now = utcnow()
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=30, now=now)
        done = now + timedelta(seconds=3)
        tr.complete(conn, "keyframe", kid, "w", values={"generation_ms": 123.0},
                    detail={"ms": 123}, now=done)
        r, entry = row(conn, kid), last(conn, kid)
    assert (r.state, r.lease_owner, r.lease_expires_at, r.error, r.generation_ms) == \
        ("completed", None, None, None, 123.0)
    assert r.completed_at == done
    assert (entry.event, entry.worker, entry.at, json.loads(entry.detail)) == \
        ("completed", "w", done, {"ms": 123})


def test_only_the_lease_holder_completes_and_the_error_says_why(engine):
    (kid,) = make_keyframes(engine, 1)
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=30)
        with pytest.raises(StaleTransitionError,
                           match=f"keyframe {kid}: expected executing leased to intruder, "
                                 "found executing; executing -> completed not applied"):
            tr.complete(conn, "keyframe", kid, "intruder")
        with pytest.raises(StaleTransitionError, match="found no such row"):
            tr.complete(conn, "keyframe", kid + 99, "w")
    with pytest.raises(IllegalTransitionError, match="unknown entity 'keyframes'"):
        with engine.begin() as conn:
            tr.create(conn, "keyframes", {})
    with pytest.raises(IllegalTransitionError, match="frame rows are not claimed"):
        with engine.begin() as conn:
            tr.claim(conn, "frame", "w", lease_seconds=30)


@pytest.mark.parametrize("attempt, seconds", [(1, 2), (2, 4), (3, 8), (5, 32), (9, 300),
                                              (30, 300), (0, 2)])
def test_retry_backoff_doubles_from_two_seconds_up_to_five_minutes(attempt, seconds):
    assert tr.retry_backoff(attempt) == seconds        # README: 2 s, 4 s, … ≤ 300 s


def test_a_failure_retries_after_the_backoff_of_its_attempt(engine):
    (kid,) = make_keyframes(engine, 1, max_attempts=5)
    now = utcnow()
    long_error = "x" * 5000
    with engine.begin() as conn:
        for attempt, wait in ((1, 2), (2, 4), (3, 8)):
            (r,) = tr.claim(conn, "keyframe", "w", lease_seconds=30, now=now)
            assert r.attempt == attempt
            assert tr.fail(conn, "keyframe", kid, "w", long_error, now=now) == "retryable"
            r, entry = row(conn, kid), last(conn, kid)
            assert r.scheduled_at == now + timedelta(seconds=wait)
            assert (r.state, r.lease_owner, r.lease_expires_at, r.completed_at) == \
                ("retryable", None, None, None)
            assert r.error == long_error[:4000]
            assert (entry.event, entry.worker, entry.at) == ("failed", "w", now)
            assert json.loads(entry.detail) == {"error": long_error[:500], "why": "will retry"}
            now += timedelta(seconds=wait)


def test_a_failure_with_its_attempts_used_up_or_permanent_is_discarded(engine):
    used, perm = make_keyframes(engine, 2, max_attempts=1)
    now = utcnow()
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=30, limit=2, now=now)
        assert tr.fail(conn, "keyframe", used, "w", "boom", now=now) == "discarded"
        assert tr.fail(conn, "keyframe", perm, "w", "no such checkpoint", permanent=True,
                       now=now) == "discarded"
        for kid, why in ((used, "attempts used up"), (perm, "permanent")):
            r, entry = row(conn, kid), last(conn, kid)
            assert (r.state, r.completed_at, r.lease_owner) == ("discarded", now, None)
            assert json.loads(entry.detail)["why"] == why


def test_postpone_gives_the_attempt_back_and_waits_its_delay(engine):
    """A full disk is not the job's fault: retryable after `delay_seconds`, event
    `postponed`, and the attempt it used is given back."""
    a, b = make_keyframes(engine, 2)
    now = utcnow()
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=30, limit=2, now=now)
        tr.postpone(conn, "keyframe", a, "w", "No space left on device", delay_seconds=7,
                    now=now)
        ra, rb, entry = row(conn, a), row(conn, b), last(conn, a)
        with pytest.raises(StaleTransitionError):
            tr.postpone(conn, "keyframe", b, "not-the-owner", "x", delay_seconds=1)
    assert (ra.state, ra.attempt, ra.lease_owner, ra.lease_expires_at, ra.error) == \
        ("retryable", 0, None, None, "No space left on device")
    assert ra.scheduled_at == now + timedelta(seconds=7)
    assert (rb.state, rb.attempt) == ("executing", 1)            # the other row untouched
    assert (entry.event, entry.worker, entry.at) == ("postponed", "w", now)
    assert json.loads(entry.detail) == {"error": "No space left on device",
                                        "why": "environment"}


def test_release_gives_back_only_the_owners_executing_rows(engine):
    mine, done, theirs, waiting = make_keyframes(engine, 4)
    now = utcnow()
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "me", lease_seconds=30, limit=2, now=now)   # mine, done
        tr.complete(conn, "keyframe", done, "me", now=now)
        tr.claim(conn, "keyframe", "them", lease_seconds=30, now=now)          # theirs
        stop = now + timedelta(seconds=5)
        assert tr.release(conn, "keyframe", "me", now=stop, detail="signal SIGTERM") == [mine]
        rows = {r.id: r for r in conn.execute(select(KF)).all()}
        entry = last(conn, mine)
    r = rows[mine]
    assert (r.state, r.lease_owner, r.lease_expires_at, r.attempt, r.scheduled_at) == \
        ("available", None, None, 0, stop)
    assert (entry.event, entry.worker, entry.from_state, entry.to_state, entry.detail) == \
        ("released", "me", "executing", "available", "signal SIGTERM")
    assert (rows[done].state, rows[done].attempt) == ("completed", 1)
    assert (rows[theirs].state, rows[theirs].lease_owner) == ("executing", "them")
    assert (rows[waiting].state, rows[waiting].attempt) == ("available", 0)


def test_rescue_of_a_row_with_no_attempts_left_discards_it(engine):
    (kid,) = make_keyframes(engine, 1, max_attempts=1)
    now = utcnow()
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=1, now=now)
        assert tr.rescue(conn, "keyframe", now=now + timedelta(seconds=2), worker="start") == \
            {"available": [], "discarded": [kid]}
        r, entry = row(conn, kid), last(conn, kid)
    assert (r.state, r.completed_at, r.error) == \
        ("discarded", now + timedelta(seconds=2), "abandoned: lease expired, attempts used up")
    assert (entry.event, entry.worker, entry.to_state) == ("abandoned", "start", "discarded")


def test_every_lease_rescues_unexpired_leases_too(engine):
    (kid,) = make_keyframes(engine, 1)
    now = utcnow()
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=600, now=now)
        assert tr.rescue(conn, "keyframe", now=now, every_lease=True) == \
            {"available": [kid], "discarded": []}


def test_details_that_are_not_json_are_stored_as_text(engine):
    (kid,) = make_keyframes(engine, 1)
    when = utcnow()
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=30)
        tr.complete(conn, "keyframe", kid, "w", detail={"b": 1, "at": when})
        detail = conn.execute(text("SELECT detail FROM transitions ORDER BY id DESC LIMIT 1")
                              ).scalar()
    assert json.loads(detail) == {"at": str(when), "b": 1}
    assert detail.index('"at"') < detail.index('"b"')            # sorted keys


def test_create_records_its_state_time_worker_and_detail(engine):
    from dreamd.ledger.states import is_legal

    at = utcnow() - timedelta(hours=1)
    with engine.begin() as conn:
        fid = tr.create(conn, "frame", {"chain_index": 0, "t": 0.0, "kind": "keyframe",
                                        "path": "frames/x.png", "state": "ready",
                                        "created_at": at}, worker="interpolation",
                        detail={"batch": 7})
        entry = tr.history(conn, "frame", fid)[-1]
        with pytest.raises(IllegalTransitionError,
                           match="a frame cannot be created 'shown': expected 'ready'"):
            tr.create(conn, "frame", {"chain_index": 1, "t": 0.0, "kind": "keyframe",
                                      "path": "frames/y.png", "state": "shown"})
        with pytest.raises(IllegalTransitionError, match=r"frame \d+: ready -> executing is not "
                                                         "a legal transition"):
            tr.transition(conn, "frame", fid, "ready", "executing")
    assert (entry.from_state, entry.to_state, entry.event, entry.worker, entry.at) == \
        (None, "ready", "created", "interpolation", at)
    assert json.loads(entry.detail) == {"batch": 7}
    assert not is_legal("no-such-entity", None, "available")


def test_an_unknown_entity_is_named_with_the_known_ones(engine):
    with pytest.raises(IllegalTransitionError,
                       match="unknown entity 'keyframes': expected one of keyframe, "):
        with engine.begin() as conn:
            tr.history(conn, "keyframe", 1)
            tr.has_due(conn, "keyframes")


def test_a_transition_without_an_owner_says_only_the_state_and_names_its_event(engine):
    (kid,) = make_keyframes(engine, 1)
    with engine.begin() as conn:
        with pytest.raises(StaleTransitionError,
                           match=f"^keyframe {kid}: expected executing, found available; "
                                 "executing -> completed not applied$"):
            tr.transition(conn, "keyframe", kid, "executing", "completed")
        tr.transition(conn, "keyframe", kid, "available", "cancelled", worker="planner")
        entry = last(conn, kid)
    assert (entry.event, entry.worker) == ("cancelled", "planner")     # event = new state


def test_claimed_rows_come_back_in_chain_order(engine):
    """The rows a batch claim returns are in chain order whatever their row ids."""
    with engine.begin() as conn:
        ids = [tr.create(conn, "keyframe", {"chain_index": k, "backend": "procedural",
                                            "theme": "t", "prompt": "p", "seed": k,
                                            "denoise": 0.3, "source": "img2img", "width": 8,
                                            "height": 8}) for k in (5, 3, 4)]
        rows = tr.claim(conn, "keyframe", "w", lease_seconds=30, limit=3)
    assert [r.chain_index for r in rows] == [3, 4, 5]
    assert [r.id for r in rows] == [ids[1], ids[2], ids[0]]


def test_a_cancelled_row_keeps_no_lease_for_heartbeat_or_release(engine):
    """A plan dropped while it ran (executing -> cancelled) may keep its lease columns;
    neither a heartbeat nor a stop's release may touch it again."""
    (kid,) = make_keyframes(engine, 1)
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=30)
        tr.transition(conn, "keyframe", kid, "executing", "cancelled", owner="w")
        assert tr.heartbeat(conn, "keyframe", [kid], "w", lease_seconds=30) == 0
        assert tr.release(conn, "keyframe", "w") == []
        assert row(conn, kid).state == "cancelled"


def test_postponed_errors_are_cut_like_failures(engine):
    (kid,) = make_keyframes(engine, 1)
    long_error = "y" * 5000
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=30)
        tr.postpone(conn, "keyframe", kid, "w", long_error, delay_seconds=1)
        r, entry = row(conn, kid), last(conn, kid)
    assert r.error == long_error[:4000]
    assert json.loads(entry.detail)["error"] == long_error[:500]


def test_a_discarded_rescue_clears_the_lease_and_records_the_attempt(engine):
    (kid,) = make_keyframes(engine, 1, max_attempts=1)
    now = utcnow()
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=1, now=now)
        tr.rescue(conn, "keyframe", now=now + timedelta(seconds=2))
        r, entry = row(conn, kid), last(conn, kid)
    assert (r.lease_owner, r.lease_expires_at) == (None, None)
    assert json.loads(entry.detail) == {"attempt": 1}


def test_history_is_one_rows_entries_oldest_first(engine):
    (kid,) = make_keyframes(engine, 1)
    with engine.begin() as conn:
        fid = tr.create(conn, "frame", {"chain_index": 0, "t": 0.0, "kind": "keyframe",
                                        "path": "frames/x.png"})
        # a frame with the keyframe's id: its history is not the keyframe's
        conn.execute(text("UPDATE frames SET id = :k WHERE id = :f"), {"k": kid, "f": fid})
        conn.execute(text("UPDATE transitions SET entity_id = :k WHERE entity = 'frame'"),
                     {"k": kid})
        tr.claim(conn, "keyframe", "w", lease_seconds=30)
        tr.complete(conn, "keyframe", kid, "w")
        events = [(h.entity, h.event) for h in tr.history(conn, "keyframe", kid)]
    assert events == [("keyframe", "created"), ("keyframe", "claimed"),
                      ("keyframe", "completed")]


def test_replay_names_the_entry_that_breaks_a_history(engine):
    (kid,) = make_keyframes(engine, 1)
    with engine.begin() as conn:
        tr.claim(conn, "keyframe", "w", lease_seconds=30)
        entries = tr.history(conn, "keyframe", kid)
    assert tr.replay(entries) == "executing"
    with pytest.raises(StaleTransitionError,
                       match=rf"^keyframe {kid}: history entry {entries[1].id} goes available "
                             r"-> executing but the row was None$"):
        tr.replay(entries[1:])
    from types import SimpleNamespace
    bad = SimpleNamespace(**{**entries[0]._mapping, "to_state": "completed"})  # illegal
    with pytest.raises(IllegalTransitionError,
                       match=rf"^keyframe {kid}: history entry {bad.id} None -> completed is "
                             "illegal$"):
        tr.replay([bad])


def test_transition_each_moves_the_rows_still_in_the_state_and_names_the_others(engine):
    """Many rows in one go (the display records the frames it showed this way): each
    with its own time and values, one log entry each; a row that left the state
    meanwhile is not touched and its id comes back."""
    kids = make_keyframes(engine, 3)
    t0 = utcnow()
    with engine.begin() as conn:
        tr.transition(conn, "keyframe", kids[1], "available", "cancelled", worker="user")
        stale = tr.transition_each(conn, "keyframe", [
            (kid, t0 + timedelta(seconds=i), {"error": f"reason {i}"})
            for i, kid in enumerate(kids)], "available", "cancelled", worker="w")
        rows = [row(conn, kid) for kid in kids]
        entries = [tr.history(conn, "keyframe", kid)[-1] for kid in kids]
    assert stale == [kids[1]]
    assert [r.state for r in rows] == ["cancelled"] * 3
    assert [r.error for r in rows] == ["reason 0", None, "reason 2"]
    assert [(e.worker, e.at) for e in entries] == [
        ("w", t0), ("user", entries[1].at), ("w", t0 + timedelta(seconds=2))]


def test_transition_each_refuses_an_illegal_edge_or_mixed_values_before_writing(engine):
    kids = make_keyframes(engine, 2)
    with engine.begin() as conn:
        with pytest.raises(IllegalTransitionError):
            tr.transition_each(conn, "keyframe", [(kids[0], utcnow(), {})],
                               "available", "completed")
        with pytest.raises(ValueError, match="same values"):
            tr.transition_each(conn, "keyframe", [(kids[0], utcnow(), {"error": "x"}),
                                                  (kids[1], utcnow(), {})],
                               "available", "cancelled")
        assert [row(conn, k).state for k in kids] == ["available", "available"]
        assert tr.transition_each(conn, "keyframe", [], "available", "cancelled") == []
