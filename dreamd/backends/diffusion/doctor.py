"""`dreamd doctor` on the in-process backend: is the model found, does it load (built on the
CPU, never run), which LoRA, tokenizer, device and dtype the daemon would use, and how
much memory its weights take (parameters x bytes). One (verdict, detail) line.
"""

from __future__ import annotations

import time

from dreamd.backends.diffusion import load
from dreamd.errors import ModelError


def check(cfg) -> tuple[str, str]:
    from dreamd.backends.diffusion.device import place

    d = cfg.diffusion
    try:
        plan = load.plan(cfg)
    except ModelError as exc:
        return "problem", f"diffusers: {exc} (the daemon would dream on the procedural backend)"
    placement = place(d.device, cfg.system.gpu, d.dtype)
    started = time.perf_counter()
    try:
        # loadable is proven by loading, on the CPU in half precision: the GPU stays free
        # and the RAM it takes is half the fp32 weights'; nothing is run
        pipe, family, scheduler = load.build(plan, dtype="fp16", device="cpu",
                                             scheduler=d.scheduler, allow_downloads=False)
    except ModelError as exc:
        return "problem", f"diffusers: {exc} (the daemon would dream on the procedural backend)"
    seconds = time.perf_counter() - started
    parameters = sum(p.numel() for name in ("unet", "vae", "text_encoder", "text_encoder_2")
                     if getattr(pipe, name, None) is not None
                     for p in getattr(pipe, name).parameters())
    tokens = len(pipe.tokenizer.get_vocab())
    ids = pipe.tokenizer("a dream").input_ids
    del pipe
    counted = load.Plan(**{**plan.__dict__, "parameters": parameters})
    parts = [
        f"diffusers: {plan.model.name} ({plan.model.where}, {load.FAMILY_NAMES[family]}) "
        f"loads ({seconds:.1f} s, built on the CPU, not run)",
        f"LoRA {plan.lora.name} fused" if plan.lora else "no LoRA",
        f"tokenizer {tokens:,} tokens ('a dream' -> {len(ids)} ids)",
        f"runs on {placement.reason}",
        f"{load.memory_estimate(counted, placement.dtype)}",
        f"scheduler {scheduler}, {d.steps} steps, guidance {d.guidance:g}",
    ]
    if plan.notice:
        parts.append(plan.notice)
    # asked for the GPU and not on it, or weights known to be non-commercial: worth a look
    warn = (d.device == "cuda" and not placement.device.startswith("cuda")) or (
        "compute capability" in placement.reason)
    return ("warning" if warn else "ok"), "; ".join(parts)
