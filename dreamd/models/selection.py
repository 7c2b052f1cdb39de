"""Which files of a hub repo `dreamd models pull` fetches: of a diffusers pipeline only what
img2img loads (configs, tokenizers, and fp16 safetensors of the weighted components where
the repo has them); of any other repo one single-file checkpoint or LoRA. Pure: it works on
the repo's file listing, before anything is downloaded.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from dreamd.errors import UsageError

CONFIG_SUFFIXES = (".json", ".txt", ".model")       # configs, vocab/merges, sentencepiece
WEIGHTS = (".safetensors",)
PICKABLE = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class RepoFile:
    """One file of the listing. sha256: the hub's hash of an LFS file's content;
    blob_id: its git object id. The HF cache names a blob by sha256 (LFS) or blob id."""

    name: str
    size: int
    blob_id: str | None = None
    sha256: str | None = None

    @property
    def etag(self) -> str | None:
        return self.sha256 or self.blob_id


@dataclass
class Selection:
    """kind: pipeline (a diffusers folder) or file (one checkpoint or LoRA, `main`);
    variant: the diffusers weight variant picked ("fp16") or None."""

    kind: str
    files: list[RepoFile] = field(default_factory=list)
    main: RepoFile | None = None
    variant: str | None = None

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def human(n: float) -> str:
    """Bytes in decimal units, as the hub shows sizes."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def choose(repo_id: str, files: list[RepoFile], index: dict | None,
           pick: str | None = None) -> Selection:
    """The files to fetch. `index`: the repo's model_index.json (None when it has none);
    `pick`: a file name or glob (--file) that asks for one file whatever the repo is."""
    if pick:
        return _picked(repo_id, files, pick)
    if index is not None:
        return _pipeline(repo_id, files, index)
    weights = [f for f in files if f.name.endswith(WEIGHTS)]
    if len(weights) == 1:
        return Selection("file", weights, weights[0])
    if not weights:
        others = [f.name for f in files if f.name.endswith(PICKABLE)]
        hint = (f" (it has {', '.join(others[:4])}: --file NAME takes one)" if others else "")
        raise UsageError(f"{repo_id} holds no .safetensors file and no model_index.json: "
                         f"nothing dreamd can load{hint}")
    ordered = sorted(weights, key=lambda f: f.name)[:8]
    listed = ", ".join(f"{f.name} ({human(f.size)})" for f in ordered)
    raise UsageError(f"{repo_id} holds {len(weights)} .safetensors files; choose one with "
                     f"--file NAME: {listed}")


def _picked(repo_id: str, files: list[RepoFile], pick: str) -> Selection:
    found = [f for f in files if f.name == pick] or \
            [f for f in files if fnmatch.fnmatchcase(f.name, pick)]
    found = [f for f in found if f.name.endswith(PICKABLE)]
    if len(found) != 1:
        weights = sorted(f.name for f in files if f.name.endswith(PICKABLE))
        what = "no" if not found else f"{len(found)}"
        raise UsageError(f"--file {pick}: {what} .safetensors or .ckpt file of {repo_id} "
                         f"matches; it has: {', '.join(weights[:12]) or 'none'}")
    return Selection("file", found, found[0])


def weighted_components(index: dict) -> list[str]:
    """The components of a model_index.json img2img needs weights for: not the safety
    checker (dreamd never runs it), not the configs-only scheduler and tokenizers."""
    light = {"scheduler", "tokenizer", "tokenizer_2", "feature_extractor", "safety_checker",
             "image_encoder"}
    return sorted(k for k, v in index.items() if not k.startswith("_") and k not in light
                  and isinstance(v, list) and v and v[0] is not None)


def _variant(name: str) -> str | None:
    """diffusers' weight variant in a file name: "fp16" in diffusion_pytorch_model.fp16.safetensors
    and model.fp16-00001-of-00002.safetensors; None in model.safetensors."""
    base = name.rsplit("/", 1)[-1].removesuffix(".safetensors")
    if "." not in base:
        return None
    return base.split(".", 1)[1].split("-", 1)[0]


def _pipeline(repo_id: str, files: list[RepoFile], index: dict) -> Selection:
    components = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)
                  and v and v[0] is not None and k != "safety_checker"}
    chosen = [f for f in files if f.name == "model_index.json"]
    for f in files:
        top, _, rest = f.name.partition("/")
        if top in components and rest and "/" not in rest and rest.endswith(CONFIG_SUFFIXES):
            chosen.append(f)
    variants = set()
    for component in weighted_components(index):
        weights = [f for f in files if f.name.startswith(component + "/")
                   and f.name.count("/") == 1 and f.name.endswith(WEIGHTS)]
        fp16 = [f for f in weights if _variant(f.name) == "fp16"]
        plain = [f for f in weights if _variant(f.name) is None]
        take = fp16 or plain
        if not take:
            raise UsageError(f"{repo_id} has no .safetensors weights for its {component} "
                             f"(dreamd loads safetensors only, never pickled .bin files)")
        variants.add("fp16" if fp16 else None)
        chosen.extend(take)
    # from_pretrained(variant="fp16") takes a component's plain weights where it has no
    # fp16 ones (diffusers' variant_compatible_siblings), so one fp16 component is enough
    variant = "fp16" if "fp16" in variants else None
    return Selection("pipeline", chosen, None, variant)


def folder_variant(folder: str | Path) -> str | None:
    """The variant a diffusers folder must be loaded with (from_pretrained(variant=)): "fp16"
    when a component holds only fp16 weights, as a pull leaves them (diffusers finds no
    model.safetensors there without it, and takes plain weights where a component has no
    fp16 ones); None for a folder of plain weights."""
    folder = Path(folder)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        variants = {_variant(p.name) for p in (folder / component).glob("*.safetensors")}
        if "fp16" in variants and None not in variants:
            return "fp16"
    return None

