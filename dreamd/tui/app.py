"""`dreamd tui`: the Textual dashboard. It watches one data dir through its ledger
(read-only) and output files, and steers the dream with `controls` rows; it never
imports torch, so it works beside a daemon on another machine's data dir.

Two thread workers feed it (never touching widgets: they post messages): one takes a
ledger Snapshot every second (a locked ledger blocks only that thread), one reloads
the preview when `current_frame.png` changes. Control rows are written from a third,
short-lived thread, so a busy ledger never freezes a key.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Footer, Static

from dreamd.tui import halfblocks, panels, steering
from dreamd.tui.halfblocks import HalfBlocks
from dreamd.tui.reading import Reader, Snapshot, utcnow

LEDGER_EVERY = 1.0        # seconds between snapshots of the ledger
PREVIEW_EVERY = 0.5       # seconds between looks at current_frame.png (at most 2 redraws/s)
# A half-block preview is drawn in Python on the event loop (about 50 ms for 90x30 cells
# on an idle 2-core machine, 280 ms when it is loaded): it may take at most this share of
# the loop's time, so keys and the other panels always get theirs (bench/RESULTS.md).
PREVIEW_SHARE = 0.25
SPARK_SAMPLES = 300       # buffer samples kept for the sparkline (5 minutes at 1 a second)


@dataclass
class Outcome:
    """What became of a control the dashboard sent."""
    control_id: int
    label: str
    state: str               # sent | applied | rejected | failed
    error: str | None = None


class Snapped(Message):
    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


class Previewed(Message):
    def __init__(self, image: Any, caption: str, selected: bool,
                 drawing: halfblocks.Drawing | None = None) -> None:
        super().__init__()
        self.image, self.caption, self.selected = image, caption, selected
        self.drawing = drawing      # half blocks: drawn in the worker thread


class ControlSent(Message):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__()
        self.outcome = outcome


class BufferPanel(Static):
    """The buffer: drawn at paint time, when its width (for the gauge and the
    sparkline) is known."""

    data: tuple[Snapshot, list[float]] | None = None

    def show(self, snap: Snapshot, samples: list[float]) -> None:
        self.data = (snap, samples)
        self.refresh()

    def render(self):
        if self.data is None:
            return ""
        snap, samples = self.data
        return panels.buffer(snap, samples, width=min(60, max(10, self.size.width - 1)))


def image_widget(graphics: str):
    """The preview widget: the best protocol the terminal speaks (Kitty, Sixel), else
    half blocks, drawn off the event loop (dreamd/tui/halfblocks.py). textual-image asks
    the terminal at import, before the app starts."""
    from textual_image import widget

    kinds = {"auto": widget.Image, "halfcell": HalfBlocks, "unicode": widget.UnicodeImage,
             "sixel": widget.SixelImage, "kitty": widget.TGPImage}
    chosen = kinds[graphics]
    return HalfBlocks if chosen is widget.HalfcellImage else chosen


def load_image(path: Path):
    """A PIL image fully read now (in the worker thread), or None when it is gone."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError):
        return None


