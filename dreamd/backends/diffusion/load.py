"""From the [diffusion] config to a diffusers img2img pipeline on its device, offline.

    plan(cfg)                  which model, which family, which LoRA: found and checked from
                               file headers only (no torch); a ModelError names the file and
                               the fix. What the backend checks at start and `doctor` reports.
    build(plan, placement)     the pipeline: from_single_file(config=<shipped skeleton>) for a
                               checkpoint, from_pretrained(local_files_only) for a folder or a
                               hub snapshot, the LoRA loaded and fused, the scheduler set
    skeleton_dir(family)       the config skeleton shipped for a family (package data)

Offline first (research note §3): a single file is built from the skeleton's configs, never
from the configs diffusers would otherwise download; the tokenizer is built from open_clip's
BPE; HF_HUB_OFFLINE is set while loading unless diffusion.allow_downloads.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from dreamd.backends.diffusion import locate as where
from dreamd.backends.diffusion.locate import Located
from dreamd.conditions import OUT_OF_MEMORY, classify
from dreamd.errors import ModelError

log = logging.getLogger("dreamd.diffusion")

SKELETONS = Path(__file__).parent / "skeletons"
FAMILY_NAMES = {"sd15": "SD 1.x", "sd21": "SD 2.x", "sdxl": "SDXL"}
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def skeleton_dir(family: str) -> Path:
    return SKELETONS / family


@dataclass(frozen=True)
class Plan:
    """The model and LoRA a config asks for, found and checked (light: no torch)."""

    model: Located
    family: str | None            # None: a .ckpt whose family is read when it is loaded
    lora: Located | None
    parameters: int               # from the headers (0 when not known before loading)
    notice: str | None            # the licence line, when the weights are non-commercial
    config_dir: Path | None       # a user's skeleton (diffusion.config_dir), else None
    few_step: bool                # turbo / lightning / LCM: made for 1-4 steps


def plan(cfg) -> Plan:
    """Find and check what [diffusion] asks for; ModelError (with the fix) when it cannot
    be used. Reads headers and configs only."""
    d = cfg.diffusion
    wanted = None if d.family == "auto" else d.family
    base = cfg.file.parent if getattr(cfg, "file", None) else None
    models_dir = cfg.comfyui.models_dir or None
    model = where.locate(d.model, models_dir=models_dir, checkpoint=cfg.comfyui.checkpoint,
                         base_dir=base, family=wanted)
    parameters = 0
    if model.kind == "file":
        info = where.inspect_file(model.path)
        found, parameters = info.family, info.parameters
    else:
        found = model.family
        missing = where.missing_parts(model.path, found or wanted)
        if missing:
            fix = (f"`{where.pull_command(model.hub_id)}` again to finish the download"
                   if model.hub_id else "save the whole pipeline there again")
            raise ModelError(f"{model.path}: incomplete model folder (no weights for "
                             f"{', '.join(missing)}): {fix}")
        parameters = _folder_parameters(model)
    if wanted and found and wanted != found:
        raise ModelError(f"diffusion.family = {wanted!r}, but {model.path} holds an "
                         f"{FAMILY_NAMES[found]} model: set diffusion.family = \"auto\" (or "
                         f"\"{found}\")")
    family = found or wanted
    config_dir = Path(d.config_dir) if d.config_dir else None
    if config_dir is not None and not (config_dir / "model_index.json").is_file():
        raise ModelError(f"diffusion.config_dir = {str(config_dir)!r}: no model_index.json "
                         f"there; point it at a diffusers config folder, or leave it empty")
    few = where.few_step(model)
    lora = _lora(cfg, model, family, few, models_dir, base)
    return Plan(model=model, family=family, lora=lora, parameters=parameters,
                notice=where.licence_notice(model), config_dir=config_dir, few_step=few)


def _lora(cfg, model: Located, family: str | None, few: bool, models_dir, base) -> Located | None:
    spec = cfg.diffusion.lora.strip()
    if spec.lower() in ("", "none"):
        return None
    if spec.lower() == "auto":
        hub_id = where.LCM_LORA.get(family or "")
        if few or hub_id is None:
            return None         # already few-step, or no LCM-LoRA for this family
        for f in (where.find_checkpoints(models_dir, "loras") if models_dir else []):
            try:
                fits = _lora_fits(f, family) is None
            except ModelError:
                fits = False        # not a LoRA at all: not the one auto looks for
            if "lcm" in f.name.lower() and fits:
                return Located(spec="auto", kind="file", path=f, family=family,
                               where="loras/ of comfyui.models_dir", files=(f,))
        try:
            lora = where.locate(hub_id, what="lora", key="diffusion.lora")
        except where.ModelNotFoundError:
            raise where.ModelNotFoundError(
                f"diffusion.lora = \"auto\": the LCM-LoRA for {FAMILY_NAMES[family]} "
                f"({hub_id}) is not on this machine: run `{where.pull_command(hub_id)}` "
                f"(or set diffusion.lora = \"none\" and use a few-step model)") from None
    else:
        lora = where.locate(spec, what="lora", key="diffusion.lora", models_dir=models_dir,
                            base_dir=base)
    problem = _lora_fits(lora.path, family)
    if problem:
        raise ModelError(f"diffusion.lora: {lora.path} {problem}; the model {model.name} is "
                         f"{FAMILY_NAMES.get(family or '', 'of another family')}: use a LoRA "
                         f"made for it (or diffusion.lora = \"none\")")
    return lora


def _lora_fits(path: Path, family: str | None) -> str | None:
    """None when the LoRA can go on a model of `family` (or it cannot be told from the
    header); else what is wrong, in words."""
    made_for = where.lora_family(path)
    if made_for and family and made_for != family:
        return f"was made for {FAMILY_NAMES[made_for]} models"
    return None


def _folder_parameters(model: Located) -> int:
    total = 0
    for f in model.files:
        if f.suffix == ".safetensors":
            try:
                table = where.read_header(f)
            except ModelError:
                continue
            total += sum(where._numel(t.get("shape", [])) for t in table.values())
    return total


def memory_estimate(p: Plan, dtype: str) -> str:
    """Weights in memory: parameters x bytes per parameter (activations come on top)."""
    if not p.parameters:
        return "size not known before loading (a .ckpt)"
    size = p.parameters * BYTES.get(dtype, 4)
    said = f"{size / 2**30:.1f} GiB" if size >= 2**30 / 10 else f"{size / 2**20:.0f} MiB"
    return f"about {said} of weights ({p.parameters / 1e6:,.1f} M parameters in {dtype})"


# ---------------------------------------------------------------- building

@contextmanager
def offline(allowed: bool) -> Iterator[None]:
    """No network while loading unless allowed: HF_HUB_OFFLINE for libraries imported from
    now on, and huggingface_hub's own switch for those already imported."""
    if allowed:
        yield
        return
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants
    was = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = was
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def quiet() -> None:
    """diffusers' and transformers' progress bars and advice stay out of dreamd.log: the
    backend says what matters in its own lines."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def pipeline_class(family: str):
    if family == "sdxl":
        from diffusers import StableDiffusionXLImg2ImgPipeline
        return StableDiffusionXLImg2ImgPipeline
    from diffusers import StableDiffusionImg2ImgPipeline
    return StableDiffusionImg2ImgPipeline


def build(p: Plan, *, dtype: str = "fp32", device: str = "cpu", scheduler: str = "auto",
          allow_downloads: bool = False) -> tuple[Any, str, str]:
    """The img2img pipeline on `device` in `dtype`, with its LoRA fused and its scheduler
    set; returns (pipeline, family, scheduler name). ModelError names the file and the fix."""
    from dreamd.backends.diffusion.device import torch_dtype

    quiet()
    with offline(allow_downloads):
        # a .ckpt is read to be told; a folder of unknown widths is built as SD 1.x/2.x
        # (one pipeline class for both; only the tokenizer's padding differs)
        family = p.family or (_ckpt_family(p.model.path) if p.model.kind == "file" else "sd15")
        pipe = _load(p, family, torch_dtype(dtype), allow_downloads)
        if p.lora is not None:
            _fuse_lora(pipe, p, family)
    chosen = choose_scheduler(scheduler, p)
    set_scheduler(pipe, chosen)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if family == "sdxl" and dtype == "fp16":
        pipe.vae.to(dtype=torch_dtype("fp32"))   # the SDXL VAE overflows in fp16 (NaN images)
    if device.startswith("cuda"):
        import torch
        pipe.unet.to(memory_format=torch.channels_last)
    return pipe, family, chosen


def _ckpt_family(path: Path) -> str:
    """The family of a pickled .ckpt (its header cannot be read without unpickling)."""
    import torch
    try:
        sd = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except Exception as exc:
        raise ModelError(f"{path}: cannot be read as a torch checkpoint ({_first_line(exc)}); "
                         f"a damaged or truncated download? fetch or copy it again") from exc
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else {}
    table = {k: {"shape": list(v.shape)} for k, v in sd.items() if hasattr(v, "shape")}
    return where.family_of_keys(path, table)


def _load(p: Plan, family: str, dtype, allow_downloads: bool):
    from dreamd.backends.diffusion.tokenizer import clip_tokenizer

    cls = pipeline_class(family)
    extra: dict[str, Any] = {}
    if family != "sdxl":
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = p.model.path
    try:
        if p.model.kind == "file":
            extra["tokenizer"] = clip_tokenizer(family)
            if family == "sdxl":
                extra["tokenizer_2"] = clip_tokenizer("sdxl-2")
            config = p.config_dir or skeleton_dir(family)
            return cls.from_single_file(str(path), config=str(config), dtype=dtype,
                                        local_files_only=not allow_downloads, **extra)
        # a diffusers folder: its own tokenizer when it has one (a partial pull may not)
        if not (path / "tokenizer").is_dir():
            extra["tokenizer"] = clip_tokenizer(family)
        if family == "sdxl" and not (path / "tokenizer_2").is_dir():
            extra["tokenizer_2"] = clip_tokenizer("sdxl-2")
        variant = where.folder_variant(path)
        return cls.from_pretrained(str(path), dtype=dtype, variant=variant,
                                   local_files_only=not allow_downloads, **extra)
    except ModelError:
        raise
    except Exception as exc:
        if classify(exc) == OUT_OF_MEMORY:
            raise               # not the model's fault: the keyframe waits (dreamd.conditions)
        raise ModelError(explain_load_error(path, family, exc)) from exc


def explain_load_error(path: Path, family: str, exc: BaseException) -> str:
    """One line for a model that was found but would not load."""
    text = _first_line(exc)
    low = text.lower()
    if "size mismatch" in low or "shape" in low or "cannot copy out of meta" in low:
        return (f"{path}: its weights do not fit the {FAMILY_NAMES.get(family, family)} "
                f"architecture ({text[:200]}); set diffusion.family to the model's family, or "
                f"diffusion.config_dir to its configs")
    if any(w in low for w in ("safetensor", "header", "deserializ", "incomplete metadata",
                              "invalid load key", "pytorchstreamreader", "unexpected eof",
                              "zip", "truncated")):
        return (f"{path}: damaged or truncated ({text[:200]}): fetch or copy it again")
    if any(w in low for w in ("offline", "connect", "localentrynotfound", "cannot find the "
                              "requested files", "huggingface.co")):
        return (f"{path}: needs files that are not on this machine ({text[:200]}); run "
                f"`dreamd models pull <its hub id>` or set diffusion.allow_downloads = true once")
    return f"{path}: cannot be loaded ({type(exc).__name__}: {text[:300]})"


def _fuse_lora(pipe, p: Plan, family: str) -> None:
    lora = p.lora
    assert lora is not None
    try:
        pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name,
                               adapter_name="dreamd", local_files_only=True)
    except Exception as exc:
        if classify(exc) == OUT_OF_MEMORY:
            raise
        raise ModelError(f"diffusion.lora: {lora.path} does not fit the model {p.model.name} "
                         f"({_first_line(exc)[:200]}): use a LoRA made for "
                         f"{FAMILY_NAMES.get(family, family)} (or diffusion.lora = \"none\")") from exc
    if not pipe.get_list_adapters():
        raise ModelError(f"diffusion.lora: none of {lora.path}'s tensors fit the model "
                         f"{p.model.name}: use a LoRA made for {FAMILY_NAMES.get(family, family)} "
                         f"(or diffusion.lora = \"none\")")
    # fused into the weights and the adapter layers dropped: no LoRA cost per step
    pipe.fuse_lora(adapter_names=["dreamd"])
    pipe.unload_lora_weights()


# ---------------------------------------------------------------- schedulers

SCHEDULERS = ("lcm", "euler_a", "euler", "ddim", "dpmpp_2m")


def choose_scheduler(name: str, p: Plan) -> str:
    """auto: LCM for an LCM model or LoRA; else Euler ancestral with trailing timesteps (what
    turbo and lightning models are run with, and good at few steps)."""
    if name != "auto":
        return name
    text = f"{p.model.hub_id or ''} {p.model.path.name} " + (
        f"{p.lora.hub_id or ''} {p.lora.path.name}" if p.lora else "")
    return "lcm" if "lcm" in text.lower() else "euler_a"


def set_scheduler(pipe, name: str) -> None:
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler,
                           EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                           LCMScheduler)

    cls, extra = {
        "lcm": (LCMScheduler, {}),
        # trailing: the last step lands on t = 0 at 1-4 steps (the turbo and lightning setting)
        "euler_a": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}),
        "euler": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
        "ddim": (DDIMScheduler, {"timestep_spacing": "trailing"}),
        "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    }[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
