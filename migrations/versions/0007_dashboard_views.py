"""the views the dashboard needed: throughput_per_minute, pipeline_counts,
keyframe_history, control_log

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 00:35:00
"""
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

VIEWS = {
    # Per UTC minute: keyframes completed, frames made and shown, and the two rates.
    "throughput_per_minute": """
        CREATE VIEW throughput_per_minute AS
        SELECT minute,
               sum(keyframes) AS keyframes,
               sum(made) AS frames_made,
               sum(shown) AS frames_shown,
               round(sum(made) / 60.0, 2) AS fps_made,
               round(sum(shown) / 60.0, 2) AS fps_shown
        FROM (
            SELECT strftime('%Y-%m-%d %H:%M', completed_at) AS minute,
                   1 AS keyframes, 0 AS made, 0 AS shown
            FROM keyframes WHERE state = 'completed' AND completed_at IS NOT NULL
            UNION ALL
            SELECT strftime('%Y-%m-%d %H:%M', created_at), 0, 1, 0 FROM frames
            UNION ALL
            SELECT strftime('%Y-%m-%d %H:%M', shown_at), 0, 0, 1 FROM frames
            WHERE shown_at IS NOT NULL
        )
        GROUP BY minute
        ORDER BY minute
    """,
    # Rows per table and state: the pipeline at a glance.
    "pipeline_counts": """
        CREATE VIEW pipeline_counts AS
        SELECT 'keyframes' AS "table", state, count(*) AS rows FROM keyframes GROUP BY state
        UNION ALL
        SELECT 'interpolations', state, count(*) FROM interpolations GROUP BY state
        UNION ALL
        SELECT 'frames', state, count(*) FROM frames GROUP BY state
        UNION ALL
        SELECT 'embeddings', state, count(*) FROM embeddings GROUP BY state
        UNION ALL
        SELECT 'controls', state, count(*) FROM controls GROUP BY state
    """,
    # Every keyframe with what made it: its input (and injection, if any), timing and
    # the picture that is left of it (the image, or its thumbnail once pruned).
    "keyframe_history": """
        CREATE VIEW keyframe_history AS
        SELECT k.chain_index, k.state, k.theme, k.denoise, k.source,
               i.kind AS injection, i.reason AS injection_reason, k.backend, k.server,
               k.generation_ms, k.attempt, k.error, k.created_at, k.completed_at,
               CASE WHEN k.pruned_at IS NULL THEN k.path ELSE k.thumb_path END AS picture, k.pruned_at, k.id AS keyframe_id
        FROM keyframes k
        LEFT JOIN injections i ON i.keyframe_id = k.id
        ORDER BY k.chain_index
    """,
    # Every control with its outcome and how long the daemon took to apply it.
    "control_log": """
        CREATE VIEW control_log AS
        SELECT id AS control_id, command, args, state, error, created_at, applied_at,
               ROUND((julianday(applied_at) - julianday(created_at)) * 86400000.0, 1)
                   AS latency_ms
        FROM controls
        ORDER BY id
    """,
}


def upgrade() -> None:
    for sql in VIEWS.values():
        op.execute(sql)


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
