"""The embedded keyframe backend: a procedural dreamer for machines without a GPU.

One keyframe is one img2img-like step of the chain: flow the input along a seeded
noise field, dissolve and fade part of it, paint new luminous structure (wireframe,
particles, glow) in a palette read from the prompt, then pull the tones back into a
dark, contrasted band so a long chain neither turns to mush nor saturates.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time

import numpy as np
from PIL import Image

from dreamd.backends import KeyframeRequest, KeyframeResult
from dreamd.backends.motifs import PAINTERS, Canvas, Look, particles
from dreamd.errors import PermanentBackendError

DEFAULT_PROMPT = (
    "ethereal digital angel, dissolving particles, technical wireframe, "
    "monochrome with cyan and red accents"
)

# Named colours, sRGB in [0, 1]. Kept bright: they are colours of light on a dark ground.
COLOURS: dict[str, tuple[float, float, float]] = {
    "white": (0.92, 0.95, 1.0), "silver": (0.74, 0.8, 0.9), "cyan": (0.2, 0.88, 1.0),
    "teal": (0.1, 0.8, 0.72), "blue": (0.28, 0.48, 1.0), "azure": (0.35, 0.7, 1.0),
    "violet": (0.62, 0.4, 1.0), "purple": (0.7, 0.3, 0.95), "magenta": (1.0, 0.22, 0.78),
    "pink": (1.0, 0.5, 0.72), "red": (1.0, 0.2, 0.16), "crimson": (0.9, 0.1, 0.25),
    "orange": (1.0, 0.5, 0.12), "amber": (1.0, 0.66, 0.16), "gold": (1.0, 0.8, 0.36),
    "yellow": (1.0, 0.92, 0.4), "green": (0.35, 1.0, 0.45), "emerald": (0.12, 0.86, 0.52),
    "lime": (0.7, 1.0, 0.3),
}
_ALIASES = {"golden": "gold", "scarlet": "red", "aqua": "cyan", "turquoise": "teal",
            "grey": "silver", "gray": "silver", "rose": "pink", "indigo": "violet"}

# Words that set a mood: "colours | motif:weight ...". Colour words alone only tint.
_MOODS_SPEC = {
    "ocean": "blue cyan white | waves:1 particles:.5 clouds:.6", "sea": "=ocean",
    "water": "=ocean", "underwater": "=ocean",
    "forest": "emerald green gold | branches:1 particles:.6 clouds:.7", "jungle": "=forest",
    "moss": "=forest", "tree": "=forest",
    "fire": "orange red gold | particles:1.2 clouds:.7 waves:.3", "flame": "=fire",
    "ember": "=fire", "lava": "=fire", "inferno": "=fire",
    "neon": "magenta cyan | grid:1 solid:.6 rings:.4", "cyberpunk": "=neon", "synthwave": "=neon",
    "crystal": "cyan white violet | crystal:1.2 geometry:.4", "ice": "=crystal",
    "frost": "=crystal", "glass": "=crystal", "prism": "=crystal",
    "space": "violet blue white | particles:1 clouds:1 rings:.5", "cosmic": "=space",
    "nebula": "=space", "galaxy": "=space", "stars": "=space",
    "sunset": "orange pink violet | clouds:1 waves:.5", "dusk": "=sunset",
    "angel": " | wings:1.2 rings:.5", "halo": " | rings:1", "wings": " | wings:1",
    "ethereal": " | clouds:.4", "divine": " | rings:.6 wings:.4",
    "digital": " | constellation:.8 grid:.4", "technical": " | solid:.6 rings:.5",
    "wireframe": " | solid:1 constellation:.6 grid:.4", "mesh": "=wireframe",
    "blueprint": "blue white | grid:1 geometry:.6", "circuit": " | constellation:1 grid:.5",
    "geometry": " | geometry:1 solid:.4", "geometric": "=geometry", "polygons": "=geometry",
    "sacred": " | geometry:1 rings:.5",
    "particles": " | particles:1", "dissolving": " | particles:.8", "dust": "=particles",
    "sparks": " | particles:1", "fireflies": "gold | particles:1",
    "clouds": " | clouds:1", "fog": " | clouds:1", "mist": " | clouds:1", "smoke": " | clouds:.8",
    "waves": " | waves:1", "rings": " | rings:1", "orbit": " | rings:1",
    "branches": " | branches:1", "roots": " | branches:1",
    "constellation": " | constellation:1", "network": " | constellation:1 grid:.3",
}
_MONO_WORDS = {"monochrome", "mono", "grayscale", "greyscale", "noir", "achromatic"}
_GLOW_WORDS = {"ethereal": .4, "neon": .6, "glow": .5, "glowing": .5, "luminous": .4,
               "divine": .3, "radiant": .4, "light": .2}
# Words that carry no look; everything else unknown feeds the stable hash.
_STOP = {"a", "an", "the", "and", "with", "of", "in", "on", "at", "to", "by", "for", "from",
         "into", "accent", "accents", "style", "very", "tones", "colors", "colours", "image"}
MOTIFS = ("grid", "solid", "constellation", "geometry", "crystal", "rings", "waves",
          "branches", "wings", "particles", "clouds")
# A prompt with no colour word gets one of these, picked by a stable hash of its words.
_PALETTES = (("white", "cyan", "red"), ("gold", "amber", "white"), ("violet", "magenta", "cyan"),
             ("emerald", "teal", "gold"), ("blue", "azure", "white"), ("pink", "violet", "gold"),
             ("orange", "crimson", "yellow"), ("silver", "blue", "pink"))


def _parse_spec(spec: str) -> tuple[tuple[str, ...], dict[str, float]]:
    colours, _, motifs = spec.partition("|")
    return tuple(colours.split()), {m: float(w) for m, w in (t.split(":") for t in motifs.split())}


_MOODS = {w: _parse_spec(_MOODS_SPEC[s[1:]] if s.startswith("=") else s)
          for w, s in _MOODS_SPEC.items()}


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that, unlike hash(), is the same in every process."""
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def look_for(text: str | None) -> Look:
    """Read colours and motifs from prompt words; unknown words pick a palette by hash."""
    words = [w for w in _words(text or DEFAULT_PROMPT) if w not in _STOP]
    colours: list[str] = []
    motifs: dict[str, float] = {}
    unknown: list[str] = []
    glow = 1.0
    mood_colours: list[str] = []
    for w in words:
        known = False
        if w in COLOURS:
            colours.append(w); known = True
        if w in _MOODS:
            mood_colours.extend(_MOODS[w][0])
            for m, weight in _MOODS[w][1].items():
                motifs[m] = motifs.get(m, 0.0) + weight
            known = True
        glow += _GLOW_WORDS.get(w, 0.0)
        known = known or w in _MONO_WORDS or w in _GLOW_WORDS
        if not known:
            unknown.append(w)
    mono = any(w in _MONO_WORDS for w in words)
    colours += mood_colours          # words that name a colour outrank a mood's colours
    if mono:
        colours = [c for c in colours if c not in ("white", "silver")]
    h = stable_hash(" ".join(unknown))
    if not colours and not mono:
        colours = list(_PALETTES[h % len(_PALETTES)])
    if not motifs:
        # A prompt we cannot read still gets a stable, distinct set of motifs.
        picks = [MOTIFS[(h >> (8 * i)) % len(MOTIFS)] for i in range(1, 4)]
        motifs = {m: 1.0 for m in picks}
    motifs.setdefault("particles", 0.35)    # the dream always sheds a little dust
    colours = list(dict.fromkeys(colours))  # keep order, drop repeats
    if mono:
        ink, accents = COLOURS["white"], [COLOURS[c] for c in colours[:2]] or [COLOURS["silver"]]
    else:
        ink = COLOURS[colours[0]]
        accents = [COLOURS[c] for c in colours[1:3]] or [COLOURS["white"]]
    tint = np.mean([ink, *accents], axis=0)
    background = tuple(float(v) for v in 0.012 + 0.045 * tint / max(float(tint.max()), 1e-6))
    return Look(ink=ink, accents=tuple(accents), background=background,  # type: ignore[arg-type]
                motifs=motifs, mono=mono, glow=min(glow, 2.0))


