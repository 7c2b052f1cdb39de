"""The dashboard (`dreamd tui`) driven by Textual's pilot on a prepared real ledger
(tests/tui_ledger.py): the panels render what the ledger holds, every key writes the
right `controls` row, applied and rejected controls are shown with the reason, the
"no daemon" and "no GPU" states are said plainly, selecting a history row shows that
keyframe's image, and a locked ledger does not stop the dashboard. Layout snapshots at
two terminal sizes (pytest-textual-snapshot; `--snapshot-update` after a deliberate
change, then look at the SVGs)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys

import pytest

from dreamd import config
from dreamd.tui import gpu
from dreamd.tui.app import DreamApp
from tests.conftest import WriteLock, worker_context
from tests.tui_ledger import NOW, prepare

NO_GPU = gpu.Reading((), "no NVIDIA GPU (NVML Shared Library Not Found)")
ONE_GPU = gpu.Reading((gpu.Device(0, "NVIDIA H200", 20480.0, 143771.0, 37, 54),))


@pytest.fixture
def data_dir(tmp_path, ledger_template):
    d = tmp_path / "data"
    prepare(d, ledger_template)
    return d


def make_app(data_dir, reading=NO_GPU, **kw) -> DreamApp:
    cfg = config.load(None, data_dir)
    kw.setdefault("ledger_every", 0.25)
    return DreamApp(cfg, graphics="halfcell", now=lambda: NOW, gpu_reader=lambda: reading, **kw)


async def until(pilot, predicate, what: str, timeout: float = 30.0):
    """Let the app run until `predicate()` holds (its workers are real threads)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def text_of(app, selector: str) -> str:
    """What a Static shows, as plain text (its content may be a Rich renderable)."""
    from rich.console import Console

    widget = app.query_one(selector)
    content = widget.content or widget.render()
    if isinstance(content, str) or not hasattr(content, "__rich_console__"):
        return str(content)
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(content)
    return console.export_text()


def table_rows(app, selector: str) -> list[list[str]]:
    table = app.query_one(selector)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def controls(db) -> list[tuple[str, dict]]:
    conn = sqlite3.connect(db)
    try:
        return [(c, json.loads(a)) for c, a in
                conn.execute("SELECT command, args FROM controls ORDER BY id")]
    finally:
        conn.close()


def test_panels_show_the_ledger(data_dir):
    async def go():
        app = make_app(data_dir)
        async with app.run_test(size=(140, 44)) as pilot:
            await until(pilot, lambda: app.snapshot is not None, "a snapshot")
            await until(pilot, lambda: app.query_one("#preview").image is not None, "preview")
            daemon = text_of(app, "#daemon")
            assert "no daemon running" in daemon and "stopped 3 min ago" in daemon
            assert "signal SIGTERM" in daemon
            pipeline = text_of(app, "#pipeline-text")
            assert "completed 6" in pipeline and "executing 1" in pipeline
            assert "ready 8, shown 8" in pipeline
            assert "keyframe 6 (executing" in pipeline
            assert "procedural, codec pixel" in pipeline
            buffer = text_of(app, "#buffer-text")
            assert "2.0 s of 30 s target at 4 fps" in buffer
            assert "no NVIDIA GPU" in text_of(app, "#gpu-text")
            history = table_rows(app, "#history")
            assert [r[0] for r in history] == ["6", "5", "4", "3", "2", "1", "0"]
            assert history[2][3] == "cache (chance)" and history[0][6] == "executing"
            events = text_of(app, "#events").splitlines()
            assert events[0] == "12:02:01 keyframe 7 available → executing claimed"
            assert events[1] == '12:02:00 keyframe 7 (new) → available {"theme": "signal"}'
            assert app.query_one("#preview-box").border_title == "live: current_frame.png"
    asyncio.run(go())


def test_gpu_panel_reads_each_device(data_dir):
    async def go():
        app = make_app(data_dir, ONE_GPU)
        async with app.run_test(size=(140, 44)) as pilot:
            await until(pilot, lambda: app.snapshot is not None, "a snapshot")
            assert "NVIDIA H200" in text_of(app, "#gpu-text")
            assert "VRAM 20.0/140.4 GB, util 37%, 54°C" in text_of(app, "#gpu-text")
    asyncio.run(go())


