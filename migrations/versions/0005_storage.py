"""storage owns what it writes: paths relative to the data dir, keyframe files that
can go (pruned_at, a thumbnail), and the data dir's identity

Rows written before this held absolute paths, so a moved or copied data dir named the
old one's files. Paths under a folder the daemon owns (frames/, keyframes/,
injections/, thumbs/) become "<folder>/<name>", whatever data dir they were written
in: the daemon only ever writes those names directly under its data dir. Seeds under
this data dir's seeds/ become relative too; other seeds stay absolute.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 21:40:00
"""
from pathlib import PurePosixPath, PureWindowsPath

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

OWNED = ("frames", "keyframes", "injections", "thumbs")
COLUMNS = (("frames", "path"), ("keyframes", "path"), ("keyframes", "input_path"),
           ("injections", "seed_path"))


def _data_dir(bind) -> str | None:
    for _seq, name, file in bind.exec_driver_sql("PRAGMA database_list").all():
        if name == "main" and file:
            return str(PurePosixPath(file.replace("\\", "/")).parent)
    return None


def _relative(value: str, data_dir: str | None) -> str | None:
    """The relative form of an absolute path the daemon wrote, or None to leave it."""
    posix = value.replace("\\", "/")
    if not (posix.startswith("/") or PureWindowsPath(value).is_absolute()):
        return None
    p = PurePosixPath(posix)
    if p.parent.name in OWNED:
        return f"{p.parent.name}/{p.name}"
    if data_dir and posix.startswith(data_dir.rstrip("/") + "/seeds/"):
        return posix[len(data_dir.rstrip("/")) + 1:]
    return None


def upgrade() -> None:
    # plain ADD COLUMN (SQLite has it): a batch copy of keyframes would break the views
    op.add_column('keyframes', sa.Column('pruned_at', sa.DateTime(), nullable=True))
    op.add_column('keyframes', sa.Column('thumb_path', sa.Text(), nullable=True))
    op.add_column('runtime_state', sa.Column('data_dir_id', sa.String(length=36),
                                             nullable=True))
    op.add_column('runtime_state', sa.Column('storage', sa.Text(), nullable=True))
    op.create_index('ix_transitions_at', 'transitions', ['at'], unique=False)
    op.create_index('ix_frames_created_at', 'frames', ['created_at'], unique=False)

    bind = op.get_bind()
    data_dir = _data_dir(bind)
    for table, column in COLUMNS:
        rows = bind.exec_driver_sql(
            f"SELECT id, {column} FROM {table} WHERE {column} IS NOT NULL").all()
        for row_id, value in rows:
            rel = _relative(value, data_dir)
            if rel is not None:
                bind.exec_driver_sql(f"UPDATE {table} SET {column} = ? WHERE id = ?",
                                     (rel, row_id))


def downgrade() -> None:
    # an older dreamd reads paths as they are: absolute again, under this data dir
    bind = op.get_bind()
    data_dir = _data_dir(bind)
    if data_dir:
        for table, column in COLUMNS:
            bind.exec_driver_sql(
                f"UPDATE {table} SET {column} = ? || '/' || {column} "
                f"WHERE {column} IS NOT NULL AND {column} NOT LIKE '/%' "
                f"AND {column} NOT LIKE '_:%'", (data_dir.rstrip("/"),))
    op.drop_index('ix_frames_created_at', 'frames')
    op.drop_index('ix_transitions_at', 'transitions')
    # dropping a column copies the table: the views that read it go and come back
    views = bind.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'view'").all()
    for name, _sql in views:
        op.execute(f"DROP VIEW {name}")
    with op.batch_alter_table('runtime_state', schema=None) as batch_op:
        batch_op.drop_column('storage')
        batch_op.drop_column('data_dir_id')
    with op.batch_alter_table('keyframes', schema=None) as batch_op:
        batch_op.drop_column('thumb_path')
        batch_op.drop_column('pruned_at')
    for _name, sql in views:
        op.execute(sql)
