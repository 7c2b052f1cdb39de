"""Colour coherence: the keyframe worker pulls each img2img input towards the palette of
its theme run's reference keyframe (the run's first: recorder.reference_of), so a
feedback loop cannot creep towards magenta, red or darkness over hundreds of keyframes.

An image input is matched in CIELAB (scikit-image's `match_histograms`, as A1111's
colour correction does, or each channel's mean and spread) and blended with itself by
`quality.coherence_strength`. A backend that feeds latents from keyframe to keyframe
calls `match_latent` on its latent instead (see its docstring). The reference's small
copy lives in <data_dir>/palette/, named by the reference keyframe's id and hash; it
goes once another run's reference takes over (`prune_palettes`, from the janitor).
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import select, text

from dreamd.conditions import classify
from dreamd.ledger.models import Keyframe
from dreamd.quality import recorder
from dreamd.storage.files import write_atomic
from dreamd.storage.paths import resolve

log = logging.getLogger("dreamd.quality")
KF = Keyframe.__table__
PALETTE_DIR = "palette"
PALETTE_SIZE = 256          # px, the longer side: plenty for a histogram, ~100 KB at most
PALETTE_GRACE = 10.0        # seconds: a palette younger than this is never pruned
METHODS = ("histogram", "mean")
_EPS = 1e-6


@dataclass(frozen=True)
class Palette:
    """The reference a keyframe's input was pulled towards: also handed to the backend
    (KeyframeRequest.palette), so one that feeds latents can match its latent to the
    reference keyframe's (`match_latent`)."""

    keyframe_id: int            # the reference keyframe (keyframes.id)
    path: Path                  # its small copy, <data_dir>/palette/ref-<id>-<sha>.png
    method: str                 # histogram | mean
    strength: float             # 0..1

    def image(self) -> Image.Image:
        """The reference as an RGB picture (at most PALETTE_SIZE px on its longer side)."""
        with Image.open(self.path) as im:
            return im.convert("RGB")

    def lab(self) -> np.ndarray:
        return _palette_lab(self.path)


def palette_path(data_dir: Path, keyframe_id: int, sha256: str) -> Path:
    """Named by the keyframe and its content: never taken for another ledger's keyframe
    of the same id (ids repeat when a ledger is replaced)."""
    return Path(data_dir) / PALETTE_DIR / f"ref-{keyframe_id}-{sha256[:12]}.png"


# ---------------------------------------------------------------- the keyframe worker's call

def steer(ctx, row, image: Image.Image | None) -> tuple[Image.Image | None, Palette | None]:
    """The keyframe worker's input for `row`, pulled towards its run's palette, and the
    palette (None, and `image` itself, when coherence does not apply: off, no input, a
    seed or an injection, the first keyframe of a run). Never fails the keyframe: a
    failure is logged and the input goes unchanged."""
    if image is None or row.source != "img2img":
        # a seed starts a run; an injection's blend is a deliberate change of look
        return image, None
    method = ctx.knob("quality.coherence")
    strength = float(ctx.knob("quality.coherence_strength"))
    if method not in METHODS or strength <= 0:
        return image, None
    try:
        palette = palette_for(ctx, row, method, strength)
        if palette is None:
            return image, None
        return match_image(image, palette.lab(), method, strength), palette
    except Exception as exc:    # the dream goes on with the input as it was
        _failed(row.chain_index, exc)
        return image, None


_failed_once = threading.Event()
_told_gone: set[tuple[str, int]] = set()


def _failed(chain_index: int, exc: BaseException) -> None:
    if not _failed_once.is_set():
        _failed_once.set()
        condition = classify(exc)       # disk full, ledger busy: said elsewhere, no traceback
        log.warning("keyframe %d: colour coherence failed (%s); its input goes as it "
                    "was, and later failures are logged at debug level", chain_index,
                    condition or f"{type(exc).__name__}: {exc}",
                    exc_info=None if condition else exc)
    else:
        log.debug("keyframe %d: colour coherence failed: %s", chain_index, exc)


def reference_row(conn, row):
    """The reference keyframe's row (id, sha256, path, pruned_at, thumb_path) for `row`,
    the keyframe about to be made; None when `row` starts a run (it becomes the
    reference) or the reference's row is gone."""
    before = conn.execute(recorder.PREVIOUS_KEYFRAME_SQL, {"c": row.chain_index - 1}).first()
    ref_id = recorder.reference_of(row, before)
    if ref_id is None:
        return None
    return conn.execute(select(KF.c.id, KF.c.sha256, KF.c.path, KF.c.pruned_at,
                               KF.c.thumb_path).where(KF.c.id == ref_id)).first()


