"""keyframes.generation_ms, and the SQL views users query: frame_history,
keyframe_timing, injection_log

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 08:30:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

VIEWS = {
    # Every frame in playback order, with the keyframe (theme, prompt) it belongs to.
    "frame_history": """
        CREATE VIEW frame_history AS
        SELECT f.id AS frame_id, f.chain_index, f.t, f.kind, f.state, f.path,
               f.created_at, f.shown_at, f.evicted_at,
               k.id AS keyframe_id, k.theme, k.prompt, k.backend, k.source
        FROM frames f
        LEFT JOIN keyframes k
               ON k.chain_index = f.chain_index AND k.state = 'completed'
        ORDER BY f.chain_index, f.t
    """,
    # How long each keyframe waited and ran, in seconds.
    "keyframe_timing": """
        CREATE VIEW keyframe_timing AS
        SELECT id AS keyframe_id, chain_index, state, backend, theme, attempt,
               created_at, started_at, completed_at,
               ROUND((julianday(started_at) - julianday(created_at)) * 86400.0, 3)
                   AS wait_seconds,
               ROUND((julianday(completed_at) - julianday(started_at)) * 86400.0, 3)
                   AS run_seconds,
               generation_ms
        FROM keyframes
        ORDER BY chain_index
    """,
    # Every injection with the keyframe it changed.
    "injection_log": """
        CREATE VIEW injection_log AS
        SELECT i.id AS injection_id, i.created_at, k.chain_index, k.theme,
               i.kind, i.reason, i.weight, i.similarity,
               i.source_frame_id, i.seed_path, i.keyframe_id
        FROM injections i
        JOIN keyframes k ON k.id = i.keyframe_id
        ORDER BY i.id
    """,
}


def upgrade() -> None:
    with op.batch_alter_table('keyframes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('generation_ms', sa.Float(), nullable=True))
    for sql in VIEWS.values():
        op.execute(sql)


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    with op.batch_alter_table('keyframes', schema=None) as batch_op:
        batch_op.drop_column('generation_ms')
