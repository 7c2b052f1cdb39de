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
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dreamd.backend import KeyframeRequest, KeyframeResult
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


@dataclass(frozen=True)
class Look:
    """What a prompt asks for: the colours of light, the ground, and the motifs."""

    ink: tuple[float, float, float]                 # the main line colour
    accents: tuple[tuple[float, float, float], ...]  # up to two accent colours
    background: tuple[float, float, float]          # a very dark tint
    motifs: dict[str, float] = field(default_factory=dict)
    mono: bool = False
    glow: float = 1.0


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

SS = 2  # supersampling of the line canvases: thin lines come out anti-aliased


class _Canvas:
    """Three supersampled 8-bit layers (ink, accent 1, accent 2) that become coloured light."""

    def __init__(self, w: int, h: int, look: Look, rng: np.random.Generator, lum: np.ndarray):
        self.w, self.h, self.look, self.rng, self.lum = w * SS, h * SS, look, rng, lum
        self.u = min(w, h) * SS                    # the unit every size is measured in
        self.layers = [Image.new("L", (self.w, self.h)) for _ in range(1 + len(look.accents))]
        self.draws = [ImageDraw.Draw(layer) for layer in self.layers]

    def pick(self) -> ImageDraw.ImageDraw:
        """Mostly ink, sometimes an accent: accents are accents."""
        if len(self.draws) == 1 or self.rng.random() < 0.72:
            return self.draws[0]
        return self.draws[1 + int(self.rng.integers(len(self.draws) - 1))]

    def focus(self) -> tuple[float, float]:
        r = self.rng
        return (self.w * (0.5 + 0.28 * r.standard_normal()), self.h * (0.5 + 0.2 * r.standard_normal()))

    def bright_points(self, n: int) -> np.ndarray:
        """n points drawn where the current image is bright, so new structure grows from old."""
        h, w = self.lum.shape
        cand = self.rng.random((n * 6, 2)) * (h, w)
        keep = self.lum[cand[:, 0].astype(int), cand[:, 1].astype(int)] ** 0.7 > self.rng.random(n * 6) * 0.5
        pts = np.concatenate([cand[keep], self.rng.random((n, 2)) * (h, w)])[:n]
        return pts[:, ::-1] * SS                  # (x, y) in canvas pixels

    def light(self, glow: float) -> list[np.ndarray]:
        """Each layer as light: the sharp line plus two soft halos."""
        out = []
        for layer in self.layers:
            sharp = layer.reduce(SS)
            near = sharp.filter(ImageFilter.GaussianBlur(self.u / SS * 0.012))
            far = sharp.filter(ImageFilter.GaussianBlur(self.u / SS * 0.045))
            out.append((np.asarray(sharp, np.float32) + glow * (
                0.9 * np.asarray(near, np.float32) + 1.6 * np.asarray(far, np.float32))) / 255.0)
        return out


def _v(strength: float, base: float = 255) -> int:
    return int(max(0, min(255, base * strength)))


def _grid(c: _Canvas, s: float) -> None:
    r = c.rng
    horizon = c.h * r.uniform(0.45, 0.75)
    vx = c.w * r.uniform(0.2, 0.8)
    flip = r.random() < 0.3                      # sometimes a ceiling, not a floor
    d = c.pick()
    ys = lambda y: c.h - y if flip else y  # noqa: E731
    for k in range(-10, 11):
        x_bottom = vx + k * c.w * 0.12
        d.line([(vx, ys(horizon)), (x_bottom, ys(c.h))], fill=_v(s, 70), width=1)
    for k in range(1, 11):
        y = horizon + (c.h - horizon) * (k / 10) ** 2.2
        d.line([(0, ys(y)), (c.w, ys(y))], fill=_v(s, 40 + 8 * k), width=1)


def _rotation(r: np.random.Generator) -> np.ndarray:
    q = r.standard_normal(4)
    a, b, cc, d = q / np.linalg.norm(q)
    return np.array([[a*a+b*b-cc*cc-d*d, 2*(b*cc-a*d), 2*(b*d+a*cc)],
                     [2*(b*cc+a*d), a*a-b*b+cc*cc-d*d, 2*(cc*d-a*b)],
                     [2*(b*d-a*cc), 2*(cc*d+a*b), a*a-b*b-cc*cc+d*d]])


