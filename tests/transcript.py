"""The real ComfyUI transcript (../shared/comfyui/api_transcript.md) read as data: its
sections, what each request sent, what each response and websocket frame said; and the one
normaliser that makes a recording and a replay comparable (ids, clocks, counters)."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# -- reading --------------------------------------------------------------------------------

HEADING = re.compile(r"^## (\d+)\. (.*)$", re.M)
JSON_BLOCK = re.compile(r"```json\n(.*?)\n```", re.S)


@dataclass(frozen=True)
class Response:
    status: int | None
    headers: dict[str, str]     # the ones the transcript lists
    body: Any                   # JSON; None: an empty body; bytes: a binary body's first bytes


@dataclass(frozen=True)
class Variant:
    """Sections 16-24: a base workflow with some nodes changed or removed."""

    body: dict[str, Any]        # the request, its "prompt" still None
    base: str                   # the workflow file it starts from
    image: str                  # what its LoadImage loads
    changed: dict[str, Any]
    removed: list[str]


@dataclass(frozen=True)
class Section:
    number: int
    title: str
    text: str

    def json_blocks(self) -> list[Any]:
        return [json.loads(block) for block in JSON_BLOCK.findall(self.text)]

    def plain_block(self) -> list[str]:
        """The lines of the first block without a language (section 33's listing)."""
        match = re.search(r"```\n(.*?)```", self.text, re.S)
        assert match, f"section {self.number} has no plain block"
        return match.group(1).splitlines()

    def subsections(self) -> dict[str, Section]:
        """'### `name`' -> its text (section 52)."""
        parts = re.split(r"^### `([^`]+)`$", self.text, flags=re.M)
        return {name: Section(self.number, name, body) for name, body in zip(parts[1::2], parts[2::2])}

    def request(self) -> tuple[str, str] | None:
        """(method, path with its query) of the request, when the section shows one."""
        match = (re.search(r"```http\n(GET|POST) (\S+)\n```", self.text)
                 or re.search(r"\*\*Request\*\* `(GET|POST) (\S+)`", self.text))
        return (match.group(1), match.group(2)) if match else None

    def request_json(self) -> Any:
        """The JSON body shown after 'Body (`application/json`):', or None."""
        match = re.search(r"Body \(`application/json`\):\n\n```json\n(.*?)\n```", self.text, re.S)
        return json.loads(match.group(1)) if match else None

    def form(self) -> tuple[dict[str, str], tuple[str, str, int] | None]:
        """A multipart request: its plain fields, and its file part (name, type, size)."""
        match = re.search(r"Body: `multipart/form-data` with fields (.*)", self.text)
        assert match, f"section {self.number} has no multipart body"
        line = match.group(1)
        part = re.search(r"`image` \(file part, filename=`([^`]+)`, Content-Type (\S+), (\d+) bytes\)", line)
        fields = dict(re.findall(r"`(\w+)`=`([^`]*)`", line))
        return fields, (part.group(1), part.group(2), int(part.group(3))) if part else None

    def variant(self) -> Variant:
        match = re.search(r"Body \(`application/json`\): `(\{.*?\})` where <workflow> is .*?"
                          r"\(see `([^`]+)`, image `([^`]+)`\)", self.text)
        assert match, f"section {self.number} is not a workflow variant"
        body = json.loads(match.group(1).replace("<workflow>", "null"))
        changed = re.search(r"Changed/added node\(s\):\n\n```json\n(.*?)\n```", self.text, re.S)
        removed = re.search(r"Removed node\(s\): (\[.*?\])", self.text)
        return Variant(body, match.group(2), match.group(3),
                       json.loads(changed.group(1)) if changed else {},
                       ast.literal_eval(removed.group(1)) if removed else [])

    def response(self) -> Response:
        head = re.search(r"\*\*Response\*\* HTTP (\d+), headers (\{.*?\}), \d+ bytes", self.text)
        inline = re.search(r"-> HTTP (\d+)", self.text)
        if head:
            status, headers, rest = int(head.group(1)), json.loads(head.group(2)), self.text[head.end():]
        elif inline:
            status, headers, rest = int(inline.group(1)), {}, self.text[inline.end():]
        else:   # a history entry shown on its own (sections 40, 45)
            status, headers, rest = None, {}, self.text
        return Response(status, headers, _body(rest))

    def quoted_after(self, label: str) -> str:
        """The `…`-quoted text that follows `label`."""
        match = re.search(re.escape(label) + r"\s*`([^`]*)`", self.text)
        assert match, f"section {self.number} has no {label!r}"
        return match.group(1)


def _body(rest: str) -> Any:
    found = [(m.start(), kind, m) for kind, m in (
        ("json", JSON_BLOCK.search(rest)),
        ("empty", re.search(r"\(empty body\)", rest)),
        ("binary", re.search(r"\(binary body, first bytes (b'.*?')\)", rest))) if m]
    assert found, "no response body"
    _, kind, match = min(found, key=lambda f: f[0])
    if kind == "json":
        return json.loads(match.group(1))
    return None if kind == "empty" else ast.literal_eval(match.group(1))


def sections(path: Path) -> dict[int, Section]:
    text = path.read_text()
    heads = list(HEADING.finditer(text))
    return {int(h.group(1)): Section(int(h.group(1)), h.group(2),
                                     text[h.end():heads[i + 1].start() if i + 1 < len(heads) else len(text)])
            for i, h in enumerate(heads)}


# -- comparing --------------------------------------------------------------------------------

# What legitimately differs between the recording and any replay, by key. Everything else is
# compared exactly: keys, values, their JSON types, the order of lists and frames.
IDS = ("prompt_id", "client_id", "sid")      # uuids per prompt and socket, or chosen names
ID_LISTS = ("delete",)                       # POST /queue's prompt ids
STAMPS = ("timestamp",                       # milliseconds since the epoch
          "number",                          # the queue number: it counts every POST /prompt
                                             # of the recording, some of which are not shown
          "ram_free", "vram_free", "torch_vram_free",   # the machine's free memory
          "len")                             # a binary frame's size: the compressed PNG's
UNORDERED = ("executed", "current_outputs",  # Python sets on the server: any order
             "errors")                       # a node's input errors: found in set order
FRAMES = ("traceback",)                      # stack frames: the server's paths and lines

ITEMS_TRIMMED = re.compile(r"^… (\d+) more items trimmed$")
CHARS_TRIMMED = re.compile(r"^(.*)… \[(\d+) chars trimmed\]$", re.S)


def normalise(doc: Any) -> Any:
    """`doc` with the volatile values named: ids become '<id N>' (N by first appearance,
    wherever the same id shows again, as a key too), STAMPS '<key: type>', UNORDERED lists
    sorted, each traceback frame '<frame>'. A queue item [number, prompt_id, prompt, extra,
    outputs] names its number and id like the keys do."""
    ids: dict[str, str] = {}

    def collect(x: Any) -> None:
        if isinstance(x, dict):
            for k in sorted(x):
                if k in IDS and isinstance(x[k], str):
                    ids.setdefault(x[k], f"<id {len(ids) + 1}>")
                if k in ID_LISTS and isinstance(x[k], list):
                    for v in x[k]:
                        ids.setdefault(v, f"<id {len(ids) + 1}>")
                collect(x[k])
        elif isinstance(x, list):
            if _queue_item(x):
                ids.setdefault(x[1], f"<id {len(ids) + 1}>")
            for v in x:
                collect(v)

    def rewrite(x: Any, key: str | None = None) -> Any:
        if isinstance(x, dict):
            return {ids.get(k, k): rewrite(v, k) for k, v in x.items()}
        if key in STAMPS:
            return f"<{key}: {type(x).__name__}>"
        if key in FRAMES and isinstance(x, list):
            return ["<frame>" if isinstance(f, str) and f.startswith('  File "') else f for f in x]
        if isinstance(x, list):
            items = [rewrite(v) for v in x]
            if _queue_item(x):
                items[0] = f"<number: {type(x[0]).__name__}>"
            return sorted(items, key=canonical) if key in UNORDERED else items
        return ids.get(x, x) if isinstance(x, str) else x
    collect(doc)
    return rewrite(doc)


def _queue_item(x: list[Any]) -> bool:
    return (len(x) >= 3 and isinstance(x[0], int | float) and not isinstance(x[0], bool)
            and isinstance(x[1], str) and isinstance(x[2], dict))


def trim_like(actual: Any, recorded: Any) -> Any:
    """`actual` trimmed where the transcript trimmed (a list's '… N more items trimmed', a
    string's '… [N chars trimmed]'), so that what the transcript kept is compared exactly
    and what it cut is compared by count."""
    if isinstance(recorded, list) and isinstance(actual, list):
        if recorded and isinstance(recorded[-1], str) and ITEMS_TRIMMED.match(recorded[-1]):
            keep = len(recorded) - 1
            if len(actual) > keep:
                actual = actual[:keep] + [f"… {len(actual) - keep} more items trimmed"]
        return [trim_like(a, r) for a, r in zip(actual, recorded)] + actual[len(recorded):]
    if isinstance(recorded, dict) and isinstance(actual, dict):
        return {k: trim_like(v, recorded[k]) if k in recorded else v for k, v in actual.items()}
    if isinstance(recorded, str) and isinstance(actual, str):
        match = CHARS_TRIMMED.match(recorded)
        if match and len(actual) > len(match.group(1)):
            keep = len(match.group(1))
            return actual[:keep] + f"… [{len(actual) - keep} chars trimmed]"
    return actual


def trimmed(recorded: Any) -> bool:
    """Whether the transcript cut anything out of `recorded`."""
    if isinstance(recorded, dict):
        return any(trimmed(v) for v in recorded.values())
    if isinstance(recorded, list):
        return any(trimmed(v) for v in recorded)
    return isinstance(recorded, str) and bool(ITEMS_TRIMMED.match(recorded) or CHARS_TRIMMED.match(recorded))


def canonical(x: Any) -> str:
    """JSON text that tells 1 from 1.0 from true and ignores the order of keys."""
    return json.dumps(x, sort_keys=True, indent=1, ensure_ascii=False, default=repr)