def palette_for(ctx, row, method: str, strength: float) -> Palette | None:
    """The palette of `row`'s run, its small copy written the first time it is needed
    (the reference is then usually the keyframe just made, so its image is there; a
    pruned one's thumbnail stands in)."""
    data_dir = ctx.cfg.data_dir
    with ctx.reader.connect() as conn:
        ref = reference_row(conn, row)
    if ref is None or not ref.sha256 or ref.id == row.parent_id or (
            ref.path is not None and row.input_path == ref.path):
        # the input is the reference itself (the run's second keyframe): matching it to
        # its own palette would change nothing but rounding
        return None
    path = palette_path(data_dir, ref.id, ref.sha256)
    if not path.exists():
        found = [p for p in (resolve(data_dir, ref.path if ref.pruned_at is None else None),
                             resolve(data_dir, ref.thumb_path)) if p is not None and p.exists()]
        if not found:
            if (str(data_dir), ref.id) not in _told_gone:   # once per reference
                _told_gone.add((str(data_dir), ref.id))
                log.info("keyframe %d: the image of its colour reference (keyframe row %d) "
                         "is gone; this theme run goes unmatched", row.chain_index, ref.id)
            return None
        source = found[0]
        write_palette(source, path)
        log.info("keyframe %d: colour reference is keyframe row %d (%s)", row.chain_index,
                 ref.id, path.name)
    return Palette(ref.id, path, method, strength)


def write_palette(source: Path, path: Path) -> None:
    with Image.open(source) as im:
        im = im.convert("RGB")
        im.thumbnail((PALETTE_SIZE, PALETTE_SIZE), Image.Resampling.BOX)
        buf = io.BytesIO()
        im.save(buf, "PNG", compress_level=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue(), fsync=True)


_lab_cache: dict[str, tuple[float, np.ndarray]] = {}
_lab_lock = threading.Lock()


def _palette_lab(path: Path) -> np.ndarray:
    """The palette in CIELAB, kept in memory while its file is unchanged (one run's
    reference serves every keyframe of the run)."""
    from skimage.color import rgb2lab

    mtime = path.stat().st_mtime
    with _lab_lock:
        hit = _lab_cache.get(str(path))
    if hit is not None and hit[0] == mtime:
        return hit[1]
    with Image.open(path) as im:
        lab = rgb2lab(np.asarray(im.convert("RGB"), dtype=np.float32) / np.float32(255))
    with _lab_lock:
        _lab_cache.clear()          # one reference at a time: the cache stays small
        _lab_cache[str(path)] = (mtime, lab)
    return lab


# ---------------------------------------------------------------- the matching

def match_lab(lab: np.ndarray, reference: np.ndarray, method: str,
              strength: float) -> np.ndarray:
    """`lab` (H, W, 3) pulled towards `reference` (h, w, 3, any size), both CIELAB:
    `histogram` matches each channel's distribution, `mean` each channel's mean and
    standard deviation; the result is blended with `lab` by `strength` (0..1)."""
    if method == "histogram":
        from skimage.exposure import match_histograms

        # on 8-bit CIELAB, as A1111 does (OpenCV's LAB is 8-bit): scikit-image then counts
        # levels instead of sorting every value, ~6 ms instead of ~45 at 512x256; only the
        # correction is quantised (within a level of float matching), not the picture
        source = _lab8(lab)
        shift = match_histograms(source, _lab8(reference), channel_axis=-1).astype(np.float32)
        matched = lab + (shift - source) / _LAB8_SCALE
    elif method == "mean":
        mean, std = lab.mean(axis=(0, 1)), lab.std(axis=(0, 1))
        r_mean, r_std = reference.mean(axis=(0, 1)), reference.std(axis=(0, 1))
        matched = (lab - mean) / np.maximum(std, _EPS) * r_std + r_mean
    else:
        raise ValueError(f"quality.coherence = {method!r}: expected one of {METHODS}")
    s = np.float32(min(max(float(strength), 0.0), 1.0))
    return lab + s * (matched - lab)


