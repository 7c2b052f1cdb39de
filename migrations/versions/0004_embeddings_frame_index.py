"""an index on embeddings.frame_id: the embedding worker looks up new frames' vectors
every tick, and without it that scans every embedding ever stored

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 10:15:00
"""
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('embeddings', schema=None) as batch_op:
        batch_op.create_index('ix_embeddings_frame_id', ['frame_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('embeddings', schema=None) as batch_op:
        batch_op.drop_index('ix_embeddings_frame_id')
