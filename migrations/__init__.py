"""Alembic migrations of the dreamd ledger (installed as `dreamd.migrations`)."""