def test_the_real_gpu_reading_never_raises():
    reading = gpu.read()
    assert reading.devices or reading.problem.startswith(("no NVIDIA GPU", "GPU readings"))


KEYS = [
    ("p", "pause", {"reason": "paused from the dashboard"}),
    ("D", "set", {"key": "generation.denoise", "value": "0.45"}),     # stored knob 0.4
    ("d", "set", {"key": "generation.denoise", "value": "0.35"}),
    ("F", "set", {"key": "display.fps", "value": "5.0"}),
    ("f", "set", {"key": "display.fps", "value": "3.0"}),
    ("N", "set", {"key": "generation.interpolation_frames", "value": "11"}),
    ("n", "set", {"key": "generation.interpolation_frames", "value": "9"}),
    ("t", "theme", {"name": "next"}),
    ("i", "inject", {}),
    ("g", "free", {}),
]


def test_each_key_writes_its_control_row(data_dir):
    async def go():
        app = make_app(data_dir)
        async with app.run_test(size=(140, 44)) as pilot:
            await until(pilot, lambda: app.snapshot is not None, "a snapshot")
            for i, (key, _, _) in enumerate(KEYS, 1):
                await pilot.press(key)
                await until(pilot, lambda: len(app.outcomes) == i, f"control for {key!r}")
            assert not app.failures
            message = text_of(app, "#message")
            assert "free GPU memory: sent" in message
            assert "no daemon is running: it is applied when one starts" in message
    asyncio.run(go())
    assert controls(data_dir / "dreamd.db") == [(c, a) for _, c, a in KEYS]


def test_applied_and_rejected_controls_are_shown_with_the_reason(data_dir):
    from dreamd.workers import controls as worker

    async def go():
        app = make_app(data_dir)
        ctx_gen = worker_context(data_dir / "dreamd.db", "[cache]\nenabled = false\n")
        ctx = next(ctx_gen)
        try:
            async with app.run_test(size=(140, 44)) as pilot:
                await until(pilot, lambda: app.snapshot is not None, "a snapshot")
                await pilot.press("D")
                await until(pilot, lambda: len(app.outcomes) == 1, "the set control")
                worker.tick(ctx)                       # the daemon's own apply
                await until(pilot, lambda: ": applied" in text_of(app, "#message"), "applied")
                assert "generation.denoise=0.45: applied" in text_of(app, "#message")
                await pilot.press("i")
                await until(pilot, lambda: len(app.outcomes) == 2, "the inject control")
                worker.tick(ctx)
                await until(pilot, lambda: ": rejected" in text_of(app, "#message"), "rejected")
                assert "inject now: rejected: the aesthetic memory is off (cache.enabled = " \
                       "false)" in text_of(app, "#message")
                states = sorted(o.state for o in app.outcomes.values())
                assert states == ["applied", "rejected"]
                # the pause key follows the ledger: paused now, so it resumes
                await pilot.press("p")
                await until(pilot, lambda: len(app.outcomes) == 3, "the pause control")
                worker.tick(ctx)
                await until(pilot, lambda: app.snapshot.paused, "paused in the ledger")
                assert "paused: paused from the dashboard" in text_of(app, "#daemon")
                await pilot.press("p")
                await until(pilot, lambda: len(app.outcomes) == 4, "the resume control")
        finally:
            ctx_gen.close()
    asyncio.run(go())
    assert [c for c, _ in controls(data_dir / "dreamd.db")] == ["set", "inject", "pause",
                                                                "resume"]


def test_a_running_daemon_is_said_to_run(tmp_path, ledger_template):
    d = tmp_path / "data"
    prepare(d, ledger_template, running_run=True)
    conn = sqlite3.connect(d / "dreamd.db")
    conn.execute("UPDATE daemon_runs SET pid = ?, host = ?, heartbeat_at = ?",
                 (subprocess.os.getpid(), __import__("socket").gethostname(),
                  NOW.isoformat(sep=" ")))
    conn.commit()
    conn.close()

    async def go():
        app = make_app(d)
        async with app.run_test(size=(140, 44)) as pilot:
            await until(pilot, lambda: app.snapshot is not None, "a snapshot")
            assert app.snapshot.daemon.alive
            assert text_of(app, "#daemon").startswith("daemon running (run 1, pid ")
    asyncio.run(go())


