"""Gradients of the low-rank family (refattn.lowrank): Linformer (given projections get
their gradients, random ones are held fixed), Nyströmformer (through the landmarks, the
three softmax kernels and the pseudoinverse: its iterations, or the exact one) and Luna
(pack and unpack, the packed sequence's gradient, cotangents of the packed context).

Each VJP is checked three independent ways: central finite differences
(``numerical_vjp``, relative error <= 1e-7 normwise) on every differentiable input,
another form of the same function (exact attention's VJP in the limits where the
mechanism is exact attention, or composed of two attentions; the converged iterative
pseudoinverse against the exact one), and PyTorch float64 autograd through a
transcription of the forward written here (<= 1e-12). None of the three forwards is
causal (``supports_causal=False``: the papers define no causal form), so there are no
causal variants to check.
"""
import numpy as np
import pytest

import refattn as ra
from refattn.lowrank import (iterative_pinv, linformer_attention, linformer_projections,
                             luna_attention, nystrom_attention)
# (refattn.lowrank's __init__ does not re-export the VJPs yet: their own modules)
from refattn.lowrank.linformer import linformer_attention_vjp
from refattn.lowrank.luna import luna_attention_vjp
from refattn.lowrank.nystrom import (iterative_pinv_vjp, nystrom_attention_vjp,
                                     pinv_backward)
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp


def _problem(rng, *, n=5, m=7, hq=4, hkv=2, d=3, dv=2, scale=1.0):
    """A batch of 2 with GQA (4 query heads on 2 KV heads), ``k`` broadcast over the
    batch and ``v`` given with a batch dim of 1."""
    q = rng.standard_normal((2, hq, n, d)) * scale
    k = rng.standard_normal((hkv, m, d)) * scale
    v = rng.standard_normal((1, hkv, m, dv))
    g = rng.standard_normal((2, hq, n, dv))
    return q, k, v, g


def _err(exact, other, names="qkv"):
    return max(max_rel_error(exact[x], other[x], normwise=True) for x in names)


def _check_shapes(grads, **inputs):
    for name, x in inputs.items():
        got = grads[name]
        if isinstance(x, tuple):
            assert isinstance(got, tuple) and [a.shape for a in got] == [a.shape for a in x]
        else:
            assert got.shape == x.shape and got.dtype == np.float64, name


def test_the_vjps_are_attached():
    specs = ra.mechanisms()
    assert specs["linformer_attention"].vjp is linformer_attention_vjp
    assert specs["nystrom_attention"].vjp is nystrom_attention_vjp
    assert specs["luna_attention"].vjp is luna_attention_vjp
    assert iterative_pinv.vjp is iterative_pinv_vjp and ra.gradients.has_vjp(iterative_pinv)
    # none is causal: the VJP refuses causal= exactly as the forward does
    q, k, v, g = _problem(np.random.default_rng(0))
    for name, kw in (("linformer_attention", dict(rank=2, rng=0)),
                     ("nystrom_attention", dict(num_landmarks=2)),
                     ("luna_attention", dict(packed=2))):
        assert not specs[name].supports_causal
        with pytest.raises(TypeError):
            specs[name].fn(q, k, v, causal=True, **kw)
        with pytest.raises(TypeError):
            ra.vjp(name, q, k, v, g, causal=True, **kw)


# --------------------------------------------------------------------------- linformer


