"""Gradients of the linear family (refattn.linear): linear attention (every feature map
and form, causal and not) and Performer (every kernel, with and without the stabilizer,
random features held fixed).

Each VJP is checked three independent ways: central finite differences
(``numerical_vjp``, relative error <= 1e-7 normwise), agreement of its forms
(quadratic / recurrent / chunkwise / two products, <= 1e-11), and PyTorch float64
autograd through a transcription of the forward written here (<= 1e-12); linear
attention also against flash-linear-attention's naive recurrent reference (float32).
"""
import numpy as np
import pytest

import refattn as ra
from refattn.linear import linear_attention, performer_attention
# (refattn.linear's __init__ does not re-export the VJPs yet: their own modules)
from refattn.linear.linear import linear_attention_vjp
from refattn.linear.performer import performer_attention_vjp
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp

FEATURE_MAPS = ("elu", "relu", "identity")
KERNELS = ("positive", "hyperbolic", "trigonometric")
METHODS = (None, "quadratic", "recurrent", "chunkwise")


def _problem(rng, *, n=5, m=7, hq=4, hkv=2, d=3, dv=2, positive=False):
    """A batch of 2 with GQA (4 query heads on 2 KV heads) and ``k`` broadcast over the
    batch; ``positive``: inputs in [0.2, 1.2] (identity features with denominators well
    away from 0, so finite differences are well conditioned)."""
    draw = (lambda s: rng.uniform(0.2, 1.2, s)) if positive else rng.standard_normal
    q = draw((2, hq, n, d))
    k = draw((hkv, m, d))                                     # broadcast over the batch
    v = rng.standard_normal((2, hkv, m, dv))
    g = rng.standard_normal((2, hq, n, dv))
    return q, k, v, g


def _rel(exact, other):
    return max(max_rel_error(exact[x], other[x], normwise=True) for x in "qkv")


# --------------------------------------------------------------------------- linear


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("causal,n,m", [(False, 5, 7), (True, 5, 7), (True, 7, 5),
                                        (True, 6, 6)])
def test_linear_finite_differences(rng, feature_map, causal, n, m):
    q, k, v, g = _problem(rng, n=n, m=m, positive=feature_map == "identity")
    kw = dict(feature_map=feature_map, causal=causal)
    num = numerical_vjp(linear_attention, dict(q=q, k=k, v=v), g, **kw)
    exact = ra.vjp("linear_attention", q, k, v, g, **kw)
    assert {x: exact[x].shape for x in "qkv"} == {"q": q.shape, "k": k.shape, "v": v.shape}
    assert _rel(exact, num) <= 1e-7
    if n > m and causal:                     # the first N - M queries see no key
        assert not exact["q"][..., : n - m, :].any()


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("causal,n,m", [(False, 9, 13), (True, 9, 13), (True, 13, 9),
                                        (True, 11, 11), (True, 1, 4)])
def test_linear_forms_agree(rng, feature_map, causal, n, m):
    q, k, v, g = _problem(rng, n=n, m=m, d=4, dv=3, positive=feature_map == "identity")
    base = linear_attention_vjp(q, k, v, g, feature_map=feature_map, causal=causal,
                                method="quadratic")
    for method in METHODS:
        for chunk in (1, 3, 4, 64):
            other = linear_attention_vjp(q, k, v, g, feature_map=feature_map, causal=causal,
                                         method=method, chunk_size=chunk)
            assert _rel(base, other) <= 1e-11, (method, chunk)
    # a check that can fail: a different cotangent changes the gradient
    other = linear_attention_vjp(q, k, v, g * (1 + 1e-6 * rng.standard_normal(g.shape)),
                                 feature_map=feature_map, causal=causal)
    assert _rel(base, other) > 1e-11


def _torch_linear(q, k, v, feature_map, causal):
    """Linear attention in torch, written from the paper's equation: masked
    ``φ(q)·φ(k)`` weights normalized by their row sums, 0 where the sum is 0."""
    import torch
    phi = {"elu": lambda x: torch.nn.functional.elu(x) + 1, "relu": torch.relu,
           "identity": lambda x: x}[feature_map]
    return _torch_normalized(phi(q), phi(k), v, causal)


