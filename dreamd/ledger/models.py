"""The ledger's tables. Their names and columns are part of the interface: users
query them with SQL, and the README documents them. Schema changes only through
Alembic migrations in `migrations/`. All times are UTC.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (CheckConstraint, DateTime, Float, ForeignKey, Index, Integer,
                        LargeBinary, MetaData, String, Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so migrations (batch mode on SQLite) can refer to them.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Naive UTC, the form SQLite stores and compares as text."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class JobColumns:
    """What every claimable row has: state, attempts, schedule and lease."""

    state: Mapped[str] = mapped_column(String(16), default="available")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    scheduled_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)


class Keyframe(JobColumns, Base):
    """One link of the dream chain: keyframe k+1 is img2img of keyframe k."""

    __tablename__ = "keyframes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chain_index: Mapped[int] = mapped_column(Integer)
    backend: Mapped[str] = mapped_column(String(32))
    theme: Mapped[str] = mapped_column(String(128))
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    seed: Mapped[int] = mapped_column(Integer)
    denoise: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(16))  # seed | img2img | injection
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("keyframes.id"))
    input_path: Mapped[str | None] = mapped_column(Text)  # the img2img input actually used
    prompt_id: Mapped[str | None] = mapped_column(String(64))
    server: Mapped[str | None] = mapped_column(Text)  # which ComfyUI got the prompt
    path: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    generation_ms: Mapped[float | None] = mapped_column(Float)
    # storage (dreamd/storage/retention.py): when the image file went (the row stays as
    # history), and the small thumbnail that stays in its place
    pruned_at: Mapped[datetime | None] = mapped_column(DateTime)
    thumb_path: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint("source IN ('seed', 'img2img', 'injection')", name="source"),
        # The claim's filter and sort, in one index (as Oban does).
        Index("ix_keyframes_claim", "state", "scheduled_at", "chain_index"),
        Index("ix_keyframes_chain_index", "chain_index"),
    )


class Interpolation(JobColumns, Base):
    """One batch of N in-betweens for the pair (from, to) of consecutive keyframes."""

    __tablename__ = "interpolations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chain_index: Mapped[int] = mapped_column(Integer)  # the `from` keyframe's chain index
    from_keyframe_id: Mapped[int] = mapped_column(ForeignKey("keyframes.id"))
    to_keyframe_id: Mapped[int] = mapped_column(ForeignKey("keyframes.id"))
    n_frames: Mapped[int] = mapped_column(Integer)
    codec: Mapped[str | None] = mapped_column(String(32))
    divisor: Mapped[float] = mapped_column(Float, default=1.0)
    duration_ms: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        Index("ix_interpolations_claim", "state", "scheduled_at", "chain_index"),
    )


class Frame(Base):
    """A picture the display can show: a keyframe (t = 0) or an in-between."""

    __tablename__ = "frames"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chain_index: Mapped[int] = mapped_column(Integer)
    t: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(16))  # keyframe | inbetween
    keyframe_id: Mapped[int | None] = mapped_column(ForeignKey("keyframes.id"))
    interpolation_id: Mapped[int | None] = mapped_column(ForeignKey("interpolations.id"))
    path: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="ready")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    shown_at: Mapped[datetime | None] = mapped_column(DateTime)
    evicted_at: Mapped[datetime | None] = mapped_column(DateTime)

    __table_args__ = (
        # A place in the playback order is produced once, ever.
        UniqueConstraint("chain_index", "t"),
        CheckConstraint("kind IN ('keyframe', 'inbetween')", name="kind"),
        Index("ix_frames_state_order", "state", "chain_index", "t"),
        Index("ix_frames_created_at", "created_at"),   # history pruning, oldest first
    )


class Embedding(JobColumns, Base):
    """A frame's vector in the aesthetic memory."""

    __tablename__ = "embeddings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    frame_id: Mapped[int] = mapped_column(ForeignKey("frames.id"))
    model: Mapped[str] = mapped_column(String(128))
    dim: Mapped[int | None] = mapped_column(Integer)
    vector: Mapped[bytes | None] = mapped_column(LargeBinary)  # float32, little-endian
    in_cache: Mapped[int] = mapped_column(Integer, default=0)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime)

    __table_args__ = (
        Index("ix_embeddings_claim", "state", "scheduled_at"),
        # the embedding worker asks "which of these frames have a vector?" every tick
        Index("ix_embeddings_frame_id", "frame_id"),
    )


