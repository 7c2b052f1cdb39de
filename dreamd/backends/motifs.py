"""What the procedural dreamer draws: luminous motifs (wireframe grids, solids,
constellations, crystals, rings, waves, branches, wings) and dissolving particles,
on supersampled canvases that become coloured light with a glow.
`dreamd.backends.procedural` decides what to paint and blends it into the chain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SS = 2  # supersampling of the line canvases: thin lines come out anti-aliased


@dataclass(frozen=True)
class Look:
    """What a prompt asks for: the colours of light, the ground, and the motifs."""

    ink: tuple[float, float, float]                 # the main line colour
    accents: tuple[tuple[float, float, float], ...]  # up to two accent colours
    background: tuple[float, float, float]          # a very dark tint
    motifs: dict[str, float] = field(default_factory=dict)
    mono: bool = False
    glow: float = 1.0


class Canvas:
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


def _grid(c: Canvas, s: float) -> None:
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


def _solid(c: Canvas, s: float) -> None:
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


def _constellation(c: Canvas, s: float) -> None:
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


def _geometry(c: Canvas, s: float) -> None:
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


def _crystal(c: Canvas, s: float) -> None:
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


def _rings(c: Canvas, s: float) -> None:
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


def _waves(c: Canvas, s: float) -> None:
    r = c.rng
    xs = np.linspace(0, c.w, 96)
    base = c.h * r.uniform(0.3, 0.8)
    freq, phase = r.uniform(1.5, 5) * 2 * math.pi / c.w, r.uniform(0, 2 * math.pi)
    d = c.pick()
    for k in range(int(r.integers(4, 10))):
        amp = c.u * 0.06 * (1 + 0.3 * k)
        ys = base + k * c.u * 0.035 + amp * np.sin(xs * freq + phase + 0.5 * k) * np.sin(xs * freq * 0.37 + k)
        d.line(list(zip(xs, ys)), fill=_v(s, 200 - 14 * k), width=1)


def _branches(c: Canvas, s: float) -> None:
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


def _wings(c: Canvas, s: float) -> None:
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


PAINTERS = {"grid": _grid, "solid": _solid, "constellation": _constellation, "geometry": _geometry,
             "crystal": _crystal, "rings": _rings, "waves": _waves, "branches": _branches,
             "wings": _wings}


def particles(c: Canvas, s: float, n: int, vx: np.ndarray, vy: np.ndarray) -> None:
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
