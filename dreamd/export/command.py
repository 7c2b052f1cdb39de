"""`dreamd export`: a stretch of the dream as a video or an animation, or its keyframes
as a contact sheet. Light at import (the parser is built for every command); PyAV,
Pillow and, only when frames must be made again, torch are imported when used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterator

from dreamd.errors import DreamdError, UsageError

DEFAULT_SECONDS = 10.0
SHEET_KEYFRAMES = 24


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        w = h = 0
    if not (16 <= w <= 8192 and 16 <= h <= 8192):
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, 16 to 8192 each "
                                         f"(e.g. 512x256)")
    return w, h


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number > 0")
        return value
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", type=Path, metavar="FILE",
                   help="the video: .mp4 (H.264), .webp or .gif (animated)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--seconds", type=_positive(float), metavar="S",
                      help=f"the last S seconds as played, up to the playhead (default "
                           f"{DEFAULT_SECONDS:g})")
    what.add_argument("--last", type=_positive(int), metavar="N",
                      help="the last N keyframes and the frames between them")
    what.add_argument("--from", dest="first", type=int, metavar="K",
                      help="from keyframe K (chain index; with --to)")
    p.add_argument("--to", dest="to", type=int, metavar="K",
                   help="to keyframe K (chain index; default: the newest)")
    p.add_argument("--fps", type=_positive(float), help="frames per second of the file "
                   "(default: display.fps)")
    p.add_argument("--size", type=_size, metavar="WxH", help="frame size (default: the "
                   "frames' own)")
    p.add_argument("--quality", type=int, default=80, choices=range(0, 101), metavar="0-100",
                   help="encoder quality (default 80)")
    p.add_argument("--contact-sheet", type=Path, metavar="FILE.png", help="write a grid of "
                   "keyframes with their chain index and theme instead (the range options "
                   f"choose them; default the last {SHEET_KEYFRAMES})")
    p.add_argument("--columns", type=_positive(int), default=6, help="contact sheet columns")
    p.add_argument("--tile-width", type=_positive(int), default=256, metavar="PX",
                   help="contact sheet: width of each keyframe's picture (default 256)")


def export(cfg, args: argparse.Namespace) -> int:
    from dreamd.ledger import read_model

    if args.to is not None and (args.last is not None or args.seconds is not None):
        raise UsageError("--to goes with --from (chain indices; alone: from the first "
                         "keyframe), not with --last or --seconds")
    if not args.output and not args.contact_sheet:
        raise UsageError("say where: --output FILE (.mp4, .webp, .gif) or --contact-sheet "
                         "FILE.png")
    if args.output:
        from dreamd.export.writers import format_of
        format_of(args.output)        # a wrong extension fails before any work
    if not cfg.db_path.exists():
        raise DreamdError(f"no ledger at {cfg.db_path} yet: start the daemon first")
    conn = read_model.connect(cfg.db_path)
    try:
        # the display rate in effect (the read model's knobs: stored and valid, else config)
        display_fps = float(read_model.knobs(read_model.stored_knobs(conn),
                                             cfg)["display.fps"].value)
        if args.contact_sheet:
            return _sheet(cfg, conn, args)
        return _video(cfg, conn, args, display_fps)
    finally:
        conn.close()


def _range_given(args) -> bool:
    return args.last is not None or args.first is not None or args.to is not None


def _sheet(cfg, conn, args) -> int:
    from PIL import Image

    from dreamd.export import plan, writers

    kfs = plan.keyframes(conn, cfg.data_dir, first=args.first, last=args.to,
                         newest=args.last) if _range_given(args) else \
        plan.keyframes(conn, cfg.data_dir, newest=SHEET_KEYFRAMES)
    tiles = []
    for k in kfs:
        source = k.path or k.thumb
        im = None
        if source is not None:
            with Image.open(source) as opened:
                im = opened.convert("RGB")
        tiles.append((im, f"#{k.chain_index} {k.theme}"))
    size = writers.contact_sheet(args.contact_sheet, tiles, columns=args.columns,
                                 tile_width=args.tile_width)
    print(f"{args.contact_sheet}: {len(tiles)} keyframes, {size[0]}x{size[1]}")
    return 0


def _video(cfg, conn, args, display_fps: float) -> int:
    from dreamd.export import plan, writers

    if _range_given(args):
        p = plan.by_chain(conn, cfg.data_dir, args.first, args.to, args.last)
    else:
        p = plan.by_seconds(conn, cfg.data_dir, args.seconds or DEFAULT_SECONDS, display_fps)
    slots = p.slots()
    remade, gaps = _resolve(cfg, p, slots)
    kept = [(seg, t) for seg, t in slots if round(t, 6) in seg.files
            or seg.start.chain_index in remade]
    if p.unmade:
        print(f"dreamd export: keyframes {p.unmade[0]} to {p.unmade[-1]} have no frames yet "
              f"(still being interpolated): the export ends at keyframe "
              f"{p.segments[-1].start.chain_index}", file=sys.stderr)
    for gap in gaps:
        print(f"dreamd export: {gap}", file=sys.stderr)
    if not kept:
        raise DreamdError("every frame of that stretch is gone (retention deleted the frames "
                          "and the keyframe images they could be made from): nothing written")
    first = kept[0][0]
    size = args.size or (first.start.width, first.start.height)
    if writers.format_of(args.output) == "mp4":
        size = writers.even(size)
    fps = args.fps or display_fps
    n = writers.write(args.output, _frames(kept, remade, len(kept)), fps, size,
                      quality=args.quality)
    made = sum(1 for seg, _ in kept if seg.start.chain_index in remade)
    print(f"{args.output}: {n} frames at {fps:g} fps ({n / fps:.1f} s), {size[0]}x{size[1]}, "
          f"keyframes {kept[0][0].start.chain_index} to {kept[-1][0].start.chain_index}"
          + (f"; {made} frames made again from their keyframes" if made else "")
          + (f"; {len(gaps)} gaps (see above)" if gaps else ""))
    return 0


def _resolve(cfg, p, slots) -> tuple[dict[int, dict[float, Any]], list[str]]:
    """Segments with deleted frames made again ({chain: {t: image}}), and the spans that
    are gone, said in words."""
    from dreamd.export.remake import Remaker

    remaker = Remaker(cfg)
    remade: dict[int, dict[float, Any]] = {}
    gaps: list[str] = []
    wanted = {}
    for seg, t in slots:
        if round(t, 6) not in seg.files:
            wanted.setdefault(seg.start.chain_index, seg)
    for chain, seg in sorted(wanted.items()):
        if seg.remakable():
            try:
                remade[chain] = remaker.segment(seg)
                continue
            except Exception as exc:       # weights gone, a damaged image: a gap, said
                why = str(exc)
        elif seg.end is None:
            why = "its frame was deleted and it ends the stretch"
        else:
            lost = [f"{k.chain_index}" for k in (seg.start, seg.end) if k.path is None]
            why = (f"keyframe image{'s' if len(lost) > 1 else ''} {', '.join(lost)} deleted by "
                   f"retention (only thumbnails remain)")
        end = f"to {seg.end.chain_index} " if seg.end else ""
        gaps.append(f"keyframes {seg.start.chain_index} {end}(from "
                    f"{seg.start.completed_at}): frames deleted and not made again: {why}")
    return remade, gaps


def _frames(kept, remade, total: int) -> Iterator[Any]:
    from PIL import Image
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeRemainingColumn

    progress = Progress(TextColumn("exporting"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), disable=not sys.stderr.isatty(),
                        transient=True, console=Console(stderr=True))
    with progress:
        task = progress.add_task("frames", total=total)
        for seg, t in kept:
            key = round(t, 6)
            if key in seg.files:
                with Image.open(seg.files[key]) as im:
                    yield im.convert("RGB")
            else:
                yield remade[seg.start.chain_index][key]
            progress.advance(task)
