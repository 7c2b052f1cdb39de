"""The page's controls: a POST becomes a `controls` row through
`dreamd.ledger.controls.request`, like the CLI's, the TUI's and Rainmeter's; the
daemon applies it within a second. Only a few commands are offered (pause, resume,
next theme, and three knobs), checked here the way the daemon will check them.

When the viewer is exposed beyond loopback every control needs the token; in every
mode a browser's cross-site POST is refused (its Origin names another site, and only
`application/json` is accepted, which a plain form cannot send).
"""

from __future__ import annotations

import json
from typing import Any

import anyio
from starlette.requests import Request

from dreamd.errors import ConfigError
from dreamd.web.state import TOKEN_HEADER, WEB_KNOBS, ViewerState, same_origin, same_token

MAX_BODY = 4096


class ControlRefused(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def parse(body: Any, theme_names: list[str]) -> tuple[str, dict[str, Any]]:
    """The page's request as (command, args) for a control row, or ControlRefused."""
    from dreamd.ledger.controls import validate_knob

    if not isinstance(body, dict):
        raise ControlRefused('expected a JSON object like {"command": "pause"}', 400)
    command = body.get("command")
    if command == "pause":
        reason = str(body.get("reason") or "paused from the web viewer")[:200]
        return "pause", {"reason": reason}
    if command == "resume":
        return "resume", {}
    if command == "theme":
        name = body.get("name") or "next"
        if name != "next" and name not in theme_names:
            raise ControlRefused(f"no theme named {name!r}: themes are "
                                 f"{', '.join(theme_names)} (or next)", 400)
        return "theme", {"name": name}
    if command == "set":
        key, value = body.get("key"), body.get("value")
        if key not in WEB_KNOBS:
            raise ControlRefused(f"the viewer sets only {', '.join(WEB_KNOBS)} "
                                 f"(not {key!r}); `dreamd set` sets the others", 400)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ControlRefused(f"{key}: expected a number, got {value!r}", 400)
        try:
            validate_knob(key, str(value))
        except ConfigError as exc:
            raise ControlRefused(str(exc), 400) from None
        return "set", {"key": key, "value": str(value)}
    raise ControlRefused(f"unknown command {command!r}: the viewer sends pause, resume, "
                         f"theme or set", 400)


def _write(state: ViewerState, command: str, args: dict[str, Any]) -> int:
    from dreamd.ledger.controls import request

    assert state.writer is not None
    with state.writer.begin() as conn:
        return request(conn, command, args)


async def send(state: ViewerState, request: Request) -> int:
    if state.writer is None:
        raise ControlRefused("controls are off (web.controls = false)", 403)
    if state.token is not None and not same_token(request.headers.get(TOKEN_HEADER),
                                                  state.token):
        raise ControlRefused("this viewer is exposed: controls need the token (open the "
                             "page with ?token=… from <data dir>/web-token)", 401)
    if not same_origin(request):
        raise ControlRefused("cross-site request refused", 403)
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise ControlRefused("expected Content-Type: application/json", 415)
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ControlRefused("request too large", 413)
    try:
        body = json.loads(raw)
    except ValueError:
        raise ControlRefused("the body is not JSON", 400) from None
    command, args = parse(body, [t.name for t in state.cfg.prompts.themes])
    try:
        # a busy ledger waits up to busy_timeout: in a worker thread, never on the loop
        return await anyio.to_thread.run_sync(_write, state, command, args)
    except Exception as exc:
        raise ControlRefused(f"the ledger did not take the control: "
                             f"{str(getattr(exc, 'orig', exc)).splitlines()[0]}", 503) from None