def _words(text: str) -> list[str]:
    out = []
    for w in "".join(c if c.isalpha() else " " for c in text.lower()).split():
        w = _ALIASES.get(w, w)
        if w not in COLOURS and w not in _MOODS and w.endswith("s") and (
                w[:-1] in COLOURS or w[:-1] in _MOODS):
            w = w[:-1]
        out.append(w)
    return out


# --- noise and flow -------------------------------------------------------------------

def _fbm(rng: np.random.Generator, w: int, h: int, cell: float, octaves: int = 3) -> np.ndarray:
    """Smooth noise, roughly unit variance: random grids upsampled bicubically (fast in PIL)."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        c = max(cell / 2 ** o, 3.0)
        grid = rng.standard_normal((int(h / c) + 3, int(w / c) + 3)).astype(np.float32)
        out += amp * np.asarray(Image.fromarray(grid, "F").resize((w, h), Image.BICUBIC))
        total += amp * amp
        amp *= 0.5
    return out / math.sqrt(total)


def _advect(img: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Semi-Lagrangian flow: out(p) = img(p - v(p)), bilinear, mirrored at the borders."""
    h, w, _ = img.shape
    ys, xs = _pixel_grid(h, w)
    sx = _mirror(xs - vx, w - 1)
    sy = _mirror(ys - vy, h - 1)
    x0 = np.minimum(sx.astype(np.int32), max(w - 2, 0))
    y0 = np.minimum(sy.astype(np.int32), max(h - 2, 0))
    fx = (sx - x0)[..., None]
    fy = (sy - y0)[..., None]
    flat = img.reshape(-1, 3)
    i = y0 * w + x0
    dx, dy = (1 if w > 1 else 0), (w if h > 1 else 0)
    top = flat[i] * (1 - fx) + flat[i + dx] * fx
    bottom = flat[i + dy] * (1 - fx) + flat[i + dy + dx] * fx
    return top * (1 - fy) + bottom * fy


