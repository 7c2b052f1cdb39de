"""Workflow templates for the ComfyUI backend: load one, find where each value goes, fill it,
and check it against a server's /object_info before anything is queued.

The daemon sets these values, by key:

    image            LoadImage.image              the uploaded input (img2img only)
    prompt           CLIPTextEncode.text          on the sampler's `positive` side
    negative_prompt  CLIPTextEncode.text          on the sampler's `negative` side
    seed             KSampler.seed (KSamplerAdvanced.noise_seed)
    steps, cfg       KSampler.steps, .cfg
    sampler          KSampler.sampler_name
    scheduler        KSampler.scheduler
    denoise          KSampler.denoise             img2img only: txt2img keeps the workflow's (1.0)
    width, height    the first node with width and height upstream of the latent
                     (EmptyLatentImage; in img2img the input image's size decides)
    checkpoint       CheckpointLoaderSimple.ckpt_name, upstream of the sampler's `model`
    filename_prefix  SaveImage.filename_prefix    also names the output node the result is read from

The default mapping is found by walking the graph from the output node (SaveImage, else
PreviewImage) to the nearest sampler, then along the sampler's links. A user's own workflow
(LCM, Turbo, two samplers) can name any slot explicitly, `{"seed": "3.inputs.seed"}`
(node id, "inputs", input name); an empty string leaves that value to the workflow.
"""

from __future__ import annotations

import copy
import json
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamd.errors import PermanentBackendError

KEYS = ("image", "prompt", "negative_prompt", "seed", "steps", "cfg", "sampler", "scheduler",
        "denoise", "width", "height", "checkpoint", "filename_prefix")

# Repository checkout first (workflows/ beside dreamd/), then a copy shipped inside the package.
WORKFLOW_DIRS = (Path(__file__).resolve().parents[3] / "workflows",
                 Path(__file__).resolve().parents[2] / "workflows")

OUTPUT_CLASSES = ("SaveImage", "PreviewImage")
# ComfyUI keeps LoadImage's list to the top of its input dir and checks the file itself.
DYNAMIC_COMBOS = {("LoadImage", "image")}

Workflow = dict[str, Any]


class WorkflowError(PermanentBackendError):
    """The workflow cannot be used; the message says which node or key to fix."""


@dataclass(frozen=True)
class InputPath:
    """One input of one node: written `node_id.inputs.name` in a mapping."""

    node: str
    input: str

    def __str__(self) -> str:
        return f"{self.node}.inputs.{self.input}"


def workflow_names() -> list[str]:
    return sorted({p.stem for d in WORKFLOW_DIRS if d.is_dir() for p in d.glob("*.json")})


def load_workflow(name_or_path: str | Path) -> tuple[Workflow, Path]:
    """A workflow by name (`sd15_img2img`, from workflows/) or by path to an API-format file."""
    given = Path(name_or_path).expanduser()
    candidates = [given] if given.is_file() else []
    if not candidates and given.name == str(name_or_path):  # a bare name, not a path
        stem = given.name[:-5] if given.name.endswith(".json") else given.name
        candidates = [d / f"{stem}.json" for d in WORKFLOW_DIRS if (d / f"{stem}.json").is_file()]
    if not candidates:
        raise WorkflowError(f"workflow {str(name_or_path)!r} not found: it is not a file, and "
                            f"workflows/ has {', '.join(workflow_names()) or 'nothing'}")
    path = candidates[0]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WorkflowError(f"workflow {path} cannot be read as JSON: {exc}") from exc
    check_api_format(data, str(path))
    return data, path


def check_api_format(data: Any, source: str) -> None:
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise WorkflowError(f"workflow {source} is in ComfyUI's UI format; export it with "
                            "'Export (API)' / 'Save (API Format)' instead")
    if not isinstance(data, dict) or not data:
        raise WorkflowError(f"workflow {source} is not an API-format object of nodes")
    for node_id, node in data.items():
        if not (isinstance(node, dict) and isinstance(node.get("class_type"), str)
                and isinstance(node.get("inputs"), dict)):
            raise WorkflowError(f"workflow {source}: node {node_id!r} needs a class_type "
                                "and an inputs object")


def is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int))


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), node_id) if node_id.isdigit() else (1 << 62, node_id)


def _upstream(workflow: Workflow, start: str, inputs: tuple[str, ...] | None = None) -> Iterator[str]:
    """Node ids reachable upstream of `start` (through `inputs` only at the first hop), nearest first."""
    seen, todo = {start}, deque([(start, True)])
    while todo:
        node_id, first = todo.popleft()
        for name, value in workflow[node_id]["inputs"].items():
            if first and inputs is not None and name not in inputs:
                continue
            if is_link(value) and value[0] in workflow and value[0] not in seen:
                seen.add(value[0])
                yield value[0]
                todo.append((value[0], False))