def _torch_normalized(fq, fk, v, causal):
    """``φ(q)·φ(k)`` weights, masked (bottom-right causal), normalized by their row sums,
    0 where the sum is 0; GQA by repeating the KV heads."""
    import torch
    group = fq.shape[-3] // fk.shape[-3]
    fk, vv = fk.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    a = fq @ fk.transpose(-1, -2)                                      # (..., H, N, M)
    n, m = a.shape[-2:]
    if causal:
        keep = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
        a = torch.where(keep, a, torch.zeros(()))
    den = a.sum(-1, keepdim=True)
    safe = torch.where(den != 0, den, torch.ones(()))
    return torch.where(den != 0, (a @ vv) / safe, torch.zeros(()))


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("causal,n,m", [(False, 6, 8), (True, 6, 8), (True, 8, 6)])
def test_linear_matches_torch_autograd(rng, feature_map, causal, n, m):
    torch = pytest.importorskip("torch")
    q, k, v, g = _problem(rng, n=n, m=m, d=4, dv=3, positive=feature_map == "identity")
    if feature_map == "relu":
        q[..., 0, :] = -np.abs(q[..., 0, :])       # an all-zero feature row: 0 output
    t = {x: torch.tensor(a, requires_grad=True) for x, a in dict(q=q, k=k, v=v).items()}
    out = _torch_linear(t["q"], t["k"], t["v"], feature_map, causal)
    theirs = dict(zip("qkv", (x.numpy() for x in torch.autograd.grad(
        out, [t["q"], t["k"], t["v"]], torch.from_numpy(g)))))
    assert max_rel_error(linear_attention(q, k, v, feature_map=feature_map, causal=causal),
                         out.detach().numpy(), normwise=True) <= 1e-12
    for method in METHODS:
        ours = linear_attention_vjp(q, k, v, g, feature_map=feature_map, causal=causal,
                                    method=method, chunk_size=3)
        assert _rel(ours, theirs) <= 1e-12, method


@pytest.mark.slow          # importing flash-linear-attention takes 15-30 s
def test_linear_matches_flash_linear_attention_naive(rng):
    """fla's ``naive_recurrent_linear_attn(normalize=True)`` (float32, ``(B, T, H, K)``,
    ``1e-10`` added to the denominator) on ``elu + 1`` features, differentiated by
    torch: agreement at float32 accuracy."""
    pytest.importorskip("torch")
    naive = pytest.importorskip("fla.ops.linear_attn.naive",
                                reason="flash-linear-attention is not installed")
    import torch
    q, k, v = rng.standard_normal((3, 2, 3, 40, 8))            # (B, H, T, D)
    g = rng.standard_normal(v.shape)
    t = {x: torch.tensor(a, dtype=torch.float32, requires_grad=True)
         for x, a in dict(q=q, k=k, v=v).items()}
    bthd = lambda x: x.transpose(1, 2)                          # noqa: E731
    phi = lambda x: torch.nn.functional.elu(x) + 1             # noqa: E731
    out, _ = naive.naive_recurrent_linear_attn(bthd(phi(t["q"])), bthd(phi(t["k"])),
                                               bthd(t["v"]), normalize=True)
    theirs = torch.autograd.grad(bthd(out), [t["q"], t["k"], t["v"]],
                                 torch.tensor(g, dtype=torch.float32))
    theirs = dict(zip("qkv", (x.double().numpy() for x in theirs)))
    ours = linear_attention_vjp(q, k, v, g, causal=True)
    assert _rel(ours, theirs) <= 1e-5
    wrong = linear_attention_vjp(q, k, v, g, causal=False)
    assert _rel(wrong, theirs) > 1e-2


class _ExpPair:
    """A user feature map ``φ(x) = (e^x, e^{-x})`` (F = 2D, positive) carrying its
    derivative as ``.vjp``."""

    def __call__(self, x):
        return np.concatenate([np.exp(x), np.exp(-x)], -1)

    def vjp(self, x, grad_phi):
        d = x.shape[-1]
        return grad_phi[..., :d] * np.exp(x) - grad_phi[..., d:] * np.exp(-x)


