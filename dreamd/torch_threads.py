"""How many CPU threads torch may use: set once, deliberately, before any torch work.

The daemon calls `configure_torch_threads(config value)` at start; the interpolation
worker's slerp and decode, and the local VAEs, then run with that many threads.
"""

from __future__ import annotations

import logging
import os

import torch

from dreamd.errors import ConfigError

log = logging.getLogger(__name__)

# torch.set_num_interop_threads raises once inter-op work has started, and only the
# first call can count: remember that we made it.
_interop_set = False


def configure_torch_threads(n: int | None) -> int:
    """Set torch's intra-op threads to `n` (None or 0: the measured default); return it.

    Inter-op threads can be set only once per process and only before torch has run
    parallel work; later calls leave them alone instead of raising.
    """
    global _interop_set
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ConfigError(f"torch threads must be a whole number >= 0 (0 = automatic), got {n!r}")
    threads = n or _default_threads()
    torch.set_num_threads(threads)
    if not _interop_set:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError as exc:       # torch already started its inter-op pool
            log.debug("torch inter-op threads already fixed (%s); leaving them", exc)
        _interop_set = True
    log.info("torch threads: intra-op %d, inter-op %d", torch.get_num_threads(),
             torch.get_num_interop_threads())
    return threads


def _default_threads() -> int:
    """Half the cores this process may run on, at least one.

    Measured on the 2-core machine (bench/RESULTS.md, "Torch threads"): 1 thread was as
    fast or faster than 2 for the torch workloads, and much faster under load (a 4-layer
    64-channel conv ~80-105 ms vs ~200 ms; slerp of 3x256x512, N=10, 32-133 ms vs
    142-269 ms), because
    the daemon always has other CPU work (the keyframe worker, the display writer) and
    torch's threads then wait on each other. Half the cores leaves the rest to that work;
    on bigger machines this is an extrapolation, and the config value overrides it.
    """
    try:
        cores = len(os.sched_getaffinity(0))   # what the scheduler allows, not os.cpu_count()
    except AttributeError:                    # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)