# CIELAB on 0-255 levels: L 0-100 scaled, a and b offset (as OpenCV's 8-bit LAB)
_LAB8_SCALE = np.array([255 / 100, 1.0, 1.0], np.float32)
_LAB8_OFFSET = np.array([0.0, 128.0, 128.0], np.float32)


def _lab8(lab: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(lab * _LAB8_SCALE + _LAB8_OFFSET), 0, 255).astype(np.uint8)


def match_image(image: Image.Image, reference_lab: np.ndarray, method: str,
                strength: float) -> Image.Image:
    """An RGB picture pulled towards a reference palette (CIELAB array), as RGB."""
    from skimage.color import lab2rgb, rgb2lab

    # float32 all the way: half the time of scikit-image's float64 default, and far
    # finer than the 8-bit picture it becomes
    lab = rgb2lab(np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255))
    out = match_lab(lab, reference_lab.astype(np.float32, copy=False), method, strength)
    with warnings.catch_warnings():
        # colours matched outside the sRGB gamut are clipped, as they should be
        warnings.simplefilter("ignore", UserWarning)
        rgb = lab2rgb(out)
    return Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")


def match_latent(latent: Any, reference: Any, strength: float) -> Any:
    """For a backend that feeds each keyframe's latent to the next img2img instead of the
    image (the in-process diffusion backend): `latent`'s per-channel mean and standard
    deviation moved towards `reference`'s by `strength` (0..1), the latent-space form of
    colour coherence (research note in_process_diffusion.md, section 4). Cheap: two
    reductions and one affine map, on the latent's own device.

    `latent` is a torch tensor (C, H, W) or (B, C, H, W); `reference` the reference
    keyframe's latent, (C, h, w) or (1, C, h, w), in the same latent space (same VAE,
    same scaling) and of any size: encode `Palette.image()` (the request's
    `palette`) once per reference and keep it, keyed by `Palette.keyframe_id`. Returns a
    tensor of `latent`'s shape and dtype. Written without importing torch (dreamd.quality
    never does): it only calls the tensors' own methods.
    """
    s = min(max(float(strength), 0.0), 1.0)
    if s == 0.0:
        return latent
    work = latent.float()
    ref = reference.float().to(work.device)
    if ref.ndim == work.ndim - 1:
        ref = ref.unsqueeze(0)
    if ref.shape[-3] != work.shape[-3]:
        raise ValueError(f"match_latent: {work.shape[-3]} channels against a reference of "
                         f"{ref.shape[-3]}: not the same latent space")
    mean = work.mean(dim=(-2, -1), keepdim=True)
    std = work.std(dim=(-2, -1), keepdim=True).clamp_min(_EPS)
    r_mean = ref.mean(dim=(-2, -1), keepdim=True).mean(dim=0, keepdim=True)
    r_std = ref.std(dim=(-2, -1), keepdim=True).mean(dim=0, keepdim=True)
    matched = (work - mean) / std * r_std + r_mean
    return (work + s * (matched - work)).to(latent.dtype)


# ---------------------------------------------------------------- retention

LIVE_REFERENCE_SQL = text(
    "SELECT r.id, r.sha256 FROM keyframes k JOIN quality q ON q.keyframe_id = k.id "
    "JOIN keyframes r ON r.id = q.reference_id "
    # `+state`: read backwards along ix_keyframes_chain_index (retention's _HEAD says why)
    "WHERE +k.state = 'completed' ORDER BY k.chain_index DESC, k.id DESC LIMIT 1")


def prune_palettes(ctx, now: float | None = None) -> int:
    """Delete the palettes no run needs any more: every one but the reference of the
    chain's head (the run the next keyframe continues), after a short grace. Returns the
    bytes freed. Called by the janitor with retention's pass."""
    folder = ctx.cfg.data_dir / PALETTE_DIR
    if not folder.is_dir():
        return 0
    with os.scandir(folder) as it:
        entries = [e for e in it if e.is_file()]
    if not entries:
        return 0
    with ctx.reader.connect() as conn:
        live = conn.execute(LIVE_REFERENCE_SQL).first()
    now = time.time() if now is None else now
    keep = (palette_path(ctx.cfg.data_dir, live.id, live.sha256).name
            if live is not None and live.sha256 else None)
    freed = 0
    for e in entries:
        if e.name == keep:
            continue
        try:
            st = e.stat()
            if now - st.st_mtime <= PALETTE_GRACE:
                continue
            os.unlink(e.path)
            freed += st.st_size
        except FileNotFoundError:
            continue
    return freed