def _linformer_projs(rng, kind, m, r=3):
    """``proj`` and ``shared`` for each way of giving the projections."""
    if kind == "pair":                      # one pair for every batch element and head
        return (rng.standard_normal((r, m)), rng.standard_normal((r, m))), False
    if kind == "per-head":                  # E per (batch, KV head), F per KV head
        return (rng.standard_normal((2, 2, r, m)), rng.standard_normal((1, r, m))), False
    if kind == "shared":
        return rng.standard_normal((2, r, m)), True
    if kind == "mean":
        return linformer_projections(m, r, kind="mean"), False
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["pair", "per-head", "shared", "mean"])
@pytest.mark.parametrize("n,m", [(5, 7), (7, 4)])
def test_linformer_finite_differences(rng, kind, n, m):
    q, k, v, g = _problem(rng, n=n, m=m)
    proj, shared = _linformer_projs(rng, kind, m)
    exact = linformer_attention_vjp(q, k, v, g, proj=proj, shared=shared)
    if shared:
        inputs = dict(q=q, k=k, v=v, proj=proj)
        numeric = numerical_vjp(lambda **x: linformer_attention(**x, shared=True), inputs,
                                g)
        _check_shapes(exact, **inputs)
        assert _err(exact, numeric, ("q", "k", "v", "proj")) <= 1e-7
        return
    inputs = dict(q=q, k=k, v=v, e=proj[0], f=proj[1])
    numeric = numerical_vjp(lambda q, k, v, e, f: linformer_attention(q, k, v, proj=(e, f)),
                            inputs, g)
    _check_shapes(exact, q=q, k=k, v=v, proj=tuple(proj))
    exact = dict(exact, e=exact["proj"][0], f=exact["proj"][1])
    assert _err(exact, numeric, ("q", "k", "v", "e", "f")) <= 1e-7


def test_linformer_random_projections_are_held_fixed(rng):
    q, k, v, g = _problem(rng)
    exact = ra.vjp("linformer_attention", q, k, v, g, rank=3, rng=7)
    assert sorted(exact) == ["k", "q", "v"]              # no gradient for drawn E, F
    numeric = numerical_vjp(linformer_attention, dict(q=q, k=k, v=v), g, rank=3, rng=7)
    assert _err(exact, numeric) <= 1e-7
    # the same projections given as arrays: the same q, k, v gradients
    given = linformer_attention_vjp(q, k, v, g, proj=linformer_projections(7, 3, rng=7))
    assert _err(exact, given) == 0.0
    # a check that can fail: other projections give other gradients
    assert _err(exact, linformer_attention_vjp(q, k, v, g, rank=3, rng=8)) > 1e-3


def test_linformer_equals_attention_composed_with_the_projections(rng):
    """``O = attention(Q, E K, F V)``: exact attention's VJP, chained by hand through the
    projections (``dK = Eᵀ dK̃``, ``dE = dK̃ Kᵀ``), is an independent form."""
    q, k, v, g = _problem(rng, n=9, m=11, d=4, dv=3)
    k = np.broadcast_to(k, (2,) + k.shape)
    v = np.broadcast_to(v, (2,) + v.shape[1:])
    e, f = rng.standard_normal((2, 2, 5, 11)), rng.standard_normal((2, 2, 5, 11))
    mine = linformer_attention_vjp(q, k, v, g, proj=(e, f), scale=0.4)
    inner = ra.vjp("attention", q, e @ k, f @ v, g, scale=0.4)
    ref = {"q": inner["q"], "k": e.swapaxes(-1, -2) @ inner["k"],
           "v": f.swapaxes(-1, -2) @ inner["v"],
           "e": inner["k"] @ k.swapaxes(-1, -2), "f": inner["v"] @ v.swapaxes(-1, -2)}
    mine = dict(mine, e=mine["proj"][0], f=mine["proj"][1])
    assert _err(mine, ref, ("q", "k", "v", "e", "f")) <= 1e-12
    # E = F = I (rank = M): exact attention's gradients
    eye = np.eye(11)
    mine = linformer_attention_vjp(q, k, v, g, proj=(eye, eye))
    assert _err(mine, ra.vjp("attention", q, k, v, g)) <= 1e-12


def _torch_linformer(q, k, v, e, f, scale):
    """Linformer in torch from the paper's equation ``softmax(s Q (E K)ᵀ)(F V)``."""
    import torch
    group = q.shape[-3] // k.shape[-3]
    kp = (e @ k).repeat_interleave(group, dim=-3)
    vp = (f @ v).repeat_interleave(group, dim=-3)
    return torch.softmax(scale * q @ kp.transpose(-1, -2), dim=-1) @ vp


