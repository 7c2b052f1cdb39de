"""`dreamd stats`: what the aesthetic memory did over a run, read from the ledger.

Pure Python on purpose (no numpy, no torch): `dreamd stats` is a light command.
Vectors are float32 blobs; only vectors of one model are compared (the model with
the most embedded keyframes, unless one is named).
"""

from __future__ import annotations

import json
import math
import sys
from array import array
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, text

from dreamd.memory.scale import scale_for

# the [cache] config without overrides: every threshold at the embedder's default
_NO_OVERRIDES = SimpleNamespace(similarity_threshold=0.0, collapse_threshold=0.0,
                                band_min=0.0, band_max=0.0)


def unpack(blob: bytes) -> array:
    v = array("f")
    v.frombytes(blob)
    if sys.byteorder == "big":      # stored little-endian
        v.byteswap()
    return v


def dot(a: array, b: array) -> float:
    return math.fsum(x * y for x, y in zip(a, b))


def _mean(values: list[float]) -> float | None:
    return round(math.fsum(values) / len(values), 4) if values else None


def similarity_summary(vectors: list[array], window: int,
                       collapse_at: float | None = None) -> dict[str, Any]:
    """Consecutive similarity, and the mean pairwise similarity of every window of
    `window` consecutive keyframes (its mean over the run, the last one's, and the
    share of windows at or above `collapse_at`: how often the chain was collapsing)."""
    n = len(vectors)
    # every pair closer than the window, computed once: (i, j) -> cosine
    near = {(i, j): dot(vectors[i], vectors[j]) for i in range(n)
            for j in range(i + 1, min(n, i + window))}
    consecutive = [near[(i, i + 1)] for i in range(n - 1)]
    windows = []
    for end in range(window, n + 1):
        start = end - window
        pairs = [near[(i, j)] for i in range(start, end) for j in range(i + 1, end)]
        windows.append(math.fsum(pairs) / len(pairs))
    return {"keyframes": n, "consecutive_mean": _mean(consecutive),
            "recent_mean": _mean(windows), "recent_last": _mean(windows[-1:]),
            "recent_max": round(max(windows), 4) if windows else None,
            "window": window, "collapse_threshold": collapse_at,
            "collapsing_share": (round(sum(w >= collapse_at for w in windows) / len(windows), 4)
                                 if windows and collapse_at is not None else None)}


def collect(conn: Connection, window: int = 8, model: str | None = None,
            cache: Any = None) -> dict[str, Any]:
    """The report; `cache` (the [cache] config) supplies threshold overrides."""
    models = conn.execute(text(
        "SELECT e.model, COUNT(*) FROM embeddings e JOIN frames f ON f.id = e.frame_id "
        "WHERE e.state = 'completed' AND f.kind = 'keyframe' GROUP BY e.model "
        "ORDER BY COUNT(*) DESC")).all()
    model = model or (models[0][0] if models else None)
    blobs = conn.execute(text(
        "SELECT e.vector FROM embeddings e JOIN frames f ON f.id = e.frame_id "
        "WHERE e.state = 'completed' AND f.kind = 'keyframe' AND e.model = :m "
        "AND e.vector IS NOT NULL ORDER BY f.chain_index"), {"m": model}).scalars().all()
    collapse_at = scale_for(model or "", cache or _NO_OVERRIDES).collapse
    sims = similarity_summary([unpack(b) for b in blobs], window, collapse_at)

    states = dict(conn.execute(text(
        "SELECT state, COUNT(*) FROM embeddings GROUP BY state")).all())
    decisions = conn.execute(text(
        "SELECT json_extract(detail, '$.admitted') AS admitted, "
        "json_array_length(json_extract(detail, '$.evicted')) AS evicted "
        "FROM transitions WHERE entity = 'embedding' AND event = 'completed' "
        "AND json_valid(detail)")).all()
    injections = conn.execute(text(
        "SELECT kind, reason, COUNT(*) FROM injections GROUP BY kind, reason "
        "ORDER BY kind, reason")).all()
    hits = conn.execute(text(
        "SELECT COUNT(*), COUNT(DISTINCT source_frame_id) FROM injections "
        "WHERE kind = 'cache'")).one()
    keyframes = dict(conn.execute(text(
        "SELECT source, COUNT(*) FROM keyframes WHERE state = 'completed' "
        "GROUP BY source")).all())
    return {
        "model": model,
        "models": {m: n for m, n in models},
        "similarity": sims,
        "embeddings": {"by_state": states,
                       "skipped_under_load": conn.execute(text(
                           "SELECT COUNT(*) FROM transitions WHERE entity = 'embedding' "
                           "AND event = 'skipped'")).scalar_one()},
        "cache": {"size": conn.execute(text(
                      "SELECT COUNT(*) FROM embeddings WHERE in_cache = 1")).scalar_one(),
                  "admitted": sum(1 for d in decisions if d.admitted),
                  "rejected_as_alike": sum(1 for d in decisions if d.admitted == 0),
                  "evicted": sum(d.evicted or 0 for d in decisions),
                  "hits": hits[0], "distinct_frames_injected": hits[1]},
        "injections": {"total": sum(r[2] for r in injections),
                       "by_kind_reason": {f"{k}/{r}": n for k, r, n in injections}},
        "keyframes": {"completed_by_source": keyframes},
    }


def render(report: dict[str, Any]) -> str:
    s, c, e, i = (report["similarity"], report["cache"], report["embeddings"],
                  report["injections"])

    def f(v: Any) -> str:
        return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    lines = [
        f"model: {report['model'] or 'none (nothing embedded yet)'}",
        f"keyframes embedded: {s['keyframes']}   completed by source: "
        + (", ".join(f"{k} {n}" for k, n in sorted(report['keyframes']
                                                   ['completed_by_source'].items())) or "none"),
        f"similarity, consecutive keyframes: mean {f(s['consecutive_mean'])}",
        f"similarity, recent keyframes (windows of {s['window']}): mean {f(s['recent_mean'])}, "
        f"max {f(s['recent_max'])}, last {f(s['recent_last'])}; windows at or above the "
        f"collapse threshold {f(s['collapse_threshold'])}: "
        + ("n/a" if s["collapsing_share"] is None else f"{100 * s['collapsing_share']:.1f} %"),
        f"cache: {c['size']} members; admitted {c['admitted']}, rejected as alike "
        f"{c['rejected_as_alike']}, evicted {c['evicted']}; hits {c['hits']} "
        f"({c['distinct_frames_injected']} distinct frames)",
        "embeddings: " + (", ".join(f"{k} {n}" for k, n in sorted(e['by_state'].items()))
                           or "none") + f"; skipped under load {e['skipped_under_load']}",
        f"injections: {i['total']}" + ("".join(
            f"\n  {k:<18} {n}" for k, n in i["by_kind_reason"].items())),
    ]
    return "\n".join(lines)


def as_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=str)
