"""Where a diffusion model is and what family it is, without torch (the in-process backend's
first step, and what `dreamd models list` and `dreamd doctor` ask).

    locate(spec, ...)        a [diffusion] model or lora value -> Located (a file, a diffusers
                             folder, or a hub id's snapshot in the Hugging Face cache), or a
                             ModelNotFoundError whose message names the exact fix
    inspect_file(path)       a single-file checkpoint read from its safetensors header only:
                             family, tensor count, or a ModelError (truncated, not a checkpoint)
    folder_family(path)      the family of a diffusers folder, from its configs
    folder_variant(path)     "fp16" when a pulled folder holds only fp16 weights
    lora_family(path)        which family a LoRA file was trained for (its cross-attention width)
    find_checkpoints(dir)    the weight files under a ComfyUI models dir's checkpoints/
    cached_snapshot(hub_id)  a hub id's snapshot folder in the HF cache, or None
    licence_notice(...)      one line when the weights are known to be non-commercial

A spec is looked up in this order: an existing path (absolute, or relative to the config
file's folder, then the working dir); a name in <comfyui.models_dir>/checkpoints (loras/ for a
LoRA); a hub id ("org/name") in the HF cache. Only the safetensors header (a few hundred KB)
is read, so this is cheap enough for a command that must not import torch.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from dreamd.errors import ModelError

FAMILIES = ("sd15", "sd21", "sdxl")
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# What "diffusion.model = ''" falls back to, and what `dreamd models pull` fetches for it.
DEFAULT_HUB_ID = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                  "sd21": "stabilityai/sd-turbo",
                  "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
DEFAULT_MODEL = DEFAULT_HUB_ID["sd15"]
# The LCM-LoRA that makes a family's plain checkpoints good in 4 steps ("lora = auto");
# SD 2.x has none published (use a turbo model).
LCM_LORA = {"sd15": "latent-consistency/lcm-lora-sdv1-5",
            "sdxl": "latent-consistency/lcm-lora-sdxl"}
# Width of the text embeddings each family's UNet attends to (cross_attention_dim).
CONTEXT_WIDTH = {768: "sd15", 1024: "sd21", 2048: "sdxl"}
# Models that already make an image in 1-4 steps: no LCM-LoRA for them ("lora = auto").
FEW_STEP = re.compile(r"turbo|lightning|lcm|hyper|schnell", re.I)
# Weights released under a non-commercial licence (research note §5): the hub id or the file
# names they are published under.
NON_COMMERCIAL = (
    (re.compile(r"sd[_-]?xl[_-]?turbo", re.I), "SDXL-Turbo"),
    (re.compile(r"sd[_-]?turbo", re.I), "SD-Turbo"),
)
HEADER_LIMIT = 100 << 20      # a safetensors header above this is garbage, not a model
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ModelNotFoundError(ModelError):
    """The diffusion model is not on this machine."""


@dataclass(frozen=True)
class Located:
    """A model (or LoRA) found on this machine."""

    spec: str                       # what the config said ("" = the default)
    kind: str                       # "file" | "folder" (a diffusers folder or a hub snapshot)
    path: Path                      # the file, or the folder
    family: str | None              # sd15 | sd21 | sdxl; None = not known before loading
    where: str                      # how it was found, in words
    hub_id: str | None = None       # the hub id, when it came from the HF cache
    files: tuple[Path, ...] = field(default=(), compare=False)   # weight files (fingerprint)

    @property
    def name(self) -> str:
        return self.hub_id or self.path.name

    def fingerprint(self) -> tuple:
        """Changes when the weights on disk change (a finished download, a replaced file)."""
        out = []
        for f in self.files or (self.path,):
            try:
                st = f.stat()
                out.append((str(f), st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((str(f), None, None))
        return tuple(out)


# ---------------------------------------------------------------- the Hugging Face cache

def hub_cache_dir() -> Path:
    """The HF hub cache, in huggingface_hub's own order of variables, read at call time (so
    the user's or a test's environment counts even after huggingface_hub was imported)."""
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(env[name]).expanduser()
    home = env.get("HF_HOME") or str(Path(env.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface")
    return Path(home).expanduser() / "hub"


def is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.lower().endswith(WEIGHT_SUFFIXES)


def cached_snapshot(hub_id: str, cache_dir: Path | None = None,
                    revision: str = "main") -> Path | None:
    """The snapshot folder of `hub_id` at `revision` in the HF cache, or None. The cache
    layout is huggingface_hub's: models--org--name/refs/<revision> names the commit whose
    files are under snapshots/<commit>/."""
    repo = (cache_dir or hub_cache_dir()) / ("models--" + hub_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    try:
        commit = (repo / "refs" / revision).read_text().strip()
    except OSError:
        commit = revision
    if (snapshots / commit).is_dir():
        return snapshots / commit
    found = [p for p in snapshots.iterdir() if p.is_dir()]
    return found[0] if len(found) == 1 else None


def pull_command(hub_id: str) -> str:
    return f"dreamd models pull {hub_id}"


# ---------------------------------------------------------------- finding a model

def models_root(models_dir: str | Path) -> Path:
    """ComfyUI's models/ folder, also when the ComfyUI folder itself was given."""
    root = Path(models_dir).expanduser()
    if not (root / "checkpoints").is_dir() and (root / "models").is_dir():
        root = root / "models"
    return root


