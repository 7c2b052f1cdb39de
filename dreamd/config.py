"""Configuration: one optional TOML file, typed and validated at load.

Every key has a built-in default (the schema below is the single source of truth;
docs/configuration.md is generated from it by dreamd/config_reference.py, and
tests/test_docs.py fails when the two differ).
`load()` finds the file, validates it, applies the data-dir override and records
where each value came from, so `dreamd config show` can say so.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import platformdirs

from dreamd.errors import ConfigError

CONFIG_ENV = "DREAMD_CONFIG"
DATA_DIR_ENV = "DREAMD_DATA_DIR"
CONFIG_NAME = "dreamd.toml"


def key(default: Any, doc: str, *, min: float | None = None, max: float | None = None,
        choices: tuple[str, ...] | None = None, check: Any = None, live: bool = False,
        step: float | None = None, path: bool = False) -> Any:
    """A config key: its default, its one-line doc and what values are allowed.

    `live`: `dreamd set` may change it while the daemon runs (a knob). `step`: the knob's
    increment on the surfaces that step it (the dashboard's keys, the web viewer's and
    the skin's buttons): the knobs with a step are the ones they offer. `path`: a file or
    folder, taken relative to the config file's folder when written relative."""
    assert step is None or live, "only a live knob has a step"
    meta = {"doc": doc, "min": min, "max": max, "choices": choices, "check": check,
            "live": live, "step": step, "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: _copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if is_dataclass(value):
        return type(value)(**{f.name: _copy(getattr(value, f.name)) for f in fields(value)})
    return value


def _resolution(value: list[int]) -> str | None:
    if len(value) != 2:
        return "two integers [width, height]"
    if any(v % 8 or not 64 <= v <= 4096 for v in value):
        return "[width, height], each a multiple of 8 between 64 and 4096"
    return None


def _url(value: str) -> str | None:
    return None if re.match(r"^https?://[^\s/]+", value) else "an http:// or https:// URL"


def _urls(value: list[str]) -> str | None:
    if not value:
        return "at least one URL"
    bad = [u for u in value if _url(u)]
    return f"http:// or https:// URLs ({bad[0]!r} is not one)" if bad else None


_MAPPING_VALUE = re.compile(r"^([^.\s]+\.inputs\.[^.\s]+)?$")


def _mapping(value: dict[str, str]) -> str | None:
    bad = [k for k, v in value.items() if not _MAPPING_VALUE.match(v)]
    return (f"values written \"<node id>.inputs.<input name>\" or \"\" ({bad[0]} = "
            f"{value[bad[0]]!r} is not)") if bad else None


def _subfolder(value: str) -> str | None:
    parts = value.split("/")
    if value and all(p and p not in (".", "..") and "\\" not in p and ":" not in p
                     for p in parts):
        return None
    return "a relative folder name without '..', '\\' or ':'"


def _four_words(value: list[str]) -> str | None:
    return None if len(value) == 4 else "four strings: dawn, day, dusk, night"


@dataclass
class Theme:
    name: str = key("", "a short name, shown in the status and the history")
    positive: str = key("", "the positive prompt")
    negative: str = key("", "the negative prompt")


DEFAULT_THEMES = [
    Theme("ethereal",
          "ethereal digital angel, dissolving particles, technical wireframe, "
          "monochrome with cyan and red accents, soft glow, dark background",
          "blurry, lowres, text, watermark, oversaturated"),
    Theme("cathedral",
          "wireframe cathedral of light, monochrome, cyan glow, red accents, "
          "particles drifting upward, architectural geometry",
          "blurry, lowres, text, watermark"),
    Theme("signal",
          "dissolving signal, glitch particles, thin cyan lines, red pulse, "
          "monochrome void, technical diagram",
          "blurry, lowres, text, watermark"),
]

# Process names of common games (the executable that holds the GPU, not the launcher:
# Steam, Epic and Battle.net idle in the background all day). Matched case-insensitively,
# with or without ".exe", so Proton and native Linux builds match too.
DEFAULT_GAMES = [
    "eldenring.exe", "cs2.exe", "dota2.exe", "valorant-win64-shipping.exe",
    "fortniteclient-win64-shipping.exe", "overwatch.exe", "cyberpunk2077.exe", "bg3.exe",
    "bg3_dx11.exe", "witcher3.exe", "rdr2.exe", "gta5.exe", "r5apex.exe",
    "league of legends.exe", "destiny2.exe", "starfield.exe", "helldivers2.exe",
    "cod.exe", "rocketleague.exe", "minecraft.windows.exe", "palworld-win64-shipping.exe",
    "marvel-win64-shipping.exe", "ffxiv_dx11.exe", "wow.exe",
]


@dataclass
class System:
    data_dir: str = key("", "where the ledger, frames and logs live; empty = the platform's "
                            "user data dir (relative paths are relative to the config file)", path=True)
    log_level: str = key("INFO", "log verbosity", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    gpu: int = key(0, "GPU index used for generation (ComfyUI's CUDA_VISIBLE_DEVICES, local "
                      "models, VRAM readings)", min=0, max=64)
    torch_threads: int = key(0, "torch CPU threads; 0 = the measured default (1 on small machines)",
                             min=0, max=256)


@dataclass
class Generation:
    backend: str = key("procedural", "keyframe backend: procedural (embedded, no GPU), comfyui "
                                     "(a ComfyUI server), diffusers (a model run in-process, "
                                     "[diffusion])", choices=("procedural", "comfyui", "diffusers"))
    resolution: list[int] = key([512, 256], "keyframe size [width, height]", check=_resolution)
    interpolation_frames: int = key(10, "in-between frames per keyframe pair", min=0, max=240,
                                    live=True, step=1)
    denoise: float = key(0.3, "img2img strength: how far each keyframe drifts from the last",
                         min=0.01, max=1.0, live=True, step=0.05)
    steps: int = key(20, "diffusion steps per keyframe (ComfyUI)", min=1, max=200, live=True)
    cfg: float = key(7.0, "classifier-free guidance scale (ComfyUI)", min=0.0, max=30.0,
                     live=True)
    sampler: str = key("euler_ancestral", "sampler name (checked against the ComfyUI server)")
    scheduler: str = key("normal", "scheduler name (checked against the ComfyUI server)")
    seed: int = key(0, "base seed; keyframe k uses a seed derived from it and k", min=0,
                    max=2**53)
    resolution_divisor: float = key(1.0, "interpolate at 1/divisor size and upscale after "
                                         "decoding (2 = half size, 1.333 = 3/4)", min=1.0, max=8.0)
    codec: str = key("auto", "latent codec for in-betweens",
                     choices=("auto", "taesd", "sd-vae", "pixel"))
    codec_path: str = key("", "explicit weight file for the codec (empty = look for one)", path=True)
    codec_device: str = key("auto", "where the codec runs: auto = the GPU system.gpu when CUDA "
                                    "has it, else the CPU; cuda = the same, with a warning when "
                                    "it falls back; cpu keeps it off a GPU ComfyUI uses",
                            choices=("auto", "cpu", "cuda"))
    codec_precision: str = key("auto", "auto = fp16 on CUDA, on the CPU bf16 when a probe on "
                                       "your weights finds it faster and within 1/255 of fp32",
                               choices=("auto", "fp32", "bf16", "fp16"))
    codec_variant: str = key("auto", "SD 1.x/2.x or SDXL latents; auto reads it from the "
                                     "weights (or xl in the file name)",
                             choices=("auto", "sd", "xl"))
    seeds_dir: str = key("", "starting images (PNG/JPEG); empty = the checkout's seeds/ plus "
                             "<data_dir>/seeds", path=True)
    max_attempts: int = key(3, "tries per keyframe or interpolation before it is discarded",
                            min=1, max=100)
    lease_seconds: float = key(60.0, "how long a worker's claim lasts without a heartbeat",
                               min=5.0, max=3600.0)


@dataclass
class Display:
    fps: float = key(4.0, "frames shown per second", min=0.1, max=60.0, live=True, step=1.0)
    buffer_target_seconds: float = key(30.0, "how far ahead of the playhead frames are made",
                                       min=1.0, max=3600.0, live=True)
    min_buffer_seconds: float = key(5.0, "the status says buffering until this much is ready",
                                    min=0.0, max=3600.0, live=True)
    max_output_frames: int = key(2000, "shown frames kept on disk (segment starts included); "
                                       "older ones are deleted", min=10, max=10_000_000, live=True)
    output_dir: str = key("", "where current_frame.png, previous_frame.png and status.json "
                              "are written; empty = <data_dir>/output", path=True)


@dataclass
class Cache:
    # Similarity thresholds at 0 take the embedder's own scale (dreamd/memory/embedder.py):
    # CLIP and the descriptor put the same pair of pictures at different similarities.
    enabled: bool = key(True, "the aesthetic memory: embeddings, the cache, collapse "
                              "detection and injections")
    injections: bool = key(True, "false = embed, admit and measure (`dreamd stats`), but never "
                                 "inject: the chain runs as if there were no memory")
    embedder: str = key("auto", "auto = open_clip when its weights are on this machine, else "
                                "the descriptor (colour + structure, no weights)",
                        choices=("auto", "open_clip", "descriptor"))
    clip_model: str = key("ViT-B-32", "open_clip architecture name, or a path to a model "
                                      "config .json")
    clip_pretrained: str = key("laion2b_s34b_b79k", "open_clip weights: a file path, or a tag "
                                                    "looked up in open_clip's local cache")
    allow_downloads: bool = key(False, "let open_clip download missing weights (never by "
                                       "default: the daemon says which file it needs)")
    embed_midpoints: bool = key(False, "also embed the middle in-between of each pair (more "
                                       "cache candidates, more CPU)")
    max_backlog: int = key(16, "embeddings waiting beyond this are skipped (counted in "
                               "`dreamd stats`) so the memory never holds playback back",
                           min=1, max=100_000)
    max_size: int = key(50, "frames kept in the cache (least recently used leave first)",
                        min=1, max=100_000)
    similarity_threshold: float = key(0.0, "a frame joins the cache when its highest "
                                           "similarity to the members is below this; 0 = the "
                                           "embedder's default", min=0.0, max=1.0)
    collapse_window: int = key(8, "keyframes whose mean pairwise similarity measures collapse",
                               min=2, max=1000)
    collapse_threshold: float = key(0.0, "mean similarity of the window at which the chain "
                                         "counts as collapsing; 0 = the embedder's default",
                                    min=0.0, max=1.0)
    warmup_keyframes: int = key(10, "keyframes at the start of a chain with no injections",
                                min=0, max=1_000_000)
    cooldown_keyframes: int = key(3, "keyframes after an injection before the next one",
                                  min=1, max=1_000_000)
    injection_probability: float = key(0.25, "base chance per keyframe of an injection",
                                       min=0.0, max=1.0)
    collapse_probability: float = key(0.8, "chance per keyframe of an injection while "
                                           "collapsing", min=0.0, max=1.0)
    band_min: float = key(0.0, "an injected cached frame is at least this similar to the "
                               "current look (related); 0 = the embedder's default",
                          min=0.0, max=1.0)
    band_max: float = key(0.0, "…and at most this similar (different); 0 = the embedder's "
                               "default", min=0.0, max=1.0)
    injection_weight: float = key(0.6, "share of the cached frame in the blended input",
                                  min=0.0, max=1.0)
    seed_probability: float = key(0.1, "base chance that an injection uses a seed image instead "
                                       "of the cache (grows with each cache injection in a "
                                       "row)", min=0.0, max=1.0)
    seed_force_after: int = key(4, "after this many cache injections in a row the next "
                                   "injection is a seed", min=1, max=1000)
    seed_weight: float = key(0.6, "share of the seed image in the blended input",
                             min=0.0, max=1.0)


@dataclass
class Prompts:
    themes: list[Theme] = key(DEFAULT_THEMES, "positive/negative prompt pairs, as "
                                              "[[prompts.themes]] tables with name, positive, "
                                              "negative")
    rotation_interval: int = key(20, "keyframes before the next theme", min=1, max=1_000_000,
                                 live=True)
    time_of_day: bool = key(False, "append a word for the local time of day to every prompt "
                                   "(from time_of_day_words)")
    time_of_day_words: list[str] = key(["at dawn", "in daylight", "at dusk", "at night"],
                                       "what is appended from 05:00, 08:00, 17:00 and 20:00 "
                                       "local time", check=_four_words)


@dataclass
class ComfyUI:
    urls: list[str] = key(["http://127.0.0.1:8188"], "ComfyUI servers, tried in order of health",
                          check=_urls)
    workflow: str = key("sd15_img2img", "a workflow name in workflows/ or a path to an "
                                        "API-format JSON file")
    checkpoint: str = key("v1-5-pruned-emaonly.safetensors", "checkpoint the workflow loads")
    models_dir: str = key("", "ComfyUI's models/ dir, searched for VAE/TAESD weights", path=True)
    start_command: str = key("", "command that starts ComfyUI (split like a shell would, never "
                                 "run by one); empty = do not supervise")
    fallback: str = key("none", "what to do while every server is down",
                        choices=("none", "procedural"))
    txt2img_workflow: str = key("sd15_txt2img", "workflow for the first keyframe when there is "
                                                "no seed image (a name in workflows/ or a path)")
    mapping: dict[str, str] = key({}, "where the daemon's values go in `workflow`, as key = "
                                      "\"<node id>.inputs.<name>\" (\"\" = leave it to the "
                                      "workflow); empty = found by walking the graph",
                                  check=_mapping)
    txt2img_mapping: dict[str, str] = key({}, "the same for `txt2img_workflow`", check=_mapping)
    poll_interval_seconds: float = key(0.25, "how often /history is asked while a prompt runs",
                                       min=0.01, max=10.0)
    deadline_seconds: float = key(300.0, "a prompt not finished by then is interrupted (if it "
                                         "is ours and running) and retried", min=1.0,
                                  max=86_400.0)
    connect_timeout_seconds: float = key(3.0, "HTTP connect timeout per request", min=0.1,
                                         max=120.0)
    read_timeout_seconds: float = key(30.0, "HTTP read timeout per request", min=0.5,
                                      max=3600.0)
    lookup_timeout_seconds: float = key(5.0, "deadline of a health check or a /history or "
                                             "/queue look-up (never retried on a timeout: a "
                                             "server that accepts and never answers is "
                                             "benched after one)", min=0.5, max=120.0)
    push: bool = key(True, "follow each prompt over ComfyUI's websocket (/ws) and read "
                           "/history when it says the prompt ended; false = poll /history")
    tries: int = key(4, "tries per HTTP request before a server counts as down (POST /prompt "
                        "is retried only when nothing was sent)", min=1, max=20)
    bench_seconds_max: float = key(300.0, "longest a failing server is benched (the bench "
                                          "doubles from 2 s on each failure)", min=1.0,
                                   max=86_400.0)
    upload_subfolder: str = key("dreamd", "subfolder of ComfyUI's input dir for uploaded "
                                          "images", check=_subfolder)
    start_cwd: str = key("", "working directory of `start_command` (relative paths are "
                             "relative to the config file); empty = the daemon's", path=True)
    start_env: dict[str, str] = key({}, "extra environment for `start_command` "
                                        "(CUDA_VISIBLE_DEVICES is set from system.gpu "
                                        "unless given here: an explicit one wins)")
    start_argv: list[str] = key([], "the command as a list, one argument each, never split "
                                    "(wins over start_command; no quoting to get right on "
                                    "Windows)")
    max_restarts_per_hour: int = key(10, "restarts of a dying `start_command` per hour before "
                                         "the daemon gives up on it", min=0, max=1000)
    log_file: str = key("", "where the output of `start_command` is appended; empty = "
                            "<data_dir>/logs/comfyui.log", path=True)


def _process_names(value: list[str]) -> str | None:
    bad = [n for n in value if not n.strip() or "/" in n or "\\" in n]
    return (f"process names like \"eldenring.exe\", not paths or empty strings "
            f"({bad[0]!r} is not one)") if bad else None


@dataclass
class Governor:
    # dreamd/governor/law.py: keeps production ahead of playback without tuning
    enabled: bool = key(True, "choose the interpolation frames N and the interpolation size "
                              "from measured keyframe and in-between times, between your "
                              "generation.interpolation_frames / resolution_divisor and the "
                              "maxima below; false = exactly your settings (no stretch either)",
                      live=True)
    max_interpolation_frames: int = key(120, "the most in-betweens per pair it may choose "
                                             "when keyframes are slow", min=0, max=240)
    max_resolution_divisor: float = key(4.0, "the smallest interpolation size it may choose "
                                             "when in-betweens are slow (4 = 1/4 size)",
                                        min=1.0, max=8.0)
    stretch: bool = key(True, "slow the display gently (down to min_stretch of display.fps) "
                              "while the buffer is low, before it runs out")
    min_stretch: float = key(0.85, "the slowest display rate while stretching, as a share of "
                                   "display.fps", min=0.5, max=1.0)
    dwell_seconds: float = key(30.0, "the shortest time between two changes of N or size",
                               min=1.0, max=3600.0)


ACTIONS = ("keep", "pause", "free")     # a presence rule's action (dreamd/guard/reasons.py)


@dataclass
class Guard:
    # dreamd/guard/ and dreamd/workers/guard.py: the game guard
    enabled: bool = key(True, "the guard: pause generation (and free VRAM) while a known "
                              "game runs, a full-screen window is in front, on battery or "
                              "with the session locked (each rule's on_* key says what it "
                              "does); resume once every reason is gone; false = all off")
    known_games: list[str] = key(DEFAULT_GAMES, "process names that pause the dream "
                                                "(case-insensitive, \".exe\" optional)",
                                 check=_process_names)
    check_interval_seconds: float = key(2.0, "how often the process list (and the GPU) is read",
                                        min=0.5, max=3600.0)
    resume_after_seconds: float = key(60.0, "how long the game must have been gone before "
                                            "generation resumes by itself", min=0.0,
                                      max=86_400.0)
    gpu_vram_gb: float = key(0.0, "pause while another process holds more than this much "
                                  "memory on the generation GPU (system.gpu; pynvml, NVIDIA "
                                  "only); 0 = off", min=0.0, max=1024.0)
    gpu_utilization_percent: float = key(0.0, "pause while another process uses more than "
                                              "this share of the generation GPU's compute; "
                                              "0 = off", min=0.0, max=100.0)
    # presence rules (dreamd/guard/presence.py): keep = the rule is off, pause = pause
    # generation, free = pause and give the GPU back (the keyframe in flight interrupted)
    on_game: str = key("free", "what a known game or GPU contention does: keep (nothing), "
                               "pause, or free (pause, interrupt the keyframe in flight and "
                               "give the GPU back)", choices=ACTIONS)
    on_fullscreen: str = key("pause", "what a full-screen or maximised window in front does "
                                      "(Windows: covering 95 % of its monitor, or Direct3D "
                                      "exclusive full-screen; never the desktop, the taskbar "
                                      "or Rainmeter): keep, pause or free", choices=ACTIONS)
    on_battery: str = key("pause", "what running on battery does: keep, pause or free",
                          choices=ACTIONS)
    on_battery_saver: str = key("pause", "what battery saver does (Windows reports it): "
                                         "keep, pause or free", choices=ACTIONS)
    on_locked: str = key("pause", "what a locked session or a display asleep does (Windows: "
                                  "the lock screen; Linux: logind's LockedHint / IdleHint): "
                                  "keep, pause or free", choices=ACTIONS)
    fullscreen_ignore: list[str] = key([], "process names whose windows never count as "
                                           "full-screen (Rainmeter and the wallpaper hosts "
                                           "never do)", check=_process_names)
    presence_resume_seconds: float = key(3.0, "how long a full-screen window, the battery "
                                              "or the lock must have been gone before that "
                                              "reason ends (so a click on the taskbar does "
                                              "not flap the pause); a game waits "
                                              "resume_after_seconds", min=0.0, max=86_400.0)


@dataclass
class Storage:
    # dreamd/storage/retention.py: what each kind of file and row may cost, and for how long
    budget_gb: float = key(2.0, "size budget of the data dir; over it the oldest deletable "
                                "files go first (0 = no budget)", min=0.0, max=1_000_000.0)
    min_free_gb: float = key(1.0, "free-space floor of the disk: below it generation pauses "
                                  "and playback goes on from the buffer (0 = no floor)",
                             min=0.0, max=1_000_000.0)
    keyframe_hours: float = key(24.0, "keyframe images older than this are deleted (their "
                                      "rows stay as history); 0 = keep (the budget still "
                                      "applies)", min=0.0, max=1_000_000.0)
    thumbnails: bool = key(True, "keep a small thumbnail (thumbs/) when a keyframe image goes")
    frame_history_hours: float = key(24.0, "rows of frames, their embeddings (cache members "
                                           "stay) and transitions older than this are pruned; "
                                           "0 = keep everything", min=0.0, max=1_000_000.0)
    history_days: float = key(7.0, "rows of keyframes, interpolations, injections, "
                                   "controls and governor decisions (and thumbnails) older "
                                   "than this are pruned; "
                                   "0 = keep everything", min=0.0, max=1_000_000.0)


@dataclass
class Quality:
    # dreamd/quality/: the controls against what img2img loops do to a dream over hours
    # (README "Colour drift and stagnation"); the measurements themselves need no keys
    coherence: str = key("histogram", "pull each img2img input towards the palette of its "
                                      "theme run's first keyframe against colour drift: "
                                      "histogram = match the CIELAB histograms, mean = match "
                                      "CIELAB mean and spread, off", live=True,
                         choices=("histogram", "mean", "off"))
    coherence_strength: float = key(0.5, "how far each input is pulled towards the reference "
                                         "palette (0 = not at all, 1 = all the way)",
                                    min=0.0, max=1.0, live=True)
    stagnation_floor: float = key(2.3, "a keyframe changed less than this from the previous "
                                       "one (mean delta E) counts as stagnant", min=0.0,
                                  max=100.0, live=True)
    stagnation_keyframes: int = key(4, "stagnant keyframes in a row that start a break "
                                       "(0 = never break)", min=0, max=10_000, live=True)
    breaker_keyframes: int = key(3, "keyframes a break lasts, made at breaker_denoise",
                                 min=1, max=1000, live=True)
    breaker_denoise: float = key(0.6, "the denoise of a break's keyframes (never below "
                                      "generation.denoise)", min=0.01, max=1.0, live=True)
    ease: str = key("linear", "slerp positions of the in-betweens: linear = even steps; "
                              "smooth = slower near each keyframe, so the change of direction "
                              "there does not pop", choices=("linear", "smooth"), live=True)


@dataclass
class Diffusion:
    # dreamd/backends/diffusion/: the in-process backend (generation.backend = "diffusers")
    model: str = key("", "a checkpoint (.safetensors/.ckpt: a path, or a name in "
                         "comfyui.models_dir/checkpoints), a diffusers folder, or a hub id in "
                         "the Hugging Face cache (`dreamd models pull`); empty = "
                         "comfyui.checkpoint when comfyui.models_dir has it, else "
                         "stable-diffusion-v1-5/stable-diffusion-v1-5")
    family: str = key("auto", "auto reads it from the weights; sd15 = SD 1.x, sd21 = SD 2.x "
                              "at 512 (SD-Turbo), sdxl", choices=("auto", "sd15", "sd21", "sdxl"))
    config_dir: str = key("", "the diffusers config folder a single-file checkpoint is built "
                              "from; empty = the one shipped for its family", path=True)
    lora: str = key("auto", "a LoRA (a file, a name in comfyui.models_dir/loras, a folder or a "
                            "hub id); auto = the family's LCM-LoRA, unless the model already "
                            "makes images in a few steps (turbo, lightning, lcm); none = none")
    steps: int = key(4, "denoising steps; raised when steps x generation.denoise < 1, so at "
                        "least one runs", min=1, max=200)
    guidance: float = key(1.0, "classifier-free guidance; 1 or less = none (LCM, turbo); above "
                               "1 doubles the UNet's work", min=0.0, max=30.0)
    scheduler: str = key("auto", "auto = lcm with an LCM model or LoRA, else euler_a (trailing "
                                 "timesteps, right for turbo and lightning models)",
                         choices=("auto", "lcm", "euler_a", "euler", "ddim", "dpmpp_2m"))
    dtype: str = key("auto", "auto = fp16 on CUDA, fp32 on the CPU",
                     choices=("auto", "fp32", "fp16", "bf16"))
    device: str = key("auto", "auto = the GPU system.gpu when CUDA has it and this torch build "
                              "can run it, else the CPU; cuda = the same, with a warning when "
                              "it falls back; cpu", choices=("auto", "cpu", "cuda"))
    seed_policy: str = key("per-keyframe", "per-keyframe = each keyframe's own seed (from "
                                           "generation.seed and its index); fixed = "
                                           "generation.seed every time (the same noise: "
                                           "steadier, but texture can stick)",
                           choices=("per-keyframe", "fixed"))
    allow_downloads: bool = key(False, "let diffusers fetch missing files from the hub while "
                                       "loading (never by default: `dreamd models pull` "
                                       "fetches, `dreamd run` stays offline)")


LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


@dataclass
class Web:
    # dreamd/web/: the viewer `dreamd run` serves (README "The web viewer")
    enabled: bool = key(True, "serve the web viewer while the daemon runs")
    host: str = key("127.0.0.1", "address the viewer listens on; anything but 127.0.0.1 or "
                                 "localhost also needs web.expose = true")
    port: int = key(8719, "the viewer's port (0 = any free port, said at start)",
                    min=0, max=65535)
    expose: bool = key(False, "allow a web.host other than loopback: every control then "
                              "needs the token stored in <data_dir>/web-token")
    controls: bool = key(True, "offer pause, resume, theme, denoise, fps and interpolation "
                               "frames on the page (false = a page that only shows)")
    fit: str = key("cover", "how a frame fills the viewer's page: cover = the whole page, "
                            "edges cropped; contain = the whole frame, black bars; stretch = "
                            "the whole page, distorted (a page's ?fit= overrides it, so each "
                            "monitor's page can have its own)",
                   choices=("cover", "contain", "stretch"))


@dataclass
class Config:
    system: System = field(default_factory=System)
    generation: Generation = field(default_factory=Generation)
    display: Display = field(default_factory=Display)
    cache: Cache = field(default_factory=Cache)
    prompts: Prompts = field(default_factory=Prompts)
    comfyui: ComfyUI = field(default_factory=ComfyUI)
    guard: Guard = field(default_factory=Guard)
    governor: Governor = field(default_factory=Governor)
    storage: Storage = field(default_factory=Storage)
    diffusion: Diffusion = field(default_factory=Diffusion)
    quality: Quality = field(default_factory=Quality)
    web: Web = field(default_factory=Web)
    # Where each value came from, by key path ("display.fps" -> "default" | "file:…" | …).
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    file: Path | None = field(default=None, compare=False, repr=False)

    @property
    def data_dir(self) -> Path:
        return Path(self.system.data_dir)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "dreamd.db"

    @property
    def output_dir(self) -> Path:
        return Path(self.display.output_dir) if self.display.output_dir else self.data_dir / "output"

    @property
    def frames_dir(self) -> Path:
        """In-between and decoded keyframe frames (retention deletes old ones)."""
        return self.data_dir / "frames"

    @property
    def keyframes_dir(self) -> Path:
        """Raw keyframes as the backend made them (kept)."""
        return self.data_dir / "keyframes"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "dreamd.pid"

    def seed_dirs(self) -> list[Path]:
        """Where starting images are looked for, in order."""
        if self.generation.seeds_dir:
            return [Path(self.generation.seeds_dir)]
        dirs = [self.data_dir / "seeds"]
        checkout = Path(__file__).resolve().parents[1] / "seeds"
        if checkout.is_dir():
            dirs.insert(0, checkout)
        return dirs


SECTIONS = [f.name for f in fields(Config) if is_dataclass(f.default_factory)]  # type: ignore[arg-type]


def key_paths() -> list[tuple[str, Any]]:
    """Every documented key as ("section.key", dataclass field)."""
    return list(_key_paths())


@functools.cache
def _key_paths() -> tuple[tuple[str, Any], ...]:
    # the schema never changes while the program runs, and evaluating its annotations
    # (get_type_hints) is dear: the surfaces check knobs several times a second
    out = []
    for section in SECTIONS:
        cls = _section_class(section)
        out.extend((f"{section}.{f.name}", f) for f in fields(cls))
    return tuple(out)


def live_knobs() -> dict[str, Any]:
    """The keys `dreamd set` may change while the daemon runs, in schema order."""
    return {p: f for p, f in key_paths() if f.metadata["live"]}


def live_key(key: str) -> str:
    """`key` when it is a live knob, else a ConfigError that suggests the one meant."""
    live = sorted(live_knobs())
    if key in live:
        return key
    known = [p for p, _ in key_paths()]
    if key in known:
        raise ConfigError(f"{key} cannot be set while running: live keys are {', '.join(live)}")
    hint = difflib.get_close_matches(key, live, n=1) or difflib.get_close_matches(key, known, n=1)
    extra = f"; did you mean {hint[0]}?" if hint else ""
    raise ConfigError(f"unknown key {key!r}{extra} (live keys: {', '.join(live)})")


def stepped_knobs() -> dict[str, tuple[float, float, float]]:
    """{knob: (step, lowest, highest)} for the knobs the surfaces step with a key or a
    button, from the schema (so their ranges cannot drift from the config's)."""
    return {p: (f.metadata["step"], f.metadata["min"], f.metadata["max"])
            for p, f in key_paths() if f.metadata["step"] is not None}


def path_keys() -> list[tuple[str, Any]]:
    """The keys that name a file or folder."""
    return [(p, f) for p, f in key_paths() if f.metadata["path"]]


def _section_class(section: str) -> type:
    return _type_hints(Config)[section]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


# ---------------------------------------------------------------- validation

def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is list:
        (inner,) = get_args(tp)
        # "a list of strings", not "a list of a strings"
        return f"a list of {_type_name(inner).split(' ', 1)[-1]}s" if inner is not Theme \
            else "a list of tables"
    if origin is dict:
        inner = _type_name(get_args(tp)[1])
        return f"a table of {inner.split(' ', 1)[-1]}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Theme: "a table"}.get(tp, str(tp))


def _check_value(path: str, value: Any, tp: Any, meta: dict[str, Any]) -> Any:
    """Return the value converted to `tp`, or raise ConfigError naming `path`."""
    def fail(allowed: str) -> ConfigError:
        return ConfigError(f"{path} = {value!r} is invalid: expected {allowed}")

    origin = get_origin(tp)
    if origin is list:
        (inner,) = get_args(tp)
        if not isinstance(value, list):
            raise fail(_type_name(tp))
        items = [_check_value(f"{path}[{i}]", v, inner, {}) for i, v in enumerate(value)]
        value = items
    elif origin is dict:
        # a table of name -> value (mappings, environments): names are TOML keys, so strings
        _, inner = get_args(tp)
        if not isinstance(value, dict):
            raise fail(_type_name(tp))
        value = {k: _check_value(f"{path}.{k}", v, inner, {}) for k, v in value.items()}
    elif is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail("a table")
        value = _build(tp, value, path, sources=None, origin="")
    elif tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        value = float(value)
        if not math.isfinite(value):    # NaN passes every range check: refuse it here
            raise fail("a finite number")
    elif tp is str:
        if not isinstance(value, str):
            raise fail("a string")

    lo, hi, choices, check = meta.get("min"), meta.get("max"), meta.get("choices"), meta.get("check")
    if choices and value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise fail("one of " + ", ".join(repr(c) for c in choices) + extra)
    if lo is not None and value < lo or hi is not None and value > hi:
        raise fail(f"a value between {lo:g} and {hi:g}")
    if check is not None and (problem := check(value)):
        raise fail(problem)
    return value


def _build(cls: type, table: dict[str, Any], prefix: str, sources: dict[str, str] | None,
           origin: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for name in table:
        if name not in known:
            where = f"{prefix}.{name}" if prefix else name
            hint = difflib.get_close_matches(name, list(known), n=1)
            extra = f"; did you mean {prefix + '.' if prefix else ''}{hint[0]}?" if hint else ""
            raise ConfigError(f"unknown key {where!r}{extra} (known here: {', '.join(known)})")
    obj = cls()
    for name, value in table.items():
        path = f"{prefix}.{name}" if prefix else name
        setattr(obj, name, _check_value(path, value, hints[name], dict(known[name].metadata)))
        if sources is not None:
            sources[path] = origin
    return obj


def _cross_checks(cfg: Config) -> None:
    d = cfg.display
    if d.min_buffer_seconds > d.buffer_target_seconds:
        raise ConfigError(
            f"display.min_buffer_seconds = {d.min_buffer_seconds:g} is invalid: expected a value "
            f"no larger than display.buffer_target_seconds ({d.buffer_target_seconds:g})")
    c = cfg.cache
    if c.band_min and c.band_max and c.band_min > c.band_max:
        raise ConfigError(f"cache.band_min = {c.band_min:g} is invalid: expected a value no "
                          f"larger than cache.band_max ({c.band_max:g})")
    themes = cfg.prompts.themes
    if not themes:
        raise ConfigError("prompts.themes = [] is invalid: expected at least one theme")
    names = [t.name for t in themes]
    for i, t in enumerate(themes):
        if not t.name.strip():
            raise ConfigError(f"prompts.themes[{i}].name = {t.name!r} is invalid: expected a "
                              f"non-empty name")
        if not t.positive.strip():
            raise ConfigError(f"prompts.themes[{i}].positive = {t.positive!r} is invalid: "
                              f"expected a prompt")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"prompts.themes: the name {dupes[0]!r} is used twice: expected "
                          f"unique names")
    w = cfg.web
    if w.host not in LOOPBACK_HOSTS and not w.expose:
        raise ConfigError(f"web.host = {w.host!r} is invalid: expected 127.0.0.1 or localhost, "
                          f"or set web.expose = true to serve the viewer beyond this machine "
                          f"(every control then needs the token in <data_dir>/web-token)")


# ---------------------------------------------------------------- loading

def user_config_file() -> Path:
    return Path(platformdirs.user_config_dir("dreamd", appauthor=False)) / CONFIG_NAME


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("dreamd", appauthor=False))


def _not_a_file(path: Path) -> str:
    if path.is_dir():
        return f"is a directory, not a config file (did you mean {path / CONFIG_NAME}?)"
    return "no such file"


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> tuple[Path | None, str]:
    """Where the config comes from: (path or None, how it was found)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"--config {explicit}: {_not_a_file(path)}")
        return path, "--config"
    env = os.environ.get(CONFIG_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError(f"${CONFIG_ENV}={env}: {_not_a_file(path)}")
        return path, f"${CONFIG_ENV}"
    local = Path.cwd() / CONFIG_NAME
    if local.is_file():
        return local, "./" + CONFIG_NAME
    user = user_config_file()
    if user.is_file():
        return user, "user config dir"
    return None, "no file: built-in defaults"


def _backslash_hint(text: str, exc: tomllib.TOMLDecodeError) -> str:
    """A Windows path in double quotes ("C:\\ComfyUI\\models") is the usual cause of a
    bad escape: TOML reads `\\C` as an escape. Point at single quotes, which take a
    backslash as it is."""
    where = re.search(r"at line (\d+)", str(exc))
    lines = text.splitlines()
    if not where or not 0 < int(where.group(1)) <= len(lines):
        return ""
    line = lines[int(where.group(1)) - 1]
    quoted = re.search(r'"([^"]*\\[^"]*)"?', line)
    if quoted is None:
        return ""
    value = quoted.group(1)
    return (f"; a backslash in double quotes starts an escape: write a Windows path in "
            f"single quotes, '{value}' (or double each backslash)")


def parse(text: str, origin: str = "<string>", base_dir: Path | None = None,
          sources: dict[str, str] | None = None) -> Config:
    """Validate TOML text into a Config (no data-dir override, no file lookup)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}{_backslash_hint(text, exc)}") from None
    sources = {} if sources is None else sources
    cfg = Config()
    for section, table in raw.items():
        if section not in SECTIONS:
            hint = difflib.get_close_matches(section, SECTIONS, n=1)
            extra = f"; did you mean [{hint[0]}]?" if hint else ""
            raise ConfigError(f"{origin}: unknown section [{section}]{extra} "
                              f"(sections: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{origin}: {section} = {table!r} is invalid: expected a "
                              f"[{section}] table")
        try:
            setattr(cfg, section, _build(_section_class(section), table, section, sources,
                                         f"file:{origin}"))
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    try:
        _cross_checks(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    if base_dir is not None:
        for key_path, _ in path_keys():
            section, name = key_path.split(".")
            obj = getattr(cfg, section)
            value = getattr(obj, name)
            if value and not Path(value).expanduser().is_absolute():
                setattr(obj, name, str((base_dir / value).resolve()))
    return cfg


def load(config_file: str | os.PathLike[str] | None = None,
         data_dir: str | os.PathLike[str] | None = None) -> Config:
    """The effective config: file lookup, validation, then the data-dir override."""
    path, how = find_config_file(config_file)
    sources: dict[str, str] = {}
    if path is None:
        cfg = Config()
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        cfg = parse(text, str(path), base_dir=path.parent.resolve(), sources=sources)
    cfg.file = path
    for path_, _ in key_paths():
        sources.setdefault(path_, "default")

    env_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        cfg.system.data_dir, sources["system.data_dir"] = str(data_dir), "--data-dir"
    elif env_dir:
        cfg.system.data_dir, sources["system.data_dir"] = env_dir, f"${DATA_DIR_ENV}"
    elif not cfg.system.data_dir:
        cfg.system.data_dir = str(default_data_dir())
        sources["system.data_dir"] = "default (platform user data dir)"
    cfg.system.data_dir = str(Path(cfg.system.data_dir).expanduser().resolve())
    cfg.sources = sources
    return cfg


def check_file(path: str | os.PathLike[str]) -> Config:
    """Validate one file; raises ConfigError naming the key when it is wrong."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: {_not_a_file(p)}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse(text, str(p), base_dir=p.parent.resolve())


def check_key(path: str, raw: str) -> Any:
    """Parse and validate one value written as TOML (`dreamd set KEY=VALUE`)."""
    fields_ = dict(key_paths())
    if path not in fields_:
        hint = difflib.get_close_matches(path, list(fields_), n=1)
        extra = f"; did you mean {hint[0]}?" if hint else ""
        raise ConfigError(f"unknown key {path!r}{extra}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw     # a bare word: take it as a string, the type check decides
    return check_value(path, value)


def check_value(path: str, value: Any) -> Any:
    """Validate one already-typed value (a knob stored in the ledger as JSON)."""
    fields_ = dict(key_paths())
    if path not in fields_:
        raise ConfigError(f"unknown key {path!r}")
    section, name = path.split(".")
    tp = _type_hints(_section_class(section))[name]
    return _check_value(path, value, tp, dict(fields_[path].metadata))


def flatten(cfg: Config) -> list[tuple[str, Any]]:
    """("section.key", value) for every key, in schema order."""
    out = []
    for path, _ in key_paths():
        section, name = path.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, list) and value and is_dataclass(value[0]):
            value = [{f.name: getattr(v, f.name) for f in fields(v)} for v in value]
        out.append((path, value))
    return out


def to_toml(cfg: Config) -> str:
    """The effective config as TOML, each value annotated with where it came from."""
    lines: list[str] = []
    current = None
    for path, value in flatten(cfg):
        section, name = path.split(".")
        if section != current:
            lines.append(f"\n[{section}]")
            current = section
        source = cfg.sources.get(path, "default")
        if section == "prompts" and name == "themes":
            lines.append(f"# themes: {source}")
            continue
        lines.append(f"{name} = {_toml_value(value)}  # {source}")
    for theme in cfg.prompts.themes:
        lines.append("\n[[prompts.themes]]")
        for f in fields(theme):
            lines.append(f"{f.name} = {_toml_value(getattr(theme, f.name))}")
    return "\n".join(lines).lstrip() + "\n"


def _toml_value(value: Any) -> str:
    import json
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}"
                                for k, v in value.items()) + " }"
    return json.dumps(str(value))


def _toml_key(name: str) -> str:
    import json
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)