@pytest.mark.parametrize("shared", [False, True])
def test_linformer_matches_torch_autograd(rng, shared):
    torch = pytest.importorskip("torch")
    q, k, v, g = _problem(rng, n=12, m=10, d=5, dv=4)
    e = rng.standard_normal((2, 1, 4, 10))
    f = e if shared else rng.standard_normal((2, 4, 10))
    t = {x: torch.tensor(a, requires_grad=True) for x, a in dict(q=q, k=k, v=v, e=e, f=f)
         .items()}
    out = _torch_linformer(t["q"], t["k"], t["v"], t["e"], t["e"] if shared else t["f"],
                           0.3)
    names = ("q", "k", "v", "e") + (() if shared else ("f",))
    theirs = dict(zip(names, (x.numpy() for x in torch.autograd.grad(
        out, [t[x] for x in names], torch.from_numpy(g)))))
    proj = e if shared else (e, f)
    assert max_rel_error(linformer_attention(q, k, v, proj=proj, shared=shared, scale=0.3),
                         out.detach().numpy(), normwise=True) <= 1e-12
    ours = ra.vjp("linformer_attention", q, k, v, g, proj=proj, shared=shared, scale=0.3)
    if shared:
        ours["e"] = ours["proj"]
    else:
        ours["e"], ours["f"] = ours["proj"]
    assert _err(ours, theirs, names) <= 1e-12


# --------------------------------------------------------------------------- nystrom


@pytest.mark.parametrize("iters", [0, 1, 6, None])
@pytest.mark.parametrize("n,m,c", [(5, 7, 3), (7, 6, 2), (6, 6, 6), (5, 5, 1)])
def test_nystrom_finite_differences(rng, iters, n, m, c):
    q, k, v, g = _problem(rng, n=n, m=m)
    kw = dict(num_landmarks=c, pinv_iters=iters)
    exact = ra.vjp("nystrom_attention", q, k, v, g, **kw)
    _check_shapes(exact, q=q, k=k, v=v)
    # the landmark kernel Ã is ill-conditioned (cond 629 in one case here): the default
    # step's truncation error (h² times third derivatives of Ã⁺) reaches 1e-6; h = 1e-6
    # keeps it and the rounding error (~1e-10) small
    numeric = numerical_vjp(nystrom_attention, dict(q=q, k=k, v=v), g, step=1e-6, **kw)
    assert _err(exact, numeric) <= 1e-7


@pytest.mark.parametrize("iters", [0, 1, 2, 6, 9])
def test_iterative_pinv_finite_differences(rng, iters):
    """Through every iteration and the start ``Aᵀ / (‖A‖₁‖A‖∞)`` (its norms included):
    general matrices with signs (``|x|``) and no ties in the norms."""
    a = rng.standard_normal((2, 3, 4, 4)) + 2 * np.eye(4)
    g = rng.standard_normal(a.shape)
    exact = ra.vjp(iterative_pinv, a, g, iters=iters)
    numeric = numerical_vjp(lambda a: iterative_pinv(a, iters), dict(a=a), g)
    assert exact["a"].shape == a.shape
    assert _err(exact, numeric, "a") <= 1e-7
    # an all-zero matrix: Z = 0 whatever A's direction, zero gradient
    zero = ra.vjp(iterative_pinv, np.zeros((3, 3)), np.ones((3, 3)), iters=iters)["a"]
    assert np.isfinite(zero).all() and not zero.any()


def test_exact_pinv_derivative(rng):
    """The Golub-Pereyra derivative: finite differences on an invertible matrix (where
    it is ``-A⁻ᵀ G A⁻ᵀ``), torch's ``linalg.pinv`` autograd on a rank-deficient one
    (where the two extra terms matter; finite differences cannot see them: the rank
    jumps)."""
    a = rng.standard_normal((2, 4, 4)) + 2 * np.eye(4)
    g = rng.standard_normal(a.shape)
    exact = pinv_backward(a, np.linalg.pinv(a), g)
    numeric = numerical_vjp(np.linalg.pinv, dict(a=a), g)["a"]
    assert max_rel_error(exact, numeric, normwise=True) <= 1e-7
    inv = np.linalg.inv(a).swapaxes(-1, -2)
    assert max_rel_error(exact, -inv @ g @ inv, normwise=True) <= 1e-12
    torch = pytest.importorskip("torch")
    low = rng.standard_normal((3, 5, 2)) @ rng.standard_normal((3, 2, 5))   # rank 2
    g = rng.standard_normal(low.shape)
    t = torch.tensor(low, requires_grad=True)
    theirs, = torch.autograd.grad(torch.linalg.pinv(t), t, torch.from_numpy(g))
    mine = pinv_backward(low, np.linalg.pinv(low), g)
    assert max_rel_error(mine, theirs.numpy(), normwise=True) <= 1e-12
    zt = np.linalg.pinv(low).swapaxes(-1, -2)
    assert max_rel_error(-zt @ g @ zt, theirs.numpy(), normwise=True) > 1e-3