def find_checkpoints(models_dir: str | Path, sub: str = "checkpoints") -> list[Path]:
    """Weight files under <models_dir>/checkpoints (or loras), sorted; [] when none."""
    folder = models_root(models_dir) / sub
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)


def locate(spec: str, *, what: str = "model", key: str = "diffusion.model",
           models_dir: str | Path | None = None, checkpoint: str | None = None,
           base_dir: Path | None = None, cache_dir: Path | None = None,
           family: str | None = None) -> Located:
    """Find `spec` (see the module docstring). `what` is "model" or "lora"; an empty model
    spec means comfyui.checkpoint in models_dir when it is there, else DEFAULT_MODEL from
    the HF cache (of `family`, when one is configured)."""
    sub = "checkpoints" if what == "model" else "loras"
    spec = spec.strip()
    if not spec and what != "model":
        raise ModelNotFoundError(f"{key} is empty: no LoRA to look for")
    if not spec and what == "model":
        if models_dir and checkpoint:
            candidate = models_root(models_dir) / sub / checkpoint
            if candidate.is_file():
                return _file(spec, candidate, f"comfyui.checkpoint in {candidate.parent}")
        default = DEFAULT_HUB_ID.get(family or "sd15", DEFAULT_MODEL)
        return _hub(spec, default, cache_dir, key, what,
                    looked=[f"{models_root(models_dir) / sub / checkpoint} (comfyui.checkpoint)"]
                    if models_dir and checkpoint else [])
    looked: list[str] = []
    path = Path(spec).expanduser()
    candidates = [path] if path.is_absolute() else [
        *([base_dir / path] if base_dir else []), Path.cwd() / path]
    for c in candidates:
        if c.is_file():
            return _file(spec, c.resolve(), "file")
        if c.is_dir():
            return _folder(spec, c.resolve(), "diffusers folder", what=what)
    looked.extend(str(c) for c in candidates)
    if models_dir and not path.is_absolute():
        folder = models_root(models_dir) / sub
        for name in (spec, *(spec + s for s in (".safetensors", ".ckpt"))):
            c = folder / name
            if c.is_file():
                return _file(spec, c, f"{sub}/ of comfyui.models_dir")
        looked.append(f"{folder}/{spec}")
    if is_hub_id(spec):     # (the paths looked at are noise beside a hub id)
        return _hub(spec, spec, cache_dir, key, what, [])
    hint = (f"; or `{pull_command(DEFAULT_MODEL)}` and set {key} = \"{DEFAULT_MODEL}\""
            if what == "model" else f"; or `{pull_command(LCM_LORA['sd15'])}` and set "
            f"{key} = \"{LCM_LORA['sd15']}\"")
    raise ModelNotFoundError(
        f"{key} = {spec!r}: no such file or folder (looked at {', '.join(looked)}); give the "
        f"path of a .safetensors checkpoint or a diffusers folder, a name in "
        f"comfyui.models_dir/{sub}, or a hub id{hint}")


def _hub(spec: str, hub_id: str, cache_dir: Path | None, key: str, what: str,
         looked: list[str]) -> Located:
    snap = cached_snapshot(hub_id, cache_dir)
    cache = cache_dir or hub_cache_dir()
    if snap is None:
        said = f"{key} = {spec!r}" if spec else f"{key} (empty: the default {hub_id})"
        also = f"; looked at {', '.join(looked)}" if looked else ""
        raise ModelNotFoundError(
            f"{said}: not in the Hugging Face cache ({cache}){also}: run "
            f"`{pull_command(hub_id)}` to fetch it")
    found = _folder(spec, snap, f"hub id {hub_id} in the Hugging Face cache", what=what,
                    hub_id=hub_id)
    return found


