"""Starting images: the seeds a chain begins from and returns to when it needs new blood.

`make_seed` paints one from nothing (the procedural dreamer's painter); `write_seeds`
fills a folder without ever overwriting; `load_seeds` reads what a user dropped in;
`seed_files` and `pick_seed` are where the planner and the memory take seeds from (a
broken file is skipped, once warned about, never handed to a backend).
"""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from dreamd.backends.procedural import DEFAULT_PROMPT, look_for, paint_seed, stable_hash, to_pil

log = logging.getLogger(__name__)

# Seeds rotate through ethereal variations so a folder of them is not one picture
# in six crops; index 0 is the default theme itself.
ETHEREAL_THEMES = (
    DEFAULT_PROMPT,
    "ethereal angel wings and halo, dissolving particles, monochrome with gold accents",
    "ethereal crystal shards, technical wireframe, monochrome with cyan and violet accents",
    "ethereal digital constellation, rings, mist, monochrome with red and cyan accents",
    "ethereal sacred geometry, wireframe, particles, monochrome with cyan accents",
    "ethereal nebula, orbit rings, dissolving particles, monochrome with violet and red accents",
)
SEED_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def make_seed(index: int, width: int = 512, height: int = 256, theme: str | None = None) -> Image.Image:
    """Seed image number `index`: deterministic, different for every index, RGB width x height."""
    text = theme or ETHEREAL_THEMES[index % len(ETHEREAL_THEMES)]
    return to_pil(paint_seed(look_for(text), stable_hash("seed", index, text), width, height))


def write_seeds(directory: str | os.PathLike[str], count: int, start: int = 0,
                width: int = 512, height: int = 256) -> list[Path]:
    """Write `count` new seeds as seed_NNN.png from number `start`, skipping taken names.

    The image in seed_NNN.png is always make_seed(NNN), so a skipped name costs nothing
    and running this twice gives new images, never a changed or overwritten file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    number = start
    while len(written) < count:
        path = directory / f"seed_{number:03d}.png"
        if not path.exists():
            buffer = io.BytesIO()
            make_seed(number, width, height).save(buffer, "PNG", optimize=True)
            if _create_exclusive(path, buffer.getvalue()):
                written.append(path)
        number += 1
    return written


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Write to a temporary name, fsync, then link into place; False if the name got taken.

    os.link fails when the target exists, so a file that appeared since the check is never
    replaced, and a crash never leaves a half-written seed under its final name.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    return True


def load_seeds(directory: str | os.PathLike[str]) -> list[tuple[Path, Image.Image]]:
    """Every readable PNG/JPEG/WebP in `directory` (sorted by name) as RGB.

    A broken, unreadable or non-image file is skipped with a warning naming it: one bad
    file a user dropped in must not stop the dream.
    """
    directory = Path(directory)
    if not directory.is_dir():
        log.warning("seed directory %s does not exist; no seeds loaded", directory)
        return []
    seeds: list[tuple[Path, Image.Image]] = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue                       # our own temporary files, editor droppings
        image = _load_one(path)
        if image is not None:
            seeds.append((path, image))
    return seeds


def _load_one(path: Path) -> Image.Image | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.format not in {"PNG", "JPEG", "WEBP", "MPO"}:   # MPO: phone JPEGs
                    log.warning("skipping seed %s: %s is not PNG, JPEG or WebP", path, image.format)
                    return None
                image.load()               # decode now: a truncated file fails here, not later
                image = ImageOps.exif_transpose(image)
                return _flatten(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        log.warning("skipping seed %s: cannot read it as an image (%s)", path, exc)
        return None


def _flatten(image: Image.Image) -> Image.Image:
    """RGB; transparency goes onto black, the colour of the dream's ground."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        ground = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(ground, rgba).convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------- choosing a seed
# Verdicts per file version (path, size, mtime): a broken seed is decoded and warned
# about once, a good one decoded once; a file replaced by the user is looked at again.
_verdicts: dict[tuple[str, int, int], bool] = {}
_verdicts_lock = threading.Lock()


def seed_files(dirs) -> list[Path]:
    """Candidate seeds in `dirs` (a Config's `seed_dirs()`, or any folders), by name
    within each folder; hidden files (our own temporary names) are not candidates."""
    files: list[Path] = []
    for d in dirs:
        d = Path(d)
        if d.is_dir():
            files.extend(sorted(p for p in d.iterdir() if p.suffix.lower() in SEED_SUFFIXES
                                and not p.name.startswith(".") and p.is_file()))
    return files


def usable(path: Path) -> bool:
    """Does `path` decode as a PNG, JPEG or WebP image? A broken one is warned about
    (naming it) the first time it is looked at, then skipped quietly."""
    try:
        st = path.stat()
    except OSError as exc:
        log.warning("skipping seed %s: %s", path, exc.strerror or exc)
        return False
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _verdicts_lock:
        if key in _verdicts:
            return _verdicts[key]
    ok = _load_one(path) is not None          # logs the one warning when it is not
    with _verdicts_lock:
        _verdicts[key] = ok
    return ok


def pick_seed(files: list[Path], start: int) -> Path | None:
    """The first usable seed from `files[start]` on (wrapping round), or None when no
    file is usable: the caller starts from a generated image instead."""
    n = len(files)
    for i in range(n):
        path = files[(start + i) % n]
        if usable(path):
            return path
    return None


def forget_checks() -> None:
    """Drop the remembered verdicts (tests; a long-lived process never needs to)."""
    with _verdicts_lock:
        _verdicts.clear()