def test_nystrom_forms_agree(rng):
    """A well-conditioned landmark kernel: the converged iterations give the exact
    pseudoinverse's gradient (their derivative converges with the iterates); with
    ``c = N = M`` and the exact inverse, Nyströmformer is exact attention."""
    q, k, v, g = _problem(rng, n=9, m=11, d=4, dv=3, scale=1.5)
    exact = nystrom_attention_vjp(q, k, v, g, num_landmarks=3, pinv_iters=None)
    for iters in (40, 60):
        assert _err(exact, nystrom_attention_vjp(q, k, v, g, num_landmarks=3,
                                                 pinv_iters=iters)) <= 1e-11
    # a check that can fail: 6 iterations are not converged here
    assert _err(exact, nystrom_attention_vjp(q, k, v, g, num_landmarks=3)) > 1e-8
    q, k, v, g = _problem(rng, n=8, m=8, d=4, dv=3)
    mine = nystrom_attention_vjp(q, k, v, g, num_landmarks=8, pinv_iters=None)
    assert _err(mine, ra.vjp("attention", q, k, v, g)) <= 1e-11


def _torch_segment_means(x, c):
    import torch
    return torch.stack([s.mean(dim=-2) for s in torch.tensor_split(x, c, dim=-2)], dim=-2)


def _torch_iterative_inv(a, iters):
    """Nyströmformer's ``iterative_inv`` (the official code) with the norms per matrix."""
    import torch
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    n1 = torch.max(torch.sum(torch.abs(a), dim=-2), dim=-1).values
    ninf = torch.max(torch.sum(torch.abs(a), dim=-1), dim=-1).values
    z = a.transpose(-1, -2) / (n1 * ninf)[..., None, None]
    for _ in range(iters):
        az = a @ z
        z = (0.25 * z) @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _torch_nystrom(q, k, v, c, iters, scale):
    import torch
    group = q.shape[-3] // k.shape[-3]
    q_land = _torch_segment_means(q, c)
    k_land = _torch_segment_means(k, c).repeat_interleave(group, dim=-3)
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    f = torch.softmax(scale * q @ k_land.transpose(-1, -2), dim=-1)
    a = torch.softmax(scale * q_land @ k_land.transpose(-1, -2), dim=-1)
    b = torch.softmax(scale * q_land @ k.transpose(-1, -2), dim=-1)
    z = torch.linalg.pinv(a) if iters is None else _torch_iterative_inv(a, iters)
    return f @ (z @ (b @ v))


@pytest.mark.parametrize("iters", [6, 3, None])
@pytest.mark.parametrize("n,m,c", [(12, 10, 4), (11, 13, 3)])
def test_nystrom_matches_torch_autograd(rng, iters, n, m, c):
    torch = pytest.importorskip("torch")
    q, k, v, g = _problem(rng, n=n, m=m, d=5, dv=4, scale=1.2)
    t = {x: torch.tensor(a, requires_grad=True) for x, a in dict(q=q, k=k, v=v).items()}
    out = _torch_nystrom(t["q"], t["k"], t["v"], c, iters, 0.5)
    theirs = dict(zip("qkv", (x.numpy() for x in torch.autograd.grad(
        out, [t["q"], t["k"], t["v"]], torch.from_numpy(g)))))
    kw = dict(num_landmarks=c, pinv_iters=iters, scale=0.5)
    assert max_rel_error(nystrom_attention(q, k, v, **kw), out.detach().numpy(),
                         normwise=True) <= 1e-12
    assert _err(ra.vjp("nystrom_attention", q, k, v, g, **kw), theirs) <= 1e-12


# --------------------------------------------------------------------------- luna


