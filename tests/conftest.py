"""Shared fixtures: a ledger migrated once per session and copied per test (a real
file, never :memory:, since WAL needs a file), and an isolated dreamd environment."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # several test processes share the cores: torch's thread pool in each of them would
    # only make them wait on each other (bench/RESULTS.md, "Torch threads"); the daemons
    # the tests start set their own threads from their config
    os.environ.setdefault("OMP_NUM_THREADS", "1")


_TEMPLATE: Path | None = None


@pytest.fixture(scope="session")
def ledger_template(tmp_path_factory) -> Path:
    """An empty ledger migrated once per test process, copied wherever a test needs a new
    one (the migrations run from base take about 0.7 s; a copy, a millisecond)."""
    global _TEMPLATE
    if _TEMPLATE is None:
        from dreamd.ledger import database

        path = tmp_path_factory.mktemp("template") / "dreamd.db"
        database.upgrade(path)
        _TEMPLATE = path
    return _TEMPLATE


@pytest.fixture(autouse=True, scope="session")
def _ledger_template_for_daemons(ledger_template):
    """DaemonRunner seeds a new data dir from the template (set here for it)."""
    yield


@pytest.fixture
def db_path(ledger_template, tmp_path) -> Path:
    path = tmp_path / "data" / "dreamd.db"
    path.parent.mkdir(parents=True)
    shutil.copy(ledger_template, path)
    return path


@pytest.fixture
def engine(db_path):
    from dreamd.ledger import database

    eng = database.writer(db_path)
    yield eng
    eng.dispose()


@pytest.fixture
def dreamd_env(tmp_path, monkeypatch) -> dict[str, str]:
    """Environment for running `dreamd` in a subprocess, isolated from the user's files."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DREAMD_")}
    env.update({"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                "XDG_DATA_HOME": str(home / ".local/share"),
                "DREAMD_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1",
                # the guard's presence rules read nothing of this machine's battery, lock
                # or windows (a laptop on battery would pause every test's daemon)
                "DREAMD_PRESENCE_FILE": os.devnull})
    for key in ("DREAMD_CONFIG", "DREAMD_DATA_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local/share"))
    return env


def dreamd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dreamd", *args]


# ---------------------------------------------------------------- running the daemon

import subprocess  # noqa: E402
import time  # noqa: E402

FAST_CONFIG = """
[web]
port = 0    # any free port: the daemons of tests run side by side never collide
[cache]
embedder = "descriptor"     # "auto" imports open_clip to look for weights: 2.5 s of CPU
[generation]
resolution = [128, 64]
interpolation_frames = 4
lease_seconds = 10.0
[display]
fps = 10.0
buffer_target_seconds = 3.0
min_buffer_seconds = 1.0
"""


def with_keys(config_text: str, table: str, keys: str) -> str:
    """`config_text` with `keys` (TOML lines) added to its `[table]` (a table cannot be
    declared twice, so a test adds to FAST_CONFIG's tables instead of appending them)."""
    header = f"[{table}]\n"
    if header not in config_text:
        return config_text + header + keys.strip() + "\n"
    return config_text.replace(header, header + keys.strip() + "\n", 1)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_real_presence(monkeypatch):
    """A guard made in-process reads no presence of this machine either (dreamd_env)."""
    monkeypatch.setenv("DREAMD_PRESENCE_FILE", os.devnull)


@pytest.fixture(autouse=True)
def _no_daemon_left_behind():
    """A test that fails half-way must not leave its daemon running (eating the CPU of
    every later test)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


class DaemonRunner:
    """Start `dreamd run` as a real subprocess on one data dir, with a config file."""

    def __init__(self, env: dict[str, str], tmp_path: Path, config: str = FAST_CONFIG,
                 *, fresh_ledger: bool = False):
        self.seed_ledger = not fresh_ledger
        self.env = dict(env)
        self.data_dir = Path(env["DREAMD_DATA_DIR"])
        self.config = tmp_path / "dreamd.toml"
        self.config.write_text(config)
        self.logs: list[Path] = []

    def start(self, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.data_dir.parent / f"daemon-{len(self.logs)}.out"
        first = not self.logs
        self.logs.append(log)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ledger = self.data_dir / "dreamd.db"
        if first and self.seed_ledger and _TEMPLATE is not None and not ledger.exists():
            # what the daemon's own migration would make, without its 0.7 s at every test;
            # test_migrations and `fresh_ledger=True` keep the daemon's own path tested
            shutil.copy(_TEMPLATE, ledger)
        proc = subprocess.Popen(dreamd_cmd("--config", str(self.config), "run", *args),
                                env={**self.env, **(extra_env or {}), "COLUMNS": "200"},
                                stdout=log.open("w"), stderr=subprocess.STDOUT)
        _STARTED.append(proc)
        return proc

    def run(self, seconds: float, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = self.start("--duration", str(seconds), *args)
        rc = proc.wait(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, rc, self.logs[-1].read_text(), "")

    def output(self) -> str:
        return self.logs[-1].read_text() if self.logs else ""

    def db(self):
        from dreamd.ledger import database
        return database.reader(self.data_dir / "dreamd.db")


@pytest.fixture
def daemon(dreamd_env, tmp_path) -> DaemonRunner:
    return DaemonRunner(dreamd_env, tmp_path)


# ---------------------------------------------------------------- faults of the machine

import sqlite3  # noqa: E402


class WriteLock:
    """Another process's `sqlite3` session holding the ledger's write lock."""

    def __init__(self, db_path: Path, timeout: float = 30) -> None:
        self.conn = sqlite3.connect(db_path, isolation_level=None, timeout=timeout)

    def __enter__(self):
        self.conn.execute("BEGIN EXCLUSIVE")
        return self

    def __exit__(self, *exc):
        self.conn.execute("ROLLBACK")
        self.conn.close()


def machine_cannot(why: str) -> None:
    """A test this machine cannot run: a skip that says why, except under CI=true, where
    every test must run (CI is set up for all of them), so a skip would hide a hole."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}: CI must run this test (.ci/run sets up what it needs)",
                    pytrace=False)
    pytest.skip(why)