class Injection(Base):
    """Why a keyframe's input was not simply the previous keyframe."""

    __tablename__ = "injections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    keyframe_id: Mapped[int] = mapped_column(ForeignKey("keyframes.id"))
    kind: Mapped[str] = mapped_column(String(16))  # cache | seed
    source_frame_id: Mapped[int | None] = mapped_column(ForeignKey("frames.id"))
    seed_path: Mapped[str | None] = mapped_column(Text)
    similarity: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(String(32))  # collapse | chance | bootstrap | forced
    weight: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Control(Base):
    """A request from a surface (CLI, TUI, Rainmeter); the daemon applies it."""

    __tablename__ = "controls"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    command: Mapped[str] = mapped_column(String(32))
    args: Mapped[str] = mapped_column(Text, default="{}")  # JSON object
    state: Mapped[str] = mapped_column(String(16), default="available")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    applied_at: Mapped[datetime | None] = mapped_column(DateTime)

    __table_args__ = (Index("ix_controls_state", "state"),)


class Transition(Base):
    """Append-only history: one row per state change of any row, creation included."""

    __tablename__ = "transitions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    entity: Mapped[str] = mapped_column(String(16))
    entity_id: Mapped[int] = mapped_column(Integer)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    worker: Mapped[str | None] = mapped_column(String(64))
    event: Mapped[str | None] = mapped_column(String(32))  # claimed, abandoned, released, …
    detail: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_transitions_entity_entity_id", "entity", "entity_id"),
                      Index("ix_transitions_at", "at"))


class DaemonRun(Base):
    """One `dreamd run`, from start to stop, with a heartbeat while alive."""

    __tablename__ = "daemon_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255))
    version: Mapped[str] = mapped_column(String(32))
    backend: Mapped[str | None] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime)
    exit_reason: Mapped[str | None] = mapped_column(Text)


class RuntimeState(Base):
    """The one row of live state: playhead, pause, live knobs."""

    __tablename__ = "runtime_state"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    playhead_frame_id: Mapped[int | None] = mapped_column(Integer)
    playhead_chain_index: Mapped[int | None] = mapped_column(Integer)
    playhead_t: Mapped[float | None] = mapped_column(Float)
    frames_shown: Mapped[int] = mapped_column(Integer, default=0)
    underruns: Mapped[int] = mapped_column(Integer, default=0)
    paused: Mapped[int] = mapped_column(Integer, default=0)
    pause_reason: Mapped[str | None] = mapped_column(Text)
    theme_index: Mapped[int] = mapped_column(Integer, default=0)
    knobs: Mapped[str] = mapped_column(Text, default="{}")  # JSON: live overrides (`dreamd set`)
    # JSON: the ComfyUI servers' health as the daemon last saw it (null = never used ComfyUI)
    comfyui_health: Mapped[str | None] = mapped_column(Text)
    # the data dir this ledger belongs to (its `.dreamd-id` file): a ledger from
    # another data dir, or files from another ledger, are never taken for its own
    data_dir_id: Mapped[str | None] = mapped_column(String(36))
    # JSON: the data dir's size by part and the free space, as the janitor last measured
    storage: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)



class GovernorDecision(Base):
    """A change the governor made (dreamd/governor/law.py): the interpolation frames N and
    size it chose, or the display slowed or back to full rate, with why and what it
    measured. Rows are few: a change waits at least `governor.dwell_seconds`."""

    __tablename__ = "governor_decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    run_id: Mapped[int | None] = mapped_column(Integer)       # daemon_runs.id
    # slow_keyframes | fast_keyframes | slow_inbetweens | headroom | draining | bounds |
    # off | stretch | stretch_end
    reason: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)                # what the log said, in words
    interpolation_frames: Mapped[int] = mapped_column(Integer)  # N from now on
    resolution_divisor: Mapped[float] = mapped_column(Float)    # interpolation size from now on
    stretch: Mapped[float] = mapped_column(Float, default=1.0)  # display rate / display.fps
    previous_frames: Mapped[int | None] = mapped_column(Integer)
    previous_divisor: Mapped[float | None] = mapped_column(Float)
    # the measurements behind it
    keyframe_seconds: Mapped[float | None] = mapped_column(Float)
    inbetween_ms: Mapped[float | None] = mapped_column(Float)  # per frame, at previous_divisor
    fps: Mapped[float] = mapped_column(Float)
    buffer_seconds: Mapped[float | None] = mapped_column(Float)
    buffer_trend: Mapped[float | None] = mapped_column(Float)  # buffer s gained per s
    load: Mapped[float | None] = mapped_column(Float)           # predicted; < 1 keeps up
    detail: Mapped[str | None] = mapped_column(Text)            # JSON: everything else

    __table_args__ = (Index("ix_governor_decisions_at", "at"),)