PACKED = {"int 3": 3, "int 1": 1, "(l, D)": (3, 3), "(1, l, D)": (1, 3, 3),
          "(Hkv, l, D)": (2, 3, 3), "(Hq, l, D)": (4, 3, 3), "(B, 1, l, D)": (2, 1, 3, 3),
          "(B, Hq, l, D)": (2, 4, 3, 3)}


@pytest.mark.parametrize("packed", PACKED)
def test_luna_finite_differences(rng, packed):
    q, k, v, g = _problem(rng, n=5, m=7)
    p = PACKED[packed]
    if isinstance(p, int):
        exact = ra.vjp("luna_attention", q, k, v, g, packed=p)
        assert sorted(exact) == ["k", "q", "v"]
        numeric = numerical_vjp(luna_attention, dict(q=q, k=k, v=v), g, packed=p)
        assert _err(exact, numeric) <= 1e-7
        return
    p = rng.standard_normal(p)
    exact = ra.vjp("luna_attention", q, k, v, g, packed=p)
    inputs = dict(q=q, k=k, v=v, packed=p)
    _check_shapes(exact, **inputs)
    numeric = numerical_vjp(luna_attention, inputs, g)
    assert _err(exact, numeric, inputs) <= 1e-7


@pytest.mark.parametrize("packed", [2, np.ones((2, 3)) * 0.3])
def test_luna_packed_context_cotangents(rng, packed):
    q, k, v, g = _problem(rng, n=5, m=7)
    out, ck, cv = luna_attention(q, k, v, packed=packed, return_packed=True)
    gk, gv = rng.standard_normal(ck.shape), rng.standard_normal(cv.shape)
    inputs = dict(q=q, k=k, v=v) if isinstance(packed, int) else \
        dict(q=q, k=k, v=v, packed=packed)
    for cot in ((g, gk, gv), (None, gk, None), (g, None, gv)):
        exact = ra.vjp("luna_attention", q, k, v, cot[0], packed=packed, return_packed=True,
                       grad_packed_keys=cot[1], grad_packed_values=cot[2])
        numeric = numerical_vjp(lambda **x: luna_attention(**x, return_packed=True),
                                {x: np.array(a) for x, a in inputs.items()}, cot,
                                **({"packed": packed} if isinstance(packed, int) else {}))
        assert _err(exact, numeric, inputs) <= 1e-7


def test_luna_equals_two_attentions(rng):
    """Pack = ``attention(P, K, [K | V])``, unpack = ``attention(Q, C_K, C_V)``: exact
    attention's VJP, chained by hand, is an independent form."""
    q, k, v, g = _problem(rng, n=9, m=11, d=4, dv=3)
    p = rng.standard_normal((2, 4, 5, 4))                # one packed sequence per head
    gk, gv = rng.standard_normal((2, 4, 5, 4)), rng.standard_normal((2, 4, 5, 3))
    kb, vb = np.broadcast_to(k, (2,) + k.shape), np.broadcast_to(v, (2,) + v.shape[1:])
    kv = np.concatenate([kb, vb], axis=-1).repeat(2, axis=1)   # (2, Hq, M, D + Dv)
    packed_ctx = ra.attention(p, kb.repeat(2, axis=1), kv, scale=0.6)
    ck, cv = packed_ctx[..., :4], packed_ctx[..., 4:]
    unpack = ra.vjp("attention", q, ck, cv, g, scale=0.6)
    pack = ra.vjp("attention", p, kb.repeat(2, axis=1), kv,
                  np.concatenate([unpack["k"] + gk, unpack["v"] + gv], axis=-1), scale=0.6)
    dk = (pack["k"] + pack["v"][..., :4]).reshape(2, 2, 2, 11, 4).sum((0, 2))
    dv = pack["v"][..., 4:].reshape(2, 2, 2, 11, 3).sum((0, 2))[None]
    ref = {"q": unpack["q"], "k": dk, "v": dv, "packed": pack["q"]}
    mine = luna_attention_vjp(q, k, v, g, packed=p, scale=0.6, grad_packed_keys=gk,
                              grad_packed_values=gv)
    assert _err(mine, ref, ref) <= 1e-12


