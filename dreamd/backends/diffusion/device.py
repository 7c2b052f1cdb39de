"""Where the diffusion model runs, and in what precision: system.gpu when CUDA has it and
this torch build can run that card, else the CPU, with one line saying why.

A CUDA 13 torch (cu130) runs Turing (sm_75) and newer only; Maxwell and Pascal cards need a
cu126 build (research note §1.5). torch itself only warns deep inside the first kernel, so
the card is checked against torch.cuda.get_arch_list() before anything is placed on it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger("dreamd.diffusion")

DTYPES = ("auto", "fp32", "fp16", "bf16")
CU126_FIX = ("install a torch build that still ships kernels for it: `pip install torch "
             "--index-url https://download.pytorch.org/whl/cu126`")


@dataclass(frozen=True)
class Placement:
    device: str                     # "cpu" | "cuda:N"
    dtype: str                      # "fp32" | "fp16" | "bf16"
    reason: str                     # one line: what was chosen and why


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Can a build with these kernels (`sm_XY`, and `compute_XY` PTX that the driver can
    compile for newer cards) run a card of this compute capability? Cubins run on the same
    major version at an equal or higher minor; PTX runs on any card at or above it."""
    major, minor = capability
    for arch in arch_list:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch)
        if not m:
            continue
        a_major, a_minor = int(m.group(2)), int(m.group(3))
        if m.group(1) == "sm" and a_major == major and a_minor <= minor:
            return True
        if m.group(1) == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def place(device: str = "auto", gpu: int = 0, dtype: str = "auto") -> Placement:
    """The device and dtype for `diffusion.device` / `system.gpu` / `diffusion.dtype`.

    auto and cuda take CUDA GPU `gpu` when there is one this build runs, else the CPU (cuda
    says so as a warning); cpu is the CPU. dtype auto = fp16 on CUDA, fp32 on the CPU (fp16
    kernels on a CPU are slow or missing)."""
    import torch

    why = ""
    target = "cpu"
    if device in ("auto", "cuda"):
        if not torch.cuda.is_available():
            why = "CUDA has no GPU here" if device == "cuda" else "no CUDA GPU"
        elif gpu >= torch.cuda.device_count():
            why = f"system.gpu = {gpu}, but CUDA has {torch.cuda.device_count()} GPU(s)"
        else:
            cap = torch.cuda.get_device_capability(gpu)
            arches = torch.cuda.get_arch_list()
            if arch_supported(cap, arches):
                target = f"cuda:{gpu}"
            else:
                name = torch.cuda.get_device_name(gpu)
                why = (f"GPU {gpu} ({name}, compute capability {cap[0]}.{cap[1]}) cannot run "
                       f"this torch build ({torch.__version__}, kernels for "
                       f"{', '.join(arches) or 'none'}): {CU126_FIX}")
                log.warning("diffusion: %s; the model runs on the CPU meanwhile", why)
        if why and device == "cuda" and "compute capability" not in why:
            log.warning("diffusion.device = cuda, but %s: the model runs on the CPU", why)
    on_cuda = target.startswith("cuda")
    if dtype == "auto":
        chosen = "fp16" if on_cuda else "fp32"
    elif dtype == "fp16" and not on_cuda:
        chosen, why = "fp32", (why + "; " if why else "") + "fp16 on the CPU is slow: fp32"
    else:
        chosen = dtype
    reason = f"{target}, {chosen}" + (f" ({why})" if why else "")
    return Placement(device=target, dtype=chosen, reason=reason)


def torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