def test_linear_callable_feature_map(rng):
    q, k, v, g = _problem(rng)
    fmap = _ExpPair()
    for causal in (False, True):
        num = numerical_vjp(linear_attention, dict(q=q, k=k, v=v), g, feature_map=fmap,
                            causal=causal)
        for method in METHODS:
            exact = linear_attention_vjp(q, k, v, g, feature_map=fmap, causal=causal,
                                         method=method, chunk_size=2)
            assert _rel(exact, num) <= 1e-7
    with pytest.raises(TypeError, match=r"feature_map\.vjp\(x, grad_phi\)"):
        linear_attention_vjp(q, k, v, g, feature_map=lambda x: np.exp(x))
    bad = _ExpPair()
    bad.vjp = lambda x, gp: gp                                  # wrong shape (F = 2D)
    with pytest.raises(ValueError, match="must return the shape of q"):
        linear_attention_vjp(q, k, v, g, feature_map=bad)


def test_linear_bad_grad_out(rng):
    q, k, v, g = _problem(rng)
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape "
                                         r"\(2, 4, 5, 2\), got \(2, 4, 5, 3\)"):
        ra.vjp("linear_attention", q, k, v, np.zeros((2, 4, 5, 3)))
    with pytest.raises(ValueError, match="grad_out"):
        linear_attention_vjp(q, k, v, np.full(g.shape, np.nan))


def test_linear_extreme_inputs(rng):
    """Long sequences, huge and underflowing features, all-zero relu rows: finite
    gradients, zero for the rows whose denominator is 0, equal across forms."""
    q, k, v = rng.standard_normal((3, 1, 2, 300, 4)) * 30
    g = rng.standard_normal(v.shape)
    q[..., 7, :] = -800.0                            # elu features underflow: den = 0
    for fm in ("elu", "relu"):
        grads = [linear_attention_vjp(q, k, v, g, feature_map=fm, causal=True, method=m,
                                      chunk_size=32) for m in METHODS]
        for gr in grads:
            assert all(np.isfinite(gr[x]).all() for x in "qkv")
            assert not gr["q"][..., 7, :].any()
            assert _rel(grads[1], gr) <= 1e-11


def test_linear_quadratic_backward_checks_memory(rng):
    q, k, v, g = _problem(rng)
    with pytest.raises(ra.MemoryBudgetError, match=r"method='chunkwise'"):
        linear_attention_vjp(q, k, v, g, causal=True, method="quadratic", memory_budget=1000)
    linear_attention_vjp(q, k, v, g, causal=True, method="chunkwise", memory_budget=1000)


def test_linear_vjp_is_registered():
    from refattn.gradients import has_vjp
    assert has_vjp("linear_attention") and has_vjp(linear_attention)
    assert ra.mechanisms()["linear_attention"].vjp is linear_attention_vjp


# --------------------------------------------------------------------------- performer


