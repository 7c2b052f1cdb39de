"""The cache of diverse past frames: admission, LRU eviction, candidates to inject.

Membership lives in the ledger (`embeddings.in_cache`, `last_used_at`), so the cache
survives a restart. A frame joins when its highest similarity to the members (of its
own model) is below the admission threshold; beyond `cache.max_size` the least
recently used member leaves (members of another model first: they can never be used
again). "Used" is: admitted, matched by a new frame too similar to join, or injected.
A member's file is kept while it is a member (the janitor's retention skips it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import Connection, and_, case, func, select, update

from dreamd.ledger.models import Embedding, Frame, Keyframe
from dreamd.storage.paths import resolve

EM, FR, KF = Embedding.__table__, Frame.__table__, Keyframe.__table__


def to_blob(vector: np.ndarray) -> bytes:
    """float32, little-endian: what `embeddings.vector` holds."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def from_blob(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


# The picture a frame stands for: a keyframe's raw image (the img2img input; kept while
# its frame is a member, dreamd/storage/retention.py), an in-between's own file, or the
# decoded segment start when the raw image is gone. A path as rows keep it (relative to
# the data dir: dreamd.storage.paths.resolve).
IMAGE_PATH = case((and_(FR.c.kind == "keyframe", KF.c.pruned_at.is_(None),
                        KF.c.path.is_not(None)), KF.c.path), else_=FR.c.path)


@dataclass
class Admission:
    admitted: bool
    nearest_id: int | None = None        # the member most like the new frame
    similarity: float | None = None      # its similarity (None: the cache was empty)
    evicted: list[int] = field(default_factory=list)

    def detail(self) -> dict:
        return {"admitted": self.admitted, "nearest": self.nearest_id,
                "similarity": None if self.similarity is None else round(self.similarity, 4),
                "evicted": self.evicted}


def members(conn: Connection, model: str):
    return conn.execute(select(EM.c.id, EM.c.frame_id, EM.c.vector, EM.c.last_used_at)
                        .where(EM.c.in_cache == 1, EM.c.model == model,
                               EM.c.vector.is_not(None))).all()


def size(conn: Connection) -> int:
    return conn.execute(select(func.count()).select_from(EM)
                        .where(EM.c.in_cache == 1)).scalar_one()


def decide(conn: Connection, vector: np.ndarray, model: str, threshold: float,
           max_size: int) -> Admission:
    """Does a frame with `vector` join, and who leaves for it? (Reads only; `apply` writes.)"""
    rows = members(conn, model)
    if rows:
        sims = np.stack([from_blob(r.vector) for r in rows]) @ vector
        i = int(np.argmax(sims))
        adm = Admission(admitted=float(sims[i]) < threshold, nearest_id=rows[i].id,
                        similarity=float(sims[i]))
    else:
        adm = Admission(admitted=True)
    excess = size(conn) + 1 - max_size
    if adm.admitted and excess > 0:
        adm.evicted = list(conn.execute(
            select(EM.c.id).where(EM.c.in_cache == 1)
            .order_by((EM.c.model == model).asc(), EM.c.last_used_at.asc(), EM.c.id.asc())
            .limit(excess)).scalars())
    return adm


def apply(conn: Connection, adm: Admission, now: datetime) -> None:
    """With the new row stored: evict who leaves for it, or touch the member it matched."""
    if adm.evicted:
        conn.execute(update(EM).where(EM.c.id.in_(adm.evicted)).values(in_cache=0))
    if not adm.admitted and adm.nearest_id is not None:
        conn.execute(update(EM).where(EM.c.id == adm.nearest_id).values(last_used_at=now))


@dataclass
class Candidate:
    embedding_id: int
    frame_id: int
    chain_index: int
    path: Path
    similarity: float


def candidates(conn: Connection, model: str, reference: np.ndarray, band: tuple[float, float],
               *, before_chain: int | None = None,
               data_dir: Path | None = None) -> list[Candidate]:
    """Members related to `reference` but different from it (similarity within the band),
    whose picture is still on disk; members from `before_chain` on are the chain's own
    recent past, which is what the injection tries to get away from."""
    q = (select(EM.c.id, EM.c.frame_id, EM.c.vector, FR.c.chain_index,
                IMAGE_PATH.label("image_path"))
         .select_from(EM.join(FR, FR.c.id == EM.c.frame_id)
                      .outerjoin(KF, KF.c.id == FR.c.keyframe_id))
         .where(EM.c.in_cache == 1, EM.c.model == model, EM.c.vector.is_not(None)))
    if before_chain is not None:
        q = q.where(FR.c.chain_index < before_chain)
    out = []
    for r in conn.execute(q).all():
        sim = float(from_blob(r.vector) @ reference)
        path = resolve(data_dir or Path("."), r.image_path)
        if band[0] <= sim <= band[1] and path is not None and path.is_file():
            out.append(Candidate(r.id, r.frame_id, r.chain_index, path, sim))
    return out


def pick(found: list[Candidate], rng: random.Random) -> Candidate | None:
    """One candidate, the less similar the likelier (the point is to move away)."""
    if not found:
        return None
    weights = [max(1e-3, 1.0 - c.similarity) for c in found]
    return rng.choices(found, weights=weights, k=1)[0]


def touch(conn: Connection, embedding_id: int, now: datetime) -> None:
    conn.execute(update(EM).where(EM.c.id == embedding_id).values(last_used_at=now))


def member_frame_ids():
    """A subquery of the frames the cache holds (retention must keep their files)."""
    return select(EM.c.frame_id).where(EM.c.in_cache == 1)
