"""`dreamd doctor`'s look for a torch that cannot use the NVIDIA GPU this machine has
(PyPI's torch for Windows is CPU-only, so the local codec runs on the CPU even with an
NVIDIA card): the GPUs (pynvml, else `nvidia-smi`), torch's build, and the command that
installs PyTorch's CUDA build into this environment.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

SELECTOR = "https://pytorch.org/get-started/locally/"
# CUDA builds PyTorch's wheel index has carried (download.pytorch.org/whl/cuXYZ); the
# newest one the driver runs is suggested, and the selector names the others
BUILDS = ((11, 8), (12, 1), (12, 4), (12, 6), (12, 8), (12, 9), (13, 0))


@dataclass(frozen=True)
class Gpus:
    names: list[str]
    driver_cuda: tuple[int, int] | None     # the newest CUDA the driver runs


@dataclass(frozen=True)
class TorchBuild:
    version: str
    cuda: str | None            # torch.version.cuda: None for a CPU-only build
    available: bool             # torch.cuda.is_available()


def nvidia_gpus() -> Gpus | None:
    """The NVIDIA GPUs the driver sees, or None when there is no driver."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:
        return _from_nvidia_smi()
    try:
        names = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
            names.append(name if isinstance(name, str) else name.decode())
        version = pynvml.nvmlSystemGetCudaDriverVersion()      # 12080 for 12.8
        return Gpus(names, (version // 1000, version % 1000 // 10)) if names else None
    except Exception:
        return _from_nvidia_smi()
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _from_nvidia_smi() -> Gpus | None:
    """`nvidia-smi -L` for the names ("GPU 0: NVIDIA GeForce RTX 3080 (UUID: ...)") and
    its table's header for the driver's CUDA version ("CUDA Version: 12.8")."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        listed = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10)
        table = subprocess.run([exe], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    names = re.findall(r"^GPU \d+: (.+?)(?: \(UUID: [^)]*\))?$", listed.stdout, re.M)
    if listed.returncode != 0 or not names:
        return None
    cuda = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", table.stdout)
    return Gpus(names, (int(cuda.group(1)), int(cuda.group(2))) if cuda else None)


def torch_build() -> TorchBuild:
    import torch
    return TorchBuild(torch.__version__, torch.version.cuda, torch.cuda.is_available())


def install_command(driver_cuda: tuple[int, int] | None, python: str | None = None) -> str:
    """PyTorch's selector command for its CUDA build (torch with the torchvision that
    matches it, as the selector gives them), for this environment's python."""
    fit = [b for b in BUILDS if driver_cuda is None or b <= driver_cuda]
    major, minor = fit[-1] if fit else BUILDS[0]
    exe = python or sys.executable
    exe = f'"{exe}"' if " " in exe else exe
    return (f"{exe} -m pip install --force-reinstall torch torchvision --index-url "
            f"https://download.pytorch.org/whl/cu{major}{minor}")


def check(gpus: Gpus | None, build: TorchBuild) -> tuple[str, str] | None:
    """A warning and what to do when an NVIDIA GPU is there and torch cannot use it;
    None when there is nothing to say (no NVIDIA GPU, or torch uses it)."""
    if gpus is None or build.available:
        return None
    gpu = ", ".join(gpus.names)
    driver = (f" (its driver runs CUDA up to {gpus.driver_cuda[0]}.{gpus.driver_cuda[1]})"
              if gpus.driver_cuda else "")
    if build.cuda is None:
        return "warning", (
            f"an NVIDIA GPU is here ({gpu}){driver} but torch {build.version} is a CPU-only "
            f"build (PyPI's torch for Windows is), so the local codec and embedder run on "
            f"the CPU. Install PyTorch's CUDA build: {install_command(gpus.driver_cuda)} "
            f"(or the command {SELECTOR} gives for your system), then `dreamd doctor` again")
    built = tuple(int(x) for x in re.findall(r"\d+", build.cuda)[:2])
    why = (f"the driver is older than the CUDA {build.cuda} this torch needs (update the "
           f"NVIDIA driver)" if gpus.driver_cuda and built > gpus.driver_cuda else
           "its CUDA libraries did not load (reinstall it)")
    return "warning", (
        f"an NVIDIA GPU is here ({gpu}){driver} and torch {build.version} is built for CUDA "
        f"{build.cuda}, but cannot use it: {why}; or install the build that fits the "
        f"driver: {install_command(gpus.driver_cuda)}")
