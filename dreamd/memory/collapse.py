"""Collapse: the chain's recent keyframes have become too alike.

The measure is the mean pairwise cosine similarity of the last W embedded keyframes
(of one model); the chain is collapsing when it reaches the model's threshold. It is
read from the ledger each time the planner decides, so it survives a restart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import Connection, select

from dreamd.ledger.models import Embedding, Frame
from dreamd.memory.cache import from_blob

EM, FR = Embedding.__table__, Frame.__table__


def current_model(conn: Connection) -> str | None:
    """The model of the newest completed embedding: the one the memory works in now."""
    return conn.execute(select(EM.c.model).where(EM.c.state == "completed",
                                                 EM.c.vector.is_not(None))
                        .order_by(EM.c.id.desc()).limit(1)).scalar()


def recent_keyframes(conn: Connection, model: str, n: int):
    """The last n embedded keyframes of `model`, oldest first: (chain_index, embedding id,
    frame id, vector)."""
    rows = conn.execute(select(FR.c.chain_index, EM.c.id, EM.c.frame_id, EM.c.vector)
                        .select_from(EM.join(FR, FR.c.id == EM.c.frame_id))
                        .where(FR.c.kind == "keyframe", EM.c.model == model,
                               EM.c.state == "completed", EM.c.vector.is_not(None))
                        .order_by(FR.c.chain_index.desc()).limit(n)).all()
    return [(r.chain_index, r.id, r.frame_id, from_blob(r.vector)) for r in reversed(rows)]


def mean_pairwise(vectors: list[np.ndarray]) -> float | None:
    n = len(vectors)
    if n < 2:
        return None
    m = np.stack(vectors)
    g = m @ m.T
    return float((g.sum() - np.trace(g)) / (n * (n - 1)))


@dataclass
class Window:
    model: str | None
    chain: list[int]                 # chain indexes of the keyframes in the window
    vectors: list[np.ndarray]
    level: float | None              # mean pairwise similarity; None before W keyframes
    collapsing: bool

    @property
    def reference(self) -> np.ndarray | None:
        """The newest embedded keyframe: the stand-in for the current look."""
        return self.vectors[-1] if self.vectors else None


def window(conn: Connection, size: int, threshold: float, model: str | None = None) -> Window:
    model = model or current_model(conn)
    if model is None:
        return Window(None, [], [], None, False)
    rows = recent_keyframes(conn, model, size)
    vectors = [r[3] for r in rows]
    level = mean_pairwise(vectors) if len(rows) >= size else None
    return Window(model, [r[0] for r in rows], vectors, level,
                  level is not None and level >= threshold)