def _torch_luna(q, k, v, p, scale):
    """Luna in torch from the paper's equations, ``p`` ``(..., Hq, l, D)``."""
    import torch
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    p = p.expand(*q.shape[:-2], *p.shape[-2:])             # the packed rows per query head
    pi = torch.softmax(scale * p @ k.transpose(-1, -2), dim=-1)
    ck, cv = pi @ k, pi @ v
    return torch.softmax(scale * q @ ck.transpose(-1, -2), dim=-1) @ cv, ck, cv


@pytest.mark.parametrize("packed", ["segments", "(Hkv, l, D)"])
def test_luna_matches_torch_autograd(rng, packed):
    torch = pytest.importorskip("torch")
    q, k, v, g = _problem(rng, n=12, m=10, d=5, dv=4)
    arrays = dict(q=q, k=k, v=v)
    if packed != "segments":
        arrays["packed"] = rng.standard_normal((2, 4, 5))
    t = {x: torch.tensor(a, requires_grad=True) for x, a in arrays.items()}
    p = _torch_segment_means(t["q"], 4) if packed == "segments" else \
        t["packed"].repeat_interleave(2, dim=-3)
    out, ck, cv = _torch_luna(t["q"], t["k"], t["v"], p, 0.4)
    gk, gv = rng.standard_normal(ck.shape), rng.standard_normal(cv.shape)
    theirs = dict(zip(arrays, (x.numpy() for x in torch.autograd.grad(
        (out, ck, cv), list(t.values()),
        (torch.from_numpy(g), torch.from_numpy(gk), torch.from_numpy(gv))))))
    kw = dict(packed=4 if packed == "segments" else arrays["packed"], scale=0.4)
    mine = luna_attention(q, k, v, return_packed=True, **kw)
    for a, b in zip(mine, (out, ck, cv)):
        assert max_rel_error(a, b.detach().numpy(), normwise=True) <= 1e-12
    ours = ra.vjp("luna_attention", q, k, v, g, grad_packed_keys=gk, grad_packed_values=gv,
                  **kw)
    assert _err(ours, theirs, arrays) <= 1e-12


# --------------------------------------------------------------------------- errors


CALLS = {"linformer_attention": dict(rank=2, rng=0),
         "nystrom_attention": dict(num_landmarks=2),
         "luna_attention": dict(packed=2)}


@pytest.mark.parametrize("name", CALLS)
def test_bad_cotangents_name_themselves_and_the_expected_shape(rng, name):
    q, k, v, _ = _problem(rng)
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape "
                                         r"\(2, 4, 5, 2\), got \(2, 4, 5, 3\)"):
        ra.vjp(name, q, k, v, np.ones((2, 4, 5, 3)), **CALLS[name])
    with pytest.raises(ValueError, match="grad_out"):
        ra.vjp(name, q, k, v, np.full((2, 4, 5, 2), np.nan), **CALLS[name])
    if name == "luna_attention":
        with pytest.raises(ValueError, match=r"grad_packed_keys must have the output's "
                                             r"shape \(2, 4, 2, 3\)"):
            ra.vjp(name, q, k, v, None, grad_packed_keys=np.ones((2, 4, 2, 2)),
                   **CALLS[name])
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape \(4, 4\)"):
        ra.vjp(iterative_pinv, np.eye(4), np.eye(3), iters=2)


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("size", [1e-3, 30.0])
def test_extreme_inputs_give_finite_gradients(rng, name, size):
    """Near-uniform and saturated softmaxes over a longer sequence (N = M = 200): logits
    of order 1e-6 make Nyströmformer's landmark kernel nearly singular, of order 1e3
    one-hot."""
    q, k, v, g = _problem(rng, n=200, m=200, d=4, dv=3, scale=size)
    kw = dict(CALLS[name], **({"num_landmarks": 8} if name == "nystrom_attention" else {}))
    grads = ra.vjp(name, q, k, v, g, **kw)
    assert all(np.isfinite(x).all() for x in grads.values())
    if name == "nystrom_attention":
        exact = ra.vjp(name, q, k, v, g, num_landmarks=8, pinv_iters=None)
        assert all(np.isfinite(x).all() for x in exact.values())
