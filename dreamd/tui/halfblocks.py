"""The dashboard's preview in half blocks (▀: the upper pixel is the character's colour,
the lower one its background), for terminals that speak no graphics protocol.

Drawn for a dashboard left open all day: the picture is scaled (by PIL, in C) and turned
into one Strip per row in the preview's worker thread, never on the event loop, which
only swaps the rows in; colours are kept to 5 bits a channel so that a Style is made once
and reused (a morph changes few of them from one frame to the next), and runs of one
colour pair are one segment. textual-image's half-cell widget, which this replaces, drew
every cell anew on the loop: about 87 ms a frame at 90x30 cells, a quarter of a core at
4 fps (bench/RESULTS.md, "The dashboard").
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from textual.geometry import Region, Size
from textual.strip import Strip
from textual.widget import Widget

UPPER = "▀"
KEEP_BITS = 0xF8            # 5 bits a channel: a Style per colour pair, made once
MAX_STYLES = 50_000         # the cache starts over past this (a day of dreaming, at most)


class Drawing:
    """An image as the rows of a half-block picture of a given size; `rows` are the
    colours of each row, so the next drawing reuses the Strip of a row that is the same
    (and the widget repaints only the rows that changed)."""

    __slots__ = ("image", "size", "strips", "rows")

    def __init__(self, image: Any, size: Size, strips: list[Strip],
                 rows: list[bytes] | None = None) -> None:
        self.image, self.size, self.strips = image, size, strips
        self.rows = rows or []


class StyleCache:
    """Styles by colour pair; thread-safe (the worker thread draws, the loop may too)."""

    def __init__(self) -> None:
        self._styles: dict[bytes, Style] = {}
        self._lock = threading.Lock()

    def style(self, pair: bytes) -> Style:
        found = self._styles.get(pair)
        if found is None:
            r, g, b, r2, g2, b2 = pair
            found = Style(color=Color.from_rgb(r, g, b), bgcolor=Color.from_rgb(r2, g2, b2))
            with self._lock:
                if len(self._styles) >= MAX_STYLES:
                    self._styles.clear()
                self._styles[pair] = found
        return found


STYLES = StyleCache()


def fit(width: int, height: int, cells: Size) -> tuple[int, int]:
    """The picture's size in half-block pixels (two per cell row) inside `cells`, its
    aspect kept (a half-block pixel is about square)."""
    if cells.width <= 0 or cells.height <= 0 or width <= 0 or height <= 0:
        return 0, 0
    scale = min(cells.width / width, 2 * cells.height / height)
    w = max(1, min(cells.width, round(width * scale)))
    h = max(2, min(2 * cells.height, round(height * scale)))
    return w, h - h % 2


def draw(image: Any, cells: Size, previous: Drawing | None = None) -> Drawing:
    """The half-block rows of a PIL image inside `cells`, centred; blank rows and columns
    around it; rows equal to `previous`'s are its very Strips. Runs anywhere (no widget
    is touched)."""
    from PIL import Image

    w, h = fit(*image.size, cells)
    if not w or not h:
        return Drawing(image, cells, [])
    pixels = np.asarray(image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR))
    pixels = pixels & KEEP_BITS
    pairs = np.concatenate([pixels[0::2], pixels[1::2]], axis=2)   # (rows, w, 6)
    left = (cells.width - w) // 2
    top = (cells.height - h // 2) // 2
    pad_left = [Segment(" " * left)] if left else []
    pad_right = cells.width - w - left
    blank = Strip([Segment(" " * cells.width)], cells.width)
    strips = [blank] * top
    rows = [b""] * top
    same = previous is not None and previous.size == cells
    for row in pairs:
        raw = row.tobytes()
        if same and len(rows) < len(previous.rows) and previous.rows[len(rows)] == raw:
            strips.append(previous.strips[len(rows)])
            rows.append(raw)
            continue
        rows.append(raw)
        segments = list(pad_left)
        start = 0
        # one segment per run of equal colour pairs
        change = np.flatnonzero(np.any(row[1:] != row[:-1], axis=1)) + 1
        for end in (*change.tolist(), w):
            pair = raw[start * 6:start * 6 + 6]
            segments.append(Segment(UPPER * (end - start), STYLES.style(pair)))
            start = end
        if pad_right:
            segments.append(Segment(" " * pad_right))
        strips.append(Strip(segments, cells.width))
    strips += [blank] * (cells.height - len(strips))
    return Drawing(image, cells, strips, rows)


class HalfBlocks(Widget):
    """Shows a Drawing; the owner draws it off the loop (`draw`) for the widget's size
    and hands it over with `show`. A resize draws the last image again, once."""

    DEFAULT_CSS = "HalfBlocks { width: 100%; height: 1fr; }"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._drawing: Drawing | None = None
        self.image: Any = None          # the image on show (what the app and tests ask)
        # the size in cells, kept on the loop for the worker thread that draws: a thread
        # must not ask a widget (its size makes scrollbars, and they need the loop)
        self.cells = Size(0, 0)

    def on_resize(self, event) -> None:
        self.cells = event.size

    @property
    def drawing(self) -> Drawing | None:
        return self._drawing

    def show(self, drawing: Drawing | None, image: Any) -> None:
        """Show `drawing` (of `image`), repainting only the rows that changed."""
        before, self._drawing, self.image = self._drawing, drawing, image
        if (before is None or drawing is None or before.size != drawing.size
                or len(before.strips) != len(drawing.strips)):
            self.refresh()
            return
        width = drawing.size.width
        for y, (old, new) in enumerate(zip(before.strips, drawing.strips)):
            if old is not new:
                self.refresh(Region(0, y, width, 1))

    def render_line(self, y: int) -> Strip:
        d = self._drawing
        if self.image is not None and (d is None or d.size != self.size):
            d = self._drawing = draw(self.image, self.size)      # resized: drawn again
        if d is None or y >= len(d.strips):
            return Strip.blank(self.size.width)
        return d.strips[y]
