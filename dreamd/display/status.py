"""status.json: what the Rainmeter skin, the TUI and scripts read about the dream.

Fixed keys in a fixed order (documented in the README); written atomically, except
on a full disk, where a new file cannot be made: then it is rewritten in place, so it
never freezes on a state the daemon has left. A killed daemon writes nothing: readers
judge it stale when `last_update` is older than `stale_after_seconds`.
"""

from __future__ import annotations

import errno
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from json.encoder import encode_basestring_ascii
from typing import Any

from dreamd.storage.files import write_atomic

KEYS = (
    "status",                 # starting | buffering | playing | underrun | paused | stopped
    "frame_number",           # frames shown since the ledger began
    "keyframe_index",         # chain index of the frame on screen
    "generation_time",        # seconds the last keyframe took
    "current_mode",           # hybrid (keyframes + in-betweens) | keyframes (N = 0)
    "backend",                # procedural | comfyui | diffusers (the one making keyframes now)
    "codec",                  # pixel | taesd | sd-vae | … (null until the first batch)
    "current_prompt",         # the prompt of the keyframe on screen
    "cache_size",             # frames in the aesthetic memory
    "buffer_seconds",         # ready frames ahead of the playhead, in seconds
    "buffer_target_seconds",
    "is_buffering",
    "fps",
    "paused",
    "pause_reason",
    "uptime_hours",
    "daemon_status",          # running | stopping | stopped
    "comfyui_status",         # n/a | ok | starting | down | fallback | error
    "last_update",            # ISO 8601 UTC
    "problem",                # null, or what is wrong now: ledger busy, disk full, …
    "stale_after_seconds",    # last_update older than this: the daemon is gone or hung
    "theme",                  # the theme of the keyframe on screen
    "paused_by",              # null | user | guard (the game guard; it resumes by itself)
    "keyframe_progress",      # null, or the ComfyUI prompt running: keyframe, step, steps, node
    "denoise",                # generation.denoise now (the skin's denoise buttons step it)
)
STALE_AFTER_MIN = 10.0        # seconds; status.json is written at least once a second


_KEY_SET = frozenset(KEYS)


def build(**values: Any) -> dict[str, Any]:
    if values.keys() != _KEY_SET:            # (one comparison: it is built with each frame)
        missing = [k for k in KEYS if k not in values]
        extra = [k for k in values if k not in _KEY_SET]
        raise ValueError(f"status.json keys: missing {missing}, unknown {extra}")
    return {k: values[k] for k in KEYS}


def stale_after(fps: float) -> float:
    """How old `last_update` may get before a reader must treat the file as stale: the
    display writes it at least every frame (and twice a second), so several missed
    writes in a row mean the daemon is dead, hung or cannot write."""
    return round(max(STALE_AFTER_MIN, 5.0 / fps), 1)


def _flat(v: Any) -> str:
    """A flat value as json.dumps writes it, without json.dumps's own cost per call (it
    is called for every key of every status.json, several times a second)."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    kind = type(v)
    if kind is str:
        return encode_basestring_ascii(v)
    if kind is int:
        return int.__repr__(v)
    if kind is float and math.isfinite(v):
        return float.__repr__(v)
    if isinstance(v, (dict, list)):       # rare: a ComfyUI prompt's progress
        return json.dumps(v, indent=2).replace("\n", "\n  ")
    return json.dumps(v)


_KEY_PREFIX = {k: f"  {json.dumps(k)}: " for k in KEYS}


def encode(status: dict[str, Any]) -> bytes:
    """`json.dumps(status, indent=2)`, byte for byte, at a fraction of the CPU: with an
    indent, json falls back to its pure-Python encoder, and this is written with every
    frame. Flat values are written as json writes them; a nested one is indented as
    json would."""
    if not status:
        return b"{}"
    prefix = _KEY_PREFIX
    lines = [(prefix.get(k) or f"  {json.dumps(k)}: ") + _flat(v) for k, v in status.items()]
    return ("{\n" + ",\n".join(lines) + "\n}").encode("utf-8")


def write(path: Path, status: dict[str, Any]) -> None:
    data = encode(status)
    try:
        write_atomic(path, data)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        if not _write_in_place(path, data):
            raise


def _write_in_place(path: Path, data: bytes) -> bool:
    """The disk is full: overwrite the existing file's blocks instead of making a new
    file (not atomic: a reader may see a torn file for an instant, which beats a status
    frozen on `playing`). False when there is no file to overwrite or it fails too."""
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
    except OSError:
        return False
    try:
        if hasattr(os, "posix_fallocate"):
            # a longer status needs blocks the full disk may not have: fail here, before
            # the old content is touched (a short write would leave a torn, NUL-padded file)
            os.posix_fallocate(fd, 0, len(data))
        written = os.pwrite(fd, data, 0) if hasattr(os, "pwrite") else os.write(fd, data)
        if written != len(data):
            return False
        os.ftruncate(fd, len(data))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