def _omega(rng, m=5, d=3):
    return rng.standard_normal((m, d))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("stabilize", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_performer_finite_differences(rng, kernel, stabilize, causal):
    q, k, v, g = _problem(rng)
    if kernel == "trigonometric":                # signed weights: keep denominators away
        q, k = q * 0.3, k * 0.3                  # from 0 (FD conditioning)
    kw = dict(num_features=5, kernel=kernel, stabilize=stabilize, causal=causal, rng=7)
    num = numerical_vjp(performer_attention, dict(q=q, k=k, v=v), g, **kw)
    exact = ra.vjp("performer_attention", q, k, v, g, **kw)
    assert _rel(exact, num) <= 1e-7


def test_performer_finite_differences_scale_and_shapes(rng):
    """Negative and explicit scales, N > M causal (rows seeing no key)."""
    q, k, v, g = _problem(rng, n=7, m=5)
    for scale in (-0.4, 0.9):
        kw = dict(num_features=6, causal=True, rng=1, scale=scale, orthogonal=False)
        num = numerical_vjp(performer_attention, dict(q=q, k=k, v=v), g, **kw)
        exact = performer_attention_vjp(q, k, v, g, **kw)
        assert _rel(exact, num) <= 1e-7
        assert not exact["q"][..., :2, :].any()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal,n,m", [(False, 9, 13), (True, 9, 13), (True, 13, 9)])
def test_performer_forms_agree(rng, kernel, causal, n, m):
    q, k, v, g = _problem(rng, n=n, m=m, d=4, dv=3)
    kw = dict(num_features=16, kernel=kernel, causal=causal, rng=2)
    base = performer_attention_vjp(q, k, v, g, method="quadratic", **kw)
    for method in METHODS:
        for chunk in (1, 3, 64):
            other = performer_attention_vjp(q, k, v, g, method=method, chunk_size=chunk, **kw)
            assert _rel(base, other) <= 1e-11, (method, chunk)


def _torch_performer(q, k, v, omega, kernel, stabilize, causal, scale):
    """Performer in torch, from the paper's feature maps and the forward's stabilizer
    (query rows: their own max exponent; keys: one max per batch element and head).
    The max is *not* detached: autograd differentiates it, and it must cancel."""
    import torch
    r = abs(scale) ** 0.5
    x, y = q * r, k * (r if scale > 0 else -r)
    m = omega.shape[0]

    def feats(z, shift_axes):
        p = z @ omega.T
        half = (z * z).sum(-1, keepdim=True) / 2
        if kernel == "positive":
            h, g, norm = p - half, None, m ** -0.5
        elif kernel == "hyperbolic":
            h, g, norm = torch.cat([p - half, -p - half], -1), None, (2 * m) ** -0.5
        else:
            h, g, norm = half, torch.cat([torch.sin(p), torch.cos(p)], -1), m ** -0.5
        if stabilize:
            h = h - h.amax(dim=shift_axes, keepdim=True)
        f = torch.exp(h) * norm
        return f if g is None else f * g

    return _torch_normalized(feats(x, (-1,)), feats(y, (-2, -1)), v, causal)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("stabilize", [True, False])
@pytest.mark.parametrize("causal,n,m", [(False, 6, 8), (True, 8, 6)])
def test_performer_matches_torch_autograd(rng, kernel, stabilize, causal, n, m):
    torch = pytest.importorskip("torch")
    q, k, v, g = _problem(rng, n=n, m=m, d=4, dv=3)
    k = np.broadcast_to(k, (2,) + k.shape).copy()         # torch side: no broadcasting
    omega = rng.standard_normal((8, 4))
    scale = 0.5
    t = {x: torch.tensor(a, requires_grad=True) for x, a in dict(q=q, k=k, v=v).items()}
    out = _torch_performer(t["q"], t["k"], t["v"], torch.from_numpy(omega), kernel,
                           stabilize, causal, scale)
    theirs = dict(zip("qkv", (x.numpy() for x in torch.autograd.grad(
        out, [t["q"], t["k"], t["v"]], torch.from_numpy(g)))))
    kw = dict(num_features=8, kernel=kernel, stabilize=stabilize, causal=causal,
              omega=omega, scale=scale)
    assert max_rel_error(performer_attention(q, k, v, **kw), out.detach().numpy(),
                         normwise=True) <= 1e-12
    for method in METHODS:
        ours = performer_attention_vjp(q, k, v, g, method=method, chunk_size=4, **kw)
        assert _rel(ours, theirs) <= 1e-12, method


def test_performer_features_fixed(rng):
    """The same seed draws the forward's ω: equal to passing that ω; another seed (other
    features) gives other gradients."""
    q, k, v, g = _problem(rng, d=4)
    kw = dict(num_features=8, causal=True)
    by_seed = performer_attention_vjp(q, k, v, g, rng=5, **kw)
    omega = ra.linear.draw_omega(8, 4, rng=5)
    assert _rel(by_seed, performer_attention_vjp(q, k, v, g, omega=omega, **kw)) == 0.0
    assert _rel(by_seed, performer_attention_vjp(q, k, v, g, rng=6, **kw)) > 1e-3


def test_performer_bad_grad_out_and_extremes(rng):
    q, k, v, g = _problem(rng)
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape "
                                         r"\(2, 4, 5, 2\), got \(4, 5, 2\)"):
        performer_attention_vjp(q, k, v, g[0], num_features=4, rng=0)
    # logits of several hundred: most key features underflow (denominators down to
    # 1e-110); with the stabilizer the gradients are finite and the forms agree
    q, k, v = rng.standard_normal((3, 1, 1, 200, 4)) * 20
    g = rng.standard_normal(v.shape)
    for kernel in ("positive", "hyperbolic"):
        kw = dict(num_features=16, kernel=kernel, causal=True, rng=0)
        grads = [performer_attention_vjp(q, k, v, g, method=m, chunk_size=16, **kw)
                 for m in METHODS]
        for gr in grads:
            assert all(np.isfinite(gr[x]).all() for x in "qkv")
            assert _rel(grads[1], gr) <= 1e-11
    # logits of thousands: the trigonometric features overflow without the stabilizer;
    # with it, subnormal denominators make 1/den overflow: a clear error, not NaN
    q, k, v = q * 2, k * 2, v
    with pytest.raises(ValueError, match="overflowed"):
        performer_attention_vjp(q, k, v, g, num_features=16, kernel="trigonometric",
                                stabilize=False, rng=0)
    with pytest.raises(ValueError, match=r"gradient of performer_attention .* not finite"):
        performer_attention_vjp(q, k, v, g, num_features=16, causal=True, rng=0)
    grads = performer_attention_vjp(q, k, v, g, num_features=16, causal=True, rng=0,
                                    check_finite=False)
    assert not np.isfinite(grads["q"]).all()


