"""The in-process keyframe backend (generation.backend = "diffusers"): img2img on a diffusers
pipeline in the daemon, each keyframe's latent fed to the next one.

    generate(request)         one keyframe: the input as a latent (the previous keyframe's
                              own, found by its sha256, else the image VAE-encoded), the
                              prompt's embeddings from a per-theme cache, a seeded generator,
                              steps raised so at least one runs; decoded by TAESD when that is
                              the interpolation codec, else by the model's VAE
    keyframe_written(k, sha)  the keyframe worker's word that keyframe k is on disk as `sha`:
                              its latent is kept for the next img2img and the in-betweens
    free()                    the model leaves the GPU and RAM; the next keyframe loads it
    facts                     backend_now (diffusers | procedural), backend_problem (why the
                              model cannot be used: one line, with the fix), keyframe_progress

A model that cannot be found or loaded is one ModelError line; the dream goes on with the
procedural backend meanwhile and the model is looked for again every RECHECK_SECONDS (a
`dreamd models pull` finishing, a file copied into place). A CUDA out-of-memory error
unloads the model and is raised as it is: the keyframe worker postpones the keyframe
without using an attempt (dreamd.conditions), and the next try loads the model again.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from PIL import Image

from dreamd import platform
from dreamd.backends import KeyframeRequest, KeyframeResult
from dreamd.backends.diffusion import latents as kept
from dreamd.backends.diffusion import load
from dreamd.conditions import OUT_OF_MEMORY, classify
from dreamd.errors import KeyframeInterruptedError, ModelError, TransientBackendError
from dreamd.faults import pause_point

log = logging.getLogger("dreamd.diffusion")

RECHECK_SECONDS = 30.0      # how often an unusable model is looked for again
EMBEDDINGS_KEPT = 16        # prompts whose embeddings stay (themes x time-of-day words)
LATENTS_KEPT = 4            # keyframe latents kept in memory (the head and a few before)
REFERENCES_KEPT = 2         # colour references' latents (one per theme run)


class DiffusionBackend:
    name = "diffusers"

    def __init__(self, cfg, ctx: Any = None, fallback: Any = None) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.facts: dict[str, Any] = ctx.facts if ctx is not None else {}
        self.stopping: threading.Event = getattr(ctx, "stopping", None) or threading.Event()
        if fallback is None:
            from dreamd.backends.procedural import ProceduralBackend
            fallback = ProceduralBackend()
        self.fallback = fallback
        self._lock = threading.Lock()
        self._pipe: Any = None
        self._t2i: Any = None
        self._plan: load.Plan | None = None
        self._family: str | None = None
        self.scheduler: str | None = None
        self.placement = None
        self._problem: str | None = None
        self._failed_print: tuple | None = None
        self._retry_at = 0.0
        self._unload_after = False
        self._interrupting = False      # interrupt(): the keyframe being made stops at its next step
        self._clamp_said: set[tuple[int, float]] = set()
        self._embeds: OrderedDict[tuple, dict] = OrderedDict()
        self._latents: OrderedDict[str, Any] = OrderedDict()
        self._refs: OrderedDict[int, Any] = OrderedDict()
        self._last: tuple[int, Any, int, int] | None = None
        self._key: str | None = None
        self._codec_said = False
        self.loads = 0              # how many times the model was loaded (tests, bench)

    # ------------------------------------------------------------ start

    def start(self) -> DiffusionBackend:
        """Find the model now (headers only, no torch): a missing or unusable one is said at
        start, in one line, and the dream starts on the procedural fallback."""
        self.facts["comfyui_status"] = "n/a"
        try:
            self._plan = load.plan(self.cfg)
        except ModelError as exc:
            self._give_up(exc, None)
            return self
        self._publish(None)
        if self._plan.notice:
            log.warning("%s", self._plan.notice)
        log.info("diffusion model %s (%s, %s)%s", self._plan.model.name, self._plan.model.where,
                 load.FAMILY_NAMES.get(self._plan.family or "", "family read at load"),
                 f", LoRA {self._plan.lora.name}" if self._plan.lora else "")
        return self

    # ------------------------------------------------------------ KeyframeBackend

    def generate(self, request: KeyframeRequest) -> KeyframeResult:
        with self._lock:
            self._interrupting = False
            try:
                if not self._ready():
                    return self._fall_back(request)
                result = self._make(request)
            except Exception as exc:
                if classify(exc) == OUT_OF_MEMORY:
                    # give the card back now (a game, another model); the keyframe is
                    # postponed by the worker and the model loaded again for its retry
                    self._unload("out of memory")
                raise
            finally:
                self.facts["keyframe_progress"] = None
                if self._unload_after:
                    self._unload("free (asked while a keyframe was being made)")
        conditions = getattr(self.ctx, "conditions", None)
        if conditions is not None and conditions.active(OUT_OF_MEMORY):
            conditions.clear(OUT_OF_MEMORY)
        return result

    def keyframe_written(self, chain_index: int, sha256: str) -> None:
        """Keyframe `chain_index` is on disk as `sha256`: keep its latent (memory, and the
        data dir's latents/) for the next img2img and for its in-betweens. A latent that
        cannot be written costs speed only (the image is VAE-encoded instead)."""
        last = self._last
        if last is None or last[0] != chain_index:
            return                  # made by the fallback, or not by this backend
        _, latent, width, height = last
        self._latents[sha256] = latent
        while len(self._latents) > LATENTS_KEPT:
            self._latents.popitem(last=False)
        try:
            if self._key is not None:
                kept.save_feedback(self.cfg.data_dir, sha256, self._key, latent, width, height)
            codec = self._shared_codec()
            if codec is not None:
                kept.save_for_codec(self.cfg.data_dir, sha256, codec, latent, width, height)
        except Exception as exc:   # a full disk is said by the frames' own writes
            log.debug("keyframe %d: its latent was not stored: %s", chain_index, exc)

    def interrupt(self) -> str:
        """Stop the keyframe being made at its next denoising step (the guard, before it
        frees): generate() raises KeyframeInterruptedError and the model is unloaded
        right after by free(). "" when no keyframe was being made."""
        if not self._lock.locked():
            return ""
        self._interrupting = True
        return "the in-process keyframe"

    def free(self) -> dict[str, str]:
        """Unload the model (the game guard, `dreamd free`). A keyframe being made keeps it
        until it is done; the next keyframe loads it again."""
        if not self._lock.acquire(blocking=False):
            self._unload_after = True
            log.info("free: a keyframe is being made; the model is unloaded when it is done")
            return {}
        try:
            self._unload("free")
        finally:
            self._lock.release()
        return {}

    def close(self) -> None:
        with self._lock:
            self._unload(None)

    # ------------------------------------------------------------ the model

    def _ready(self) -> bool:
        """The pipeline is loaded (now, if need be); False while the model is unusable."""
        if self._pipe is not None:
            return True
        if self._problem is not None:
            if time.monotonic() < self._retry_at:
                return False
            self._retry_at = time.monotonic() + RECHECK_SECONDS
            try:
                plan = load.plan(self.cfg)
            except ModelError as exc:
                self._problem_changed(exc)
                return False
            if _prints(plan) == self._failed_print:
                return False        # the same files that failed: not worth a reload
            self._plan = plan
        if self._plan is None:
            try:
                self._plan = load.plan(self.cfg)
            except ModelError as exc:
                self._give_up(exc, None)
                return False
        return self._load(self._plan)

    def _load(self, plan: load.Plan) -> bool:
        from dreamd.backends.diffusion.device import place

        d = self.cfg.diffusion
        if self.placement is None:
            self.placement = place(d.device, self.cfg.system.gpu, d.dtype)
        started = time.perf_counter()
        try:
            pipe, family, scheduler = load.build(
                plan, dtype=self.placement.dtype, device=self.placement.device,
                scheduler=d.scheduler, allow_downloads=d.allow_downloads)
        except ModelError as exc:
            self._give_up(exc, plan)
            return False
        self._pipe, self._family, self.scheduler = pipe, family, scheduler
        self._key = kept.model_key(str(plan.model.hub_id or plan.model.path),
                                   plan.model.fingerprint(), family)
        self.loads += 1
        if self._problem is not None:
            log.warning("diffusion model %s is usable now: keyframes come from it again",
                        plan.model.name)
        self._problem, self._failed_print = None, None
        self._publish(None)
        log.info("diffusion model loaded in %.1f s: %s on %s, scheduler %s, %d steps, "
                 "guidance %g", time.perf_counter() - started, plan.model.name,
                 self.placement.reason, scheduler, d.steps, d.guidance)
        return True

    def _unload(self, why: str | None) -> None:
        self._unload_after = False
        if self._pipe is None:
            return
        device = str(getattr(self._pipe, "device", "cpu"))
        self._pipe = self._t2i = None
        self._embeds.clear()
        self._refs.clear()
        gc.collect()
        platform.give_heap_back()
        if device.startswith("cuda"):
            import torch
            torch.cuda.empty_cache()
        if why:
            log.info("diffusion model unloaded (%s): its memory is given back; the next "
                     "keyframe loads it again", why)

    def _give_up(self, exc: ModelError, plan: load.Plan | None) -> None:
        self._failed_print = _prints(plan) if plan is not None else None
        self._retry_at = time.monotonic() + RECHECK_SECONDS
        self._problem = str(exc)
        log.error("diffusion model unusable: %s -- the dream goes on with the procedural "
                  "backend meanwhile", exc)
        self._publish(self._problem)

    def _problem_changed(self, exc: ModelError) -> None:
        if str(exc) != self._problem:
            self._problem = str(exc)
            log.warning("diffusion model still unusable: %s", exc)
            self._publish(self._problem)

    def _publish(self, problem: str | None) -> None:
        self.facts["backend_now"] = "procedural" if problem else "diffusers"
        self.facts["backend_problem"] = (
            f"diffusers: {problem}; dreaming on the procedural backend meanwhile" if problem
            else None)

    def _fall_back(self, request: KeyframeRequest) -> KeyframeResult:
        result = self.fallback.generate(request)
        result.info.update(backend="procedural", fallback=True)
        return result

    # ------------------------------------------------------------ one keyframe

    def _make(self, request: KeyframeRequest) -> KeyframeResult:
        import torch

        d = self.cfg.diffusion
        pipe = self._pipe
        seed = request.seed if d.seed_policy == "per-keyframe" else self.cfg.generation.seed
        guidance = float(d.guidance)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        embeds = self._embeddings(request, guidance)
        common = dict(guidance_scale=guidance, generator=generator, output_type="latent",
                      callback_on_step_end=self._on_step(request.chain_index))
        with torch.inference_mode():
            if request.image is None:
                steps, how = d.steps, "txt2img"
                latents = self._text2image()(**embeds, **common, height=request.height,
                                             width=request.width,
                                             num_inference_steps=steps).images
            else:
                steps = self._steps(d.steps, request.denoise)
                latent, how = self._input_latent(request)
                latents = pipe(**embeds, **common, image=latent, strength=request.denoise,
                               num_inference_steps=steps).images
            if self.stopping.is_set():
                raise TransientBackendError("dreamd is stopping")
            if self._interrupting:
                raise KeyframeInterruptedError(f"keyframe {request.chain_index} was "
                                               "interrupted for a pause")
            image = self._decode(latents)
        self._last = (request.chain_index, latents[0].detach().to("cpu", torch.float32),
                      request.width, request.height)
        log.debug("keyframe %d: input %s, seed %d, %d steps", request.chain_index, how, seed,
                  steps)
        return KeyframeResult(image=image, info={"backend": "diffusers", "seed": int(seed),
                                                 "steps": steps, "input": how})

    def _steps(self, steps: int, denoise: float) -> int:
        """img2img runs int(steps x denoise) steps: at least one must run (diffusers crashes
        on zero: 'cannot reshape tensor of 0 elements', issue #11092)."""
        need = steps
        while int(need * denoise) < 1:
            need += 1
        if need != steps and (steps, denoise) not in self._clamp_said:
            self._clamp_said.add((steps, denoise))
            log.info("diffusion.steps = %d at denoise %g would run no step: %d steps "
                     "(%d run) instead", steps, denoise, need, int(need * denoise))
        return need

    def _text2image(self):
        """The same models as a text-to-image pipeline (the first keyframe, with no seed)."""
        if self._t2i is None:
            from diffusers import AutoPipelineForText2Image
            self._t2i = AutoPipelineForText2Image.from_pipe(self._pipe)
            self._t2i.set_progress_bar_config(disable=True)
        return self._t2i

    def _embeddings(self, request: KeyframeRequest, guidance: float) -> dict:
        """The prompt's text embeddings, computed once per prompt (a theme's prompts come
        back every keyframe of its run)."""
        cfg = guidance > 1.0
        key = (request.prompt, request.negative_prompt if cfg else None, cfg)
        hit = self._embeds.get(key)
        if hit is not None:
            self._embeds.move_to_end(key)
            return hit
        pipe = self._pipe
        if self._family == "sdxl":
            pe, npe, ppe, nppe = pipe.encode_prompt(
                prompt=request.prompt, device=pipe.device, num_images_per_prompt=1,
                do_classifier_free_guidance=cfg,
                negative_prompt=request.negative_prompt if cfg else None)
            value = dict(prompt_embeds=pe, negative_prompt_embeds=npe,
                         pooled_prompt_embeds=ppe, negative_pooled_prompt_embeds=nppe)
        else:
            pe, npe = pipe.encode_prompt(request.prompt, pipe.device, 1, cfg,
                                         request.negative_prompt if cfg else None)
            value = dict(prompt_embeds=pe, negative_prompt_embeds=npe)
        self._embeds[key] = value
        while len(self._embeds) > EMBEDDINGS_KEPT:
            self._embeds.popitem(last=False)
        return value

    def _input_latent(self, request: KeyframeRequest):
        """The img2img input as the UNet's latent: the previous keyframe's own when the
        input is that keyframe (its sha256), colour-matched in latent space when the worker
        steered the input (request.palette); else `image` encoded by the VAE."""
        pipe = self._pipe
        sha = getattr(request, "input_sha256", None)
        latent = None
        if sha:
            latent = self._latents.get(sha)
            if latent is None and self._key is not None:
                latent = kept.load_feedback(self.cfg.data_dir, sha, self._key)
        size = (request.height // pipe.vae_scale_factor, request.width // pipe.vae_scale_factor)
        if latent is not None and tuple(latent.shape[-2:]) == size:
            how = "latent"
            palette = getattr(request, "palette", None)
            if palette is not None:
                from dreamd.quality.coherence import match_latent
                latent = match_latent(latent, self._reference(palette), palette.strength)
                how = "latent, colour-matched"
            latent = latent.unsqueeze(0) if latent.ndim == 3 else latent
            return latent.to(pipe.device, pipe.unet.dtype), how
        return self._encode(request.image), "encoded"

    def _encode(self, image: Image.Image):
        """An image -> the UNet's scaled latent (the posterior mean: deterministic)."""
        pipe = self._pipe
        vae = pipe.vae
        x = pipe.image_processor.preprocess(image).to(vae.device, vae.dtype)
        latent = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        return latent.to(pipe.device, pipe.unet.dtype)

    def _reference(self, palette):
        """The colour reference's latent, encoded once per reference keyframe."""
        ref = self._refs.get(palette.keyframe_id)
        if ref is None:
            ref = self._encode(palette.image())
            self._refs[palette.keyframe_id] = ref
            while len(self._refs) > REFERENCES_KEPT:
                self._refs.popitem(last=False)
        return ref

    def _decode(self, latents) -> Image.Image:
        codec = self._shared_codec()
        if codec is not None and codec.name.startswith("taesd"):
            images = codec.decode(latents.float().to(codec.device))
        else:
            vae = self._pipe.vae
            images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
            images = (images.float() / 2 + 0.5).clamp(0, 1)
        array = (images[0].permute(1, 2, 0).float().cpu().numpy() * 255).round()
        return Image.fromarray(array.clip(0, 255).astype("uint8"), "RGB")

    def _shared_codec(self):
        """The interpolation codec, when it decodes this model's latents as they are."""
        codecs = getattr(self.ctx, "codecs", None)
        if codecs is None or self._plan is None or self._family is None:
            return None
        try:
            codec = codecs.get(1.0)
        except Exception as exc:   # the interpolation worker says what is wrong with it
            if not self._codec_said:
                self._codec_said = True
                log.info("diffusion: the interpolation codec is not usable (%s): keyframes "
                         "are decoded by the model's VAE", exc)
            return None
        return codec if kept.shares_space(codec, self._family, self._plan.model.files) else None

    def _on_step(self, chain_index: int):
        def step(pipe, i, _t, kwargs):
            if i == 0:     # a crash test's moment: the keyframe claimed and half made
                pause_point("keyframe-denoising", self.cfg.data_dir)
            self.facts["keyframe_progress"] = {
                "keyframe": chain_index, "step": i + 1, "steps": pipe.num_timesteps,
                "node": "unet", "node_type": "denoising"}
            if self.stopping.is_set() or self._interrupting:
                pipe._interrupt = True      # the rest of the steps are skipped
            return kwargs
        return step


def _prints(plan: load.Plan | None) -> tuple:
    if plan is None:
        return ()
    return (plan.model.fingerprint(), plan.lora.fingerprint() if plan.lora else None)


def build_backend(cfg, ctx: Any = None) -> DiffusionBackend:
    return DiffusionBackend(cfg, ctx).start()
