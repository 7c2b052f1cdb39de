"""`dreamd models list`: the diffusion models and LoRAs usable on this machine, found where
the backend looks (backends/diffusion/locate.py): the Hugging Face cache, the ComfyUI models
folder (checkpoints/, loras/, diffusers/), and diffusion.model / diffusion.lora. Each is told
apart from its safetensors header or its configs alone: no torch, no weights read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dreamd.errors import ModelError

LABELS = {"sd15": "SD 1.5", "sd21": "SD 2.x", "sdxl": "SDXL"}
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class Entry:
    """One model. value: what to write in the config (a hub id, or a path); configured:
    "model" or "lora" when the config points at it."""

    kind: str                   # pipeline | checkpoint | lora | missing | unusable
    family: str | None
    size: int
    value: str
    path: str
    source: str                 # hf-cache | comfyui | config
    configured: str | None = None
    usable: bool = True
    note: str = ""

    @property
    def label(self) -> str:
        return LABELS.get(self.family or "", "?")


@dataclass
class Inventory:
    hub_cache: str
    comfyui_models_dir: str | None
    entries: list[Entry]
    partial: list[dict[str, Any]]       # interrupted pulls: hub id, bytes kept
    configured: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        return {"hub_cache": self.hub_cache, "comfyui_models_dir": self.comfyui_models_dir,
                "configured": self.configured, "partial": self.partial,
                "models": [{**asdict(e), "family_label": e.label} for e in self.entries]}


def describe(path: Path, prefer: str = "checkpoint") -> tuple[str, str | None, str]:
    """(kind, family, note) of a weights file: checkpoint, lora, or unusable with why."""
    from dreamd.backends.diffusion import locate

    def checkpoint():
        return "checkpoint", locate.inspect_file(path).family

    def lora():
        return "lora", locate.lora_family(path)

    first, second = (checkpoint, lora) if prefer == "checkpoint" else (lora, checkpoint)
    try:
        kind, family = first()
        return kind, family, ""
    except ModelError as exc:
        why = str(exc)
    try:
        kind, family = second()
        return kind, family, ""
    except ModelError:
        return "unusable", None, why


def _size(path: Path) -> int:
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def inventory(cfg) -> Inventory:
    from dreamd.backends.diffusion import locate

    cache = locate.hub_cache_dir()
    entries: list[Entry] = []
    partial: list[dict[str, Any]] = []
    _hub_cache(cache, entries, partial)
    models_dir = cfg.comfyui.models_dir or None
    if models_dir:
        _comfyui(models_dir, entries)
    configured = _configured(cfg, cache, entries)
    return Inventory(str(cache), str(locate.models_root(models_dir)) if models_dir else None,
                     entries, partial, configured)


def _hub_cache(cache: Path, entries: list[Entry], partial: list[dict[str, Any]]) -> None:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from dreamd.backends.diffusion import locate

    # an interrupted first pull has blobs but no snapshot yet, which scan_cache_dir skips
    # as a damaged repo: its partial files are looked for here
    for folder in sorted(cache.glob("models--*")) if cache.is_dir() else ():
        blobs = folder / "blobs"
        kept = sum(p.stat().st_size for p in blobs.glob("*.incomplete")) if blobs.is_dir() else 0
        if kept:
            hub_id = folder.name.removeprefix("models--").replace("--", "/")
            partial.append({"hub_id": hub_id, "bytes": kept,
                            "resume": locate.pull_command(hub_id)})
    try:
        scanned = scan_cache_dir(cache)
    except CacheNotFound:
        return
    for repo in sorted(scanned.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        main = locate.cached_snapshot(repo.repo_id, cache)
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            snapshot = Path(revision.snapshot_path)
            by_id = main is not None and snapshot == main
            if (snapshot / "model_index.json").is_file():
                family = locate.folder_family(snapshot)
                missing = locate.missing_parts(snapshot, family)
                note = (f"no weights for {', '.join(missing)}: `"
                        f"{locate.pull_command(repo.repo_id)}` fetches them") if missing else ""
                entries.append(Entry("pipeline", family, revision.size_on_disk,
                                     repo.repo_id if by_id else str(snapshot), str(snapshot),
                                     "hf-cache", usable=not missing, note=note))
                continue
            weights = [f for f in revision.files
                       if f.file_name.lower().endswith(CHECKPOINT_SUFFIXES)]
            for f in sorted(weights, key=lambda f: str(f.file_path)):
                kind, family, _ = describe(Path(f.file_path))
                if kind == "unusable":
                    continue        # the cache holds other kinds of models too (LLMs...)
                value = str(f.file_path)
                if by_id and _finds(repo.repo_id, kind, Path(f.file_path), cache):
                    value = repo.repo_id
                entries.append(Entry(kind, family, f.size_on_disk, value, str(f.file_path),
                                     "hf-cache"))


def _finds(hub_id: str, kind: str, path: Path, cache: Path) -> bool:
    """Whether locate.py, given the hub id, lands on this very file."""
    from dreamd.backends.diffusion import locate

    try:
        found = locate.locate(hub_id, what="lora" if kind == "lora" else "model",
                              cache_dir=cache)
    except ModelError:
        return False
    return found.path == path


def _comfyui(models_dir: str, entries: list[Entry]) -> None:
    from dreamd.backends.diffusion import locate

    for sub, prefer in (("checkpoints", "checkpoint"), ("loras", "lora")):
        for path in locate.find_checkpoints(models_dir, sub):
            if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
                continue
            kind, family, why = describe(path, prefer)
            entries.append(Entry(kind, family, _size(path), str(path), str(path), "comfyui",
                                 usable=kind != "unusable", note=why))
    diffusers = locate.models_root(models_dir) / "diffusers"
    if diffusers.is_dir():
        for folder in sorted(p for p in diffusers.iterdir() if (p / "model_index.json").is_file()):
            family = locate.folder_family(folder)
            missing = locate.missing_parts(folder, family)
            entries.append(Entry("pipeline", family, _size(folder), str(folder), str(folder),
                                 "comfyui", usable=not missing,
                                 note=f"no weights for {', '.join(missing)}" if missing else ""))


def _configured(cfg, cache: Path, entries: list[Entry]) -> dict[str, str]:
    """Mark the entries diffusion.model and diffusion.lora point at, found as the backend
    finds them (locate.py); a configured model that is elsewhere is added, one that is
    nowhere is listed as missing with the fix. Returns the two settings."""
    from dreamd.backends.diffusion import locate

    section = getattr(cfg, "diffusion", None)
    if section is None:
        return {}
    specs = {"model": str(getattr(section, "model", "") or ""),
             "lora": str(getattr(section, "lora", "") or "")}
    family = getattr(section, "family", "auto")
    family = None if family == "auto" else family
    base = cfg.file.parent if getattr(cfg, "file", None) else None
    lookup = {"models_dir": cfg.comfyui.models_dir or None,
              "checkpoint": cfg.comfyui.checkpoint or None, "base_dir": base,
              "cache_dir": cache, "family": family}
    model = _mark(entries, "model", specs["model"], lookup)
    lora = specs["lora"]
    if lora.lower() == "auto":
        # the backend's rule (config.py, diffusion.lora): the family's LCM-LoRA, unless the
        # model already makes images in a few steps
        if model is None or locate.few_step(model[0]):
            lora = ""
        else:
            lora = locate.LCM_LORA.get(family or model[1] or "", "")
    if lora and lora.lower() not in ("none", "off"):
        _mark(entries, "lora", lora, lookup)
    return specs


def _mark(entries: list[Entry], what: str, spec: str, lookup: dict):
    """Find `spec` as locate.py does and mark its entry; returns (Located, family) or None."""
    from dreamd.backends.diffusion import locate

    try:
        found = locate.locate(spec, what=what, key=f"diffusion.{what}", **lookup)
    except ModelError as exc:
        entries.append(Entry("missing", None, 0, spec, "", "config", configured=what,
                             usable=False, note=str(exc)))
        return None
    match = [e for e in entries if _same(e.path, found.path)]
    if not match:
        if found.kind == "folder":
            kind, family, why = "pipeline", found.family, ""
        else:
            kind, family, why = describe(found.path, what if what == "lora" else "checkpoint")
        match = [Entry(kind, family, _size(found.path), spec, str(found.path), "config",
                       usable=kind != "unusable", note=why)]
        entries.append(match[0])
    for e in match:
        e.configured = what
    return found, match[0].family


def _same(a: str, b: Path) -> bool:
    if not a:
        return False
    pa = Path(a)
    return pa == b or pa.resolve() == b.resolve()
