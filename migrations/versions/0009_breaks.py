"""breaks: the stagnation breaker's record (dreamd/quality/breaker.py), one row per
break: when, why, how long, at what denoise instead of the user's

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 02:30:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('breaks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('keyframe_id', sa.Integer(), nullable=False),
    sa.Column('chain_index', sa.Integer(), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('keyframes', sa.Integer(), nullable=False),
    sa.Column('denoise', sa.Float(), nullable=False),
    sa.Column('user_denoise', sa.Float(), nullable=False),
    sa.Column('stagnant', sa.Integer(), nullable=False),
    sa.Column('change', sa.Float(), nullable=True),
    sa.Column('floor', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['keyframe_id'], ['keyframes.id'],
                            name=op.f('fk_breaks_keyframe_id_keyframes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_breaks'))
    )
    with op.batch_alter_table('breaks', schema=None) as batch_op:
        batch_op.create_index('ix_breaks_chain_index', ['chain_index'], unique=False)
        batch_op.create_index('ix_breaks_keyframe_id', ['keyframe_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('breaks', schema=None) as batch_op:
        batch_op.drop_index('ix_breaks_keyframe_id')
        batch_op.drop_index('ix_breaks_chain_index')
    op.drop_table('breaks')