@functools.lru_cache(maxsize=4)
def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ys.flags.writeable = xs.flags.writeable = False   # shared between calls
    return ys, xs


def _mirror(v: np.ndarray, hi: int) -> np.ndarray:
    # Mirroring (not clamping) keeps borders from smearing into streaks over a long chain;
    # one reflection is enough because displacements stay far below the image size.
    if hi <= 0:
        return np.zeros_like(v)
    v = np.abs(v)
    v = np.where(v > hi, 2 * hi - v, v)
    return np.clip(v, 0, hi, out=v)


def _blur(img: np.ndarray, factor: int) -> np.ndarray:
    """A cheap wide blur of a float image: box-downsample, then bilinear back up."""
    h, w, _ = img.shape
    small = (max(w // factor, 1), max(h // factor, 1))
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], np.float32), "F")
                        .resize(small, Image.BOX).resize((w, h), Image.BILINEAR))
             for c in range(3)]
    return np.stack(chans, axis=-1)


def _luminance(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.2126, 0.7152, 0.0722], np.float32)


# --- painting structure ---------------------------------------------------------------

_TARGET_MEAN = 0.11     # a dark ground with light in it
_TARGET_DETAIL = 0.045  # high-frequency energy that reads as "structure", not mush


def dream_step(img: np.ndarray, look: Look, key: int, denoise: float) -> np.ndarray:
    """One img2img-like step on a float (H, W, 3) image in [0, 1]; same inputs, same bytes."""
    d = float(min(max(denoise, 0.0), 1.0))
    h, w, _ = img.shape
    u = min(w, h)
    rng = lambda stream: np.random.default_rng([key & 0xFFFFFFFF, key >> 32, stream])  # noqa: E731

    # 1. Flow along a curl-noise field (swirls, no sinks) plus a slow camera drift.
    fr = rng(1)
    psi = _fbm(fr, w, h, cell=u * 0.55)
    gy, gx = np.gradient(psi)
    scale = d * 0.07 * u / (float(np.sqrt(np.mean(gx * gx + gy * gy))) * 2.5 + 1e-6)
    vx, vy = gy * scale, -gx * scale
    cx, cy = w * fr.uniform(0.3, 0.7), h * fr.uniform(0.3, 0.7)
    zoom, spin = float(fr.choice([-1.0, 1.0])) * d * 0.035, float(fr.normal(0, d * 0.02))
    ys, xs = _pixel_grid(h, w)
    vx = vx + zoom * (xs - cx) - spin * (ys - cy)
    vy = vy + zoom * (ys - cy) + spin * (xs - cx)
    out = _advect(img.astype(np.float32, copy=False), vx.astype(np.float32), vy.astype(np.float32))

    # 2. Dissolve in patches and fade toward the ground: the "noise" of this img2img.
    mask = np.clip(_fbm(rng(2), w, h, cell=u * 0.4, octaves=2) * 0.6 + 0.5, 0, 1)[..., None]
    out += (_blur(out, 6) - out) * (mask * min(1.0, 1.1 * d))
    ground = np.array(look.background, np.float32)
    out = ground + (out - ground) * (1 - 0.55 * d)

    # 3. Grade toward the palette: luminance kept, hue pulled to the ink colour.
    lum = _luminance(out)[..., None]
    ink = np.array(look.ink, np.float32)
    graded = np.minimum(lum * ink / max(float(_luminance(ink)), 0.05), 1.0)
    graded += (lum - graded) * np.clip((lum - 0.55) / 0.45, 0, 1)   # highlights go white
    out += (graded - out) * (0.45 * d)
    out = _tone(out, d)

    # 4. Mist, then new structure painted as light (screen blend never exceeds 1).
    clouds = look.motifs.get("clouds", 0.0)
    if clouds:
        cr = rng(3)
        # Ridged noise (veins where the field crosses zero) inside a soft mask: wisps and
        # filaments like a nebula, not the even blobs plain noise gives.
        veins = (1 - np.minimum(np.abs(_fbm(cr, w, h, cell=u * 0.5, octaves=4)), 1)) ** 5
        mask = np.clip(_fbm(cr, w, h, cell=u * 0.8, octaves=2) * 0.6 + 0.35, 0, 1)
        density = veins * mask * 0.6 + mask ** 2 * 0.25
        tint = np.array(look.accents[int(cr.integers(len(look.accents)))] if cr.random() < 0.2 else look.ink,
                        np.float32)
        out += (1 - out) * (density[..., None] * tint * (0.5 * d * min(clouds, 1.5)))
    canvas = Canvas(w, h, look, rng(4), np.clip(_luminance(img), 0, 1))
    sr = rng(5)
    names = [m for m in look.motifs if m in PAINTERS]
    weights = np.array([look.motifs[m] for m in names], float)
    # A fixed list of candidates, each admitted below its own threshold: more denoise
    # admits a superset, so the distance from the input grows with denoise. Stratified
    # gates keep the count steady (about 1.4 * d * slots), so no step comes out empty.
    slots = 7
    for slot in range(slots):
        motif = names[int(sr.choice(len(names), p=weights / weights.sum()))] if names else None
        gate, painter_seed = (slot + sr.random()) / slots, int(sr.integers(1 << 31))
        if motif and gate < 1.4 * d:
            canvas.rng = np.random.default_rng([painter_seed, slot])
            PAINTERS[motif](canvas, min(1.0, 0.35 + 1.3 * d))
    canvas.rng = rng(6)
    n = int(w * h / 110 * d * min(look.motifs.get("particles", 0.0), 1.2))
    particles(canvas, min(1.0, 0.4 + d), n, vx, vy)
    for light, colour in zip(canvas.light(look.glow), (look.ink, *look.accents)):
        out += (1 - out) * np.minimum(light[..., None] * np.array(colour, np.float32), 1.0)
    return _soft_clip(out)


