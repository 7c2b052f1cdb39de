"""GPU contention on the generation GPU (`system.gpu`), read through pynvml: another
process above a memory or a compute threshold means a game (or anything else) wants
the GPU. Processes of this daemon and ComfyUI's are never counted.

Without pynvml, an NVIDIA driver or the GPU index, the watch says it is unavailable
and reports nothing; process detection (games.py) works on regardless.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import psutil

log = logging.getLogger("dreamd.guard")
GB = 1024 ** 3


def is_ours(pid: int) -> bool:
    """This process, its children (a supervised ComfyUI) and any ComfyUI on the machine:
    their GPU use is the dream's own, never a reason to pause."""
    me = psutil.Process()
    if pid == me.pid or any(c.pid == pid for c in me.children(recursive=True)):
        return True
    try:
        return "comfyui" in " ".join(psutil.Process(pid).cmdline()).lower()
    except psutil.Error:
        return False


def _name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return f"pid {pid}"


class GpuWatch:
    """`state` says what the watch can do: "off", "unavailable: …" or "watching …"."""

    def __init__(self, index: int, vram_gb: float, utilization_percent: float, *,
                 nvml: Any = None, ours: Callable[[int], bool] = is_ours) -> None:
        self.index, self.vram_gb, self.utilization = index, vram_gb, utilization_percent
        self.ours = ours
        self.nvml = nvml
        self.handle = None
        self.last_sample = 0          # NVML's timestamp (µs) of the last utilisation sample
        self.state = "off"
        if vram_gb <= 0 and utilization_percent <= 0:
            return
        try:
            if self.nvml is None:
                import pynvml as nvml_module
                self.nvml = nvml_module
            self.nvml.nvmlInit()
            self.handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
            name = self.nvml.nvmlDeviceGetName(self.handle)
            name = name.decode() if isinstance(name, bytes) else name
            self.state = f"watching GPU {index} ({name})"
        except Exception as exc:          # no module, no driver, no such GPU
            self.handle = None
            self.state = f"unavailable: {exc or type(exc).__name__}"

    def contention(self) -> str | None:
        """What another process is doing to the GPU, when it crosses a threshold."""
        if self.handle is None:
            return None
        nvml, ours = self.nvml, self.ours
        if self.vram_gb > 0:
            used: dict[int, int] = {}
            for getter in ("nvmlDeviceGetComputeRunningProcesses",
                           "nvmlDeviceGetGraphicsRunningProcesses"):
                try:
                    for p in getattr(nvml, getter)(self.handle):
                        # Windows (WDDM) may not report a process's memory: None
                        if p.usedGpuMemory and not ours(p.pid):
                            used[p.pid] = max(used.get(p.pid, 0), int(p.usedGpuMemory))
                except Exception as exc:
                    log.debug("%s: %s", getter, exc)
            if used:
                pid, most = max(used.items(), key=lambda kv: kv[1])
                if most > self.vram_gb * GB:
                    return f"GPU busy: {_name(pid)} uses {most / GB:.1f} GB"
        if self.utilization > 0:
            try:
                samples = nvml.nvmlDeviceGetProcessUtilization(self.handle, self.last_sample)
            except Exception:             # NVML_ERROR_NOT_FOUND: no sample since the last
                samples = []
            busiest: dict[int, int] = {}
            for s in samples:
                self.last_sample = max(self.last_sample, int(s.timeStamp))
                if not ours(s.pid):
                    busiest[s.pid] = max(busiest.get(s.pid, 0), int(s.smUtil))
            if busiest:
                pid, util = max(busiest.items(), key=lambda kv: kv[1])
                if util > self.utilization:
                    return f"GPU busy: {_name(pid)} at {util} %"
        return None

    def close(self) -> None:
        if self.handle is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass
            self.handle = None
