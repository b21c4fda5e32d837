"""Gradients (VJPs) of the recurrent family: retention, gated linear attention and the
diagonal linear RNN, each checked three independent ways: central finite differences,
agreement of its forms (parallel / recurrent / chunkwise, or recurrent / scan /
chunkwise), and PyTorch float64 autograd through a transcription written here (plus
flash-linear-attention's naive references where installed, at their float32 accuracy).
"""
import numpy as np
import pytest

import refattn as ra
from refattn.recurrent.gla import gated_linear_attention_vjp
from refattn.recurrent.linear_rnn import linear_rnn_vjp
from refattn.recurrent.retention import retention_vjp
from refattn.testing import max_rel_error
from refattn.testing.gradients import numerical_vjp

FORMS = ("parallel", "recurrent", "chunkwise")
RNN_FORMS = ("recurrent", "scan", "chunkwise")
#: (N, M) pairs: equal, fewer queries (decoding with a cache), more queries than keys.
LENGTHS = [(6, 6), (4, 7), (7, 5)]


def _err(a, b):
    return max_rel_error(a, b, normwise=True)


def _qkv(rng, n, m, *, hq=4, hkv=2, d=3, dv=2):
    """GQA with a broadcast batch dimension: q (2, Hq, N, D), k (1, Hkv, M, D),
    v (2, Hkv, M, Dv), and a cotangent of the output's shape."""
    q = rng.standard_normal((2, hq, n, d))
    k = rng.standard_normal((1, hkv, m, d))
    v = rng.standard_normal((2, hkv, m, dv))
    return q, k, v, rng.standard_normal((2, hq, n, dv))


def _torch():
    return pytest.importorskip("torch")


def _fla(module):
    _torch()
    return pytest.importorskip(module, reason="flash-linear-attention is not installed")


# --------------------------------------------------------------------------- retention
GAMMA = np.array([0.9, 0.5, 0.99, 0.7])          # one decay per query head


@pytest.mark.parametrize("n, m", LENGTHS)
def test_retention_vjp_matches_finite_differences(rng, n, m):
    q, k, v, do = _qkv(rng, n, m)
    num = numerical_vjp(ra.retention, dict(q=q, k=k, v=v), do, gamma=GAMMA, method="parallel")
    for method in FORMS:
        got = ra.vjp("retention", q, k, v, do, gamma=GAMMA, method=method, chunk_size=3)
        assert sorted(got) == ["k", "q", "v"]
        for name in "qkv":
            assert got[name].shape == num[name].shape
            assert _err(got[name], num[name]) <= 1e-7, (method, name)


@pytest.mark.parametrize("n, m", [(33, 33), (20, 41), (41, 20)])
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_retention_vjp_forms_agree(rng, n, m, chunk):
    q, k, v, do = _qkv(rng, n, m, d=5, dv=3)
    kw = dict(gamma=GAMMA, scale=0.3)
    ref = retention_vjp(q, k, v, do, method="parallel", **kw)
    for method in ("recurrent", "chunkwise"):
        got = retention_vjp(q, k, v, do, method=method, chunk_size=chunk, **kw)
        for name in "qkv":
            assert _err(got[name], ref[name]) <= 1e-11, (method, name)


def _torch_retention(torch, q, k, v, gamma, scale):
    """Parallel retention in torch: γ^(i'-j) by powering, GQA by repeating k and v."""
    hq, n, m = q.shape[-3], q.shape[-2], k.shape[-2]
    group = hq // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    dist = (torch.arange(n)[:, None] + (m - n) - torch.arange(m)[None, :]).double()
    gamma = torch.as_tensor(gamma, dtype=torch.float64).reshape(-1, 1, 1)
    decay = torch.where(dist >= 0, gamma ** dist.clamp(min=0), torch.zeros(()).double())
    return (scale * (q @ k.transpose(-1, -2)) * decay) @ v


@pytest.mark.parametrize("n, m", LENGTHS + [(40, 40)])
def test_retention_vjp_matches_torch_autograd(rng, n, m):
    torch = _torch()
    q, k, v, do = _qkv(rng, n, m, d=4, dv=3)
    ts = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    out = _torch_retention(torch, *ts, GAMMA, 0.4)
    theirs = torch.autograd.grad(out, ts, torch.from_numpy(do))
    for method in FORMS:
        ours = retention_vjp(q, k, v, do, gamma=GAMMA, scale=0.4, method=method, chunk_size=7)
        for name, t in zip("qkv", theirs):
            assert _err(ours[name], t.numpy()) <= 1e-12, (method, name)


