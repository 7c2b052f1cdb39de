"""`dreamd run`: the daemon's lifecycle around the workers.

It owns the pid file, logging, the `daemon_runs` row and its heartbeat, the
APScheduler clock (one tick job per worker, `max_instances=1`, `coalesce=True`;
nothing durable lives in the scheduler), and signals: on SIGINT/SIGTERM (SIGHUP: a
closed terminal; SIGBREAK on Windows) or a `stop` control (`dreamd stop`) it stops
claiming, lets in-flight work finish for a few seconds, releases what is still
leased, records the stop, and exits 0.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import insert, update

from dreamd import __version__, platform
from dreamd.conditions import (DISK_FULL, begin_retrying, classify, make_reserve,
                               release_reserve, watch_ledger)
from dreamd.config import Config
from dreamd.errors import DaemonError
from dreamd.ledger import database, queries, read_model, transitions
from dreamd.ledger.models import DaemonRun, utcnow
from dreamd.ledger.states import JOB_ENTITIES

log = logging.getLogger("dreamd")
DR = DaemonRun.__table__
GRACE_SECONDS = 5.0        # how long in-flight work may finish after a stop signal
STOP_RECORD_SECONDS = 10.0  # how long the stop waits for a busy ledger to record itself
STOP_POLL = 0.5            # seconds between looks for a stop signal or a `stop` control (a
# wake-up costs ~0.1 ms of CPU here: 5 a second were 0.07 % of a core; half a second is
# still well inside what a person waiting for the stop notices)


# ---------------------------------------------------------------- pid file

def _is_dreamd(pid: int) -> bool:
    """Alive, and (when we can tell) a dreamd process, not a recycled pid."""
    if not read_model.pid_alive(pid):
        return False
    try:
        import psutil
        cmd = " ".join(psutil.Process(pid).cmdline())
        return "dreamd" in cmd or "python" in cmd
    except Exception:
        return True


def acquire_pid_file(path: Path) -> None:
    """Create the pid file, refusing when a live dreamd holds it; a stale one is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                other = 0
            if other and other != os.getpid() and _is_dreamd(other):
                raise DaemonError(f"another dreamd (pid {other}) is already running on "
                                  f"{path.parent}; stop it (`kill {other}`) or use another "
                                  f"--data-dir") from None
            log.warning("taking over a stale pid file %s (pid %s is gone)", path, other or "?")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return
    raise DaemonError(f"{path}: cannot create the pid file")


def release_pid_file(path: Path) -> None:
    try:
        if int(path.read_text().strip() or 0) == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


# ---------------------------------------------------------------- logging

