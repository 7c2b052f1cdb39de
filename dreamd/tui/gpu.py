"""GPU readings for the dashboard, through pynvml: per device VRAM, utilisation and
temperature. A machine without an NVIDIA GPU (or its driver) gets a reason, never an
exception: the dashboard says "no NVIDIA GPU" and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    used_mb: float
    total_mb: float
    utilisation: int | None      # percent
    temperature: int | None      # degrees C


@dataclass(frozen=True)
class Reading:
    devices: tuple[Device, ...]
    problem: str | None = None   # why there are none ("no NVIDIA GPU: …")


def read() -> Reading:
    """One reading of every device (about a millisecond with a driver)."""
    try:
        import pynvml
    except ImportError:
        return Reading((), "no NVIDIA GPU: pynvml (nvidia-ml-py) is not installed")
    try:
        pynvml.nvmlInit()
    except Exception as exc:       # NVMLError_LibraryNotFound, DriverNotLoaded, …
        return Reading((), f"no NVIDIA GPU ({_reason(exc)})")
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            devices.append(Device(
                i, name.decode() if isinstance(name, bytes) else str(name),
                mem.used / 2**20, mem.total / 2**20,
                _maybe(lambda: pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                _maybe(lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))))
        return Reading(tuple(devices), None if devices else "no NVIDIA GPU (the driver lists none)")
    except Exception as exc:
        return Reading((), f"GPU readings failed: {_reason(exc)}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _maybe(fn):
    """Some boards (and MIG slices) do not report every value: None, not a failure."""
    try:
        return fn()
    except Exception:
        return None


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
