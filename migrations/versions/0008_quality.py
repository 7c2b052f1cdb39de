"""quality: the dream measured as a viewer sees it (dreamd/quality/), one row per
segment (motion, flicker, the pop where it begins) and per keyframe (CIELAB colour,
saturation, brightness, contrast, change, drift); the view quality_per_hour

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 00:10:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

# The thresholds are dreamd/ledger/read_model.py's POP_RATIO (3.0) and STAGNANT_CHANGE
# (2.3); tests/test_quality_ledger.py checks that they agree. Flags are counted with
# count(CASE ...), never sum(a AND b): a NULL pop or change (the first keyframe, a
# boundary not known) would make an hour's sum NULL instead of 0.
VIEWS = {
    # Per UTC hour: segments and keyframes measured, motion and flicker (mean and
    # worst), pops (boundaries at or above 3x the typical step) and the worst one, the
    # keyframes' colour drift from their chain's reference (mean and worst), their
    # change from the previous keyframe (mean and least) and how many barely changed.
    "quality_per_hour": """
        CREATE VIEW quality_per_hour AS
        SELECT strftime('%Y-%m-%d %H:00', created_at) AS hour,
               sum(entity = 'segment') AS segments,
               round(avg(motion), 2) AS motion_avg,
               round(max(motion), 2) AS motion_max,
               round(avg(flicker), 2) AS flicker_avg,
               round(max(flicker), 2) AS flicker_max,
               count(CASE WHEN entity = 'segment' AND pop >= 3.0 THEN 1 END) AS pops,
               round(max(pop), 2) AS pop_max,
               sum(entity = 'keyframe') AS keyframes,
               round(avg(drift), 2) AS drift_avg,
               round(max(drift), 2) AS drift_max,
               round(avg(change), 2) AS change_avg,
               round(min(change), 2) AS change_min,
               count(CASE WHEN entity = 'keyframe' AND change < 2.3 THEN 1 END) AS stagnant
        FROM quality
        GROUP BY hour
        ORDER BY hour
    """,
}


def upgrade() -> None:
    op.create_table('quality',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('entity', sa.String(length=16), nullable=False),
    sa.Column('chain_index', sa.Integer(), nullable=False),
    sa.Column('keyframe_id', sa.Integer(), nullable=True),
    sa.Column('interpolation_id', sa.Integer(), nullable=True),
    sa.Column('n_frames', sa.Integer(), nullable=True),
    sa.Column('motion', sa.Float(), nullable=True),
    sa.Column('flicker', sa.Float(), nullable=True),
    sa.Column('boundary', sa.Float(), nullable=True),
    sa.Column('pop', sa.Float(), nullable=True),
    sa.Column('lab_l', sa.Float(), nullable=True),
    sa.Column('lab_a', sa.Float(), nullable=True),
    sa.Column('lab_b', sa.Float(), nullable=True),
    sa.Column('lab_l_std', sa.Float(), nullable=True),
    sa.Column('lab_a_std', sa.Float(), nullable=True),
    sa.Column('lab_b_std', sa.Float(), nullable=True),
    sa.Column('saturation', sa.Float(), nullable=True),
    sa.Column('brightness', sa.Float(), nullable=True),
    sa.Column('contrast', sa.Float(), nullable=True),
    sa.Column('change', sa.Float(), nullable=True),
    sa.Column('drift', sa.Float(), nullable=True),
    sa.Column('reference_id', sa.Integer(), nullable=True),
    sa.Column('measure_ms', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("entity IN ('segment', 'keyframe')", name=op.f('ck_quality_entity')),
    sa.ForeignKeyConstraint(['interpolation_id'], ['interpolations.id'],
                            name=op.f('fk_quality_interpolation_id_interpolations'),
                            ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['keyframe_id'], ['keyframes.id'],
                            name=op.f('fk_quality_keyframe_id_keyframes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_quality')),
    sa.UniqueConstraint('interpolation_id', name=op.f('uq_quality_interpolation_id')),
    sa.UniqueConstraint('keyframe_id', name=op.f('uq_quality_keyframe_id'))
    )
    with op.batch_alter_table('quality', schema=None) as batch_op:
        batch_op.create_index('ix_quality_created_at', ['created_at'], unique=False)
        batch_op.create_index('ix_quality_entity_chain_index', ['entity', 'chain_index'],
                              unique=False)
    for sql in VIEWS.values():
        op.execute(sql)


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    with op.batch_alter_table('quality', schema=None) as batch_op:
        batch_op.drop_index('ix_quality_entity_chain_index')
        batch_op.drop_index('ix_quality_created_at')
    op.drop_table('quality')