def _find(workflow: Workflow, start: str, inputs: tuple[str, ...] | None,
          test: Callable[[dict[str, Any]], bool]) -> str | None:
    return next((n for n in _upstream(workflow, start, inputs) if test(workflow[n])), None)


def _is_sampler(node: dict[str, Any]) -> bool:
    ins = node["inputs"]
    return all(is_link(ins.get(k)) for k in ("positive", "negative", "latent_image"))


def _literal(node: dict[str, Any], name: str) -> bool:
    return name in node["inputs"] and not is_link(node["inputs"][name])


def default_mapping(workflow: Workflow) -> dict[str, InputPath]:
    """Walk the graph from the output node; see the module docstring for what is found where."""
    mapping: dict[str, InputPath] = {}
    outputs = sorted((n for n, v in workflow.items() if v["class_type"] in OUTPUT_CLASSES),
                     key=lambda n: (OUTPUT_CLASSES.index(workflow[n]["class_type"]), _node_order(n)))
    if not outputs:
        return mapping
    out = outputs[0]
    if _literal(workflow[out], "filename_prefix"):
        mapping["filename_prefix"] = InputPath(out, "filename_prefix")
    sampler = _find(workflow, out, None, _is_sampler)
    if sampler is None:
        return mapping
    node = workflow[sampler]
    for key, names in (("seed", ("seed", "noise_seed")), ("steps", ("steps",)), ("cfg", ("cfg",)),
                       ("sampler", ("sampler_name",)), ("scheduler", ("scheduler",))):
        name = next((n for n in names if _literal(node, n)), None)
        if name:
            mapping[key] = InputPath(sampler, name)
    for key, side in (("prompt", "positive"), ("negative_prompt", "negative")):
        found = _find(workflow, sampler, (side,), lambda n: _literal(n, "text")
                      and isinstance(n["inputs"]["text"], str))
        if found:
            mapping[key] = InputPath(found, "text")
    found = _find(workflow, sampler, ("model",), lambda n: _literal(n, "ckpt_name"))
    if found:
        mapping["checkpoint"] = InputPath(found, "ckpt_name")
    found = _find(workflow, sampler, ("latent_image",), lambda n: n["class_type"] == "LoadImage")
    if found and _literal(workflow[found], "image"):
        mapping["image"] = InputPath(found, "image")
        if _literal(node, "denoise"):
            mapping["denoise"] = InputPath(sampler, "denoise")
    found = _find(workflow, sampler, ("latent_image",),
                  lambda n: _literal(n, "width") and _literal(n, "height"))
    if found:
        mapping["width"], mapping["height"] = InputPath(found, "width"), InputPath(found, "height")
    return mapping


def parse_path(key: str, text: str, workflow: Workflow) -> InputPath:
    parts = text.split(".")
    if len(parts) != 3 or parts[1] != "inputs" or not parts[0] or not parts[2]:
        raise WorkflowError(f"mapping {key!r} = {text!r}: write it as '<node id>.inputs.<input name>', "
                            "e.g. '3.inputs.seed'")
    node_id, _, name = parts
    if node_id not in workflow:
        raise WorkflowError(f"mapping {key!r} = {text!r}: the workflow has no node {node_id!r} "
                            f"(it has {', '.join(sorted(workflow, key=_node_order))})")
    node = workflow[node_id]
    if name not in node["inputs"]:
        raise WorkflowError(f"mapping {key!r} = {text!r}: node {node_id} ({node['class_type']}) has no "
                            f"input {name!r} (it has {', '.join(node['inputs']) or 'none'})")
    if is_link(node["inputs"][name]):
        raise WorkflowError(f"mapping {key!r} = {text!r}: node {node_id} input {name!r} is a link to "
                            "another node, not a value the daemon can set")
    return InputPath(node_id, name)


def resolve_mapping(workflow: Workflow, overrides: dict[str, str] | None = None) -> dict[str, InputPath]:
    """The default mapping with the user's overrides applied ("" = leave it to the workflow)."""
    mapping = default_mapping(workflow)
    for key, text in (overrides or {}).items():
        if key not in KEYS:
            raise WorkflowError(f"mapping key {key!r} is unknown; the keys are {', '.join(KEYS)}")
        if text in ("", None):
            mapping.pop(key, None)
        else:
            mapping[key] = parse_path(key, str(text), workflow)
    return mapping