def _tone(out: np.ndarray, d: float) -> np.ndarray:
    """Pull mean brightness and fine detail toward their targets.

    Runs on the old image before new structure is painted: the correction then grows
    with denoise like everything else, instead of partly undoing the new strokes.
    """
    sample = out[::3, ::3]
    lum = _luminance(sample)
    strength = min(1.0, 1.5 * d)
    black = float(np.percentile(lum, 3))
    if black > 0.02:                                     # keep the ground dark
        out = out - (black - 0.02) * strength
    mean = max(float(lum.mean()), 1e-4)
    out = out * float(np.clip(_TARGET_MEAN / mean, 0.75, 1.3)) ** strength
    blurred = _blur(out, 4)
    detail = float(np.std(_luminance((out - blurred)[::3, ::3])))
    if detail < _TARGET_DETAIL:
        # Mush: sharpen structure back, brightening only, since a two-sided unsharp
        # mask repeated over a chain digs dark rings around every speck.
        gain = min(0.8, _TARGET_DETAIL / max(detail, 1e-4) - 1) * strength
        out = out + np.maximum(out - blurred, 0) * gain
    return out


def _soft_clip(out: np.ndarray, knee: float = 0.8) -> np.ndarray:
    """Highlights roll off instead of flattening at 1: lines stay lines where they cross."""
    over = np.maximum(out - knee, 0)
    out = np.minimum(out, knee) + (1 - knee) * np.tanh(over / (1 - knee))
    return np.clip(out, 0.0, 1.0)


