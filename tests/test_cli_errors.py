"""Every way out of a command ends in one line on stderr that names the file and what to
do, exit code 2, never a traceback (issue 10, item 7), and a typo gets a suggestion.
Each case runs the real `python -m dreamd` on real files."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import dreamd_cmd, machine_cannot


def run(env, *args: str, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run(dreamd_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=120, stdin=stdin)


def one_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The command failed with exit 2 and exactly one line on stderr holding `words`."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def data(dreamd_env) -> Path:
    path = Path(dreamd_env["DREAMD_DATA_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- a read-only data dir

def run_read_only(env, folder: Path, *args: str) -> subprocess.CompletedProcess:
    """Run dreamd with `folder` read-only: chmod where that binds, else (as root, which
    chmod does not stop) a read-only bind mount in a private mount namespace."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            return run(env, *args)
        finally:
            folder.chmod(0o755)
    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        machine_cannot("root without mount namespaces: cannot make a read-only folder")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, str(folder),
                           *dreamd_cmd(*args)], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_read_only_data_dir_without_a_ledger(dreamd_env, data):
    for args in (("db", "upgrade"), ("run", "--duration", "1")):
        line = one_line(run_read_only(dreamd_env, data, *args), str(data))
        assert "--data-dir" in line


def test_read_only_data_dir_with_a_ledger(dreamd_env, data):
    assert run(dreamd_env, "db", "upgrade").returncode == 0
    for args in (("pause",), ("run", "--duration", "1"), ("set", "display.fps=5")):
        line = one_line(run_read_only(dreamd_env, data, *args), str(data))
        assert "writable" in line


# ---------------------------------------------------------------- a broken ledger file

@pytest.mark.parametrize("args", [("status",), ("run", "--duration", "1"), ("pause",),
                                  ("db", "upgrade"), ("sql", "SELECT 1")],
                         ids=" ".join)
def test_garbage_ledger(dreamd_env, data, args):
    db = data / "dreamd.db"
    db.write_bytes(b"these are not the bytes of a SQLite database\n" * 200)
    before = db.read_bytes()
    line = one_line(run(dreamd_env, *args), str(db), "not a SQLite database")
    assert "move it aside" in line
    assert db.read_bytes() == before


def test_config_show_still_shows_the_config_beside_a_garbage_ledger(dreamd_env, data):
    db = data / "dreamd.db"
    db.write_bytes(b"garbage\n" * 1000)
    proc = run(dreamd_env, "config", "show")
    assert proc.returncode == 0 and "fps = 4.0  # default" in proc.stdout
    assert "stored knobs not read" in proc.stderr and "not a SQLite database" in proc.stderr


@pytest.mark.parametrize("args", [("status",), ("run", "--duration", "1"), ("db", "upgrade")],
                         ids=" ".join)
def test_truncated_ledger(dreamd_env, data, args):
    assert run(dreamd_env, "db", "upgrade").returncode == 0
    db = data / "dreamd.db"
    with db.open("r+b") as f:          # the header and first pages survive, the rest is gone
        f.truncate(4096 * 2)
    line = one_line(run(dreamd_env, *args), str(db), "damaged")
    assert ".recover" in line


# ---------------------------------------------------------------- arguments

def test_a_directory_as_config(dreamd_env, tmp_path):
    line = one_line(run(dreamd_env, "--config", str(tmp_path), "status"), str(tmp_path),
                    "is a directory")
    assert "no such file" not in line
    env = {**dreamd_env, "DREAMD_CONFIG": str(tmp_path)}
    one_line(run(env, "status"), str(tmp_path), "is a directory")
    one_line(run(dreamd_env, "config", "check", str(tmp_path)), str(tmp_path), "is a directory")


@pytest.mark.parametrize("action", ["upgrade", "downgrade"])
def test_unknown_revision(dreamd_env, data, action):
    assert run(dreamd_env, "db", "upgrade").returncode == 0
    line = one_line(run(dreamd_env, "db", action, "nosuchrev"), "nosuchrev",
                    str(data / "dreamd.db"))
    assert "dreamd db history" in line


def current(env) -> str:
    return run(env, "db", "current").stdout.split()[0]


def test_downgrade_to_base_needs_yes_without_a_terminal(dreamd_env, data):
    assert run(dreamd_env, "db", "upgrade").returncode == 0
    head = current(dreamd_env)
    line = one_line(run(dreamd_env, "db", "downgrade", "base"), "--yes",
                    str(data / "dreamd.db"))
    assert "nothing changed" in line
    assert current(dreamd_env) == head
    ok = run(dreamd_env, "db", "downgrade", "base", "--yes")
    assert ok.returncode == 0, ok.stderr
    assert current(dreamd_env) == "none"


@pytest.mark.parametrize("answer, emptied", [(b"no\n", False), (b"yes\n", True)])
def test_downgrade_to_base_asks_on_a_terminal(dreamd_env, data, answer, emptied):
    assert run(dreamd_env, "db", "upgrade").returncode == 0
    head = current(dreamd_env)
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(dreamd_cmd("db", "downgrade", "base"), env=dreamd_env,
                                stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        os.close(slave)
        os.write(master, answer)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(master)
    assert b"empties" in err and b"Traceback" not in err, err
    assert proc.returncode == (0 if emptied else 2), err
    assert current(dreamd_env) == ("none" if emptied else head)


# ---------------------------------------------------------------- did you mean

def test_a_mistyped_knob_gets_a_suggestion(dreamd_env):
    assert run(dreamd_env, "db", "upgrade").returncode == 0
    one_line(run(dreamd_env, "set", "display.fsp=4"), "display.fsp", "did you mean display.fps")


def test_a_mistyped_command_gets_a_suggestion(dreamd_env):
    proc = run(dreamd_env, "stauts")
    assert proc.returncode == 2 and "did you mean 'status'" in proc.stderr, proc.stderr
    proc = run(dreamd_env, "db", "upgrad")
    assert proc.returncode == 2 and "did you mean 'upgrade'" in proc.stderr, proc.stderr


def test_global_options_are_taken_on_either_side_of_the_command(tmp_path, capsys,
                                                                 monkeypatch):
    """`dreamd run --data-dir DIR` used to fail with "unrecognized arguments": the global
    options are taken after the command too, and there they win."""
    import json

    from dreamd import cli

    monkeypatch.delenv("DREAMD_DATA_DIR", raising=False)
    monkeypatch.delenv("DREAMD_CONFIG", raising=False)
    before, after = tmp_path / "before", tmp_path / "after"
    for argv, expect in ((["--data-dir", str(before), "status", "--json"], before),
                         (["status", "--json", "--data-dir", str(after)], after),
                         (["--data-dir", str(before), "status", "--data-dir", str(after),
                           "--json"], after)):
        assert cli.main(argv) == 0
        assert json.loads(capsys.readouterr().out)["data_dir"] == str(expect), argv
    cfg = tmp_path / "dreamd.toml"
    cfg.write_text('[display]\nfps = 7.5\n')
    assert cli.main(["config", "show", "--config", str(cfg), "--data-dir", str(after)]) == 0
    shown = capsys.readouterr().out
    assert f"# config file: {cfg}" in shown and "fps = 7.5" in shown