def require(mapping: dict[str, InputPath], keys: tuple[str, ...], source: str) -> None:
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise WorkflowError(f"workflow {source}: no slot found for {', '.join(missing)}; name it in "
                            f"the [comfyui] mapping, e.g. {{\"{missing[0]}\": \"<node id>.inputs.<name>\"}}")


def fill(workflow: Workflow, mapping: dict[str, InputPath], values: dict[str, Any]) -> Workflow:
    """A copy of the template with every mapped value set; values without a slot are skipped."""
    filled = copy.deepcopy(workflow)
    for key, value in values.items():
        if value is not None and key in mapping:
            path = mapping[key]
            filled[path.node]["inputs"][path.input] = value
    return filled


def output_node(workflow: Workflow, mapping: dict[str, InputPath]) -> str | None:
    if "filename_prefix" in mapping:
        return mapping["filename_prefix"].node
    outputs = [n for n, v in workflow.items() if v["class_type"] in OUTPUT_CLASSES]
    return min(outputs, key=_node_order) if outputs else None


def _combo(conf: list[Any]) -> list[Any] | None:
    if isinstance(conf[0], list):
        return conf[0]
    if conf[0] == "COMBO" and len(conf) > 1 and isinstance(conf[1], dict):  # newer object_info
        return conf[1].get("options")
    return None


def checkpoints_in(object_info: dict[str, Any]) -> list[str]:
    """The checkpoint names a server offers (CheckpointLoaderSimple's list), or []."""
    try:
        conf = object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
    except (KeyError, TypeError):
        return []
    return [str(c) for c in (_combo(conf) or [])]


def _listing(options: list[Any], limit: int = 30) -> str:
    if not options:
        return "none"
    shown = ", ".join(map(str, options[:limit]))
    return shown + (f", … ({len(options)} in all)" if len(options) > limit else "")


def check_against(workflow: Workflow, object_info: dict[str, Any], *, source: str, server: str) -> None:
    """Every node type installed, required inputs present, links resolvable, combo values in
    their lists (checkpoint, sampler, scheduler named as such), numbers in range."""
    problems: list[str] = []
    for node_id in sorted(workflow, key=_node_order):
        node = workflow[node_id]
        cls = node["class_type"]
        if cls not in object_info:
            problems.append(f"node {node_id}: class_type {cls!r} is not installed on {server} "
                            "(a missing custom node pack?)")
            continue
        spec = object_info[cls].get("input", {})
        required, optional = spec.get("required", {}), spec.get("optional", {})
        for name in required:
            if name not in node["inputs"]:
                problems.append(f"node {node_id} ({cls}): required input {name!r} is missing")
        for name, value in node["inputs"].items():
            if is_link(value):
                if value[0] not in workflow:
                    problems.append(f"node {node_id} ({cls}) input {name!r} links to node "
                                    f"{value[0]!r}, which is not in the workflow")
                continue
            conf = required.get(name) or optional.get(name)
            if not conf:
                continue  # ComfyUI ignores inputs a node does not declare
            problem = _check_value(cls, name, value, conf, server)
            if problem:
                problems.append(f"node {node_id} ({cls}) input {name!r}: {problem}")
    if not any(object_info.get(v["class_type"], {}).get("output_node") for v in workflow.values()):
        problems.append("the workflow has no output node (SaveImage); ComfyUI would refuse it")
    if problems:
        raise WorkflowError(f"workflow {source} does not fit ComfyUI at {server}: " + "; ".join(problems))


def _check_value(cls: str, name: str, value: Any, conf: list[Any], server: str) -> str | None:
    options = _combo(conf)
    if options is not None:
        if (cls, name) in DYNAMIC_COMBOS or value in options:
            return None
        what = {"ckpt_name": "checkpoint", "sampler_name": "sampler", "scheduler": "scheduler"}.get(name)
        if what == "checkpoint":
            return (f"checkpoint {value!r} is not on {server}; it has: {_listing(options)} "
                    "(set [comfyui] checkpoint to one of them)")
        if what:
            return f"{what} {value!r} is not one {server} knows; valid: {_listing(options)}"
        return f"{value!r} is not one of: {_listing(options)}"
    kind, limits = conf[0], (conf[1] if len(conf) > 1 and isinstance(conf[1], dict) else {})
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number ({kind})"
        if kind == "INT" and isinstance(value, float) and not value.is_integer():
            return f"{value!r} is not an integer"
        if "min" in limits and value < limits["min"]:
            return f"{value} is below the minimum {limits['min']}"
        if "max" in limits and value > limits["max"]:
            return f"{value} is above the maximum {limits['max']}"
    return None