def test_performer_vjp_is_registered():
    assert ra.mechanisms()["performer_attention"].vjp is performer_attention_vjp


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_step_vjp_matches_finite_differences_and_chains_to_the_sequence_vjp(feature_map):
    from refattn.linear import linear_attention_init_state, linear_attention_step
    rng = np.random.default_rng(11)
    n, shape = 6, dict(batch_shape=(2,), heads_q=4, heads_kv=2, d=3, dv=2)
    q, k, v = rng.standard_normal((2, 4, n, 3)), rng.standard_normal((2, 2, n, 3)), \
        rng.standard_normal((2, 2, n, 2))
    g = rng.standard_normal((2, 4, n, 2))
    states = [linear_attention_init_state(**shape, feature_map=feature_map)]
    for t in range(n):
        states.append(linear_attention_step(states[-1], q[..., t, :], k[..., t, :],
                                            v[..., t, :])[1])
    st, t = states[3], 3                                   # one step, state and tokens
    cot = {"s": rng.standard_normal(st.s.shape), "z": rng.standard_normal(st.z.shape)}
    exact = ra.vjp(linear_attention_step, st, q[..., t, :], k[..., t, :], v[..., t, :],
                   g[..., t, :], grad_state=cot)

    def step(s, z, q_t, k_t, v_t):
        out, new = linear_attention_step(st.replace(s=s, z=z), q_t, k_t, v_t)
        return out, new.s, new.z
    numeric = numerical_vjp(step, dict(s=st.s, z=st.z, q_t=q[..., t, :], k_t=k[..., t, :],
                                       v_t=v[..., t, :]), (g[..., t, :], cot["s"], cot["z"]))
    for name in numeric:
        mine = exact["state"][name] if name in ("s", "z") else exact[name]
        assert max_rel_error(mine, numeric[name], normwise=True) <= 1e-7, name
    grads, carried = {x: np.zeros_like(a) for x, a in zip("qkv", (q, k, v))}, None
    for t in reversed(range(n)):                           # backpropagation through time
        res = ra.vjp(linear_attention_step, states[t], q[..., t, :], k[..., t, :],
                     v[..., t, :], g[..., t, :], grad_state=carried)
        carried = res["state"]
        for x in "qkv":
            grads[x][..., t, :] = res[f"{x}_t"]
    whole = ra.vjp("linear_attention", q, k, v, g, causal=True, feature_map=feature_map)
    for x in "qkv":
        assert max_rel_error(grads[x], whole[x], normwise=True) <= 1e-11, x
