"""Stores the measurements (metrics.py) in the ledger's `quality` table: the
interpolation worker calls `record_segment` once a batch's frames are written, the
keyframe worker `record_keyframe` once a keyframe is stored, each with the pictures it
still holds in memory. Measuring never fails the work it describes: an error is logged
once (then at debug level) and the row is simply missing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from sqlalchemy import insert, text

from dreamd.conditions import classify
from dreamd.ledger.models import Quality
from dreamd.quality.metrics import (KeyframeQuality, SegmentQuality, colour_drift,
                                    measure_keyframe, measure_segment, small_copy)
from dreamd.storage.paths import resolve

log = logging.getLogger("dreamd.quality")
Q = Quality.__table__


class Recent:
    """The small copies measured last, so the next segment or keyframe compares with its
    predecessor without reading a PNG back (a decode would cost more than measuring).
    Not durable and bounded: after a restart the predecessor is read from disk once."""

    def __init__(self, size: int = 8) -> None:
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def put(self, key: tuple, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def get(self, key: tuple) -> Any:
        with self._lock:
            return self._items.get(key)


# (data dir, chain index) -> (interpolation id, its segment's last frame, small)
SEGMENT_ENDS = Recent()
# (data dir, keyframe id) -> the keyframe's small copy
KEYFRAMES = Recent()
_failed_once: set[str] = set()
_failed_lock = threading.Lock()


def _failed(kind: str, chain_index: int, exc: BaseException) -> None:
    with _failed_lock:
        first = kind not in _failed_once
        _failed_once.add(kind)
    # a known condition (disk full, ledger busy...) is said by its own machinery: one
    # line here, no traceback; anything else is a bug worth its traceback
    condition = classify(exc)
    if first:
        log.warning("quality of %s %d not measured (%s); the dream goes on, and later "
                    "failures are logged at debug level", kind, chain_index,
                    condition or f"{type(exc).__name__}: {exc}",
                    exc_info=None if condition else exc)
    else:
        log.debug("quality of %s %d not measured: %s", kind, chain_index, exc)


def _read_small(data_dir: Path, *paths: str | None) -> np.ndarray | None:
    """The small copy of the first of `paths` that can be read (None when none can)."""
    for value in paths:
        path = resolve(data_dir, value)
        if path is None:
            continue
        try:
            with Image.open(path) as im:
                return small_copy(im.convert("RGB"))
        except (OSError, ValueError):
            continue
    return None


def _insert(ctx, values: dict[str, Any]) -> None:
    with ctx.engine.begin() as conn:
        conn.execute(insert(Q).values(**values))


# ---------------------------------------------------------------- a segment

PREVIOUS_SEGMENT_SQL = text(
    "SELECT interpolation_id, motion FROM quality WHERE entity = 'segment' "
    "AND chain_index = :c ORDER BY id DESC LIMIT 1")
# the frame played just before a segment's first: the previous segment's last
LAST_FRAME_SQL = text(
    "SELECT path FROM frames WHERE chain_index = :c AND state != 'evicted' "
    "ORDER BY t DESC LIMIT 1")


def record_segment(ctx, batch, frames: Sequence[Image.Image | np.ndarray]) -> SegmentQuality | None:
    """Measure a completed batch's frames (in playback order, the keyframe as shown
    first) and store a `segment` row; None (logged) when that failed."""
    try:
        return _record_segment(ctx, batch, frames)
    except Exception as exc:        # a measurement never fails the batch
        _failed("segment", batch.chain_index, exc)
        return None


def _record_segment(ctx, batch, frames) -> SegmentQuality:
    started = time.perf_counter()
    data_dir = ctx.cfg.data_dir
    smalls = [small_copy(f) for f in frames]
    previous = batch.chain_index - 1
    with ctx.reader.connect() as conn:
        before = conn.execute(PREVIOUS_SEGMENT_SQL, {"c": previous}).first()
        kept = SEGMENT_ENDS.get((str(data_dir), previous))
        if kept is not None and before is not None and kept[0] == before.interpolation_id:
            last = kept[1]
        else:       # after a restart, or a segment measured by no one: read it back
            path = conn.execute(LAST_FRAME_SQL, {"c": previous}).scalar()
            last = _read_small(data_dir, path)
    q = measure_segment(smalls, last, before.motion if before is not None else None)
    ms = (time.perf_counter() - started) * 1000
    _insert(ctx, {"entity": "segment", "chain_index": batch.chain_index,
                  "interpolation_id": batch.id, "measure_ms": ms, **q.as_row()})
    if smalls:
        SEGMENT_ENDS.put((str(data_dir), batch.chain_index), (batch.id, smalls[-1]))
    return q


# ---------------------------------------------------------------- a keyframe

PREVIOUS_KEYFRAME_SQL = text(
    "SELECT k.id, k.theme, k.path, k.thumb_path, k.pruned_at, q.reference_id "
    "FROM keyframes k LEFT JOIN quality q ON q.keyframe_id = k.id "
    "WHERE k.chain_index = :c AND k.state = 'completed' ORDER BY k.id DESC LIMIT 1")
REFERENCE_SQL = text(
    "SELECT lab_l, lab_a, lab_b FROM quality WHERE keyframe_id = :id")


def record_keyframe(ctx, row, image: Image.Image | np.ndarray) -> KeyframeQuality | None:
    """Measure a stored keyframe (`row` is its keyframes row; `image` the picture) and
    store a `keyframe` row; None (logged) when that failed."""
    try:
        return _record_keyframe(ctx, row, image)
    except Exception as exc:        # a measurement never fails the keyframe
        _failed("keyframe", row.chain_index, exc)
        return None


def reference_of(row, before) -> int | None:
    """The keyframe whose colour this one's drift is measured from: the first of its
    chain's run of one theme. A keyframe starts a new run (is its own reference) when
    it starts from a seed, when its theme differs from the previous keyframe's, or when
    the previous one has no reference (no previous, or it was never measured)."""
    if (row.source == "seed" or before is None or before.theme != row.theme
            or before.reference_id is None):
        return None
    return before.reference_id


def _record_keyframe(ctx, row, image) -> KeyframeQuality:
    started = time.perf_counter()
    data_dir = ctx.cfg.data_dir
    small = small_copy(image)
    with ctx.reader.connect() as conn:
        before = conn.execute(PREVIOUS_KEYFRAME_SQL, {"c": row.chain_index - 1}).first()
        previous = None
        if before is not None:
            previous = KEYFRAMES.get((str(data_dir), before.id))
            if previous is None:
                previous = _read_small(data_dir, before.path if before.pruned_at is None
                                       else None, before.thumb_path)
        reference = reference_of(row, before)
        ref_lab = (conn.execute(REFERENCE_SQL, {"id": reference}).first()
                   if reference is not None else None)
    q = measure_keyframe(small, previous)
    if ref_lab is None:     # its own reference: a new run begins here
        reference, drift = row.id, 0.0
    else:
        drift = colour_drift(q.lab_mean, tuple(ref_lab))
    ms = (time.perf_counter() - started) * 1000
    _insert(ctx, {"entity": "keyframe", "chain_index": row.chain_index, "keyframe_id": row.id,
                  "drift": drift, "reference_id": reference, "measure_ms": ms, **q.as_row()})
    KEYFRAMES.put((str(data_dir), row.id), small)
    return q