def test_no_ledger_yet_is_said_plainly(tmp_path):
    async def go():
        app = make_app(tmp_path / "empty")
        async with app.run_test(size=(140, 44)) as pilot:
            await until(pilot, lambda: app.snapshot is not None, "a snapshot")
            await until(pilot, lambda: "no frame yet" in
                        str(app.query_one("#preview-box").border_title), "no preview")
            daemon = text_of(app, "#daemon")
            assert "no daemon has run on this data dir yet" in daemon
            assert "no ledger at" in daemon
    asyncio.run(go())


def test_selecting_a_history_row_shows_its_keyframe(data_dir):
    async def go():
        app = make_app(data_dir)
        async with app.run_test(size=(140, 44)) as pilot:
            await until(pilot, lambda: app.snapshot is not None, "a snapshot")
            await until(pilot, lambda: app.query_one("#history").row_count == 7, "history")
            app.query_one("#history").focus()
            await pilot.press("down", "down", "enter")        # keyframe 4
            box = app.query_one("#preview-box")
            await until(pilot, lambda: str(box.border_title).startswith("keyframe 4"), "sel")
            assert box.border_title == "keyframe 4 (cathedral) from keyframes/k00004.png"
            assert app.query_one("#preview").image.size == (128, 64)
            app.query_one("#history").move_cursor(row=6)      # keyframe 0: a thumbnail
            await pilot.press("enter")
            await until(pilot, lambda: str(box.border_title).startswith("keyframe 0"), "thumb")
            assert box.border_title == "keyframe 0 (ethereal) from thumbs/k00000.jpg"
            await pilot.press("escape")
            await until(pilot, lambda: box.border_title == "live: current_frame.png", "live")
    asyncio.run(go())


def test_a_locked_ledger_leaves_the_dashboard_responsive(data_dir):
    async def go():
        app = make_app(data_dir)
        async with app.run_test(size=(140, 44)) as pilot:
            await until(pilot, lambda: app.snapshot is not None, "a snapshot")
            with WriteLock(data_dir / "dreamd.db"):
                await pilot.press("t")             # its write waits for the lock…
                seen = app.snapshots
                # …while the dashboard goes on reading and answering keys
                await until(pilot, lambda: app.snapshots >= seen + 3, "snapshots while locked")
                await pilot.press("escape")
                assert "sending" in text_of(app, "#message")
            await until(pilot, lambda: len(app.outcomes) == 1, "the control once unlocked",
                        timeout=60)
    asyncio.run(go())


def test_the_dashboard_never_imports_torch(data_dir):
    probe = ("import sys, asyncio\n"
             "from dreamd import config\n"
             "from dreamd.tui.app import DreamApp\n"
             f"app = DreamApp(config.load(None, {str(data_dir)!r}), graphics='halfcell')\n"
             "async def go():\n"
             "    async with app.run_test() as pilot:\n"
             "        while app.snapshot is None:\n"
             "            await pilot.pause(0.05)\n"
             "asyncio.run(go())\n"
             "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False"


# ---------------------------------------------------------------- layout snapshots

async def _settled(pilot):
    app = pilot.app
    await until(pilot, lambda: app.snapshot is not None, "a snapshot")
    await until(pilot, lambda: app.query_one("#preview").image is not None, "the preview")
    await pilot.pause(0.2)


@pytest.mark.parametrize("size,reading", [((100, 32), NO_GPU), ((160, 48), ONE_GPU)],
                         ids=["100x32-no-gpu", "160x48-one-gpu"])
def test_layout_snapshot(data_dir, snap_compare, size, reading):
    app = make_app(data_dir, reading, ledger_every=3600)   # one snapshot: a stable picture
    assert snap_compare(app, terminal_size=size, run_before=_settled)
