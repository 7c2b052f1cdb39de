"""Issue 10, item 2: a broken seed image (truncated, empty, not an image) never stops
the dream. Seeds are checked when chosen (the first link and seed injections); a broken
one is skipped with one warning naming it; with none usable the dream starts from a
generated image."""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import text

from dreamd import seeding
from tests import invariants
from tests.memory_chain import close, make_ctx


def broken_seeds(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (128, 64), (200, 30, 30)).save(buf, "PNG")
    truncated = directory / "a_truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    empty = directory / "b_empty.jpg"
    empty.write_bytes(b"")
    text_file = directory / "c_notes.png"
    text_file.write_text("not an image at all\n")
    return [truncated, empty, text_file]


def good_seed(directory: Path, name: str = "d_good.png") -> Path:
    path = directory / name
    Image.new("RGB", (128, 64), (20, 120, 220)).save(path)
    return path


@pytest.fixture(autouse=True)
def fresh_verdicts():
    seeding.forget_checks()
    yield
    seeding.forget_checks()


def rows(ctx, sql, **params):
    with ctx.reader.connect() as conn:
        return conn.execute(text(sql), params).all()


def test_the_first_link_skips_broken_seeds_with_one_warning_each(db_path, tmp_path, caplog):
    from dreamd.workers import planner

    seeds = tmp_path / "seeds"
    bad = broken_seeds(seeds)
    good = good_seed(seeds)
    ctx = make_ctx(db_path, f'[generation]\nseeds_dir = "{seeds}"\nresolution = [128, 64]\n')
    try:
        caplog.set_level(logging.WARNING)
        for _ in range(3):            # plan, drop the plan, plan again: still one warning
            kid = planner.plan(ctx, None)
            chosen = rows(ctx, "SELECT input_path FROM keyframes WHERE id = :i", i=kid)[0][0]
            assert Path(chosen) == good
            with ctx.engine.begin() as conn:
                conn.execute(text("UPDATE keyframes SET state = 'cancelled' WHERE id = :i"),
                             {"i": kid})
        # however often they are looked at, each broken file is warned about once
        files = seeding.seed_files(ctx.cfg.seed_dirs())
        assert seeding.pick_seed(files, 0) == good == seeding.pick_seed(files, 1)
        for path in bad:
            named = [r for r in caplog.records if str(path) in r.getMessage()]
            assert len(named) == 1, (path, [r.getMessage() for r in caplog.records])
    finally:
        close(ctx)


def test_no_usable_seed_means_a_generated_start(db_path, tmp_path):
    from dreamd.workers import planner

    seeds = tmp_path / "seeds"
    broken_seeds(seeds)
    ctx = make_ctx(db_path, f'[generation]\nseeds_dir = "{seeds}"\n')
    try:
        kid = planner.plan(ctx, None)
        row = rows(ctx, "SELECT source, input_path FROM keyframes WHERE id = :i", i=kid)[0]
        assert row.source == "seed" and row.input_path is None
    finally:
        close(ctx)


def test_a_seed_injection_skips_broken_seeds(db_path, tmp_path):
    from dreamd.memory import injection

    seeds = tmp_path / "seeds"
    broken_seeds(seeds)
    good = good_seed(seeds)
    ctx = make_ctx(db_path, f'[generation]\nseeds_dir = "{seeds}"\n')
    try:
        for i in range(8):
            assert injection.choose_seed(ctx, random.Random(i), None) == good
        broken_only = tmp_path / "broken"
        broken_seeds(broken_only)
        ctx.cfg.generation.seeds_dir = str(broken_only)
        assert injection.choose_seed(ctx, random.Random(0), None) is None
    finally:
        close(ctx)


@pytest.mark.slow
def test_a_daemon_with_only_broken_seeds_still_dreams(daemon, tmp_path):
    seeds = tmp_path / "seeds"
    bad = broken_seeds(seeds)
    daemon.config.write_text(daemon.config.read_text()
                             .replace("[generation]\n", f'[generation]\nseeds_dir = "{seeds}"\n'))
    result = daemon.run(8)
    assert result.returncode == 0, result.stdout[-3000:]
    facts = invariants.check(daemon.data_dir)
    invariants.distinct_frame_files(daemon.data_dir)
    assert facts["shown"] and facts["keyframes"] >= 2
    engine = daemon.db()
    with engine.connect() as conn:
        first = conn.execute(text("SELECT state, source, input_path FROM keyframes "
                                  "WHERE chain_index = 0 ORDER BY id")).all()
        discarded = conn.execute(text("SELECT count(*) FROM keyframes "
                                      "WHERE state = 'discarded'")).scalar()
    engine.dispose()
    assert discarded == 0 and len(first) == 1
    assert first[0].state == "completed" and first[0].input_path is None
    log = (daemon.data_dir / "logs" / "dreamd.log").read_text()
    for path in bad:
        assert log.count(f"skipping seed {path}") == 1, log[-3000:]
