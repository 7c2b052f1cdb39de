"""The measurements inside a real `dreamd run`: every completed segment and keyframe
gets its quality row, with the pop of each boundary after the first and the change of
each keyframe after the first, and `dreamd stats --json` counts what the ledger holds."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess

import pytest

from tests import invariants
from tests.conftest import DaemonRunner, FAST_CONFIG, dreamd_cmd, wait_for
from tests.test_daemon import ledger_rows

KEYFRAMES, BATCHES = 8, 6


def made(data_dir) -> bool:
    try:
        (k, b), = ledger_rows(data_dir, "SELECT (SELECT count(*) FROM keyframes WHERE state = "
                                        "'completed'), (SELECT count(*) FROM interpolations "
                                        "WHERE state = 'completed')")
    except sqlite3.Error:          # not made yet
        return False
    return k >= KEYFRAMES and b >= BATCHES


@pytest.mark.slow
def test_a_run_measures_every_segment_and_keyframe(dreamd_env, tmp_path):
    daemon = DaemonRunner(dreamd_env, tmp_path, FAST_CONFIG)
    proc = daemon.start()
    try:
        wait_for(lambda: made(daemon.data_dir), timeout=300,
                 what=f"{KEYFRAMES} keyframes and {BATCHES} batches")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, daemon.output()
    invariants.check(daemon.data_dir)
    rows = lambda sql: ledger_rows(daemon.data_dir, sql)      # noqa: E731

    # exactly one row for each completed batch and keyframe, none for anything else
    assert rows("SELECT i.id FROM interpolations i WHERE i.state = 'completed' "
                "EXCEPT SELECT interpolation_id FROM quality WHERE entity = 'segment'") == []
    assert rows("SELECT k.id FROM keyframes k WHERE k.state = 'completed' "
                "EXCEPT SELECT keyframe_id FROM quality WHERE entity = 'keyframe'") == []
    (segments, keyframes, batches, done), = rows(
        "SELECT (SELECT count(*) FROM quality WHERE entity = 'segment'), "
        "(SELECT count(*) FROM quality WHERE entity = 'keyframe'), "
        "(SELECT count(*) FROM interpolations WHERE state = 'completed'), "
        "(SELECT count(*) FROM keyframes WHERE state = 'completed')")
    assert (segments, keyframes) == (batches, done)

    seg = rows("SELECT q.chain_index, q.n_frames, i.n_frames, q.motion, q.flicker, q.boundary, "
               "q.pop, q.measure_ms FROM quality q JOIN interpolations i "
               "ON i.id = q.interpolation_id ORDER BY q.chain_index")
    for chain, measured, n, motion, flicker, boundary, pop, ms in seg:
        assert measured == n + 1                  # the keyframe as shown and its in-betweens
        assert motion > 0 and flicker >= 0 and ms > 0
        if chain > seg[0][0]:                     # after the first, every boundary is known
            assert boundary is not None and pop > 0, chain
    assert seg[0][5] is None                      # nothing played before the first

    kf = rows("SELECT q.chain_index, q.change, q.drift, q.reference_id, q.lab_l, "
              "q.brightness, q.contrast, k.theme, r.theme FROM quality q "
              "JOIN keyframes k ON k.id = q.keyframe_id "
              "LEFT JOIN keyframes r ON r.id = q.reference_id ORDER BY q.chain_index")
    assert kf[0][1] is None and kf[0][2] == 0.0   # the first: no change, its own reference
    for chain, change, drift, ref, lab_l, brightness, contrast, theme, ref_theme in kf[1:]:
        assert change > 0 and drift >= 0 and 0 <= lab_l <= 100, chain
        assert ref_theme == theme                 # a reference of its own run of one theme
        assert 0 < brightness < 255 and contrast > 0

    out = subprocess.run(dreamd_cmd("stats", "--json"), env=dreamd_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    q = json.loads(out.stdout)["quality"]
    assert (q["since_start"]["segments"], q["since_start"]["keyframes"]) == (segments,
                                                                              keyframes)
    assert q["keyframe"]["chain_index"] == kf[-1][0]
