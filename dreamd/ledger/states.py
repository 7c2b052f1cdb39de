"""The closed list of states and the one table of legal transitions.

Every state change in the ledger goes through `dreamd.ledger.transitions`, which
refuses any edge that is not listed here. States are lowercase adjectives (the
vocabulary is Oban's); a retired value is kept, never renamed, because users'
SQL and old rows name them.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """States of work rows: keyframes, interpolations, embeddings."""

    available = "available"    # ready to be claimed once scheduled_at has passed
    executing = "executing"    # claimed by a worker holding a lease
    completed = "completed"    # the artefact is on disk and recorded
    retryable = "retryable"    # failed; becomes available again at scheduled_at
    discarded = "discarded"    # failed for good (attempts used up, or retrying cannot help)
    cancelled = "cancelled"    # dropped before it ran (a plan that no longer applies)


class FrameState(StrEnum):
    """States of frames: what the display has done with them."""

    ready = "ready"            # on disk, waiting for its turn
    shown = "shown"            # the display played it
    evicted = "evicted"        # its file was deleted by retention (the row stays as history)


class ControlState(StrEnum):
    """States of controls: requests from the CLI, TUI or Rainmeter."""

    available = "available"    # written by a surface, not yet seen by the daemon
    applied = "applied"        # the daemon acted on it
    rejected = "rejected"      # the daemon could not act on it (see `error`)


J, F, C = JobState, FrameState, ControlState

_JOB_EDGES: set[tuple[str | None, str]] = {
    (None, J.available),
    (J.available, J.executing),      # claim
    (J.available, J.cancelled),
    (J.executing, J.completed),
    (J.executing, J.retryable),      # failed, will retry after backoff
    (J.executing, J.discarded),      # failed for good
    (J.executing, J.available),      # lease released on shutdown, or rescued (abandoned)
    (J.executing, J.cancelled),
    (J.retryable, J.available),      # backoff elapsed
    (J.retryable, J.cancelled),
    (J.retryable, J.discarded),
}

# What each entity may do. `None` as the source state is the row's creation.
TRANSITIONS: dict[str, frozenset[tuple[str | None, str]]] = {
    "keyframe": frozenset(_JOB_EDGES),
    "interpolation": frozenset(_JOB_EDGES),
    "embedding": frozenset(_JOB_EDGES),
    "frame": frozenset({
        (None, F.ready),
        (F.ready, F.shown),
        (F.shown, F.evicted),
        (F.ready, F.evicted),        # its file vanished, or its batch was dropped
    }),
    "control": frozenset({
        (None, C.available),
        (C.available, C.applied),
        (C.available, C.rejected),
    }),
}

# The states a row can be created in, per entity.
INITIAL = {"keyframe": J.available, "interpolation": J.available, "embedding": J.available,
           "frame": F.ready, "control": C.available}

# Entities that are claimed with a lease.
JOB_ENTITIES = ("keyframe", "interpolation", "embedding")


def is_legal(entity: str, from_state: str | None, to_state: str) -> bool:
    return (from_state, to_state) in TRANSITIONS.get(entity, frozenset())
