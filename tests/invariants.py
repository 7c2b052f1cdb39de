"""What must hold in a data dir whenever no daemon is running, whatever killed it."""

from __future__ import annotations

import bisect
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select, text

from dreamd.ledger import database, transitions as tr
from dreamd.ledger.states import is_legal
from dreamd.ledger.models import ENTITY_MODELS, Transition
from dreamd.storage.paths import resolve
from dreamd.storage.reconcile import IMAGE_MISSING


def replay_all(conn) -> None:
    """The history explains every row: each row's transitions replay to its state."""
    hist = conn.execute(select(Transition.__table__).order_by(Transition.__table__.c.id)).all()
    by_row: dict = {}
    for h in hist:
        by_row.setdefault((h.entity, h.entity_id), []).append(h)
    for entity, model in ENTITY_MODELS.items():
        table = model.__table__
        for rid, state in conn.execute(select(table.c.id, table.c.state)).all():
            entries = by_row.get((entity, rid), [])
            if entries and entries[0].from_state is not None:
                # retention pruned the start of this row's history (storage.
                # frame_history_hours): what is left must still chain, legally, to its state
                current = entries[0].from_state
                for e in entries:
                    assert e.from_state == current and is_legal(entity, e.from_state,
                                                                 e.to_state), (entity, rid, e.id)
                    current = e.to_state
                assert current == state, (entity, rid)
                continue
            if not entries and conn.execute(text(
                    "SELECT min(at) FROM transitions")).scalar() is not None and conn.execute(
                    text(f"SELECT created_at < (SELECT min(at) FROM transitions) FROM "
                         f"{table.name} WHERE id = :id"), {"id": rid}).scalar():
                continue      # older than the oldest history kept: pruned whole
            assert tr.replay(entries) == state, (entity, rid)


# A frame the display passed over must have become visible after the display read the
# ledger to choose the next frame, which it did after showing the previous one. Its
# row carries the time its transaction began, a moment before it became visible: this
# much is allowed for that moment on a loaded machine. A frame really skipped had been
# ready for the buffer's length (the tests' are seconds).
MADE_LATE_SLACK = timedelta(seconds=0.5)


def _time(value) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def no_gap(conn) -> None:
    """Nothing vanished unseen. In playback order, every frame between two shown ones
    was shown, or a transition explains why not: its file was missing at a start
    (reconcile), or its segment was made only after the playhead had passed its place
    (the display never waits behind it; the janitor evicts it "behind the playhead").
    Retention evicts shown frames only, so no row goes ready -> evicted "retention";
    and a frame evicted "behind the playhead" was behind a shown frame already.

    Rows pruned whole (`storage.frame_history_hours`) are not judged, and nothing is
    judged against them: only frames newer than every pruned one (ids above the last
    hole), whose eviction is still in the history."""
    frames = conn.execute(text(
        "SELECT id, chain_index, t AS pos, state, created_at, shown_at, evicted_at "
        "FROM frames ORDER BY chain_index, t")).all()
    why = {r.entity_id: r.detail for r in conn.execute(text(
        "SELECT entity_id, detail, from_state FROM transitions "
        "WHERE entity = 'frame' AND to_state = 'evicted'")).all()}
    unseen = conn.execute(text(
        "SELECT entity_id FROM transitions WHERE entity = 'frame' AND from_state = 'ready' "
        "AND to_state = 'evicted' AND detail = 'retention'")).scalars().all()
    assert not unseen, f"retention deleted ready frames, never shown: {unseen[:10]}"
    if not frames:
        return
    # ids are handed out in creation order; a hole is a row pruned whole
    ids = sorted(f.id for f in frames)
    pruned_up_to = max([ids[0] - 1] + [b - 1 for a, b in zip(ids, ids[1:]) if b != a + 1])
    # and nothing at or before the place of an older frame that is left
    old = [(f.chain_index, f.pos) for f in frames if f.id <= pruned_up_to]
    judged_after = max(old) if old else None

    shown = [f for f in frames if f.shown_at is not None]
    places = [(f.chain_index, f.pos) for f in shown]
    for f in frames:
        place = (f.chain_index, f.pos)
        if f.shown_at is not None or f.id <= pruned_up_to or (
                judged_after is not None and place <= judged_after):
            continue
        # the first shown frame after this one: the playhead passed it there
        i = bisect.bisect_right(places, place)
        passed_by = shown[i] if i < len(shown) else None
        if f.state == "evicted":
            if f.id not in why:
                continue                    # its eviction left the history: not judged
            if why[f.id] == "file missing at start":
                continue
            assert why[f.id] == "behind the playhead", \
                f"frame {f.id} {place} evicted unseen ({why[f.id]!r})"
            assert passed_by is not None and _time(passed_by.shown_at) < _time(f.evicted_at), (
                f"frame {f.id} {place} evicted 'behind the playhead' at {f.evicted_at} "
                f"before the playhead passed it")
        if i == 0 or passed_by is None:
            continue                        # not between two shown frames
        # between two shown frames and not shown: it must have been made too late, after
        # the display had shown the frame before it and read the ledger for the next
        before = shown[i - 1]
        made, seen = _time(f.created_at), _time(before.shown_at)
        assert made >= seen - MADE_LATE_SLACK, (
            f"gap: frame {f.id} {place} ({f.state}) was made at {made}, before the display "
            f"showed frame {before.id} {places[i - 1]} at {seen}, but the display went on to "
            f"frame {passed_by.id} {places[i]} without showing it")