def test_retention_vjp_matches_flash_linear_attention_naive(rng):
    naive = _fla("fla.ops.retention.naive")
    import torch
    q, k, v, do = rng.standard_normal((4, 2, 4, 40, 8))          # (B, H, T, D)
    ts = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    out = naive.naive_retention(*ts)
    theirs = torch.autograd.grad(out, ts, torch.from_numpy(do).float())
    gamma = 1 - 2.0 ** (-5.0 - np.arange(4))                       # their per-head decays
    ours = retention_vjp(q, k, v, do, gamma=gamma)
    for name, t in zip("qkv", theirs):                             # their float32 accuracy
        assert _err(ours[name], t.double().numpy()) <= 2e-6, name
    wrong = retention_vjp(q, k, v, do, gamma=gamma ** 2)
    assert _err(wrong["k"], theirs[1].double().numpy()) > 1e-2


# --------------------------------------------------------------------------- GLA
def _log_gates(rng, shape, lo=0.05, hi=1.0):
    """Log-gates in [-hi, -lo]: away from 0, so finite differences stay <= 0."""
    return -rng.uniform(lo, hi, shape)


@pytest.mark.parametrize("n, m", LENGTHS)
@pytest.mark.parametrize("gate_shape", ["full", "per_head", "scalar"])
def test_gla_vjp_matches_finite_differences(rng, n, m, gate_shape):
    q, k, v, do = _qkv(rng, n, m)
    shape = {"full": (2, 2, m, 3), "per_head": (2, 1, 1), "scalar": ()}[gate_shape]
    g = _log_gates(rng, shape)
    num = numerical_vjp(ra.gated_linear_attention, dict(q=q, k=k, v=v, log_gates=g), do,
                        method="parallel")
    for method in FORMS:
        got = ra.vjp("gated_linear_attention", q, k, v, do, log_gates=g, method=method,
                     chunk_size=3)
        assert sorted(got) == ["k", "log_gates", "q", "v"]
        for name in got:
            assert np.shape(got[name]) == num[name].shape, name
            assert _err(got[name], num[name]) <= 1e-7, (method, name)


@pytest.mark.parametrize("n, m", [(33, 33), (20, 41), (41, 20)])
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_gla_vjp_forms_agree(rng, n, m, chunk):
    q, k, v, do = _qkv(rng, n, m, d=5, dv=3)
    g = _log_gates(rng, (2, 2, m, 5), 0.0, 0.5)
    ref = gated_linear_attention_vjp(q, k, v, do, log_gates=g, method="parallel")
    for method in ("recurrent", "chunkwise"):
        got = gated_linear_attention_vjp(q, k, v, do, log_gates=g, method=method,
                                         chunk_size=chunk)
        for name in ref:
            assert _err(got[name], ref[name]) <= 1e-11, (method, name)