class Quality(Base):
    """What the viewer saw, measured (dreamd/quality/): one row per segment (an
    interpolation batch: motion, flicker, the pop where it begins) and one per keyframe
    (colour in CIELAB, saturation, brightness, contrast, change from the previous
    keyframe, drift from the chain's reference). A row goes with the keyframe or batch
    it describes (ON DELETE CASCADE): the same history horizon."""

    __tablename__ = "quality"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    entity: Mapped[str] = mapped_column(String(16))              # segment | keyframe
    chain_index: Mapped[int] = mapped_column(Integer)
    keyframe_id: Mapped[int | None] = mapped_column(
        ForeignKey("keyframes.id", ondelete="CASCADE"))
    interpolation_id: Mapped[int | None] = mapped_column(
        ForeignKey("interpolations.id", ondelete="CASCADE"))
    # a segment (0-255 mean absolute differences of small copies)
    n_frames: Mapped[int | None] = mapped_column(Integer)
    motion: Mapped[float | None] = mapped_column(Float)         # consecutive frames
    flicker: Mapped[float | None] = mapped_column(Float)        # second difference
    boundary: Mapped[float | None] = mapped_column(Float)       # into the first frame
    pop: Mapped[float | None] = mapped_column(Float)            # boundary / typical step
    # a keyframe (CIELAB D65; delta E = CIE76)
    lab_l: Mapped[float | None] = mapped_column(Float)
    lab_a: Mapped[float | None] = mapped_column(Float)
    lab_b: Mapped[float | None] = mapped_column(Float)
    lab_l_std: Mapped[float | None] = mapped_column(Float)
    lab_a_std: Mapped[float | None] = mapped_column(Float)
    lab_b_std: Mapped[float | None] = mapped_column(Float)
    saturation: Mapped[float | None] = mapped_column(Float)     # mean HSV, 0-1
    brightness: Mapped[float | None] = mapped_column(Float)     # RGB mean, 0-255
    contrast: Mapped[float | None] = mapped_column(Float)       # RGB std, 0-255
    change: Mapped[float | None] = mapped_column(Float)         # delta E from the previous
    drift: Mapped[float | None] = mapped_column(Float)          # delta E of means from reference
    reference_id: Mapped[int | None] = mapped_column(Integer)   # keyframes.id (may be pruned)
    measure_ms: Mapped[float | None] = mapped_column(Float)     # what measuring cost
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (
        CheckConstraint("entity IN ('segment', 'keyframe')", name="entity"),
        # one row per thing measured; also the cascade's index
        UniqueConstraint("keyframe_id"),
        UniqueConstraint("interpolation_id"),
        Index("ix_quality_created_at", "created_at"),
        Index("ix_quality_entity_chain_index", "entity", "chain_index"),
    )


class Break(Base):
    """A stagnation break (dreamd/quality/breaker.py): the chain had stopped changing
    (`stagnant` keyframes in a row changed less than `floor` from their predecessor), so
    the planner made the next `keyframes` keyframes, from `keyframe_id` on, at `denoise`
    instead of the user's `user_denoise`. Goes with its first keyframe (ON DELETE
    CASCADE): the same history horizon."""

    __tablename__ = "breaks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    keyframe_id: Mapped[int] = mapped_column(ForeignKey("keyframes.id", ondelete="CASCADE"))
    chain_index: Mapped[int] = mapped_column(Integer)           # the break's first keyframe
    reason: Mapped[str] = mapped_column(String(32))             # stagnation
    keyframes: Mapped[int] = mapped_column(Integer)             # how many it lasts
    denoise: Mapped[float] = mapped_column(Float)               # its keyframes' denoise
    user_denoise: Mapped[float] = mapped_column(Float)          # generation.denoise then
    stagnant: Mapped[int] = mapped_column(Integer)              # keyframes in a row below floor
    change: Mapped[float | None] = mapped_column(Float)         # their largest change (delta E)
    floor: Mapped[float] = mapped_column(Float)                 # quality.stagnation_floor then
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (
        Index("ix_breaks_chain_index", "chain_index"),
        Index("ix_breaks_keyframe_id", "keyframe_id"),      # the cascade's lookup
    )

# entity name (as in `transitions.entity`) -> model
ENTITY_MODELS: dict[str, type[Base]] = {
    "keyframe": Keyframe,
    "interpolation": Interpolation,
    "embedding": Embedding,
    "frame": Frame,
    "control": Control,
}
