"""status.json: what the Rainmeter skin, the TUI and scripts read about the dream.

Fixed keys in a fixed order (documented in the README); written atomically.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dreamd.storage.files import write_atomic

KEYS = (
    "status",                 # starting | buffering | playing | underrun | paused | stopped
    "frame_number",           # frames shown since the ledger began
    "keyframe_index",         # chain index of the frame on screen
    "generation_time",        # seconds the last keyframe took
    "current_mode",           # hybrid (keyframes + in-betweens) | keyframes (N = 0)
    "backend",                # procedural | comfyui
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
)


def build(**values: Any) -> dict[str, Any]:
    missing = [k for k in KEYS if k not in values]
    extra = [k for k in values if k not in KEYS]
    if missing or extra:
        raise ValueError(f"status.json keys: missing {missing}, unknown {extra}")
    return {k: values[k] for k in KEYS}


def write(path: Path, status: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(status, indent=2).encode("utf-8"))


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
