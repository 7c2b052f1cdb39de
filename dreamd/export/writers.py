"""Writing an export: H.264 MP4 through PyAV (FFmpeg ships in its wheels), animated
WebP and GIF through Pillow, and the contact sheet of keyframes as a PNG. Frames come
as an iterator of PIL images and are written as they come (MP4, WebP); every file is
written under a temporary name and renamed, so a failed export leaves no half file.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image, ImageDraw, ImageFont

from dreamd.errors import UsageError

FORMATS = {".mp4": "mp4", ".webp": "webp", ".gif": "gif"}


def format_of(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"{path}: the format comes from the extension: .mp4 (H.264), .webp "
                         f"or .gif (animated)")
    return fmt


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.stem}.part-{os.getpid()}{path.suffix}")


def write(path: Path, frames: Iterable[Image.Image], fps: float, size: tuple[int, int],
          *, quality: int = 80) -> int:
    """Write `frames` (resized to `size`) to `path`; returns how many were written."""
    fmt = format_of(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp(path)
    try:
        n = {"mp4": _mp4, "webp": _pillow, "gif": _pillow}[fmt](tmp, frames, fps, size, quality)
        os.replace(tmp, path)
        return n
    finally:
        tmp.unlink(missing_ok=True)


def _sized(frames: Iterable[Image.Image], size: tuple[int, int]) -> Iterator[Image.Image]:
    for im in frames:
        im = im.convert("RGB")
        yield im if im.size == size else im.resize(size, Image.Resampling.LANCZOS)


def _mp4(path: Path, frames, fps: float, size, quality: int) -> int:
    import av

    n = 0
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        # crf from quality: 80 -> 20 (visually clean), 100 -> 12, 0 -> 40
        stream.options = {"crf": str(round(40 - 0.28 * quality)), "preset": "medium"}
        for im in _sized(frames, size):
            for packet in stream.encode(av.VideoFrame.from_image(im)):
                out.mux(packet)
            n += 1
        for packet in stream.encode():
            out.mux(packet)
    return n


def _pillow(path: Path, frames, fps: float, size, quality: int) -> int:
    it = _sized(frames, size)
    first = next(it, None)
    if first is None:
        raise UsageError("nothing to write: the export holds no frame")
    count = [1]

    def rest() -> Iterator[Image.Image]:
        for im in it:
            count[0] += 1
            yield im

    duration = max(1, round(1000 / fps))     # ms a frame (GIF rounds to 10 ms)
    kwargs = {"quality": quality, "method": 4} if path.suffix.lower() == ".webp" else \
        {"optimize": False, "disposal": 1}
    first.save(path, save_all=True, append_images=rest(), duration=duration, loop=0, **kwargs)
    return count[0]


def even(size: tuple[int, int]) -> tuple[int, int]:
    """H.264 in yuv420p needs even sides."""
    return (size[0] + size[0] % 2, size[1] + size[1] % 2)


# ---------------------------------------------------------------- contact sheet

def contact_sheet(path: Path, tiles: list[tuple[Image.Image | None, str]], *,
                  columns: int = 4, tile_width: int = 256) -> tuple[int, int]:
    """A grid of pictures, each with its label under it; a missing picture is a grey
    tile that says so. Returns the sheet's size."""
    if not tiles:
        raise UsageError("no keyframe to put on a contact sheet")
    aspect = next((im.height / im.width for im, _ in tiles if im is not None), 0.5)
    tw, th = tile_width, max(1, round(tile_width * aspect))
    font = ImageFont.load_default(size=max(10, tile_width // 18))
    label_h = font.size + 8 if hasattr(font, "size") else 18
    pad = 6
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (pad + columns * (tw + pad), pad + rows * (th + label_h + pad)),
                      (16, 16, 20))
    draw = ImageDraw.Draw(sheet)
    for i, (im, label) in enumerate(tiles):
        x = pad + (i % columns) * (tw + pad)
        y = pad + (i // columns) * (th + label_h + pad)
        if im is None:
            draw.rectangle((x, y, x + tw - 1, y + th - 1), fill=(60, 60, 66))
            draw.text((x + 6, y + 6), "image deleted", fill=(200, 200, 200), font=font)
        else:
            sheet.paste(im.convert("RGB").resize((tw, th), Image.Resampling.LANCZOS), (x, y))
        draw.text((x + 2, y + th + 3), label, fill=(230, 230, 230), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp(path)
    try:
        sheet.save(tmp, format="PNG", optimize=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return sheet.size
