"""initial ledger: keyframes, interpolations, frames, embeddings, injections,
controls, transitions, daemon_runs, runtime_state

Revision ID: 0001
Revises: 
Create Date: 2026-11-26 08:13:53.464168
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('controls',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('command', sa.String(length=32), nullable=False),
    sa.Column('args', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('applied_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_controls'))
    )
    with op.batch_alter_table('controls', schema=None) as batch_op:
        batch_op.create_index('ix_controls_state', ['state'], unique=False)

    op.create_table('daemon_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('version', sa.String(length=32), nullable=False),
    sa.Column('backend', sa.String(length=32), nullable=True),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(), nullable=False),
    sa.Column('stopped_at', sa.DateTime(), nullable=True),
    sa.Column('exit_reason', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_daemon_runs'))
    )
    op.create_table('keyframes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('chain_index', sa.Integer(), nullable=False),
    sa.Column('backend', sa.String(length=32), nullable=False),
    sa.Column('theme', sa.String(length=128), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('negative_prompt', sa.Text(), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('denoise', sa.Float(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('input_path', sa.Text(), nullable=True),
    sa.Column('prompt_id', sa.String(length=64), nullable=True),
    sa.Column('server', sa.Text(), nullable=True),
    sa.Column('path', sa.Text(), nullable=True),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('scheduled_at', sa.DateTime(), nullable=False),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('completed_at', sa.DateTime(), nullable=True),
    sa.CheckConstraint("source IN ('seed', 'img2img', 'injection')", name=op.f('ck_keyframes_source')),
    sa.ForeignKeyConstraint(['parent_id'], ['keyframes.id'], name=op.f('fk_keyframes_parent_id_keyframes')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_keyframes'))
    )
    with op.batch_alter_table('keyframes', schema=None) as batch_op:
        batch_op.create_index('ix_keyframes_chain_index', ['chain_index'], unique=False)
        batch_op.create_index('ix_keyframes_claim', ['state', 'scheduled_at', 'chain_index'], unique=False)

    op.create_table('runtime_state',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('playhead_frame_id', sa.Integer(), nullable=True),
    sa.Column('playhead_chain_index', sa.Integer(), nullable=True),
    sa.Column('playhead_t', sa.Float(), nullable=True),
    sa.Column('frames_shown', sa.Integer(), nullable=False),
    sa.Column('underruns', sa.Integer(), nullable=False),
    sa.Column('paused', sa.Integer(), nullable=False),
    sa.Column('pause_reason', sa.Text(), nullable=True),
    sa.Column('theme_index', sa.Integer(), nullable=False),
    sa.Column('knobs', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint('id = 1', name=op.f('ck_runtime_state_single_row')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runtime_state'))
    )
    op.create_table('transitions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('entity', sa.String(length=16), nullable=False),
    sa.Column('entity_id', sa.Integer(), nullable=False),
    sa.Column('from_state', sa.String(length=16), nullable=True),
    sa.Column('to_state', sa.String(length=16), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('worker', sa.String(length=64), nullable=True),
    sa.Column('event', sa.String(length=32), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_transitions'))
    )
    with op.batch_alter_table('transitions', schema=None) as batch_op:
        batch_op.create_index('ix_transitions_entity_entity_id', ['entity', 'entity_id'], unique=False)

    op.create_table('interpolations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('chain_index', sa.Integer(), nullable=False),
    sa.Column('from_keyframe_id', sa.Integer(), nullable=False),
    sa.Column('to_keyframe_id', sa.Integer(), nullable=False),
    sa.Column('n_frames', sa.Integer(), nullable=False),
    sa.Column('codec', sa.String(length=32), nullable=True),
    sa.Column('divisor', sa.Float(), nullable=False),
    sa.Column('duration_ms', sa.Float(), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('scheduled_at', sa.DateTime(), nullable=False),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('completed_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['from_keyframe_id'], ['keyframes.id'], name=op.f('fk_interpolations_from_keyframe_id_keyframes')),
    sa.ForeignKeyConstraint(['to_keyframe_id'], ['keyframes.id'], name=op.f('fk_interpolations_to_keyframe_id_keyframes')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_interpolations'))
    )
    with op.batch_alter_table('interpolations', schema=None) as batch_op:
        batch_op.create_index('ix_interpolations_claim', ['state', 'scheduled_at', 'chain_index'], unique=False)

    op.create_table('frames',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('chain_index', sa.Integer(), nullable=False),
    sa.Column('t', sa.Float(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('keyframe_id', sa.Integer(), nullable=True),
    sa.Column('interpolation_id', sa.Integer(), nullable=True),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('shown_at', sa.DateTime(), nullable=True),
    sa.Column('evicted_at', sa.DateTime(), nullable=True),
    sa.CheckConstraint("kind IN ('keyframe', 'inbetween')", name=op.f('ck_frames_kind')),
    sa.ForeignKeyConstraint(['interpolation_id'], ['interpolations.id'], name=op.f('fk_frames_interpolation_id_interpolations')),
    sa.ForeignKeyConstraint(['keyframe_id'], ['keyframes.id'], name=op.f('fk_frames_keyframe_id_keyframes')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_frames')),
    sa.UniqueConstraint('chain_index', 't', name=op.f('uq_frames_chain_index_t'))
    )
    with op.batch_alter_table('frames', schema=None) as batch_op:
        batch_op.create_index('ix_frames_state_order', ['state', 'chain_index', 't'], unique=False)

    op.create_table('embeddings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('frame_id', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=128), nullable=False),
    sa.Column('dim', sa.Integer(), nullable=True),
    sa.Column('vector', sa.LargeBinary(), nullable=True),
    sa.Column('in_cache', sa.Integer(), nullable=False),
    sa.Column('last_used_at', sa.DateTime(), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('scheduled_at', sa.DateTime(), nullable=False),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('completed_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['frame_id'], ['frames.id'], name=op.f('fk_embeddings_frame_id_frames')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_embeddings'))
    )
    with op.batch_alter_table('embeddings', schema=None) as batch_op:
        batch_op.create_index('ix_embeddings_claim', ['state', 'scheduled_at'], unique=False)

    op.create_table('injections',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('keyframe_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('source_frame_id', sa.Integer(), nullable=True),
    sa.Column('seed_path', sa.Text(), nullable=True),
    sa.Column('similarity', sa.Float(), nullable=True),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('weight', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['keyframe_id'], ['keyframes.id'], name=op.f('fk_injections_keyframe_id_keyframes')),
    sa.ForeignKeyConstraint(['source_frame_id'], ['frames.id'], name=op.f('fk_injections_source_frame_id_frames')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_injections'))
    )


def downgrade() -> None:
    op.drop_table('injections')
    with op.batch_alter_table('embeddings', schema=None) as batch_op:
        batch_op.drop_index('ix_embeddings_claim')

    op.drop_table('embeddings')
    with op.batch_alter_table('frames', schema=None) as batch_op:
        batch_op.drop_index('ix_frames_state_order')

    op.drop_table('frames')
    with op.batch_alter_table('interpolations', schema=None) as batch_op:
        batch_op.drop_index('ix_interpolations_claim')

    op.drop_table('interpolations')
    with op.batch_alter_table('transitions', schema=None) as batch_op:
        batch_op.drop_index('ix_transitions_entity_entity_id')

    op.drop_table('transitions')
    op.drop_table('runtime_state')
    with op.batch_alter_table('keyframes', schema=None) as batch_op:
        batch_op.drop_index('ix_keyframes_claim')
        batch_op.drop_index('ix_keyframes_chain_index')

    op.drop_table('keyframes')
    op.drop_table('daemon_runs')
    with op.batch_alter_table('controls', schema=None) as batch_op:
        batch_op.drop_index('ix_controls_state')

    op.drop_table('controls')
