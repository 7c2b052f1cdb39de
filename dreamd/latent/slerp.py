"""Spherical interpolation between two keyframe latents: the frames between keyframes.

The interpolation worker encodes keyframes k and k+1, calls `slerp` once for all N
in-between t values, and decodes the (N, *shape) result as one batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Below this angle (radians) the arc and the chord agree to ~1e-9 relative, and
# sin(theta) in a denominator would only add rounding error: lerp instead.
_PARALLEL = 1e-4
# Within this of pi the plane through a and b is numerically undefined: pick one.
_OPPOSITE = 1e-6


def slerp(a: torch.Tensor, b: torch.Tensor, ts: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Interpolate from `a` (t=0) to `b` (t=1) along the great circle, for every t at once.

    Each latent is one flat vector. Direction follows the arc between a and b; the
    norm goes linearly from |a| to |b|. Returns (len(ts), *a.shape) in a.dtype on
    a.device; rows with t == 0 or t == 1 are exactly a or b. Near-parallel or zero
    inputs fall back to lerp; exactly opposite inputs turn through a deterministic
    orthogonal direction instead of producing NaN.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise TypeError(f"slerp: latents must be floating point, got {a.dtype} and {b.dtype}")
    device = a.device
    t = torch.as_tensor(ts, dtype=torch.float64, device=device).reshape(-1)
    if not bool(torch.all((t >= 0) & (t <= 1))):       # also false for NaN
        raise ValueError("slerp: every t must be a number in [0, 1]")
    # The big products run in float32 (fast, and enough for pixels or latents); the
    # scalars that decide the path (norms, angle) in float64.
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    va = a.detach().reshape(-1).to(work)
    vb = b.detach().reshape(-1).to(device=device, dtype=work)
    if not bool(torch.isfinite(va).all() and torch.isfinite(vb).all()):
        raise ValueError("slerp: latents contain NaN or inf")

    va64, vb64 = va.double(), vb.double()
    na, nb = torch.linalg.vector_norm(va64), torch.linalg.vector_norm(vb64)
    norms = (1 - t) * na + t * nb                        # (N,)
    out = _path(va, vb, va64, vb64, na, nb, t, norms, work)

    out[t == 0] = va                                      # exact endpoints, whatever rounding did
    out[t == 1] = vb
    return out.reshape(len(t), *a.shape).to(a.dtype)


def _path(va, vb, va64, vb64, na, nb, t, norms, work) -> torch.Tensor:
    """(N, D) points: lerp, the arc in the (a, b) plane, or the arc through a chosen normal."""
    if float(na) == 0.0 or float(nb) == 0.0:
        return _lerp(va, vb, t, work)                     # no direction to turn from or to
    ua = va64 / na
    cos = torch.clamp(torch.dot(ua, vb64 / nb), -1.0, 1.0)
    # The orthogonal part of b measured directly: accurate where acos(cos) is not.
    perp = vb64 / nb - cos * ua
    sin = torch.linalg.vector_norm(perp)
    theta = float(torch.atan2(sin, cos))
    if theta < _PARALLEL:
        return _lerp(va, vb, t, work)
    if math.pi - theta < _OPPOSITE:
        if ua.numel() == 1:
            return _lerp(va, vb, t, work)                 # a line has no sideways to turn into
        perp = _orthogonal(ua)
    else:
        perp = perp / sin
    # point(t) = |p(t)| * (cos(t theta) ua + sin(t theta) perp), written on a and perp
    # so the large (N, D) arrays are built by two outer products.
    ca = norms * torch.cos(t * theta) / na
    cp = norms * torch.sin(t * theta)
    return torch.outer(ca.to(work), va) + torch.outer(cp.to(work), perp.to(work))


def _lerp(va, vb, t, work) -> torch.Tensor:
    tw = t.to(work)
    return torch.outer(1 - tw, va) + torch.outer(tw, vb)


def _orthogonal(u: torch.Tensor) -> torch.Tensor:
    """A unit vector orthogonal to unit `u`, the same for the same `u` on every run.

    Gram-Schmidt on the basis vector where |u| is smallest, so the projection removed is
    as small as possible and the result is well conditioned.
    """
    e = torch.zeros_like(u)
    e[int(torch.argmin(u.abs()))] = 1.0
    v = e - torch.dot(e, u) * u
    return v / torch.linalg.vector_norm(v)
