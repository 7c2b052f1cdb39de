"""The game guard's senses: which known game is running (games.py, psutil) and whether
another process is using the generation GPU (gpu.py, pynvml). What the guard does
about it, pause, free and resume through control rows, is dreamd/workers/guard.py.
"""

from __future__ import annotations

import json

GUARD = "guard"             # args["source"] of the guard's control rows


def source_of(args: str | None) -> str:
    """Who sent a pause, from its control row's args: "guard" or "user"."""
    try:
        return GUARD if json.loads(args or "{}").get("source") == GUARD else "user"
    except (ValueError, AttributeError):
        return "user"