def _solid(c: _Canvas, s: float) -> None:
    """A rotating wireframe solid; far edges dimmer, vertices marked like a technical drawing."""
    r = c.rng
    phi = (1 + 5 ** 0.5) / 2
    kind = int(r.integers(3))
    if kind == 0:       # icosahedron
        v = np.array([(0, a, b * phi) for a in (-1, 1) for b in (-1, 1)]
                     + [(a, b * phi, 0) for a in (-1, 1) for b in (-1, 1)]
                     + [(a * phi, 0, b) for a in (-1, 1) for b in (-1, 1)], float) / 1.9
    elif kind == 1:     # octahedron
        v = np.array([(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)], float)
    if kind < 2:        # platonic: the edges are the shortest vertex pairs
        dist = np.linalg.norm(v[:, None] - v[None], axis=-1)
        edges = np.argwhere(np.triu(dist < np.min(dist + np.eye(len(v)) * 9) * 1.05, 1))
    else:               # latitude/longitude globe: rings and meridians
        n_lon, n_lat = 14, 7
        la, lo = np.meshgrid(np.linspace(-1.2, 1.2, n_lat), np.linspace(0, 2 * np.pi, n_lon + 1)[:-1])
        v = np.stack([np.cos(la) * np.cos(lo), np.sin(la), np.cos(la) * np.sin(lo)], -1).reshape(-1, 3)
        idx = np.arange(n_lon * n_lat).reshape(n_lon, n_lat)
        edges = np.concatenate([np.stack([idx.ravel(), np.roll(idx, 1, 0).ravel()], -1),
                                np.stack([idx[:, :-1].ravel(), idx[:, 1:].ravel()], -1)])
    p = v @ _rotation(r).T
    cx, cy = c.focus()
    rad = c.u * r.uniform(0.18, 0.42)
    z = 3.5 / (3.5 + p[:, 2])
    xy = np.stack([cx + rad * p[:, 0] * z, cy + rad * p[:, 1] * z], -1)
    d = c.pick()
    for i, j in edges:
        front = 0.5 - (p[i, 2] + p[j, 2]) / 4
        d.line([tuple(xy[i]), tuple(xy[j])], fill=_v(s * (0.35 + 0.65 * front), 230), width=1)
    for x, y in xy if kind < 2 else ():
        d.rectangle([x - 2, y - 2, x + 2, y + 2], outline=_v(s, 200))


def _constellation(c: _Canvas, s: float) -> None:
    pts = c.bright_points(int(c.rng.integers(14, 34)))
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(len(pts)) * 1e9
    d = c.pick()
    for i, row in enumerate(dist):
        for j in np.argsort(row)[:2]:
            if row[j] < c.u * 0.5:
                d.line([tuple(pts[i]), tuple(pts[j])], fill=_v(s, 150), width=1)
    for x, y in pts:
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=_v(s, 255))


def _polygon(cx: float, cy: float, rad: float, n: int, rot: float) -> list[tuple[float, float]]:
    return [(cx + rad * math.cos(rot + 2 * math.pi * k / n), cy + rad * math.sin(rot + 2 * math.pi * k / n))
            for k in range(n)]