def paint_seed(look: Look, key: int, width: int, height: int) -> np.ndarray:
    """An image from nothing: a dark nebulous ground, then two dream steps of structure."""
    rng = np.random.default_rng([key & 0xFFFFFFFF, key >> 32, 99])
    u = min(width, height)
    ys = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
    xs = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
    vignette = np.clip(1.15 - 0.55 * (xs ** 2 + (1.6 * ys) ** 2), 0.25, 1.0)
    nebula = np.clip(_fbm(rng, width, height, cell=u * 0.7) * 0.5 + 0.25, 0, 1) ** 2
    tint = np.mean([look.ink, *look.accents], axis=0).astype(np.float32)
    img = np.array(look.background, np.float32) * vignette[..., None] * 1.5
    img = img + (nebula * vignette)[..., None] * tint * 0.12
    img = dream_step(img.astype(np.float32), look, key, 0.55)
    return dream_step(img, look, key + 1, 0.3)


def to_array(image: Image.Image, width: int, height: int) -> np.ndarray:
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return np.asarray(image, np.float32) / 255.0


def to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")


class ProceduralBackend:
    """KeyframeBackend that dreams on the CPU with no weights; deterministic per request."""

    name = "procedural"

    def generate(self, request: KeyframeRequest) -> KeyframeResult:
        started = time.perf_counter()
        w, h = request.width, request.height
        if not (8 <= w <= 8192 and 8 <= h <= 8192):
            raise PermanentBackendError(f"procedural: size {w}x{h} is outside 8..8192")
        if not math.isfinite(request.denoise):
            raise PermanentBackendError(f"procedural: denoise {request.denoise!r} is not a number")
        # The theme's name steers too ("ocean" is a word we read); an empty prompt is the default.
        look = look_for(f"{request.theme} {request.prompt or DEFAULT_PROMPT}")
        key = stable_hash("procedural", request.seed, request.theme, request.prompt)
        if request.image is None:
            img = paint_seed(look, key, w, h)
        else:
            try:
                source = to_array(request.image, w, h)
            except (OSError, ValueError) as exc:
                raise PermanentBackendError(f"procedural: unusable input image: {exc}") from exc
            img = dream_step(source, look, key, request.denoise)
        return KeyframeResult(image=to_pil(img), info={
            "backend": self.name, "denoise": request.denoise, "seed": request.seed,
            "cold_start": request.image is None, "motifs": sorted(look.motifs),
            "elapsed_ms": round((time.perf_counter() - started) * 1000, 1)})

    def close(self) -> None:
        """Nothing to release: no processes, connections or device memory."""