def check(data_dir: Path) -> dict:
    """Assert the invariants; return a few facts for further assertions."""
    engine = database.reader(Path(data_dir) / "dreamd.db")
    try:
        with engine.connect() as conn:
            frames = conn.execute(text("SELECT id, chain_index, t, state, path, shown_at "
                                       "FROM frames")).all()
            # no place in the playback order produced twice
            places = [(f.chain_index, f._mapping["t"]) for f in frames]
            assert len(places) == len(set(places)), "a (chain_index, t) was produced twice"
            # files before rows: every live row has its file ...
            live = [f for f in frames if f.state in ("ready", "shown")]
            missing = [f.path for f in live if not resolve(data_dir, f.path).exists()]
            assert not missing, f"rows without files: {missing[:5]}"
            # ... and no frame file lacks a live row
            named = {resolve(data_dir, f.path) for f in live}
            on_disk = {p for p in (Path(data_dir) / "frames").glob("*.png")}
            assert on_disk <= named, f"files without rows: {sorted(on_disk - named)[:5]}"
            # nothing left executing
            for entity in ("keyframe", "interpolation", "embedding"):
                table = ENTITY_MODELS[entity].__table__
                stuck = conn.execute(select(table.c.id).where(table.c.state == "executing")
                                     ).scalars().all()
                assert not stuck, f"{entity} rows stuck executing: {stuck}"
            # playback order: shown frames, by time shown, move strictly forward
            shown = sorted((f for f in frames if f.shown_at is not None),
                           key=lambda f: (f.shown_at, f.id))
            order = [(f.chain_index, f._mapping["t"]) for f in shown]
            assert order == sorted(order) and len(order) == len(set(order)), \
                "frames were shown out of order"
            replay_all(conn)
            no_gap(conn)
            keyframe_files = {resolve(data_dir, p) for p in conn.execute(text(
                "SELECT path FROM keyframes WHERE path IS NOT NULL")).scalars()}
            on_disk_k = set((Path(data_dir) / "keyframes").glob("*.png"))
            assert on_disk_k <= keyframe_files, \
                f"keyframe files without rows: {sorted(on_disk_k - keyframe_files)[:5]}"
            kept_keyframes(conn, data_dir)
            rt = conn.execute(text("SELECT * FROM runtime_state WHERE id = 1")).first()
            return {"frames": len(frames), "shown": order,
                    "playhead": (rt.playhead_chain_index, rt.playhead_t) if rt else None,
                    "keyframes": conn.execute(text("SELECT count(*) FROM keyframes WHERE "
                                                   "state='completed'")).scalar()}
    finally:
        engine.dispose()


def kept_keyframes(conn, data_dir: Path) -> None:
    """Keyframe images are kept while the README's policy says so: a completed keyframe
    that retention has not marked pruned still has its image, and none that is still
    needed was pruned - the chain's head (the next img2img input), the parent of a
    keyframe not yet made, either end of a batch not yet made. Written from the README,
    not from retention's own query."""
    for r in conn.execute(text("SELECT chain_index, path FROM keyframes WHERE state = "
                               "'completed' AND pruned_at IS NULL AND path IS NOT NULL")):
        assert resolve(data_dir, r.path).exists(), \
            f"keyframe {r.chain_index}: image deleted, but its row says it is kept"
    pending = "('available', 'executing', 'retryable')"
    needed = conn.execute(text(
        "SELECT id FROM (SELECT id FROM keyframes WHERE state = 'completed' "
        "                ORDER BY chain_index DESC LIMIT 1) "
        f"UNION SELECT parent_id FROM keyframes WHERE state IN {pending} "
        f"UNION SELECT from_keyframe_id FROM interpolations WHERE state IN {pending} "
        f"UNION SELECT to_keyframe_id FROM interpolations WHERE state IN {pending}")
    ).scalars().all()
    # (an image that vanished outside dreamd is marked pruned at the next start, with
    # why: nothing else can be done with it, and that is not retention's doing)
    pruned = conn.execute(text(
        "SELECT chain_index FROM keyframes WHERE pruned_at IS NOT NULL "
        f"AND error IS NOT '{IMAGE_MISSING}' AND id IN "
        f"({','.join(str(i) for i in needed if i is not None) or 'NULL'})")).scalars().all()
    assert not pruned, f"keyframes pruned while still needed: {pruned}"


def distinct_frame_files(data_dir: Path) -> None:
    """No frame file holds another's bytes (a swap once wrote frames through a stale
    link into older frames' files), and every keyframe file still has the sha256 its row
    recorded. Frames whose images are truly equal would be allowed: none of the tests'
    dreams make two."""
    import hashlib

    from dreamd.storage.paths import resolve

    data_dir = Path(data_dir)
    seen: dict[str, Path] = {}
    for p in sorted((data_dir / "frames").glob("*.png")):
        h = hashlib.sha256(p.read_bytes()).hexdigest()
        assert h not in seen, f"{p.name} has the same bytes as {seen[h].name}"
        seen[h] = p
    engine = database.reader(data_dir / "dreamd.db")
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, path, sha256 FROM keyframes "
                                     "WHERE state = 'completed' AND sha256 IS NOT NULL")).all()
    finally:
        engine.dispose()
    for r in rows:
        p = resolve(data_dir, r.path)
        if p is not None and p.exists():
            assert hashlib.sha256(p.read_bytes()).hexdigest() == r.sha256, \
                f"keyframe {r.id}: {p.name} no longer has the bytes its row recorded"