def _file(spec: str, path: Path, where: str) -> Located:
    return Located(spec=spec, kind="file", path=path, family=None, where=where, files=(path,))


def _folder(spec: str, path: Path, where: str, *, what: str, hub_id: str | None = None) -> Located:
    """A diffusers folder (a model) or a folder holding one LoRA file."""
    if what == "lora":
        weights = [p for p in sorted(path.iterdir()) if p.suffix == ".safetensors"]
        preferred = [p for p in weights if p.name == "pytorch_lora_weights.safetensors"]
        chosen = preferred or weights
        if not chosen:
            fix = f"; `{pull_command(hub_id)}` fetches it again" if hub_id else ""
            raise ModelError(f"{path}: no .safetensors LoRA file in this folder{fix}")
        return Located(spec=spec, kind="file", path=chosen[0], family=None, where=where,
                       hub_id=hub_id, files=(chosen[0],))
    if not (path / "model_index.json").is_file():
        # a hub snapshot of a single-file repo: the one checkpoint in it
        single = [p for p in sorted(path.iterdir()) if p.suffix.lower() in WEIGHT_SUFFIXES
                  and p.exists()]
        if hub_id and len(single) == 1:
            return Located(spec=spec, kind="file", path=single[0], family=None, where=where,
                           hub_id=hub_id, files=(single[0],))
        raise ModelError(f"{path}: not a diffusers model folder (no model_index.json); give "
                         f"a .safetensors checkpoint or a folder saved by diffusers")
    files = tuple(sorted(p for sub in ("unet", "vae", "text_encoder", "text_encoder_2")
                         if (path / sub).is_dir() for p in (path / sub).iterdir()
                         if p.suffix in (".safetensors", ".bin")))
    return Located(spec=spec, kind="folder", path=path, family=folder_family(path),
                   where=where, hub_id=hub_id, files=files)


# ---------------------------------------------------------------- what a file or folder is

def folder_family(path: Path) -> str | None:
    """sd15 / sd21 / sdxl from a diffusers folder's configs; None when they do not say."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    if "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index:
        return "sdxl"
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return CONTEXT_WIDTH.get(unet.get("cross_attention_dim"))


def missing_parts(path: Path, family: str | None) -> list[str]:
    """The components of a diffusers folder whose weights are absent (an interrupted or
    partial download); a hub snapshot's files are links, so a missing blob counts too."""
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    out = []
    for part in parts:
        folder = path / part
        if not (folder / "config.json").exists() or not any(
                p.suffix in (".safetensors", ".bin") and p.exists()
                for p in (folder.iterdir() if folder.is_dir() else ())):
            out.append(part)
    return out


def folder_variant(folder: Path) -> str | None:
    """The variant a diffusers folder loads with (from_pretrained(variant=)): "fp16" when a
    component holds only fp16 weights, as `dreamd models pull` leaves a snapshot (diffusers
    then takes the plain weights of a component that has no fp16 ones); None otherwise."""
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        names = [p.name for p in (folder / component).glob("*.safetensors")]
        fp16 = [n for n in names if ".fp16." in n]
        if fp16 and len(fp16) == len(names):
            return "fp16"
    return None


