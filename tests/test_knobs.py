"""Live knobs: values are finite wherever they are checked, a stored knob that no longer
validates never stops a start, `config show` says which stored knobs override the file,
and `dreamd set --reset` clears them (issue 10, item 4)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import text

from dreamd import config
from dreamd.errors import ConfigError
from tests.conftest import dreamd_cmd


def run(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(dreamd_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=60)


def store_knobs(db: Path, knobs: str) -> None:
    """What an older dreamd, which let NaN through, left in the ledger."""
    from dreamd.ledger import database, queries

    engine = database.writer(db, pool=False)
    try:
        with engine.begin() as conn:
            queries.update_runtime(conn, knobs=knobs)
    finally:
        engine.dispose()


def stored_knobs(db: Path) -> dict:
    from dreamd.ledger import database

    engine = database.reader(db, pool=False)
    try:
        with engine.connect() as conn:
            return json.loads(conn.execute(text("SELECT knobs FROM runtime_state")).scalar()
                              or "{}")
    finally:
        engine.dispose()


def apply_pending_controls(db: Path, cfg: config.Config) -> None:
    """What a starting daemon does with controls sent while none ran."""
    from dreamd.ledger import database
    from dreamd.workers import controls
    from dreamd.workers.context import WorkerContext

    engine, reader = database.writer(db, pool=False), database.reader(db, pool=False)
    try:
        ctx = WorkerContext(cfg=cfg, engine=engine, reader=reader, run_id=0, owner="test")
        controls.restore(ctx)
        controls.tick(ctx)
    finally:
        engine.dispose()
        reader.dispose()


# ---------------------------------------------------------------- non-finite numbers

@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan"])
def test_config_file_rejects_non_finite_numbers(tmp_path, value):
    f = tmp_path / "c.toml"
    f.write_text(f"[generation]\ndenoise = {value}\n")
    with pytest.raises(ConfigError, match=r"generation.denoise = .* is invalid: expected a "
                                          r"finite number"):
        config.check_file(f)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_check_key_rejects_non_finite_numbers(value):
    with pytest.raises(ConfigError, match="display.fps = .* expected a finite number"):
        config.check_key("display.fps", value)


def test_set_and_config_check_refuse_nan(dreamd_env, tmp_path):
    assert run(dreamd_env, "db", "upgrade").returncode == 0
    proc = run(dreamd_env, "set", "display.fps=nan")
    assert proc.returncode == 2, proc.stderr
    assert "display.fps = nan is invalid: expected a finite number" in proc.stderr
    f = tmp_path / "c.toml"
    f.write_text("[display]\nfps = nan\n")
    check = run(dreamd_env, "config", "check", str(f))
    assert check.returncode == 2 and "display.fps" in check.stderr
    assert "Traceback" not in check.stderr + proc.stderr


# ---------------------------------------------------------------- stored knobs

@pytest.mark.slow
def test_a_stored_knob_that_no_longer_validates_is_dropped_at_start(daemon):
    db = daemon.data_dir / "dreamd.db"
    assert run(daemon.env, "db", "upgrade").returncode == 0
    # JSON as Python writes float('nan'): what dreamd stored before the fix
    store_knobs(db, '{"display.fps": NaN, "generation.denoise": 0.5, "display.bogus": 1}')
    proc = daemon.run(4)
    out = proc.stdout
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "cannot convert" not in out
    warnings = [line for line in out.splitlines() if "stored knob" in line]
    assert len(warnings) == 2, out
    assert any("display.fps" in w for w in warnings) and any("display.bogus" in w
                                                             for w in warnings)
    assert stored_knobs(db) == {"generation.denoise": 0.5}
    again = daemon.run(2)
    assert again.returncode == 0 and "stored knob" not in again.stdout


@pytest.mark.slow
def test_config_show_names_stored_knobs_and_set_reset_clears_them(dreamd_env, tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[display]\nfps = 8.0\n")
    cli = ("--config", str(f))
    db = Path(dreamd_env["DREAMD_DATA_DIR"]) / "dreamd.db"
    assert run(dreamd_env, *cli, "db", "upgrade").returncode == 0
    store_knobs(db, '{"display.fps": 5.0, "generation.denoise": NaN}')
    show = run(dreamd_env, *cli, "config", "show")
    assert show.returncode == 0, show.stderr
    assert "fps = 5.0  # stored by `dreamd set`" in show.stdout
    assert f"file:{f}" in show.stdout          # what it overrides is named
    assert "generation.denoise" in show.stdout and "invalid" in show.stdout
    assert "denoise = 0.3  # default" in show.stdout

    # no daemon runs: --reset is a control, applied when one starts, shown as pending
    reset = run(dreamd_env, *cli, "set", "--reset", "display.fps")
    assert reset.returncode == 0, reset.stderr
    assert "fps = 8.0  # file:" in run(dreamd_env, *cli, "config", "show").stdout
    apply_pending_controls(db, config.load(f))
    assert stored_knobs(db) == {}
    assert "fps = 8.0  # file:" in run(dreamd_env, *cli, "config", "show").stdout

    store_knobs(db, '{"display.fps": 5.0, "generation.denoise": NaN}')
    assert run(dreamd_env, *cli, "set", "--reset", "all").returncode == 0
    show = run(dreamd_env, *cli, "config", "show").stdout
    assert "stored by" not in show and "invalid" not in show     # pending: both go
    apply_pending_controls(db, config.load(f))
    assert stored_knobs(db) == {}


def test_set_reset_needs_a_live_knob(dreamd_env):
    assert run(dreamd_env, "db", "upgrade").returncode == 0
    proc = run(dreamd_env, "set", "--reset", "display.fsp")
    assert proc.returncode == 2 and "did you mean display.fps" in proc.stderr
    both = run(dreamd_env, "set", "--reset", "display.fps", "display.fps=4")
    assert both.returncode == 2
    neither = run(dreamd_env, "set")
    assert neither.returncode == 2 and "KEY=VALUE" in neither.stderr