def setup_logging(cfg: Config) -> None:
    # a closed terminal pipe or an unwritable log file never changes how the daemon
    # runs or stops (dreamd/log_sinks.py)
    from dreamd.log_sinks import LogFile, TerminalHandler

    cfg.logs_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(cfg.system.log_level)
    for h in list(root.handlers):
        root.removeHandler(h)
    console = TerminalHandler(show_path=False, rich_tracebacks=False, log_time_format="[%X]")
    console.setLevel(cfg.system.log_level)
    # `timing …` debug lines are for the log file (bench/pipeline.py reads them); on a
    # terminal they would scroll everything else away, and Rich rendering costs CPU
    console.addFilter(lambda record: not record.getMessage().startswith("timing "))
    file = LogFile(cfg.logs_dir / "dreamd.log", maxBytes=5_000_000, backupCount=3,
                   encoding="utf-8")
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(console)
    root.addHandler(file)
    for noisy in ("PIL", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # a tick skipped because the previous one still runs is normal: workers loop
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def tame_malloc() -> None:
    """Keep a long run's memory flat. glibc gives each thread its own malloc arena and
    raises its mmap threshold whenever a big buffer is freed, so the workers' numpy and
    torch temporaries (megabytes each, every keyframe) end up fragmenting thread arenas
    instead of going back to the OS: RSS crept from 1.5 to 2.3 GB in 70 s here. Two
    arenas and a fixed 1 MiB threshold (big buffers are mmapped and unmapped) stop it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_arena_max, m_mmap_threshold = -8, -3       # from glibc's malloc.h
    libc.mallopt(m_arena_max, 2)
    libc.mallopt(m_mmap_threshold, 1 << 20)


# ---------------------------------------------------------------- backends

def make_backend(cfg: Config, ctx: Any = None):
    """The keyframe backend; `ctx` lets a remote one publish its health (facts, ledger)."""
    name = cfg.generation.backend
    if name == "procedural":
        from dreamd.backends.procedural import ProceduralBackend
        return ProceduralBackend()
    if name == "comfyui":
        from dreamd.backends.comfyui.daemon_backend import build_backend
        return build_backend(cfg, ctx)
    if name == "diffusers":
        from dreamd.backends.diffusion.backend import build_backend as build_diffusion
        return build_diffusion(cfg, ctx)
    raise DaemonError(f"generation.backend = {name!r} is not a backend")


# ---------------------------------------------------------------- the workers

@dataclass
class Parts:
    """What the daemon builds once and its workers drive."""

    ctx: Any                                       # the WorkerContext they share
    backend: Any
    codecs: Any
    memory: Any
    display: Any
    janitor: Any
    governor: Any
    guard: Any
    on_knobs: Callable[..., None] | None = None    # a knob changed: the display's rate

    def controls_tick(self, on_knobs: Callable[..., None] | None) -> int:
        from dreamd.workers import controls
        return controls.tick(self.ctx, on_knobs, self.backend)


def display_interval(ctx) -> float:
    return 1.0 / (ctx.knob("display.fps") * ctx.facts.get("stretch", 1.0))


def workers(parts: Parts) -> list[tuple[str, float, Callable[[], Any]]]:
    """Every APScheduler worker of the daemon, once: (name, seconds between ticks, tick).
    (The display is not one: it has a thread of its own, dreamd/display/clock.py.)

    Idle ticks cost CPU (measured in bench/pipeline.py): each polls at the pace the
    buffer needs, not faster. A worker with work loops until it has none, and stages
    wake the next one (ctx.wake), so these intervals only bound how late a retry or a
    display-driven plan is noticed."""
    from dreamd.workers import controls, interpolation, janitor, keyframe, planner

    ctx = parts.ctx
    return [
        # woken by each keyframe done; alone, it notices the buffer falling below its
        # target (30 s by default) within 2 s
        ("planner", 2.0, lambda: planner.tick(ctx)),
        ("keyframe", 2.0, lambda: keyframe.tick(ctx, parts.backend)),
        ("interpolation", 2.0, lambda: interpolation.tick(ctx, parts.codecs)),
        ("embedding", 2.0, parts.memory.tick),
        ("janitor", 5.0, parts.janitor.tick),
        ("governor", 2.0, parts.governor.tick),
        # woken by the display's clock when a control waits (controls.EVERY); this
        # interval is only the fallback
        ("controls", controls.APPLY_EVERY, lambda: parts.controls_tick(parts.on_knobs)),
        ("heartbeat", 5.0, lambda: janitor.heartbeat(ctx)),
        ("guard", ctx.cfg.guard.check_interval_seconds, parts.guard.tick),   # games
    ]


# ---------------------------------------------------------------- the run

class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.stop_reason = "stopped"
        self.signalled: str | None = None      # set by the signal handler, read by run()
        self.running: dict[str, int] = {}
        self.running_lock = threading.Lock()

    def _job(self, name: str, fn: Callable[[], Any]) -> Callable[[], None]:
        """Wrap a tick: count it as in flight (for the shutdown grace) and never let an
        exception kill the schedule. A condition of the machine (ledger busy, disk full)
        is one warning while it lasts, not a traceback per tick."""
        def run() -> None:
            if self.ctx.stopping.is_set() and name != "display":
                return
            with self.running_lock:
                self.running[name] = self.running.get(name, 0) + 1
            try:
                fn()
            except Exception as exc:
                kind = classify(exc)
                if kind:
                    self.ctx.conditions.report(kind, name, exc)
                else:
                    log.exception("%s tick failed", name)
            finally:
                with self.running_lock:
                    self.running[name] -= 1
        return run

    def in_flight(self) -> list[str]:
        with self.running_lock:
            return [k for k, v in self.running.items() if v > 0]

    def on_signal(self, signum: int, _frame: Any = None) -> None:
        """SIGINT/SIGTERM: only note it. A handler runs between two bytecodes of the main
        thread, which may be inside `stop_event.wait()` holding the event's lock at that
        moment; `Event.set()` here would wait for that lock forever (a daemon deaf to every
        later signal, seen once in CI under load). `wait_for_stop` sets the event."""
        self.signalled = f"signal {signal.Signals(signum).name}"

    def wait_for_stop(self, duration: float | None) -> bool:
        """Until a signal, a `stop` control, a console close or `duration` seconds (None:
        for ever); True when stopped, False when the duration ran out."""
        deadline = None if duration is None else time.monotonic() + duration
        while not self.stop_event.is_set():
            # a signal, or a `stop` control the controls worker applied (dreamd stop)
            asked = self.signalled or getattr(self, "ctx", None) and \
                self.ctx.facts.get("stop_requested")
            if asked:
                self.stop_reason = asked
                self.stop_event.set()
                break
            left = STOP_POLL if deadline is None else min(STOP_POLL, deadline - time.monotonic())
            if left <= 0:
                return False
            self.stop_event.wait(left)
        return True

    def run(self, duration: float | None) -> int:
        # Signals first: a SIGTERM during start-up (migrations, a supervised ComfyUI
        # starting) must end in the same clean stop as one a minute later.
        def on_close(why: str) -> None:      # Windows: the console closed, a logoff
            self.stop_reason = why           # (another thread, not a signal handler)
            self.stop_event.set()

        previous = {s: signal.signal(s, self.on_signal) for s in platform.stop_signals()}
        stopped = threading.Event()           # the close handler holds Windows off until set
        console = platform.ConsoleClose(on_close, stopped)
        try:
            acquire_pid_file(self.cfg.pid_path)
            try:
                return self._run(duration)
            finally:
                release_pid_file(self.cfg.pid_path)
        finally:
            stopped.set()
            console.remove()
            for s, h in previous.items():
                signal.signal(s, h)

    def _run(self, duration: float | None) -> int:
        ctx = self._boot()
        self._recover(ctx)
        parts = self._build(ctx)
        # controls written while no daemon ran (a pause, a theme, a knob) act before the
        # planner plans anything: otherwise its first keyframes ignore them
        self._job("controls", lambda: parts.controls_tick(None))()
        scheduler = self._schedule(parts)
        scheduler.start()
        self.clock.start()
        try:
            if not self.wait_for_stop(duration):
                self.stop_reason = f"duration {duration:g} s elapsed"
        finally:
            clean = self._stop(scheduler, ctx, parts.display, parts.backend, parts.codecs)
        if not clean:
            # a job is stuck in a thread we cannot interrupt: its lease is released
            # and the stop recorded, so exiting now loses nothing (but the pid file,
            # which os._exit would skip the `finally` that removes)
            release_pid_file(self.cfg.pid_path)
            logging.shutdown()
            os._exit(0)
        return 0

    def _boot(self):
        """The ledger migrated and opened, this run recorded (and any run that never
        recorded its stop said to have died), the workers' shared context made."""
        from dreamd.torch_threads import configure_torch_threads
        from dreamd.storage.retention import ensure_incremental_vacuum
        from dreamd.workers.context import WorkerContext

        cfg = self.cfg
        tame_malloc()
        database.upgrade(cfg.db_path)
        if ensure_incremental_vacuum(cfg.db_path):   # once per ledger: pruning gives space back
            log.info("ledger %s: incremental vacuum turned on", cfg.db_path)
        engine, reader = database.writer(cfg.db_path), database.reader(cfg.db_path)
        threads = configure_torch_threads(cfg.system.torch_threads or None)
        # The display thread must get the GIL back promptly for low jitter.
        sys.setswitchinterval(0.001)

        host, pid = socket.gethostname(), os.getpid()
        with engine.begin() as conn:
            # runs that never recorded a stop died: say so
            conn.execute(update(DR).where(DR.c.stopped_at.is_(None)).values(
                stopped_at=DR.c.heartbeat_at, exit_reason="died (found at next start)"))
            run_id = conn.execute(insert(DR).values(
                pid=pid, host=host, version=__version__, backend=cfg.generation.backend,
                started_at=utcnow(), heartbeat_at=utcnow()).returning(DR.c.id)).scalar_one()
            queries.runtime(conn)
            if cfg.generation.backend != "comfyui":  # no stale server health in the status
                queries.update_runtime(conn, comfyui_health=None)
        ctx = WorkerContext(cfg=cfg, engine=engine, reader=reader, run_id=run_id,
                            owner=f"{host}:{pid}:{run_id}", started_monotonic=time.monotonic())
        self.ctx = ctx
        watch_ledger(engine, ctx.conditions)   # a granted write lock ends "ledger busy"
        ctx.facts["comfyui_status"] = "n/a" if cfg.generation.backend == "procedural" else "?"
        log.info("dreamd %s run %d (pid %d): data dir %s, backend %s, torch threads %d",
                 __version__, run_id, pid, cfg.data_dir, cfg.generation.backend, threads)
        return ctx

    def _recover(self, ctx) -> None:
        """What a crash left: leases back, files and rows reconciled, the pause and the
        knobs as they were; and room kept so a stop on a full disk is still recorded."""
        from dreamd.storage.reconcile import reconcile
        from dreamd.workers import controls, janitor

        make_reserve(ctx.cfg.data_dir)
        janitor.rescue_all(ctx, everything=True)
        reconcile(ctx)
        controls.restore(ctx)

    def _build(self, ctx) -> Parts:
        """The components the workers drive, and the web viewer (its own thread)."""
        from dreamd.display.writer import DisplayWriter
        from dreamd.governor.worker import GovernorWorker
        from dreamd.memory.embedder import Embedders
        from dreamd.web import server as web
        from dreamd.workers import interpolation
        from dreamd.workers.embedding import EmbeddingWorker
        from dreamd.workers.guard import Guard
        from dreamd.workers.janitor import Janitor

        backend = make_backend(self.cfg, ctx)
        codecs = interpolation.Codecs(ctx)
        ctx.codecs, ctx.embedders = codecs, Embedders(self.cfg.cache)  # shared with the planner
        parts = Parts(ctx=ctx, backend=backend, codecs=codecs, memory=EmbeddingWorker(ctx, ctx.embedders),
                      display=DisplayWriter(ctx), janitor=Janitor(ctx),
                      governor=GovernorWorker(ctx), guard=Guard(ctx))
        self.viewer = web.start(self.cfg)
        if self.viewer is not None:
            parts.display.on_shown = self.viewer.announce
        return parts

    def _schedule(self, parts: Parts):
        """One APScheduler job per worker, from the table in `workers()`, and the
        display's clock (self.clock, started with the scheduler); stages wake the next
        one (ctx.wake), and a change of the display rate retimes the clock."""
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        from dreamd.display.clock import DisplayClock
        from dreamd.display.writer import STATUS_EVERY
        from dreamd.workers import controls

        ctx, table = parts.ctx, workers(parts)
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=len(table) + 1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30})

        def wake(name: str) -> None:
            try:
                scheduler.modify_job(name, next_run_time=datetime.now())
            except Exception:   # stopping: the job is gone, nothing to wake
                pass

        # the display rate, slowed by the governor's stretch while the buffer is low
        # and between frames: status.json's heartbeat, and the look for new controls (a
        # read on a kept connection; the controls job runs only when one waits)
        self.clock = DisplayClock(
            self._job("display", parts.display.tick), lambda: display_interval(ctx),
            [(STATUS_EVERY, self._job("status", parts.display.status_heartbeat)),
             (controls.EVERY, self._job("controls-look", lambda: controls.waiting(ctx)
                                        and wake("controls")))])

        def display_rate(*_: Any) -> None:
            self.clock.retime()

        ctx.wake = wake
        parts.on_knobs = display_rate
        parts.display.pacer.on_change = display_rate
        for name, seconds, tick in table:
            scheduler.add_job(self._job(name, tick), "interval", seconds=seconds, id=name,
                              name=name, next_run_time=datetime.now())
        return scheduler

    def _stop(self, scheduler, ctx, display, backend, codecs) -> bool:
        log.info("stopping (%s)", self.stop_reason)
        ctx.stopping.set()
        scheduler.shutdown(wait=False)
        deadline = time.monotonic() + GRACE_SECONDS
        self.clock.stop(timeout=GRACE_SECONDS)
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        stuck = self.in_flight()
        display.flush(timeout=2.0)            # frames shown while the ledger was busy
        for last_try in (False, True):
            try:
                with begin_retrying(ctx, "stop", give_up_after=STOP_RECORD_SECONDS,
                                    stopping_too=True) as conn:
                    for entity in JOB_ENTITIES:
                        released = transitions.release(conn, entity, ctx.lease_owner(entity),
                                                       detail=self.stop_reason)
                        if released:
                            log.info("released %s %s", entity, released)
                    conn.execute(update(DR).where(DR.c.id == ctx.run_id).values(
                        stopped_at=utcnow(), heartbeat_at=utcnow(),
                        exit_reason=self.stop_reason))
                break
            except Exception as exc:
                if (not last_try and classify(exc) == DISK_FULL
                        and release_reserve(ctx.cfg.data_dir)):
                    continue      # the space kept for this moment lets the ledger write
                # the stop is still clean: the next start finds this run without a stop,
                # records it as died and rescues its leases (the attempts they used count)
                log.error("could not record the stop in the ledger (%s): %s", classify(exc)
                          or "error", str(getattr(exc, "orig", exc)).splitlines()[0])
                break
        try:
            with ctx.reader.connect() as conn:
                ahead = display.buffered(conn)
            display.write_status(ctx.knob("display.fps"), ahead, daemon_status="stopped",
                                 state="stopped")
        except Exception:
            log.exception("final status.json")
        if getattr(self, "viewer", None) is not None:
            self.viewer.stop()          # after the final status: pages hear "stopped"
        for closer in (backend.close, codecs.release, ctx.embedders.release):
            try:
                closer()
            except Exception:
                log.exception("closing")
        display.close()
        ctx.close_looks()               # the workers' kept read connections
        checkpoint_truncate(ctx)
        ctx.engine.dispose()
        ctx.reader.dispose()
        if stuck:
            log.warning("still running after %.0f s: %s", GRACE_SECONDS, ", ".join(stuck))
        log.info("stopped (%s)", self.stop_reason)
        return not stuck


def checkpoint_truncate(ctx) -> None:
    """Fold the WAL into dreamd.db at a clean stop, so the file alone holds the whole
    ledger (a user copying just dreamd.db, a backup tool) and the WAL's space goes back."""
    try:
        database.pragma(ctx.engine, "PRAGMA wal_checkpoint(TRUNCATE)")
    except Exception as exc:    # busy or full: the WAL is still valid, the next start reads it
        log.debug("final checkpoint skipped: %s", exc)


def run(cfg: Config, duration: float | None = None) -> int:
    from dreamd.log_sinks import finish_streams

    setup_logging(cfg)
    try:
        return Daemon(cfg).run(duration)
    finally:
        finish_streams()