def read_header(path: Path) -> dict[str, dict]:
    """The tensor table of a .safetensors file (name -> dtype, shape, data_offsets), checked
    against the file's size: a truncated or damaged file is a ModelError naming it."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path}: the file is empty or cut short ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(HEADER_LIMIT, size - 8):
                raise ModelError(f"{path}: not a safetensors file (or a damaged one): its "
                                 f"header claims {n} bytes of a {size}-byte file")
            table = json.loads(f.read(n))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not a safetensors file (its header is not JSON: {exc})") from exc
    if not isinstance(table, dict):
        raise ModelError(f"{path}: not a safetensors file (a header that is not a table)")
    table.pop("__metadata__", None)
    end = max((t.get("data_offsets", [0, 0])[1] for t in table.values()
               if isinstance(t, dict)), default=0)
    if 8 + n + end > size:
        raise ModelError(f"{path}: truncated: {size:,} bytes, its header needs "
                         f"{8 + n + end:,} (an interrupted download or copy?); fetch or copy "
                         f"it again")
    return table


@dataclass(frozen=True)
class CheckpointInfo:
    family: str | None              # None: a .ckpt (pickled), read when it is loaded
    tensors: int                    # 0 when not known without loading
    parameters: int                 # elements over all tensors (0 when not known)


UNET_ANCHOR = "model.diffusion_model.input_blocks.0.0.weight"


def inspect_file(path: Path) -> CheckpointInfo:
    """What a single-file checkpoint holds, from its header: a ModelError names the file
    when it is not a usable Stable Diffusion checkpoint in the original (LDM) layout."""
    if path.suffix.lower() != ".safetensors":
        if not zipfile.is_zipfile(path):
            with path.open("rb") as f:
                first = f.read(2)
            if not first or first[0] != 0x80:
                raise ModelError(f"{path}: neither a safetensors file nor a torch checkpoint "
                                 f"(a damaged or truncated download?)")
        return CheckpointInfo(family=None, tensors=0, parameters=0)
    table = read_header(path)
    return CheckpointInfo(family=family_of_keys(path, table), tensors=len(table),
                          parameters=sum(_numel(t.get("shape", [])) for t in table.values()))


def family_of_keys(path: Path, table: dict[str, dict]) -> str:
    """The family of an LDM-layout checkpoint from its key names and shapes."""
    if UNET_ANCHOR not in table:
        what = _what_else(table)
        raise ModelError(f"{path}: not a Stable Diffusion checkpoint ({len(table)} tensors, no "
                         f"UNet under model.diffusion_model.*{what}); point diffusion.model at "
                         f"a full checkpoint (UNet, VAE and text encoder in one file) or a "
                         f"diffusers folder")
    channels = table[UNET_ANCHOR].get("shape", [0, 4])[1]
    if channels != 4:
        raise ModelError(f"{path}: a UNet with {channels} input channels (an inpainting or "
                         f"other special model); dreamd needs a plain text-to-image "
                         f"checkpoint (4 channels)")
    if any(k.startswith("conditioner.embedders.1.") for k in table):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in table):
        return "sd21"
    if any(k.startswith("cond_stage_model.transformer.") for k in table):
        return "sd15"
    context = next((t["shape"][1] for k, t in table.items()
                    if k.endswith("attn2.to_k.weight") and len(t.get("shape", [])) == 2), None)
    if context in CONTEXT_WIDTH:
        return CONTEXT_WIDTH[context]
    raise ModelError(f"{path}: a UNet without a text encoder dreamd knows (no "
                     f"cond_stage_model.* or conditioner.* tensors); use a full checkpoint")


def _what_else(table: dict[str, dict]) -> str:
    keys = list(table)
    if any("lora" in k for k in keys[:200]):
        return ": it looks like a LoRA; that goes in diffusion.lora"
    if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in keys[:200]):
        return ": it looks like a VAE"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys[:200]):
        return ": it looks like one diffusers component (a UNet or VAE alone)"
    return ""


def lora_family(path: Path) -> str | None:
    """The family a LoRA was trained for, from the input width of a cross-attention key
    projection (768 SD 1.x, 1024 SD 2.x, 2048 SDXL); None when the file does not say.
    A ModelError when it is no LoRA at all."""
    if path.suffix.lower() != ".safetensors":
        return None
    table = read_header(path)
    if not any("lora" in k.lower() for k in table):
        raise ModelError(f"{path}: not a LoRA (no lora_* tensors among its {len(table)}); "
                         f"diffusion.lora takes a LoRA .safetensors file, folder or hub id")
    widths = {t["shape"][1] for k, t in table.items()
              if ("attn2" in k and ("to_k" in k or "to.k" in k)
                  and ("lora_down" in k or "lora_A" in k or "lora.down" in k))
              and len(t.get("shape", [])) == 2}
    if any("text_encoder_2" in k or "lora_te2_" in k for k in table):
        return "sdxl"
    return next((CONTEXT_WIDTH[w] for w in widths if w in CONTEXT_WIDTH), None)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------- words for the user

def licence_notice(located: Located) -> str | None:
    """One line when the weights are published under a non-commercial licence."""
    text = _names(located)
    for pattern, name in NON_COMMERCIAL:
        if pattern.search(text):
            return (f"note: {located.name} looks like {name}, released under the Stability AI "
                    f"Non-Commercial Research Community License: not for commercial use without "
                    f"a licence from Stability AI (https://stability.ai/license)")
    return None


def few_step(located: Located) -> bool:
    """A model distilled to make an image in a few steps (turbo, lightning, LCM...)."""
    return bool(FEW_STEP.search(_names(located)))


def _names(located: Located) -> str:
    """What a model is called: its hub id and file (or folder) name, never the folders
    above it (a "turbo-tests/" directory does not make a model turbo)."""
    return f"{located.hub_id or ''} {located.path.name}"
