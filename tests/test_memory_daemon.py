"""The aesthetic memory inside a real `dreamd run`: keyframes are embedded and the
cache fills behind the chain, injections are decided and recorded, `dreamd stats`
reads the result, and a blended input no row names is removed at the next start."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess

import pytest
from sqlalchemy import text

from tests import invariants
from tests.conftest import FAST_CONFIG, DaemonRunner, dreamd_cmd, wait_for, with_keys
from tests.test_daemon import ledger_rows

# FAST_CONFIG's display at 4 fps, so a loaded test machine keeps the buffer above its
# minimum (below it the embedding worker waits: playback comes first)
MEMORY = with_keys(FAST_CONFIG.replace("fps = 10.0", "fps = 4.0").replace(
    "min_buffer_seconds = 1.0", "min_buffer_seconds = 0.5"), "cache", """
warmup_keyframes = 2
cooldown_keyframes = 1
injection_probability = 1.0
""")


def remembered(data_dir) -> bool:
    """Three embeddings completed, one in the cache, and an injection recorded."""
    try:
        got = ledger_rows(data_dir, "SELECT (SELECT count(*) FROM embeddings WHERE state = "
                                    "'completed'), (SELECT count(*) FROM embeddings WHERE "
                                    "in_cache = 1), (SELECT count(*) FROM injections)")
    except sqlite3.Error:          # not made yet
        return False
    done, members, injections = got[0]
    return done >= 3 and members >= 1 and injections >= 1


@pytest.mark.slow
def test_a_run_embeds_admits_and_injects(dreamd_env, tmp_path):
    # until the memory has done its work, not for 12 s (a loaded machine may not get
    # there in 12 s); then a clean stop, and the ledger is judged as it was left
    daemon = DaemonRunner(dreamd_env, tmp_path, MEMORY)
    proc = daemon.start()
    try:
        wait_for(lambda: remembered(daemon.data_dir), timeout=300,
                 what="three embeddings, a cache member and an injection")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, daemon.output()
    invariants.check(daemon.data_dir)
    engine = daemon.db()
    try:
        with engine.connect() as conn:
            done = conn.execute(text("SELECT count(*) FROM embeddings WHERE state = "
                                     "'completed'")).scalar()
            members = conn.execute(text("SELECT count(*) FROM embeddings "
                                        "WHERE in_cache = 1")).scalar()
            inj = conn.execute(text("SELECT i.kind, i.reason, k.source, k.input_path, "
                                    "k.chain_index FROM injections i JOIN keyframes k "
                                    "ON k.id = i.keyframe_id")).all()
    finally:
        engine.dispose()
    assert done >= 3 and members >= 1
    assert inj and all(r.source == "injection" and r.chain_index >= 2 for r in inj)
    status = json.loads((daemon.data_dir / "output" / "status.json").read_text())
    assert status["cache_size"] == members

    out = subprocess.run(dreamd_cmd("--config", str(daemon.config), "stats", "--json"),
                         env=daemon.env, capture_output=True, text=True, timeout=60)
    report = json.loads(out.stdout)
    assert report["model"] == "descriptor-hsv-dct-v1"
    assert report["injections"]["total"] == len(inj)
    assert report["cache"]["size"] == members

    # a blended input written just before a crash, that no keyframe row names
    orphan = daemon.data_dir / "injections" / "k999999-deadbeef.png"
    orphan.write_bytes(b"\x89PNG")
    assert daemon.run(2).returncode == 0
    assert not orphan.exists()
    # blends live while their keyframe is pending (dreamd/storage/retention.py); every
    # row names one under the data dir, relative to it
    assert all(r.input_path.startswith("injections/") for r in inj)
