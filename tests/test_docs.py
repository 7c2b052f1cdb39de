"""The README stays true: every config key and every table is documented."""

from __future__ import annotations

import re

import pytest

from dreamd import config
from dreamd.ledger.models import Base
from dreamd.ledger.states import TRANSITIONS
from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", [p for p, _ in config.key_paths()])
def test_every_config_key_is_documented(path):
    assert f"`{path}`" in README, f"config key {path} is not documented in README.md"


@pytest.mark.parametrize("table", sorted(Base.metadata.tables))
def test_every_table_and_column_is_documented(table):
    section = README.split("## The ledger", 1)[1]
    assert f"`{table}`" in section, f"table {table} is not documented in README.md"
    for column in Base.metadata.tables[table].columns:
        assert re.search(rf"\b{column.name}\b", section), \
            f"column {table}.{column.name} is not documented in README.md"


def test_every_state_is_documented():
    states = {s for edges in TRANSITIONS.values() for edge in edges for s in edge if s}
    for state in states:
        assert f"`{state}`" in README, f"state {state} is not documented in README.md"


def test_readme_names_the_two_commands():
    assert "make run" in README and "make test" in README