class DreamApp(App):
    TITLE = "dreamd"
    ENABLE_COMMAND_PALETTE = False       # every key is in the footer
    CSS = """
    #daemon { height: auto; padding: 0 1; background: $panel; }
    #daemon.dead { background: $error 40%; }
    #top { height: 3fr; }
    #bottom { height: 2fr; }
    #preview-box { width: 3fr; border: round $accent; border-title-align: left; }
    #preview { width: 100%; height: 1fr; }
    #side { width: 2fr; }
    .panel { border: round $primary; height: auto; padding: 0 1; }
    #history { width: 3fr; height: 100%; border: round $primary; }
    #events { width: 2fr; height: 100%; border: round $primary; padding: 0 1;
              overflow: hidden; }
    #message { height: 1; padding: 0 1; background: $boost; }
    """
    BINDINGS = [
        Binding("p", "control('pause')", "pause"),
        Binding("d", "control('generation.denoise-')", "denoise-"),
        Binding("D", "control('generation.denoise+')", "+"),
        Binding("f", "control('display.fps-')", "fps-"),
        Binding("F", "control('display.fps+')", "+"),
        Binding("n", "control('generation.interpolation_frames-')", "frames-"),
        Binding("N", "control('generation.interpolation_frames+')", "+"),
        Binding("t", "control('theme')", "theme"),
        Binding("i", "control('inject')", "inject"),
        Binding("g", "control('free')", "free GPU"),
        Binding("escape", "live", "live preview", show=False),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, cfg, *, graphics: str = "auto", now: Callable[[], datetime] = utcnow,
                 gpu_reader: Callable | None = None, ledger_every: float = LEDGER_EVERY,
                 preview_every: float = PREVIEW_EVERY) -> None:
        super().__init__()
        self.cfg = cfg
        self.graphics = graphics
        self.reader = Reader(cfg, now=now, **({"gpu_reader": gpu_reader} if gpu_reader else {}))
        self.ledger_every, self.preview_every = ledger_every, preview_every
        self.snapshot: Snapshot | None = None
        self.snapshots = 0
        self.outcomes: dict[int, Outcome] = {}
        self.failures: list[str] = []
        self.selected: int | None = None          # keyframe id shown instead of live
        self._samples: deque[float] = deque(maxlen=SPARK_SAMPLES)
        self._stop = threading.Event()
        self.sender = steering.Sender(cfg.db_path)
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._history_key: tuple = ()
        self._render_cost = 0.0                   # seconds the last preview drawing took
        self._said: dict[str | None, Any] = {}    # what each panel shows now (panels.said)
        self._preview: Any = None                 # the preview widget, found at mount
        self._events_key: int | None = None

    # ------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield Static("reading the ledger…", id="daemon")
        with Horizontal(id="top"):
            box = Vertical(id="preview-box")
            box.border_title = "preview"
            with box:
                yield image_widget(self.graphics)(id="preview")
            with VerticalScroll(id="side"):
                yield self._panel("buffer", BufferPanel(id="buffer-text"))
                yield self._panel("pipeline", Static(id="pipeline-text"))
                yield self._panel("GPU", Static(id="gpu-text"))
        with Horizontal(id="bottom"):
            history = DataTable(id="history", cursor_type="row", zebra_stripes=True)
            history.border_title = "history (enter shows a keyframe, esc the live frame)"
            yield history
            # a plain text panel: a DataTable refilled every second (events change at
            # every frame) cost more than everything else on screen together
            events = Static(id="events")
            events.border_title = "events (newest first)"
            yield events
        yield Static("", id="message")
        yield Footer()

    @staticmethod
    def _panel(title: str, *children) -> Vertical:
        v = Vertical(*children, classes="panel", id=f"panel-{title.lower()}")
        v.border_title = title
        return v

    def on_mount(self) -> None:
        preview = self._preview = self.query_one("#preview")
        if not isinstance(preview, HalfBlocks):
            self._cache_drawing(preview)
        self.query_one("#history", DataTable).add_columns(
            "#", "theme", "denoise", "source", "backend", "ms", "state")
        self.watch_ledger()
        self.watch_preview()

    def _cache_drawing(self, preview) -> None:
        """textual-image's widgets (Kitty, Sixel, unicode blocks) draw on the loop."""
        draw = preview.render_lines
        drawn: dict[str, Any] = {}

        def cached(crop):
            # The picture is drawn again only when it, its size or the crop changed: a
            # relayout (every panel update) would otherwise redraw the half blocks in
            # Python each time, ~0.3-1 s a time on a loaded machine, and keys would wait.
            key = (preview.image, preview.size, crop)
            if drawn.get("key") == key:
                return drawn["strips"]
            start = time.perf_counter()
            strips = draw(crop)
            self._render_cost = time.perf_counter() - start   # how dear is drawing it?
            drawn.update(key=key, strips=strips)   # the key holds the image: no id reuse
            return strips

        preview.render_lines = cached

    def on_unmount(self) -> None:
        self._stop.set()
        self._wake.set()
        self.sender.close()

    async def action_quit(self) -> None:
        self._stop.set()                     # the workers end; late messages are ignored
        self._wake.set()
        await super().action_quit()

    # ------------------------------------------------------------ workers (threads)
    @work(thread=True, group="ledger")
    def watch_ledger(self) -> None:
        try:
            while not self._stop.is_set():
                snap = self.reader.read(set(self._waiting()))
                self.post_message(Snapped(snap))
                self._wake.wait(self.ledger_every)
                self._wake.clear()
        finally:
            self.reader.close()

    @work(thread=True, group="preview")
    def watch_preview(self) -> None:
        path = self.cfg.output_dir / "current_frame.png"
        seen: object = "never looked"
        while not self._stop.is_set():
            if self.selected is None:
                try:
                    st = path.stat()
                    mark: tuple | None = (st.st_mtime_ns, st.st_size, st.st_ino)
                except OSError:
                    mark = None
                if mark != seen:
                    image = load_image(path) if mark else None
                    caption = "live: current_frame.png" if image else \
                        f"no frame yet ({path} does not exist)"
                    if self.selected is None:
                        self.post_message(Previewed(image, caption, selected=False,
                                                    drawing=self._drawn(image)))
                        seen = mark
            else:
                seen = "never looked"            # back to live: reload at once
            # never faster than drawing allows: at most PREVIEW_SHARE of the loop's time
            self._stop.wait(max(self.preview_every, self._render_cost / PREVIEW_SHARE))

    @work(thread=True, group="select", exclusive=True)
    def show_keyframe(self, row: dict[str, Any]) -> None:
        from dreamd.storage.paths import resolve

        image, where = None, None
        for rel in (row.get("path"), row.get("thumb_path")):
            p = resolve(self.cfg.data_dir, rel) if rel else None
            if p is not None and p.exists():
                image, where = load_image(p), rel
                if image is not None:
                    break
        if image is not None:
            caption = f"keyframe {row['chain_index']} ({row['theme']}) from {where}"
        else:
            caption = f"keyframe {row['chain_index']}: its image is gone (retention)"
        self.post_message(Previewed(image, caption, selected=True, drawing=self._drawn(image)))

    def _drawn(self, image) -> halfblocks.Drawing | None:
        """The half-block rows of `image` for the preview's size now (worker thread:
        only plain attributes of the widget are read, never the DOM)."""
        preview = self._preview
        if image is None or not isinstance(preview, HalfBlocks) or not preview.cells.area:
            return None
        return halfblocks.draw(image, preview.cells, preview.drawing)

    @work(thread=True, group="control")
    def send_control(self, request: steering.Request) -> None:
        try:
            with self._send_lock:                # one write at a time, in key order
                cid = self.sender.send(request)
        except Exception as exc:
            self.post_message(ControlSent(Outcome(-1, request.label, "failed", str(exc))))
            return
        self.post_message(ControlSent(Outcome(cid, request.label, "sent")))

    @work(thread=True, group="control")
    def warm_sender(self) -> None:
        try:
            with self._send_lock:
                self.sender.warm()
        except Exception:       # a missing or unusable ledger: the first key says why
            pass

    def _waiting(self) -> list[int]:
        return [i for i, o in list(self.outcomes.items()) if o.state == "sent"]

    # ------------------------------------------------------------ messages
    @on(Snapped)
    def _snapped(self, message: Snapped) -> None:
        if self._stop.is_set():
            return                               # a late snapshot while closing
        try:
            self._show(message.snapshot)
        except NoMatches:                        # the screen is being torn down
            pass

    def _show(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.snapshots += 1
        if self.snapshots == 1:
            self.warm_sender()
        daemon = self.query_one("#daemon", Static)
        line = snap.daemon.line
        if snap.paused:
            line += f" · paused: {snap.pause_reason or 'paused'}"
        if snap.problem:
            line += f" · {snap.problem}"
        self._update(daemon, line)
        daemon.set_class(not snap.daemon.alive, "dead")
        if snap.buffer_seconds is not None:
            self._samples.append(float(snap.buffer_seconds))
        self.query_one("#buffer-text", BufferPanel).show(snap, list(self._samples))
        self._update(self.query_one("#pipeline-text", Static), panels.pipeline(snap))
        self._update(self.query_one("#gpu-text", Static), panels.gpu(snap))
        self._fill_history(snap)
        self._fill_events(snap)
        for cid, row in snap.controls.items():
            outcome = self.outcomes.get(cid)
            if outcome is None or outcome.state != "sent" or row["state"] == "available":
                continue
            outcome.state, outcome.error = row["state"], row["error"]
            self._say(outcome)

    def _update(self, widget: Static, content: Any) -> None:
        """Give a panel new content only when it says something else: an update costs a
        layout and a repaint, once a second for each panel, all day."""
        key = panels.said(content)
        if self._said.get(widget.id) != key:
            self._said[widget.id] = key
            widget.update(content)

    def _fill_history(self, snap: Snapshot) -> None:
        key = tuple((h["id"], h["state"]) for h in snap.history)
        if key == self._history_key:
            return
        self._history_key = key
        table = self.query_one("#history", DataTable)
        cursor = table.cursor_row
        table.clear()
        for h in snap.history:
            table.add_row(*panels.history_row(h), key=str(h["id"]))
        if snap.history:
            table.move_cursor(row=min(cursor, len(snap.history) - 1))

    def _fill_events(self, snap: Snapshot) -> None:
        newest = snap.events[0]["id"] if snap.events else None
        if newest == self._events_key:
            return
        self._events_key = newest
        self.query_one("#events", Static).update(panels.events(snap.events))

    @on(Previewed)
    def _previewed(self, message: Previewed) -> None:
        if self._stop.is_set():
            return
        if message.selected != (self.selected is not None):
            return                               # a late frame of the other mode
        try:
            preview = self.query_one("#preview")
            if isinstance(preview, HalfBlocks):
                preview.show(message.drawing, message.image)
            else:
                preview.image = message.image
            self.query_one("#preview-box").border_title = message.caption
        except NoMatches:
            pass

    @on(ControlSent)
    def _sent(self, message: ControlSent) -> None:
        if self._stop.is_set():
            return
        o = message.outcome
        if o.state == "failed":
            self.failures.append(f"{o.label}: {o.error}")
            self._say(o)
            return
        self.outcomes[o.control_id] = o
        self._say(o)
        self._wake.set()                         # look for the outcome now

    def _say(self, o: Outcome) -> None:
        text = {"sent": f"control {o.control_id} {o.label}: sent",
                "applied": f"control {o.control_id} {o.label}: applied",
                "rejected": f"control {o.control_id} {o.label}: rejected: {o.error}",
                "failed": f"{o.label}: not sent: {o.error}"}[o.state]
        if o.state == "sent" and self.snapshot is not None and not self.snapshot.daemon.alive:
            text += " (no daemon is running: it is applied when one starts)"
        self.query_one("#message", Static).update(text)
        if o.state in ("rejected", "failed"):
            self.notify(text, severity="error")

    @on(DataTable.RowSelected, "#history")
    def _select(self, event: DataTable.RowSelected) -> None:
        kid = int(event.row_key.value)
        row = next((h for h in (self.snapshot.history if self.snapshot else [])
                    if h["id"] == kid), None)
        if row is None:
            return
        self.selected = kid
        self.show_keyframe(row)

    # ------------------------------------------------------------ actions
    def action_control(self, action: str) -> None:
        snap = self.snapshot
        request = steering.for_action(
            action, paused=bool(snap and snap.paused),
            knob=lambda key: self.reader.knob(snap, key) if snap else
            getattr(getattr(self.cfg, key.split(".")[0]), key.split(".")[1]))
        self.query_one("#message", Static).update(f"{request.label}: sending…")
        self.send_control(request)

    def action_live(self) -> None:
        self.selected = None
        self.query_one("#preview-box").border_title = "live: current_frame.png"


def run(cfg, graphics: str = "auto") -> int:
    image_widget(graphics)          # imports textual-image: it asks the terminal now
    DreamApp(cfg, graphics=graphics).run()
    return 0

