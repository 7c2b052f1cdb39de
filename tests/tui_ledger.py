"""A prepared real ledger for the dashboard and export tests: a migrated SQLite file
with a short dream in it (keyframes, one injection, one pruned keyframe with its
thumbnail, interpolation batches, frames shown and ready, their files on disk,
transitions, a stopped daemon run), at fixed times, so what the dashboard draws is the
same on every run."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path

from PIL import Image, ImageDraw

START = datetime(2026, 11, 30, 12, 0, 0)
NOW = START + timedelta(minutes=5)           # the clock the dashboard tests run at
KEYFRAMES = 6                                 # chain 0..5 completed; 6 is being made
N = 2                                         # in-betweens per pair
SIZE = (128, 64)
THEMES = ("ethereal", "ethereal", "ethereal", "cathedral", "cathedral", "cathedral", "signal")


def picture(k: float, size=SIZE) -> Image.Image:
    """A recognisable picture per chain position: a gradient whose hue moves with k and
    a disc that travels across."""
    w, h = size
    img = Image.new("RGB", size)
    px = img.load()
    for x in range(w):
        for y in range(h):
            px[x, y] = (int(40 + 30 * k) % 256, int(255 * x / w), int(255 * y / h))
    d = ImageDraw.Draw(img)
    cx = int((k / KEYFRAMES) * w)
    d.ellipse((cx - 10, h // 2 - 10, cx + 10, h // 2 + 10), fill=(255, 255, 255))
    return img


def _ts(seconds: float) -> str:
    return (START + timedelta(seconds=seconds)).isoformat(sep=" ", timespec="microseconds")


def prepare(data_dir: Path, template: Path | None = None, *, running_run: bool = False) -> Path:
    """Make `data_dir` hold the prepared dream; returns the ledger's path."""
    import sqlite3

    from dreamd.ledger import database

    data_dir.mkdir(parents=True, exist_ok=True)
    db = data_dir / "dreamd.db"
    if template is not None:
        shutil.copy(template, db)
    else:
        database.upgrade(db)
    for sub in ("keyframes", "frames", "thumbs", "output"):
        (data_dir / sub).mkdir(exist_ok=True)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("BEGIN")
    events: list[tuple] = []

    def event(seconds, entity, eid, frm, to, name, worker, detail=None):
        events.append((entity, eid, frm, to, _ts(seconds), worker, name,
                       json.dumps(detail) if detail else None))

    for k in range(KEYFRAMES + 1):
        t0 = k * 20.0
        done = k < KEYFRAMES
        path = f"keyframes/k{k:05d}.png" if done else None
        values = dict(id=k + 1, chain_index=k, state="completed" if done else "executing",
                      backend="procedural", theme=THEMES[k], prompt=f"{THEMES[k]} prompt",
                      negative_prompt="", seed=1000 + k, denoise=0.3,
                      source="seed" if k == 0 else ("injection" if k == 4 else "img2img"),
                      parent_id=None if k == 0 else k, path=path, width=SIZE[0],
                      height=SIZE[1], attempt=1, max_attempts=3, scheduled_at=_ts(t0),
                      created_at=_ts(t0), started_at=_ts(t0 + 1),
                      completed_at=_ts(t0 + 2) if done else None,
                      generation_ms=80.0 + k if done else None,
                      sha256="0" * 64 if done else None)
        if k == 0:      # retention took its image; the thumbnail stays
            values.update(pruned_at=_ts(200), thumb_path="thumbs/k00000.jpg")
            picture(0).resize((64, 32)).save(data_dir / "thumbs/k00000.jpg", quality=90)
        elif done:
            picture(k).save(data_dir / path)
        cols = ", ".join(values)
        conn.execute(f"INSERT INTO keyframes ({cols}) VALUES ({', '.join('?' * len(values))})",
                     tuple(values.values()))
        event(t0, "keyframe", k + 1, None, "available", "created", "planner",
              {"theme": THEMES[k]})
        event(t0 + 1, "keyframe", k + 1, "available", "executing", "claimed", "keyframe")
        if done:
            event(t0 + 2, "keyframe", k + 1, "executing", "completed", "completed", "keyframe")
    conn.execute("INSERT INTO injections (id, keyframe_id, kind, source_frame_id, seed_path, "
                 "similarity, reason, weight, created_at) VALUES (1, 5, 'cache', NULL, NULL, "
                 "0.41, 'chance', 0.6, ?)", (_ts(80),))
    fid = 0
    shown = 0
    for k in range(KEYFRAMES):
        positions = [0.0] if k == KEYFRAMES - 1 else [i / (N + 1) for i in range(N + 1)]
        iid = None
        if k < KEYFRAMES - 1:
            iid = k + 1
            conn.execute(
                "INSERT INTO interpolations (id, chain_index, from_keyframe_id, to_keyframe_id, "
                "n_frames, codec, divisor, duration_ms, state, attempt, max_attempts, "
                "scheduled_at, created_at, started_at, completed_at) VALUES "
                "(?, ?, ?, ?, ?, 'pixel', 1.0, 50.0, 'completed', 1, 3, ?, ?, ?, ?)",
                (iid, k, k + 1, k + 2, N, _ts(k * 20 + 22), _ts(k * 20 + 22),
                 _ts(k * 20 + 23), _ts(k * 20 + 24)))
        for t in positions:
            fid += 1
            rel = f"frames/f{k:05d}_{t:.4f}.png"
            picture(k + t).save(data_dir / rel)
            is_shown = k < 2 or (k == 2 and t < 0.5)
            shown += is_shown
            conn.execute(
                "INSERT INTO frames (id, chain_index, t, kind, keyframe_id, interpolation_id, "
                "path, state, created_at, shown_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (fid, k, t, "keyframe" if t == 0 else "inbetween", k + 1 if t == 0 else None,
                 iid if t else None, rel, "shown" if is_shown else "ready",
                 _ts(k * 20 + 25), _ts(k * 20 + 60) if is_shown else None))
            if is_shown:
                playhead = (fid, k, t)
                shutil.copy(data_dir / rel, data_dir / "output/current_frame.png")
    conn.execute("INSERT INTO daemon_runs (id, pid, host, version, backend, started_at, "
                 "heartbeat_at, stopped_at, exit_reason) VALUES (1, 4242, 'testhost', '0.1.0', "
                 "'procedural', ?, ?, ?, ?)",
                 (_ts(-5), _ts(118), None if running_run else _ts(120),
                  None if running_run else "signal SIGTERM"))
    conn.execute("INSERT OR REPLACE INTO runtime_state (id, playhead_frame_id, "
                 "playhead_chain_index, playhead_t, frames_shown, underruns, paused, "
                 "pause_reason, theme_index, knobs, updated_at) VALUES (1, ?, ?, ?, ?, 1, 0, "
                 "NULL, 0, ?, ?)", (*playhead, shown,
                                    json.dumps({"generation.denoise": 0.4}), _ts(120)))
    conn.executemany("INSERT INTO transitions (entity, entity_id, from_state, to_state, at, "
                     "worker, event, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     sorted(events, key=lambda e: e[4]))
    conn.execute("COMMIT")
    conn.close()
    return db
