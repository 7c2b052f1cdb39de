"""The keyframe backend interface: one img2img (or txt2img) step of the dream chain.

Implementations live in this folder: `procedural` (embedded, no GPU), `comfyui/` and
`diffusion/` (a diffusers model run in the daemon).
The keyframe worker claims a ledger row, builds a KeyframeRequest, calls `generate`
outside any transaction, and stores the returned image. Backends raise
TransientBackendError (retry) or PermanentBackendError (discard) from dreamd.errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from PIL import Image


@dataclass(frozen=True)
class KeyframeRequest:
    """Everything a backend needs to make keyframe `chain_index`."""

    chain_index: int
    width: int
    height: int
    seed: int
    theme: str                      # theme name, e.g. "ethereal"
    prompt: str                     # positive prompt text
    negative_prompt: str
    denoise: float                  # 0..1: how far the keyframe drifts from `image`
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "euler_ancestral"
    scheduler: str = "normal"
    image: Image.Image | None = None  # img2img input (RGB, width x height); None = txt2img
    # The sha256 of the input file as read, before any steering (= keyframes.sha256 of the
    # keyframe it is, when the input is the previous keyframe): a backend that keeps its
    # keyframes' latents feeds that latent instead of encoding `image` again.
    input_sha256: str | None = None
    # Chosen by the keyframe worker and committed to the ledger before the backend
    # is called, so a remote backend can re-attach to work it already submitted.
    prompt_id: str | None = None
    # The server an earlier attempt at this prompt_id went to (keyframes.server): asked
    # first on re-attach.
    server_hint: str | None = None
    # Called with a server's URL as soon as the backend knows that server has (or is about
    # to get) the prompt, so the ledger records it before a crash can lose it.
    on_server: Callable[[str], None] | None = field(default=None, compare=False, repr=False)
    # `image` as the PNG file it was read from, when that file already is an RGB PNG of
    # width x height: a remote backend may upload these bytes instead of encoding again.
    image_png: bytes | None = field(default=None, compare=False, repr=False)
    # The colour reference `image` was pulled towards (dreamd/quality/coherence.py), None
    # when coherence did not apply: a backend that feeds latents instead of `image` matches
    # its latent to this reference's with coherence.match_latent.
    palette: Any = field(default=None, compare=False, repr=False)


@dataclass
class KeyframeResult:
    image: Image.Image              # RGB, exactly width x height
    info: dict[str, Any] = field(default_factory=dict)   # backend details for logs/ledger


@runtime_checkable
class KeyframeBackend(Protocol):
    name: str                       # "procedural" | "comfyui" | "diffusers"

    def generate(self, request: KeyframeRequest) -> KeyframeResult:
        """Make one keyframe. Blocking; may take seconds."""
        ...

    def close(self) -> None:
        """Release connections, processes and memory."""
        ...

    # Optional, for the guard (dreamd/workers/controls.py `free`): `free()` gives the
    # backend's GPU memory back; `interrupt()` stops the keyframe in flight so that its
    # generate() raises KeyframeInterruptedError (the row is postponed, not failed) and
    # returns words for the log ("" when nothing was in flight).
