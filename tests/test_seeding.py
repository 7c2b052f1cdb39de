"""Seeds: painted deterministically, written without overwriting, loaded forgivingly."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamd.seeding import load_seeds, make_seed, write_seeds

REPO = Path(__file__).resolve().parents[1]


def test_make_seed_is_deterministic_rgb_and_sized():
    a, b = make_seed(4), make_seed(4)
    assert a.mode == "RGB" and a.size == (512, 256)
    assert a.tobytes() == b.tobytes()
    assert make_seed(2, width=200, height=120).size == (200, 120)


def test_seeds_differ_per_index_and_theme():
    images = [np.asarray(make_seed(i), float) for i in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(images[i] - images[j]).mean() > 5, (i, j)
    ocean = np.asarray(make_seed(0, theme="deep ocean"), float).mean((0, 1))
    assert ocean[2] > ocean[0] + 20                    # the theme steers the colour


def test_seeds_are_ethereal_dark_with_light():
    x = np.asarray(make_seed(1), float) / 255
    assert x.mean() < 0.3 and x.std() > 0.05 and x.max() > 0.8


def test_write_seeds_names_and_content(tmp_path):
    paths = write_seeds(tmp_path / "seeds", 3, width=128, height=64)
    assert [p.name for p in paths] == ["seed_000.png", "seed_001.png", "seed_002.png"]
    for n, p in enumerate(paths):
        with Image.open(p) as im:
            assert im.size == (128, 64)
            assert im.convert("RGB").tobytes() == make_seed(n, 128, 64).tobytes()
    assert sorted(f.name for f in (tmp_path / "seeds").iterdir()) == [p.name for p in paths]  # no temp files


def test_write_seeds_never_overwrites_and_skips_to_free_names(tmp_path):
    mine = tmp_path / "seed_001.png"
    Image.new("RGB", (10, 10), (255, 0, 0)).save(mine)
    before = mine.read_bytes()
    paths = write_seeds(tmp_path, 3, width=64, height=32)
    assert [p.name for p in paths] == ["seed_000.png", "seed_002.png", "seed_003.png"]
    assert mine.read_bytes() == before
    again = write_seeds(tmp_path, 2, width=64, height=32)
    assert [p.name for p in again] == ["seed_004.png", "seed_005.png"]
    later = write_seeds(tmp_path, 1, start=10, width=64, height=32)
    assert [p.name for p in later] == ["seed_010.png"]


def test_load_seeds_reads_png_jpeg_webp_and_flattens_alpha(tmp_path):
    seed = make_seed(0, 64, 32)
    seed.save(tmp_path / "a.png")
    seed.save(tmp_path / "b.jpg", quality=90)
    seed.save(tmp_path / "c.webp")
    rgba = Image.new("RGBA", (20, 10), (255, 255, 255, 0))
    rgba.save(tmp_path / "d.png")
    seed.convert("L").save(tmp_path / "e.png")
    loaded = load_seeds(tmp_path)
    assert [p.name for p, _ in loaded] == ["a.png", "b.jpg", "c.webp", "d.png", "e.png"]
    assert all(im.mode == "RGB" for _, im in loaded)
    assert loaded[0][1].tobytes() == seed.tobytes()
    assert loaded[3][1].getpixel((0, 0)) == (0, 0, 0)   # transparent goes onto black


def test_load_seeds_skips_bad_files_with_a_warning_naming_them(tmp_path, caplog):
    make_seed(0, 64, 32).save(tmp_path / "good.png")
    (tmp_path / "notes.txt").write_text("not an image")
    full = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "old.bmp")
    (tmp_path / "sub").mkdir()
    with caplog.at_level(logging.WARNING, logger="dreamd.seeding"):
        loaded = load_seeds(tmp_path)
    assert [p.name for p, _ in loaded] == ["good.png"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in ("notes.txt", "truncated.png", "empty.jpg", "old.bmp"):
        assert name in warned


def test_load_seeds_from_a_missing_directory_is_empty(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dreamd.seeding"):
        assert load_seeds(tmp_path / "nowhere") == []
    assert "nowhere" in caplog.text


def test_committed_seeds_load_and_stay_small():
    loaded = load_seeds(REPO / "seeds")
    assert len(loaded) >= 6
    for path, image in loaded:
        assert image.size == (512, 256)
        assert path.stat().st_size < 170_000, path


@pytest.mark.parametrize("index", [0, 5])
def test_committed_seeds_are_what_write_seeds_makes(index):
    path = REPO / "seeds" / f"seed_{index:03d}.png"
    with Image.open(path) as im:
        committed = np.asarray(im.convert("RGB"), float)
    # Not byte equality: float rounding may differ by a level between CPUs; a changed
    # painter differs by far more.
    assert np.abs(committed - np.asarray(make_seed(index), float)).mean() < 0.5