def mount_tmpfs(path: Path, size: str):
    """A small file system of its own at `path` (root only; CI runs as root here), or a
    skip that says why (a failure under CI); unmounted after the test."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        machine_cannot(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): "
                       f"{done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def open_worker_context(db_path: Path, config_text: str = "", *, run_id: int = 1,
                        owner: str = "test"):
    """A WorkerContext on a real ledger file, for tests that drive a worker in-process;
    `close_worker_context` lets its engines go."""
    from dreamd import config
    from dreamd.ledger import database, queries
    from dreamd.workers.context import WorkerContext

    cfg = config.parse(config_text)
    cfg.system.data_dir = str(db_path.parent)
    engine, reader = database.writer(db_path), database.reader(db_path)
    with engine.begin() as conn:
        queries.runtime(conn)
    return WorkerContext(cfg=cfg, engine=engine, reader=reader, run_id=run_id, owner=owner)


def close_worker_context(ctx) -> None:
    ctx.close_looks()
    ctx.engine.dispose()
    ctx.reader.dispose()


def worker_context(db_path: Path, config_text: str):
    """open_worker_context as a generator: `yield from` it in a fixture, or loop over it."""
    c = open_worker_context(db_path, config_text)
    try:
        yield c
    finally:
        close_worker_context(c)


@pytest.fixture
def contexts(db_path):
    """Worker contexts on the test's ledger (or the ledger at `path`), every one closed
    at the end: `contexts(config_text, path=None)`."""
    made = []

    def make(config_text: str = "", path: Path | None = None):
        made.append(open_worker_context(path or db_path, config_text))
        return made[-1]
    yield make
    for ctx in made:
        close_worker_context(ctx)


@pytest.fixture
def fsynced(monkeypatch) -> set[tuple[int, int]]:
    """The files `os.fsync` was called on, as (device, inode), then the real fsync.

    A power cut cannot be staged in a test; what can be checked is that the durability
    step happened on the very file the ledger then names (a rename keeps the inode).
    """
    done: set[tuple[int, int]] = set()
    real = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        done.add((st.st_dev, st.st_ino))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return done


def identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


# ---------------------------------------------------------------- ports

import itertools  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402


def _port_band() -> range:
    """This test process's own ports: below the kernel's ephemeral range (so no socket
    bound to port 0 and no client connection is handed one meanwhile), one band of 500
    per xdist worker (so two workers never pick the same), starting at a random place
    (so two pytest runs side by side rarely meet)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) if worker.isdigit() else 0
    low = 20000 + (index % 20) * 500
    return range(low, low + 500)


_PORTS = None


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now and that no other test of this
    run will be given: for a server a test starts later, or a URL that must be dead.
    (Binding port 0 and closing it, as before, let the kernel hand the same port to the
    next socket that asked for any port: another worker's server took a "dead" URL.)"""
    global _PORTS
    if _PORTS is None:
        band = _port_band()
        start = random.randrange(len(band))
        _PORTS = itertools.cycle([*band[start:], *band[:start]])
    for _ in range(500):
        port = next(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in this test worker's band")


# ---------------------------------------------------------------- the wheel

import zipfile  # noqa: E402


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """dreamd's wheel, built once per test process (the tests that read it share an
    xdist group, so once per run): `pip wheel` takes 10-20 s here."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(REPO)], check=True, timeout=300,
                   capture_output=True)
    (built,) = out.glob("dreamd-*.whl")
    return built


def wheel_names(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as z:
        return set(z.namelist())
