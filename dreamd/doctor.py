"""`dreamd doctor`: what this machine and config will actually use, and why.

It builds what the daemon would build (the latent codec, the embedder, the in-process
diffusion model: loaded on the CPU, never run), asks each ComfyUI server for
/system_stats and /object_info when the backend is ComfyUI (can it run the workflows:
checkpoint, sampler, scheduler, nodes), counts the seeds, and reads the GPU. Slow-ish (it loads torch and weights), so `status` stays light.
"""

from __future__ import annotations

import logging
from typing import Any

from dreamd.config import Config


def _check(name: str, fn) -> tuple[str, str, str]:
    try:
        verdict, detail = fn()
    except Exception as exc:  # doctor reports every failure, it never stops at one
        verdict, detail = "problem", f"{type(exc).__name__}: {exc}"
    return name, verdict, detail


def _ledger(cfg: Config):
    from dreamd.ledger import database
    current, head = database.current_revision(cfg.db_path), database.head_revision()
    if current is None:
        return "ok", f"{cfg.db_path} not created yet (the daemon creates it at start)"
    if current != head:
        return "warning", f"{cfg.db_path} at {current}; head is {head} (`dreamd db upgrade`)"
    return "ok", f"{cfg.db_path} at revision {current}"


def _torch(cfg: Config):
    import torch

    from dreamd.torch_threads import configure_torch_threads
    threads = configure_torch_threads(cfg.system.torch_threads or None)
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    detail = f"torch {torch.__version__}, {threads} CPU thread(s), CUDA {'yes' if cuda else 'no'}"
    if cuda:
        detail += f", {gpus} GPU(s); system.gpu = {cfg.system.gpu}"
        if cfg.system.gpu >= gpus:
            return "warning", detail + f": there is no GPU {cfg.system.gpu}"
        return "ok", detail
    # an NVIDIA card torch cannot use (a CPU-only build): say how to get the CUDA one
    from dreamd import cuda_check
    found = cuda_check.check(cuda_check.nvidia_gpus(), cuda_check.torch_build())
    if found:
        return found[0], f"{detail}; {found[1]}"
    return "ok", detail


def _gpu(cfg: Config):
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as exc:
        return "ok", f"n/a (no NVIDIA driver: {type(exc).__name__})"
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(cfg.system.gpu)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        name = pynvml.nvmlDeviceGetName(h)
        return "ok", (f"{name if isinstance(name, str) else name.decode()}: "
                      f"{mem.used / 2**30:.1f} of {mem.total / 2**30:.1f} GiB used")
    finally:
        pynvml.nvmlShutdown()


def _codec(cfg: Config):
    from dreamd.latent.choose import NO_CUDA, codec_for
    codec, reason = codec_for(cfg)          # the reason names the precision, and why
    codec.release()
    # asked for the GPU, on the CPU (the pixel codec, CPU by design, is not a warning)
    return ("warning" if NO_CUDA in reason else "ok"), reason


def _embedder(cfg: Config):
    if not cfg.cache.enabled:
        return "ok", "the aesthetic memory is off (cache.enabled = false)"
    from dreamd.memory.embedder import choose_embedder
    emb, reason = choose_embedder(cfg.cache)
    emb.close()
    return "ok", reason


def _seeds(cfg: Config):
    from dreamd.seeding import load_seeds
    found = []
    for d in cfg.seed_dirs():
        if d.is_dir():
            found.extend(load_seeds(d))
    where = ", ".join(str(d) for d in cfg.seed_dirs())
    if not found:
        return "ok", f"none in {where}: the first keyframe is painted from nothing"
    return "ok", f"{len(found)} usable in {where}"


def _backend(cfg: Config):
    if cfg.generation.backend == "procedural":
        return "ok", "procedural (embedded, no GPU or weights needed)"
    if cfg.generation.backend == "diffusers":
        from dreamd.backends.diffusion.doctor import check
        return check(cfg)
    from dreamd.backends.comfyui.doctor import check_servers
    return check_servers(cfg)


def _comfyui_folders(cfg: Config):
    from dreamd.backends.comfyui.folders import describe
    return describe(cfg)


def diagnose(cfg: Config) -> list[tuple[str, str, str]]:
    logging.getLogger().setLevel(logging.ERROR)   # the checks speak for themselves
    return [
        ("config", "ok", f"{cfg.file or 'no file: built-in defaults'}; data dir {cfg.data_dir}"),
        _check("ledger", lambda: _ledger(cfg)),
        _check("backend", lambda: _backend(cfg)),
        *([_check("folders", lambda: _comfyui_folders(cfg))]
          if cfg.generation.backend == "comfyui" else []),
        _check("torch", lambda: _torch(cfg)),
        _check("gpu", lambda: _gpu(cfg)),
        _check("codec", lambda: _codec(cfg)),
        _check("embedder", lambda: _embedder(cfg)),
        _check("seeds", lambda: _seeds(cfg)),
        _check("guard", lambda: _guard(cfg)),
    ]


def _guard(cfg: Config):
    """The game guard: what it watches, whether its GPU part can read the GPU, and any
    known game running now (the daemon would be paused)."""
    from dreamd.guard.games import GameWatch
    from dreamd.guard.gpu import GpuWatch

    g = cfg.guard
    if not g.enabled:
        return "ok", "off (guard.enabled = false)"
    games = GameWatch(g.known_games)
    running = games.running()
    gpu = GpuWatch(cfg.system.gpu, g.gpu_vram_gb, g.gpu_utilization_percent)
    gpu.close()
    detail = (f"{len(games.known)} game names every {g.check_interval_seconds:g} s, resumes "
              f"{g.resume_after_seconds:g} s after; GPU thresholds {gpu.state}")
    if running:
        detail += f"; running now: {', '.join(running)} (a daemon would pause)"
    detail += "; " + _presence(cfg)
    # thresholds asked for but unreadable: only the names are watched
    return ("warning" if gpu.state.startswith("unavailable") else "ok"), detail


def _presence(cfg: Config) -> str:
    """The presence rules: each one's action, whether this platform can tell, and what
    would pause a daemon now."""
    from dreamd.guard import presence
    from dreamd.guard.senses import for_platform

    g = cfg.guard
    senses = for_platform()
    ignore = presence.ignore_list(g.fullscreen_ignore)   # as the guard does
    rules = (("full-screen", g.on_fullscreen, "fullscreen",
              lambda look: presence.fullscreen(look, ignore)),
             ("battery", g.on_battery, "battery", presence.on_battery),
             ("battery saver", g.on_battery_saver, "saver", presence.battery_saver),
             ("locked", g.on_locked, "locked", presence.locked))
    look = senses.look(senses.can)
    said, now = [], []
    for name, action, part, sense in rules:
        if action == "keep":
            said.append(f"{name} off")
        elif part not in senses.can:
            said.append(f"{name} {action} (not readable on {senses.name})")
        else:
            said.append(f"{name} {action}")
            words = sense(look)
            if words:
                now.append(words)
    senses.close()
    out = "presence: " + ", ".join(said)
    if senses.broken:
        out += f" ({senses.broken}: the lock rule is off)"
    return out + (f"; now: {'; '.join(now)} (a daemon would pause)" if now else "")


def print_report(rows: list[tuple[str, str, str]], console: Any = None) -> None:
    from rich.console import Console
    console = console or Console()
    colour = {"ok": "green", "warning": "yellow", "problem": "red"}
    for name, verdict, detail in rows:
        console.print(f"[bold]{name:9}[/] [{colour.get(verdict, 'white')}]{verdict:8}[/] {detail}")
