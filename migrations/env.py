"""Alembic environment for the dreamd ledger. Batch mode from the first migration,
because SQLite alters most things by copying the table."""

from alembic import context
from sqlalchemy import engine_from_config, pool

from dreamd.ledger.models import Base

config = context.config
target_metadata = Base.metadata


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


# dreamd.ledger.database passes its own connection (foreign keys off, BEGIN IMMEDIATE);
# the `alembic` command line (with alembic.ini) gets an engine of its own.
connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
elif context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"),
                      target_metadata=target_metadata, render_as_batch=True,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = engine_from_config(config.get_section(config.config_ini_section, {}),
                                prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as conn:
        run(conn)
