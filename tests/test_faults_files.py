"""Issue 10, item 1: the display's frame swap never writes into a frame file.

A display commit that fails after the swap shows the same frame again; with two links
to one inode, POSIX rename is a no-op and a temp link used to stay behind, and the
next swap's fallback copy wrote *through* it into an old frame's file. Real files,
real hard links; the ledger case holds the write lock from a real second connection.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from dreamd.storage import files
from tests.conftest import WriteLock, worker_context


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def frames(tmp_path: Path, n: int) -> list[Path]:
    d = tmp_path / "frames"
    d.mkdir()
    out = []
    for i in range(n):
        p = d / f"{i}.png"
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(p)
        out.append(p)
    return out


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if files.is_temp(p))


def test_showing_a_frame_twice_leaves_no_link_and_overwrites_nothing(tmp_path):
    a, b, c = frames(tmp_path, 3)
    out = tmp_path / "output"
    out.mkdir()
    before = {p: digest(p) for p in (a, b, c)}
    current = out / "current_frame.png"
    files.place_atomic(a, current)
    files.place_atomic(a, current)          # the same frame again: same inode already
    assert temps(out) == []
    files.place_atomic(b, current)
    files.place_atomic(a, out / "previous_frame.png")
    files.place_atomic(c, current)
    assert {p: digest(p) for p in (a, b, c)} == before
    assert current.read_bytes() == c.read_bytes()
    assert temps(out) == []


def test_a_stale_temp_name_is_never_written_through(tmp_path):
    """A temp link left by an older daemon (same pid and thread id reused) is not the
    new swap's temp file: nothing is written into the file it links to."""
    import os
    import threading

    a, b = frames(tmp_path, 2)
    out = tmp_path / "output"
    out.mkdir()
    before = digest(a)
    stale = out / f".current_frame.png.{os.getpid()}.{threading.get_ident()}.tmp"
    os.link(a, stale)
    files.place_atomic(b, out / "current_frame.png")
    assert digest(a) == before
    assert (out / "current_frame.png").read_bytes() == b.read_bytes()


def test_the_copy_fallback_writes_a_fresh_file(tmp_path, monkeypatch):
    """Where links are refused (another file system), the copy goes to a new name opened
    exclusively, never through an existing one."""
    a, b = frames(tmp_path, 2)
    out = tmp_path / "output"
    out.mkdir()

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(files.os, "link", no_links)
    before = {p: digest(p) for p in (a, b)}
    current = out / "current_frame.png"
    files.place_atomic(a, current)
    files.place_atomic(a, current)
    files.place_atomic(b, current)
    assert {p: digest(p) for p in (a, b)} == before
    assert current.read_bytes() == b.read_bytes() and temps(out) == []


# ---------------------------------------------------------------- through the display

@pytest.fixture
def short_busy_ctx(db_path, monkeypatch):
    """The display test context, with engines that give up on a busy ledger quickly."""
    from dreamd.ledger import database

    monkeypatch.setattr(database, "BUSY_TIMEOUT_MS", 300)
    yield from worker_context(db_path, "[display]\nfps = 10.0\nmin_buffer_seconds = 0.1\n"
                                       "buffer_target_seconds = 5.0\n")


def test_a_failed_display_commit_overwrites_no_frame(short_busy_ctx, db_path):
    from dreamd.display.writer import DisplayWriter
    from tests import invariants
    from tests.test_display import add_segment

    ctx = short_busy_ctx
    add_segment(ctx, 0, 4)
    add_segment(ctx, 1, 4)
    frame_files = sorted(ctx.cfg.frames_dir.glob("*.png"))
    before = {p.name: digest(p) for p in frame_files}
    w = DisplayWriter(ctx)
    with WriteLock(db_path):
        # the commit after each swap fails on the locked ledger: tick() rides that out
        # (no exception reaches the scheduler) and keeps the shown frames to record later
        for _ in range(3):
            w.tick()
        assert [(chain, t) for _id, chain, t, _at in w.pending] == [(0, 0.0), (0, 0.2),
                                                                   (0, 0.4)]
    for _ in range(12):
        w.tick()
    assert w.flush(timeout=60), "the shown frames were never recorded once the lock was gone"
    assert {p.name: digest(p) for p in frame_files} == before
    assert temps(ctx.cfg.output_dir) == []
    invariants.distinct_frame_files(ctx.cfg.data_dir)


def test_stale_temp_links_in_output_are_removed_at_start(short_busy_ctx):
    from dreamd.display.writer import DisplayWriter
    from tests.test_display import add_segment

    ctx = short_busy_ctx
    add_segment(ctx, 0, 2)
    out = ctx.cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    frame = sorted(ctx.cfg.frames_dir.glob("*.png"))[0]
    import os
    os.link(frame, out / ".current_frame.png.4242.139.tmp")     # what the old swap left
    (out / ".status.json.4242.139.tmp").write_bytes(b"{")
    DisplayWriter(ctx)
    assert temps(out) == []
    assert frame.exists()
