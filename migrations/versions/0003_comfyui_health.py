"""runtime_state.comfyui_health: the ComfyUI servers' health as the daemon last saw it
(JSON), so `dreamd status` shows it without asking any server

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 10:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('runtime_state', schema=None) as batch_op:
        batch_op.add_column(sa.Column('comfyui_health', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('runtime_state', schema=None) as batch_op:
        batch_op.drop_column('comfyui_health')
