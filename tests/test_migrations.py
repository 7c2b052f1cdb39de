"""Alembic: a fresh upgrade matches the models exactly; down and up again; an older
ledger with rows in it upgrades in place and keeps them; the installed wheel migrates
without the checkout."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from dreamd.ledger import database
from dreamd.ledger.models import Base
from tests.conftest import REPO, wheel_names


def diff(path) -> list:
    engine = database.writer(path)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()


def test_fresh_upgrade_matches_models(tmp_path):
    path = tmp_path / "dreamd.db"
    database.upgrade(path)
    assert database.current_revision(path) == database.head_revision()
    assert diff(path) == []


def test_downgrade_to_base_and_back(tmp_path):
    path = tmp_path / "dreamd.db"
    database.upgrade(path)
    database.downgrade(path, "base")
    engine = database.writer(path)
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
        assert conn.execute(text("SELECT count(*) FROM sqlite_master WHERE type='view'")
                            ).scalar() == 0
    engine.dispose()
    database.upgrade(path)
    assert diff(path) == []


def test_each_revision_steps_down_and_up(tmp_path):
    path = tmp_path / "dreamd.db"
    revs = [r for r, _, _ in database.revisions()]
    for rev in revs:
        database.upgrade(path, rev)
        assert database.current_revision(path) == rev
    for rev in reversed(revs[:-1]):
        database.downgrade(path, rev)
        assert database.current_revision(path) == rev


ROWS_0001 = [
    ("keyframes", {"id": 1, "chain_index": 0, "backend": "procedural", "theme": "t",
                   "prompt": "p", "negative_prompt": "", "seed": 1, "denoise": 0.3,
                   "source": "seed", "width": 512, "height": 256, "state": "completed",
                   "attempt": 1, "max_attempts": 3, "scheduled_at": "2026-01-01 00:00:00",
                   "created_at": "2026-01-01 00:00:00", "path": "k0.png"}),
    ("keyframes", {"id": 2, "chain_index": 1, "backend": "procedural", "theme": "t",
                   "prompt": "p", "negative_prompt": "", "seed": 2, "denoise": 0.3,
                   "source": "img2img", "parent_id": 1, "width": 512, "height": 256,
                   "state": "completed", "attempt": 1, "max_attempts": 3,
                   "scheduled_at": "2026-01-01 00:00:00", "created_at": "2026-01-01 00:00:00",
                   "started_at": "2026-01-01 00:00:01", "completed_at": "2026-01-01 00:00:02"}),
    ("interpolations", {"id": 1, "chain_index": 0, "from_keyframe_id": 1, "to_keyframe_id": 2,
                        "n_frames": 2, "divisor": 1.0, "state": "completed", "attempt": 1,
                        "max_attempts": 3, "scheduled_at": "2026-01-01 00:00:00",
                        "created_at": "2026-01-01 00:00:00"}),
    ("frames", {"id": 1, "chain_index": 0, "t": 0.0, "kind": "keyframe", "keyframe_id": 1,
                "path": "f0.png", "state": "shown", "created_at": "2026-01-01 00:00:00"}),
    ("frames", {"id": 2, "chain_index": 0, "t": 1 / 3, "kind": "inbetween",
                "interpolation_id": 1, "path": "f1.png", "state": "ready",
                "created_at": "2026-01-01 00:00:00"}),
    ("embeddings", {"id": 1, "frame_id": 1, "model": "descriptor", "dim": 4,
                    "vector": b"\x00" * 16, "in_cache": 1, "state": "completed", "attempt": 1,
                    "max_attempts": 3, "scheduled_at": "2026-01-01 00:00:00",
                    "created_at": "2026-01-01 00:00:00"}),
    ("injections", {"id": 1, "keyframe_id": 2, "kind": "cache", "source_frame_id": 1,
                    "similarity": 0.5, "reason": "chance", "weight": 0.3,
                    "created_at": "2026-01-01 00:00:00"}),
    ("controls", {"id": 1, "command": "pause", "args": "{}", "state": "applied",
                  "created_at": "2026-01-01 00:00:00"}),
    ("transitions", {"id": 1, "entity": "keyframe", "entity_id": 1, "from_state": None,
                     "to_state": "available", "at": "2026-01-01 00:00:00"}),
    ("daemon_runs", {"id": 1, "pid": 1, "host": "h", "version": "0.0.1",
                     "started_at": "2026-01-01 00:00:00", "heartbeat_at": "2026-01-01 00:00:00"}),
    ("runtime_state", {"id": 1, "playhead_frame_id": 1, "playhead_chain_index": 0,
                       "playhead_t": 0.0, "frames_shown": 1, "underruns": 0, "paused": 0,
                       "theme_index": 0, "knobs": "{}", "updated_at": "2026-01-01 00:00:00"}),
]


def test_previous_revision_with_rows_upgrades_in_place(tmp_path):
    path = tmp_path / "dreamd.db"
    database.upgrade(path, "0001")
    engine = database.writer(path)
    with engine.begin() as conn:
        for table, row in ROWS_0001:
            cols = ", ".join(row)
            conn.execute(text(f"INSERT INTO {table} ({cols}) VALUES "
                              f"({', '.join(':' + c for c in row)})"), row)
    engine.dispose()

    database.upgrade(path)
    assert database.current_revision(path) == database.head_revision()
    assert diff(path) == []
    engine = database.writer(path)
    with engine.connect() as conn:
        for table, row in ROWS_0001:
            got = conn.execute(text(f"SELECT * FROM {table} WHERE id = :id"), {"id": row["id"]}
                               ).mappings().one()
            for k, v in row.items():
                assert got[k] == v, (table, k)
        # what 0002 added works on the old rows
        assert conn.execute(text("SELECT generation_ms FROM keyframes WHERE id = 2")
                            ).scalar() is None
        timing = conn.execute(text("SELECT run_seconds FROM keyframe_timing "
                                   "WHERE keyframe_id = 2")).scalar()
        assert timing == pytest.approx(1.0)
        assert conn.execute(text("SELECT count(*) FROM frame_history")).scalar() == 2
        assert conn.execute(text("SELECT reason FROM injection_log")).scalar() == "chance"
    engine.dispose()


def test_packages_listed_in_pyproject_cover_the_tree():
    import tomllib
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.relative_to(REPO).parts[:-1]) for p in (REPO / "dreamd").rglob("*.py")}
    found |= {"dreamd.migrations", "dreamd.migrations.versions"}
    missing = {p for p in found if p and "__pycache__" not in p} - listed
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


@pytest.mark.slow
@pytest.mark.xdist_group("wheel")
def test_installed_wheel_migrates_without_checkout(tmp_path, wheel):
    """Install the wheel into a plain target dir (no deps, and not a venv with
    --system-site-packages, which would pull the editable dreamd) and migrate from it."""
    names = wheel_names(wheel)
    assert "dreamd/migrations/env.py" in names
    assert any(n.startswith("dreamd/migrations/versions/0001") for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    db = tmp_path / "elsewhere" / "dreamd.db"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import dreamd, dreamd.ledger.database "
            "as d; assert dreamd.__file__.startswith(sys.argv[1]), dreamd.__file__; "
            "d.upgrade(sys.argv[2]); print(d.current_revision(sys.argv[2]))")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(target), str(db)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == database.head_revision()


def test_head_revision_without_alembic_agrees_with_alembic():
    from alembic.script import ScriptDirectory
    script = ScriptDirectory.from_config(database.alembic_config(":memory:"))
    assert database.head_revision() == script.get_current_head()
