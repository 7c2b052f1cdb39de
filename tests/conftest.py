"""Shared fixtures: a ledger migrated once per session and copied per test (a real
file, never :memory:, since WAL needs a file), and an isolated dreamd environment."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ledger_template(tmp_path_factory) -> Path:
    from dreamd.ledger import database

    path = tmp_path_factory.mktemp("template") / "dreamd.db"
    database.upgrade(path)
    return path


@pytest.fixture
def db_path(ledger_template, tmp_path) -> Path:
    path = tmp_path / "data" / "dreamd.db"
    path.parent.mkdir(parents=True)
    shutil.copy(ledger_template, path)
    return path


@pytest.fixture
def engine(db_path):
    from dreamd.ledger import database

    eng = database.writer(db_path)
    yield eng
    eng.dispose()


@pytest.fixture
def dreamd_env(tmp_path, monkeypatch) -> dict[str, str]:
    """Environment for running `dreamd` in a subprocess, isolated from the user's files."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DREAMD_")}
    env.update({"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                "XDG_DATA_HOME": str(home / ".local/share"),
                "DREAMD_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"})
    for key in ("DREAMD_CONFIG", "DREAMD_DATA_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local/share"))
    return env


def dreamd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dreamd", *args]
