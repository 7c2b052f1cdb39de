"""What the viewer's routes share: the state they read (files and the ledger, nothing of
the daemon's workers), the knobs the page offers, and the checks on who may send a
control (dreamd/web/controls.py uses them; dreamd/web/app.py serves the routes).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Engine
from starlette.requests import Request

from dreamd.config import Config, stepped_knobs
from dreamd.web.hub import FrameHub

# the knobs the page's sliders set: those the config schema gives a step, with its range
# (a slider's values are min + k * step: its min is the schema's rounded up to a step, so
# denoise moves through 0.05, 0.10, … rather than 0.01, 0.06, …)
WEB_KNOBS = tuple(stepped_knobs())
KNOB_RANGES = {key: {"min": round(math.ceil(low / step - 1e-9) * step, 6), "max": high,
                     "step": step, "label": key.split(".")[1].replace("_", " ")}
               for key, (step, low, high) in stepped_knobs().items()}
TOKEN_HEADER = "x-dreamd-token"


@dataclass
class ViewerState:
    """What the routes need: nothing of the daemon's workers, only files and the ledger."""

    cfg: Config
    hub: FrameHub
    reader: Engine                   # read-only (`mode=ro`): every GET uses this one
    writer: Engine | None            # for `controls` rows only; None when controls are off
    token: str | None = None         # required on every control when exposed
    exposed: bool = False
    status: dict[str, Any] | None = None
    _status_mtime: int = -1
    _ledger_at: float = float("-inf")
    _ledger_key: int | None = None   # the keyframe the theme was read for
    _extra: dict[str, Any] = field(default_factory=dict)


def same_token(given: str | None, expected: str) -> bool:
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


def same_origin(request: Request) -> bool:
    """A browser sends Origin on every cross-site POST: it must name this very server."""
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")