def _geometry(c: _Canvas, s: float) -> None:
    r = c.rng
    cx, cy = c.focus()
    rad = c.u * r.uniform(0.12, 0.4)
    n = int(r.integers(3, 9))
    rot = r.uniform(0, 2 * math.pi)
    d = c.pick()
    d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], outline=_v(s, 120), width=1)
    pts = _polygon(cx, cy, rad, n, rot)
    d.polygon(pts, outline=_v(s, 220))
    step = int(r.integers(2, max(3, n // 2 + 1)))
    for k in range(n):                        # the star polygon {n/step} inside
        d.line([pts[k], pts[(k + step) % n]], fill=_v(s, 140), width=1)
    inner = _polygon(cx, cy, rad * math.cos(math.pi * step / n), n, rot + math.pi / n)
    c.pick().polygon(inner, outline=_v(s, 170))


def _crystal(c: _Canvas, s: float) -> None:
    r = c.rng
    cx, cy = c.focus()
    for _ in range(int(r.integers(3, 8))):
        a = r.uniform(0, 2 * math.pi)
        length, width = c.u * r.uniform(0.1, 0.35), c.u * r.uniform(0.015, 0.05)
        ux, uy = math.cos(a), math.sin(a)
        tip = (cx + ux * length, cy + uy * length)
        mid = (cx + ux * length * 0.6, cy + uy * length * 0.6)
        shard = [(cx, cy), (mid[0] - uy * width, mid[1] + ux * width), tip,
                 (mid[0] + uy * width, mid[1] - ux * width)]
        d = c.pick()
        d.polygon(shard, fill=_v(s, 28), outline=_v(s, 230))
        d.line([(cx, cy), tip], fill=_v(s, 90), width=1)


def _rings(c: _Canvas, s: float) -> None:
    """Halo and HUD arcs: partial ellipses with tick marks."""
    r = c.rng
    cx, cy = c.focus()
    tilt = r.uniform(0.25, 1.0)
    d = c.pick()
    for k in range(int(r.integers(2, 5))):
        rad = c.u * r.uniform(0.1, 0.45)
        start = r.uniform(0, 360)
        span = r.uniform(60, 330)
        box = [cx - rad, cy - rad * tilt, cx + rad, cy + rad * tilt]
        d.arc(box, start, start + span, fill=_v(s, 210 - 30 * k), width=1 + (k == 0))
        if r.random() < 0.5:
            for t in np.linspace(math.radians(start), math.radians(start + span), 24):
                x, y = cx + rad * math.cos(t), cy + rad * tilt * math.sin(t)
                d.line([(x, y), (x + 6 * math.cos(t), y + 6 * tilt * math.sin(t))], fill=_v(s, 150))


def _waves(c: _Canvas, s: float) -> None:
    r = c.rng
    xs = np.linspace(0, c.w, 96)
    base = c.h * r.uniform(0.3, 0.8)
    freq, phase = r.uniform(1.5, 5) * 2 * math.pi / c.w, r.uniform(0, 2 * math.pi)
    d = c.pick()
    for k in range(int(r.integers(4, 10))):
        amp = c.u * 0.06 * (1 + 0.3 * k)
        ys = base + k * c.u * 0.035 + amp * np.sin(xs * freq + phase + 0.5 * k) * np.sin(xs * freq * 0.37 + k)
        d.line(list(zip(xs, ys)), fill=_v(s, 200 - 14 * k), width=1)


def _branches(c: _Canvas, s: float) -> None:
    r = c.rng
    d = c.pick()
    stack = [(c.w * r.uniform(0.1, 0.9), float(c.h), -math.pi / 2 + r.normal(0, 0.2), c.u * 0.2, 0)]
    while stack:
        x, y, a, length, depth = stack.pop()
        x2, y2 = x + math.cos(a) * length, y + math.sin(a) * length
        d.line([(x, y), (x2, y2)], fill=_v(s, 220 - 28 * depth), width=1)
        if depth < 6:
            for _ in range(2):
                stack.append((x2, y2, a + r.normal(0, 0.45), length * r.uniform(0.6, 0.8), depth + 1))


def _wings(c: _Canvas, s: float) -> None:
    """A pair of wings, abstracted: a leading edge arcing out, feathers hanging from it."""
    r = c.rng
    cx, cy = c.w * r.uniform(0.35, 0.65), c.h * r.uniform(0.35, 0.6)
    span = c.u * r.uniform(0.5, 0.95)
    rise = r.uniform(0.3, 0.7)
    t = np.linspace(0, 1, 28)[:, None]
    ink, edge = c.draws[0], c.pick()
    for side in (-1, 1):
        p0 = np.array([cx + side * c.u * 0.02, cy])
        p1 = np.array([cx + side * span * 0.35, cy - span * rise])
        p2 = np.array([cx + side * span, cy - span * rise * 0.3])
        arc = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
        edge.line([tuple(p) for p in arc], fill=_v(s, 235), width=2)
        for k, f in enumerate(np.linspace(0.08, 0.98, int(r.integers(12, 22)))):
            i = int(f * (len(arc) - 1))
            length = span * (0.55 - 0.3 * f) * r.uniform(0.7, 1.1)
            bend = side * (0.15 + 0.5 * f)
            start = arc[i]
            mid = start + length * 0.5 * np.array([bend * 0.6, 1.0])
            end = start + length * np.array([bend, 0.85])
            feather = [tuple((1 - q) ** 2 * start + 2 * (1 - q) * q * mid + q ** 2 * end)
                       for q in np.linspace(0, 1, 10)]
            ink.line(feather, fill=_v(s, 170 - 60 * f * r.random()), width=1)
    if r.random() < 0.5:                          # the halo
        rad = c.u * 0.07
        c.pick().ellipse([cx - rad, cy - span * 0.3 - rad * 0.3, cx + rad, cy - span * 0.3 + rad * 0.3],
                         outline=_v(s, 230), width=2)


_PAINTERS = {"grid": _grid, "solid": _solid, "constellation": _constellation, "geometry": _geometry,
             "crystal": _crystal, "rings": _rings, "waves": _waves, "branches": _branches,
             "wings": _wings}


def _particles(c: _Canvas, s: float, n: int, vx: np.ndarray, vy: np.ndarray) -> None:
    """Dust shed by bright structure, carried further along the flow: the dissolving."""
    if n <= 0:
        return
    r = c.rng
    pts = c.bright_points(n) / SS
    h, w = vx.shape
    ix, iy = np.clip(pts[:, 0].astype(int), 0, w - 1), np.clip(pts[:, 1].astype(int), 0, h - 1)
    carry = r.uniform(1, 6, n)
    x = (pts[:, 0] + vx[iy, ix] * carry) * SS
    y = (pts[:, 1] + vy[iy, ix] * carry - r.uniform(0, 0.02, n) * c.u) * SS
    bright = r.random(n) ** 3                       # many faint specks, a few bright ones
    for lo, hi, value in ((0, .4, 110), (.4, .8, 190), (.8, 1.01, 255)):
        sel = (bright >= lo) & (bright < hi)
        c.pick().point(list(zip(x[sel], y[sel])), fill=_v(s, value))
    for i in np.flatnonzero(bright > 0.96):
        rad = 1 + 1.5 * r.random()
        c.pick().ellipse([x[i] - rad, y[i] - rad, x[i] + rad, y[i] + rad], fill=_v(s, 255))


# --- the step -------------------------------------------------------------------------

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
    canvas = _Canvas(w, h, look, rng(4), np.clip(_luminance(img), 0, 1))
    sr = rng(5)
    names = [m for m in look.motifs if m in _PAINTERS]
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
            _PAINTERS[motif](canvas, min(1.0, 0.35 + 1.3 * d))
    canvas.rng = rng(6)
    n = int(w * h / 110 * d * min(look.motifs.get("particles", 0.0), 1.2))
    _particles(canvas, min(1.0, 0.4 + d), n, vx, vy)
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
