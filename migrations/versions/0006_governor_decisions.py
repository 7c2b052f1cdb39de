"""governor_decisions: every change the governor made (interpolation frames N and
size, the display's time-stretch), with its reason and the measurements behind it

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 00:30:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('governor_decisions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('interpolation_frames', sa.Integer(), nullable=False),
    sa.Column('resolution_divisor', sa.Float(), nullable=False),
    sa.Column('stretch', sa.Float(), nullable=False),
    sa.Column('previous_frames', sa.Integer(), nullable=True),
    sa.Column('previous_divisor', sa.Float(), nullable=True),
    sa.Column('keyframe_seconds', sa.Float(), nullable=True),
    sa.Column('inbetween_ms', sa.Float(), nullable=True),
    sa.Column('fps', sa.Float(), nullable=False),
    sa.Column('buffer_seconds', sa.Float(), nullable=True),
    sa.Column('buffer_trend', sa.Float(), nullable=True),
    sa.Column('load', sa.Float(), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_governor_decisions'))
    )
    with op.batch_alter_table('governor_decisions', schema=None) as batch_op:
        batch_op.create_index('ix_governor_decisions_at', ['at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('governor_decisions', schema=None) as batch_op:
        batch_op.drop_index('ix_governor_decisions_at')
    op.drop_table('governor_decisions')
