"""Commands that do not compute images never import torch (they answer fast)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import dreamd_cmd

PROBE = """
import sys, json
from dreamd.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "numpy", "PIL", "open_clip", "textual", "apscheduler")
               if m in sys.modules)
print("\\nIMPORTED=" + json.dumps(heavy))
sys.exit(rc)
"""

LIGHT_COMMANDS = [
    ["status"], ["status", "--json"], ["config", "show"], ["db", "current"], ["db", "history"],
    ["db", "upgrade"], ["stats"], ["stats", "--json"], ["models", "list"],
    ["models", "list", "--json"], ["service", "show"], ["uninstall", "--dry-run"],
]


@pytest.mark.parametrize("args", LIGHT_COMMANDS, ids=" ".join)
def test_light_commands_do_not_import_torch(dreamd_env, args):
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], env=dreamd_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    imported = json.loads(proc.stdout.rsplit("IMPORTED=", 1)[1])
    assert "torch" not in imported and "numpy" not in imported, imported


LEDGER_COMMANDS = [
    ["pause", "--reason", "x"], ["resume"], ["set", "generation.denoise=0.4"], ["theme", "next"],
    ["free"], ["history"], ["sql", "SELECT count(*) FROM keyframes"], ["status"],
    ["set", "--reset", "all"], ["config", "show"],
    ["sql", "SELECT * FROM frame_history", "--format", "json", "--max-rows", "5"],
    ["history", "--format", "tsv"],
    ["inject"], ["history", "--since", "10m"],
    ["sql", "SELECT 1; SELECT count(*) FROM frames"],
]


@pytest.mark.parametrize("args", LEDGER_COMMANDS, ids=" ".join)
def test_commands_on_a_ledger_do_not_import_torch(dreamd_env, args):
    subprocess.run(dreamd_cmd("db", "upgrade"), env=dreamd_env, check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], env=dreamd_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    imported = json.loads(proc.stdout.rsplit("IMPORTED=", 1)[1])
    assert "torch" not in imported and "numpy" not in imported, imported


def test_status_json_reports_the_ledger(dreamd_env):
    before = json.loads(subprocess.run(dreamd_cmd("status", "--json"), env=dreamd_env,
                                       capture_output=True, text=True, check=True).stdout)
    assert before["revision"] is None and before["alive"] is False
    subprocess.run(dreamd_cmd("db", "upgrade"), env=dreamd_env, check=True, capture_output=True)
    after = json.loads(subprocess.run(dreamd_cmd("status", "--json"), env=dreamd_env,
                                      capture_output=True, text=True, check=True).stdout)
    assert after["revision"] == after["head"]
    assert set(after["counts"]) == {"keyframes", "interpolations", "frames", "embeddings",
                                    "controls"}
    assert after["data_dir"] == dreamd_env["DREAMD_DATA_DIR"]


def test_status_answers_for_a_ledger_at_an_older_revision(dreamd_env):
    from dreamd.ledger import database
    from pathlib import Path

    db = Path(dreamd_env["DREAMD_DATA_DIR"]) / "dreamd.db"
    database.upgrade(db, "0001")
    proc = subprocess.run(dreamd_cmd("status", "--json"), env=dreamd_env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["revision"] == "0001" and report["head"] != "0001"
    human = subprocess.run(dreamd_cmd("status"), env=dreamd_env, capture_output=True,
                           text=True, timeout=60)
    assert "dreamd db upgrade" in human.stdout