def _torch_gla(torch, q, k, v, g, scale):
    """GLA in torch, token by token: S_j = exp(g_j)ᵀ ∘ S_{j-1} + k_jᵀ v_j, o_i = s q_i S_i'
    (bottom-right aligned, GQA by grouping the query heads)."""
    *batch, hq, n, d = q.shape
    hkv, m, dv = k.shape[-3], k.shape[-2], v.shape[-1]
    batch = torch.broadcast_shapes(tuple(batch), k.shape[:-3], v.shape[:-3])
    k, v = k.expand(*batch, hkv, m, d), v.expand(*batch, hkv, m, dv)
    g = g.expand(*batch, hkv, m, d)
    qg = q.expand(*batch, hq, n, d).reshape(*batch, hkv, hq // hkv, n, d) * scale
    state = torch.zeros(*batch, hkv, d, dv, dtype=torch.float64)
    rows = []
    for j in range(m):
        state = torch.exp(g[..., j, :])[..., None] * state + \
            k[..., j, :, None] * v[..., j, None, :]
        if j >= m - n:
            rows.append(torch.einsum("...hgd,...hde->...hge", qg[..., j - (m - n), :], state))
    zeros = [torch.zeros(*batch, hkv, hq // hkv, dv, dtype=torch.float64)] * max(n - m, 0)
    return torch.stack(zeros + rows, dim=-2).reshape(*batch, hq, n, dv)


@pytest.mark.parametrize("n, m", LENGTHS + [(40, 40)])
def test_gla_vjp_matches_torch_autograd(rng, n, m):
    torch = _torch()
    q, k, v, do = _qkv(rng, n, m, d=4, dv=3)
    g = _log_gates(rng, (1, 2, m, 4), 0.0, 0.7)
    ts = [torch.tensor(x, requires_grad=True) for x in (q, k, v, g)]
    out = _torch_gla(torch, *ts, 0.4)
    theirs = torch.autograd.grad(out, ts, torch.from_numpy(do))
    for method in FORMS:
        ours = gated_linear_attention_vjp(q, k, v, do, log_gates=g, scale=0.4, method=method,
                                          chunk_size=7)
        for name, t in zip(("q", "k", "v", "log_gates"), theirs):
            assert _err(ours[name], t.numpy()) <= 1e-12, (method, name)


def test_gla_vjp_matches_flash_linear_attention_naive(rng):
    naive = _fla("fla.ops.gla.naive")
    import torch
    q, k, v, do = rng.standard_normal((4, 2, 3, 50, 8))           # (B, H, T, D)
    g = np.log(rng.uniform(0.8, 1.0, q.shape))
    bthd = lambda x: torch.tensor(np.ascontiguousarray(x.transpose(0, 2, 1, 3)),  # noqa
                                  requires_grad=True)
    ts = [bthd(x) for x in (q, k, v, g)]
    out, _ = naive.naive_recurrent_gla(*ts)
    theirs = torch.autograd.grad(out, ts, bthd(do).detach().float())
    ours = gated_linear_attention_vjp(q, k, v, do, log_gates=g)
    for name, t in zip(("q", "k", "v", "log_gates"), theirs):   # their float32 accuracy
        t = t.double().numpy().transpose(0, 2, 1, 3)
        assert _err(ours[name], t) <= 2e-6, name
    # the gate gradient is not vacuous: a wrong gate moves it far outside that tolerance
    wrong = gated_linear_attention_vjp(q, k, v, do, log_gates=g / 2)["log_gates"]
    assert _err(wrong, theirs[3].double().numpy().transpose(0, 2, 1, 3)) > 1e-2


def test_gla_vjp_with_constant_gate_is_retention_vjp(rng):
    q, k, v, do = _qkv(rng, 9, 11, hq=2, hkv=2)
    gla = gated_linear_attention_vjp(q, k, v, do, log_gates=np.log(0.8), chunk_size=4)
    ret = retention_vjp(q, k, v, do, gamma=0.8, chunk_size=4)
    for name in "qkv":
        assert _err(gla[name], ret[name]) <= 1e-13, name


# --------------------------------------------------------------------------- linear RNN
RNN_CASES = [  # (a, b, x, h0) shapes: broadcasting every way the forward allows
    ((2, 7, 3), (), (2, 7, 3), (3,)),
    ((7, 1), (2, 7, 3), (1, 7, 3), None),
    ((3, 1, 5, 2), (5, 1), (3, 4, 5, 2), (4, 2)),
]


@pytest.mark.parametrize("sa, sb, sx, sh", RNN_CASES)
def test_linear_rnn_vjp_matches_finite_differences(rng, sa, sb, sx, sh):
    inputs = dict(a=rng.uniform(0.3, 0.95, sa), b=rng.standard_normal(sb),
                  x=rng.standard_normal(sx))
    if sh is not None:
        inputs["h0"] = rng.standard_normal(sh)
    full = np.broadcast_shapes(sa, sb, sx)
    dh, dlast = rng.standard_normal(full), rng.standard_normal(full[:-2] + full[-1:])
    num = numerical_vjp(ra.linear_rnn, inputs, (dh, dlast), return_last_state=True)
    extra = {} if sh is None else {"h0": inputs["h0"]}
    for method in RNN_FORMS:
        got = ra.vjp(ra.linear_rnn, inputs["a"], inputs["b"], inputs["x"], dh, **extra,
                     method=method, chunk=3, grad_last_state=dlast)
        assert sorted(got) == sorted(inputs)
        for name in got:
            assert np.shape(got[name]) == num[name].shape, name
            assert _err(got[name], num[name]) <= 1e-7, (method, name)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_linear_rnn_vjp_forms_agree(rng, chunk):
    a, x = rng.uniform(0.5, 1.0, (2, 53, 4)), rng.standard_normal((2, 53, 4))
    b, h0, dh = rng.standard_normal((53, 4)), rng.standard_normal(4), rng.standard_normal(x.shape)
    ref = linear_rnn_vjp(a, b, x, dh, h0=h0, grad_last_state=np.ones((2, 4)))
    for method in ("scan", "chunkwise"):
        got = linear_rnn_vjp(a, b, x, dh, h0=h0, grad_last_state=np.ones((2, 4)),
                             method=method, chunk=chunk)
        for name in ref:
            assert _err(got[name], ref[name]) <= 1e-11, (method, name)


def test_linear_rnn_vjp_matches_torch_autograd(rng):
    torch = _torch()
    a, b, x = rng.uniform(0.2, 1.0, (2, 30, 3)), rng.standard_normal((30, 3)), \
        rng.standard_normal((2, 30, 3))
    h0, dh, dlast = rng.standard_normal(3), rng.standard_normal((2, 30, 3)), \
        rng.standard_normal((2, 3))
    ts = [torch.tensor(z, requires_grad=True) for z in (a, b, x, h0)]
    h, hs = ts[3].expand(2, 3), []
    for t in range(30):                                  # h_t = a_t h_{t-1} + b_t x_t
        h = ts[0][:, t] * h + ts[1][t] * ts[2][:, t]
        hs.append(h)
    theirs = torch.autograd.grad((torch.stack(hs, 1), h), ts,
                                 (torch.from_numpy(dh), torch.from_numpy(dlast)))
    for method in RNN_FORMS:
        ours = linear_rnn_vjp(a, b, x, dh, h0=h0, grad_last_state=dlast, method=method,
                              chunk=7)
        for name, t in zip(("a", "b", "x", "h0"), theirs):
            assert _err(ours[name], t.numpy()) <= 1e-12, (method, name)


def test_linear_rnn_vjp_matches_flash_linear_attention_hgrn_naive(rng):
    """HGRN's recurrence h_t = exp(g_t) h_{t-1} + x_t: a = exp(g), b = 1, so
    dg = a ∘ da (their loop runs in float32)."""
    naive = _fla("fla.ops.hgrn.naive")
    import torch
    x, dh = rng.standard_normal((2, 2, 40, 6))
    g, h0 = np.log(rng.uniform(0.7, 1.0, x.shape)), rng.standard_normal((2, 6))
    ts = [torch.tensor(z, requires_grad=True) for z in (x, g, h0)]
    out, _ = naive.naive_recurrent_hgrn(*ts)
    theirs = [t.double().numpy() for t in
              torch.autograd.grad(out, ts, torch.from_numpy(dh).float())]
    ours = linear_rnn_vjp(np.exp(g), 1.0, x, dh, h0=h0)
    for name, mine, t in (("x", ours["x"], theirs[0]), ("g", np.exp(g) * ours["a"], theirs[1]),
                          ("h0", ours["h0"], theirs[2])):
        assert _err(mine, t) <= 2e-6, name


def test_linear_rnn_vjp_edge_cases(rng):
    # zero length: the last state is h0, so its cotangent flows to h0 unchanged
    got = linear_rnn_vjp(np.ones((0, 2)), 1.0, np.ones((0, 2)), np.ones((0, 2)),
                         h0=np.zeros(2), grad_last_state=np.array([2.0, 3.0]))
    assert got["h0"].tolist() == [2.0, 3.0] and got["a"].shape == (0, 2)
    # no cotangent of the states: only the last state's
    a, x = rng.uniform(0.5, 1, (6, 2)), rng.standard_normal((6, 2))
    only_last = linear_rnn_vjp(a, 1.0, x, None, grad_last_state=np.ones(2))
    assert np.allclose(only_last["x"], np.cumprod(a[::-1], axis=0)[::-1] / a)


# --------------------------------------------------------------------------- errors
def test_bad_cotangents_are_named_with_the_expected_shape(rng):
    q, k, v, _ = _qkv(rng, 4, 5)
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape "
                                         r"\(2, 4, 4, 2\), got \(2, 4, 4, 3\)"):
        retention_vjp(q, k, v, np.zeros((2, 4, 4, 3)), gamma=0.9)
    with pytest.raises(ValueError, match=r"grad_out .*\(2, 4, 4, 2\)"):
        ra.vjp("gated_linear_attention", q, k, v, np.zeros((4, 4, 2)), log_gates=-0.1)
    a = np.full((5, 3), 0.5)
    with pytest.raises(ValueError, match=r"grad_out .*\(5, 3\)"):
        linear_rnn_vjp(a, 1.0, a, np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"grad_last_state .*\(3,\)"):
        linear_rnn_vjp(a, 1.0, a, np.zeros((5, 3)), grad_last_state=np.zeros(5))
    with pytest.raises(ValueError, match="grad_out"):
        retention_vjp(q, k, v, np.full((2, 4, 4, 2), np.nan), gamma=0.9)


def test_inputs_are_validated_like_the_forward(rng):
    q, k, v, do = _qkv(rng, 4, 5)
    with pytest.raises(ValueError, match="log_gates must be <= 0"):
        gated_linear_attention_vjp(q, k, v, do, log_gates=0.1)
    with pytest.raises(ValueError, match="gamma must lie in"):
        retention_vjp(q, k, v, do, gamma=1.5)
    with pytest.raises(ValueError, match="method"):
        retention_vjp(q, k, v, do, gamma=0.5, method="dense")
    with pytest.raises(ValueError, match=r"a \(the gate"):
        linear_rnn_vjp(np.full((3, 2), 1.5), 1.0, np.ones((3, 2)), np.ones((3, 2)))
    with pytest.raises(ra.MemoryBudgetError, match="method='chunkwise'"):
        gated_linear_attention_vjp(q, k, v, do, log_gates=-0.1, method="parallel",
                                   memory_budget=1000)
    with pytest.raises(ra.MemoryBudgetError, match="method='chunkwise'"):
        retention_vjp(q, k, v, do, gamma=0.5, method="parallel", memory_budget=100)


def test_registry_finds_every_vjp():
    specs = ra.mechanisms()
    assert specs["retention"].vjp is retention_vjp
    assert specs["gated_linear_attention"].vjp is gated_linear_attention_vjp
    assert ra.linear_rnn.vjp is linear_rnn_vjp
    assert ra.gradients.has_vjp("linear_rnn") and ra.gradients.has_vjp(ra.retention)


# --------------------------------------------------------------------------- extremes
@pytest.mark.parametrize("gate", [-800.0, -30.0, -1e-9, 0.0])
def test_gla_vjp_extreme_gates_are_finite_and_forms_agree(rng, gate):
    """Gates near 0 (log-gates far below 0: exp underflows to exact zeros) and near 1,
    over 1,500 tokens: every gradient finite, the chunkwise and recurrent forms agree.

    The gate gradient is a reversed cumulative sum of ``q∘dq - k∘dk``: its rounding
    error is absolute, at the scale of the terms summed, so it is measured against
    that scale, element by element (near-0 gates have a true ``dg`` of about 0, where
    a relative error means nothing); near-1 gates give a large ``dg``, checked
    relatively too."""
    m = 1500
    q, k, v = rng.standard_normal((3, 1, 2, m, 4)) * 0.5
    g = np.full((1, 2, m, 4), gate)
    g[..., ::7, 1] = -1e-3 if gate == 0.0 else gate * 0.5    # some variety along time
    do = rng.standard_normal((1, 2, m, 4))
    rec = gated_linear_attention_vjp(q, k, v, do, log_gates=g, method="recurrent")
    chk = gated_linear_attention_vjp(q, k, v, do, log_gates=g, chunk_size=64)
    for name in rec:
        assert np.isfinite(chk[name]).all() and np.isfinite(rec[name]).all(), name
        if name != "log_gates":
            assert _err(chk[name], rec[name]) <= 1e-11, name
    terms = np.abs(q * rec["q"]) + np.abs(k * rec["k"])            # (1, 2, M, 4), G = 1
    scale = np.flip(np.cumsum(np.flip(terms, -2), -2), -2)          # Σ_{p >= t} |terms|
    assert (np.abs(chk["log_gates"] - rec["log_gates"]) <= 1e-12 * scale).all()
    if gate > -1:
        assert _err(chk["log_gates"], rec["log_gates"]) <= 1e-12


@pytest.mark.parametrize("gamma", [1e-300, 0.5, 1 - 1e-12, 1.0])
def test_retention_vjp_extreme_decays_are_finite_and_forms_agree(rng, gamma):
    m = 1200
    q, k, v = rng.standard_normal((3, 2, m, 4)) * 0.5
    do = rng.standard_normal((2, m, 4))
    rec = retention_vjp(q, k, v, do, gamma=gamma, method="recurrent")
    chk = retention_vjp(q, k, v, do, gamma=gamma, chunk_size=50)
    for name in "qkv":
        assert np.isfinite(chk[name]).all(), name
        assert _err(chk[name], rec[name]) <= 1e-11, name


@pytest.mark.parametrize("lo, hi", [(1e-300, 1e-200), (1 - 1e-12, 1.0), (0.0, 1.0)])
def test_linear_rnn_vjp_extreme_gates_are_finite_and_forms_agree(rng, lo, hi):
    a = np.clip(rng.uniform(lo, hi, (2, 3000, 3)), 1e-300, 1.0)
    x, dh = rng.standard_normal((2, 2, 3000, 3))
    ref = linear_rnn_vjp(a, 1.0, x, dh, h0=np.ones(3))
    for method in ("scan", "chunkwise"):
        got = linear_rnn_vjp(a, 1.0, x, dh, h0=np.ones(3), method=method)
        for name in ref:
            assert np.isfinite(got[name]).all(), (method, name)
            assert _err(got[name], ref[name]) <= 1e-11, (method, name)
