"""slerp: exact endpoints, never NaN, norms and distances that behave, all t in one call."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dreamd.latent.slerp import slerp

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=32)
ts_strategy = st.lists(st.floats(min_value=0, max_value=1, allow_nan=False), min_size=1, max_size=12)


@st.composite
def vector_pairs(draw, kind=None):
    """Two same-shaped latents: random, near-parallel, opposite, scaled copies, or with zeros."""
    n = draw(st.integers(1, 40))
    a = torch.tensor(draw(st.lists(finite, min_size=n, max_size=n)), dtype=torch.float32)
    kind = kind or draw(st.sampled_from(["random", "near", "near_opposite", "opposite", "scaled",
                                         "zero_a", "zero_b", "zeros"]))
    if kind == "random":
        b = torch.tensor(draw(st.lists(finite, min_size=n, max_size=n)), dtype=torch.float32)
    elif kind in ("near", "near_opposite"):
        eps = draw(st.floats(1e-9, 1e-3))
        b = a + eps * torch.sign(torch.arange(n, dtype=torch.float32) - n / 2) * (a.abs().max() + 1)
        b = -b if kind == "near_opposite" else b
    elif kind == "opposite":
        b = -a * draw(st.floats(0.1, 10))
    elif kind == "scaled":
        b = a * draw(st.floats(0.1, 10))
    elif kind == "zero_a":
        a, b = torch.zeros(n), a
    elif kind == "zero_b":
        b = torch.zeros(n)
    else:
        a, b = torch.zeros(n), torch.zeros(n)
    shape = draw(st.sampled_from([(n,), (1, n), (n, 1, 1)]))
    return a.reshape(shape), b.reshape(shape)


@settings(max_examples=300, deadline=None)
@given(vector_pairs(), ts_strategy)
def test_endpoints_exact_and_never_nan(pair, ts):
    a, b = pair
    out = slerp(a, b, [0.0, *ts, 1.0])
    assert out.shape == (len(ts) + 2, *a.shape) and out.dtype == a.dtype
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], a) and torch.equal(out[-1], b)


@settings(max_examples=200, deadline=None)
@given(vector_pairs(), ts_strategy)
def test_norm_stays_between_the_endpoint_norms(pair, ts):
    a, b = pair
    # A 1-D pair of opposite signs has no arc to follow: it lerps through zero (tested below).
    assume(not (a.numel() == 1 and float(a.flatten()[0]) * float(b.flatten()[0]) < 0))
    out = slerp(a, b, ts).flatten(1).double().norm(dim=1)
    na, nb = float(a.double().norm()), float(b.double().norm())
    lo, hi = min(na, nb), max(na, nb)
    tol = 1e-5 * hi + 1e-6
    assert torch.all(out >= lo - tol) and torch.all(out <= hi + tol)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 40).flatmap(lambda n: st.tuples(
    st.lists(finite, min_size=n, max_size=n), st.lists(finite, min_size=n, max_size=n))), ts_strategy)
def test_equal_norms_stay_on_the_sphere(lists, ts):
    a, b = (torch.tensor(v, dtype=torch.float64) for v in lists)
    if a.norm() < 1e-3 or b.norm() < 1e-3:
        return
    b = b * (a.norm() / b.norm())                       # equal norms
    norms = slerp(a, b, ts).norm(dim=1)
    assert torch.allclose(norms, a.norm().expand_as(norms), rtol=1e-9)


@settings(max_examples=200, deadline=None)
@given(vector_pairs(), st.lists(st.floats(0, 1), min_size=2, max_size=12),
       st.sampled_from(["equal", "growing"]))
def test_distance_to_a_grows_with_t(pair, ts, norms):
    # Holds when |b| >= |a|. With |b| < |a| and b nearly opposite, the shrinking arc
    # passes closer to a's antipode than b is, so it cannot hold there; not tested.
    a, b = (x.double() for x in pair)
    if a.norm() == 0 or b.norm() == 0:
        return
    b = b * (a.norm() / b.norm()) * (1.0 if norms == "equal" else 1.7)
    ts = sorted(ts)
    dist = (slerp(a, b, ts) - a).flatten(1).norm(dim=1)
    assert torch.all(dist[1:] >= dist[:-1] - 1e-9 * (1 + a.norm()))


def test_matches_the_textbook_formula():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    b = b * a.norm() / b.norm()
    va, vb = a.double().flatten(), b.double().flatten()
    theta = math.acos(float(va @ vb / (va.norm() * vb.norm())))
    ts = [0.1, 0.25, 0.5, 0.9]
    out = slerp(a, b, torch.tensor(ts))
    for i, t in enumerate(ts):
        want = (math.sin((1 - t) * theta) * va + math.sin(t * theta) * vb) / math.sin(theta)
        assert torch.allclose(out[i].double().flatten(), want, atol=1e-5)


def test_opposite_vectors_turn_through_a_deterministic_orthogonal_direction():
    a = torch.tensor([3.0, 1.0, -2.0, 0.5])
    out = slerp(a, -a, [0.5])
    again = slerp(a.clone(), -a.clone(), [0.5])
    assert torch.equal(out, again)
    assert abs(float(out[0] @ a)) < 1e-4                 # halfway round is at right angles
    assert torch.isclose(out[0].norm(), a.norm())


def test_one_dimensional_opposites_lerp_through_zero():
    out = slerp(torch.tensor([2.0]), torch.tensor([-2.0]), [0.25, 0.5])
    assert torch.allclose(out, torch.tensor([[1.0], [0.0]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_returns_the_dtype_of_a(dtype):
    a, b = torch.randn(2, 4, 4).to(dtype), torch.randn(2, 4, 4).to(dtype)
    out = slerp(a, b, [0.0, 0.5, 1.0])
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    assert torch.equal(out[0], a) and torch.equal(out[2], b)


def test_many_ts_in_one_call_match_one_at_a_time():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 16, 8, generator=g), torch.randn(4, 16, 8, generator=g)
    ts = torch.linspace(0, 1, 11)
    batch = slerp(a, b, ts)
    single = torch.cat([slerp(a, b, [float(t)]) for t in ts])
    assert torch.allclose(batch, single, atol=1e-6)


def test_rejects_bad_input():
    a = torch.zeros(3)
    with pytest.raises(ValueError):
        slerp(a, torch.zeros(4), [0.5])
    with pytest.raises(ValueError):
        slerp(a, a, [1.5])
    with pytest.raises(ValueError):
        slerp(a, a, [float("nan")])
    with pytest.raises(ValueError):
        slerp(torch.tensor([float("inf"), 0, 0]), a, [0.5])
    with pytest.raises(TypeError):
        slerp(torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), [0.5])
