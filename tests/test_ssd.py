"""Mamba-2's SSD (refattn.recurrent.ssd): the quadratic form ``Y = (L ∘ C Bᵀ) X``, Mamba-2's
chunked algorithm and the recurrence agree (<= 1e-11, float64), also with decays near 0
and 1, and equal ``selective_scan`` with one scalar ``A`` per head (a fourth form),
gated linear attention with one gate per head, and flash-linear-attention's
``naive_recurrent_simple_gla`` (run in float64, <= 1e-12); streaming, packed sequences
and initial states as the other recurrences; the VJP matches central finite differences
(<= 1e-7) and PyTorch float64 autograd (<= 1e-12); a million tokens (slow)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import refattn as ra
from refattn.recurrent import ssd
from refattn.testing import strategies as rst

import delta_rule_checks as chk

DECAYS = {"normal": (0.05, 1.0), "near0": (30.0, 700.0), "near1": (1e-12, 1e-7)}


def _make(rng, shape, d, regime):
    lo, hi = DECAYS[regime]
    return {"log_a": -rng.uniform(lo, hi, shape)}


def _update(torch, s, k, v, ins):
    return torch.exp(ins["log_a"])[..., None, None] * s + k[..., :, None] * v[..., None, :]


MECH = chk.Mech("ssd", _make, _update)


@pytest.mark.parametrize("regime", list(DECAYS))
@pytest.mark.parametrize("n, m", [(9, 9), (4, 11), (11, 6), (40, 40)])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_forms_agree(rng, regime, n, m, chunk):
    chk.forms_agree(MECH, rng, n=n, m=m, chunk=chunk, regime=regime)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2 ** 32 - 1),
       regime=st.sampled_from(list(DECAYS)))
def test_forms_agree_on_random_shapes(data, seed, regime):
    sh = data.draw(rst.shapes(max_batch_dims=1, max_len=24, max_dim=8))
    chk.forms_agree(MECH, np.random.default_rng(seed), n=sh.n, m=sh.m,
                    chunk=data.draw(st.integers(1, 30)), batch=sh.batch or (1,), hq=sh.hq,
                    hkv=sh.hkv, d=sh.d, dv=sh.dv, regime=regime)


def test_the_quadratic_form_is_the_masked_matrix(rng):
    """``L_ij = a_{j+1} ⋯ a_i`` built by products (not cumulative sums)."""
    c, b, x = rng.standard_normal((3, 1, 1, 7, 3))
    a = rng.uniform(0.3, 1.0, 7)
    big_l = np.array([[np.prod(a[j + 1:i + 1]) if j <= i else 0.0 for j in range(7)]
                      for i in range(7)])
    expect = (big_l * (c[0, 0] @ b[0, 0].T)) @ x[0, 0]
    for method in chk.FORMS:
        assert chk.err(ssd(c, b, x, log_a=np.log(a), method=method, chunk_size=3)[0, 0],
                       expect) <= 1e-14


@pytest.mark.parametrize("method", ["recurrent", "chunkwise"])
def test_selective_scan_with_a_scalar_a_per_head_is_ssd(rng, method):
    """Mamba's selective scan, channel ``d = h·P + p``: ``A[d, :] = A_h``, ``Δ`` shared by
    a head's channels, ``B``, ``C`` one group per head; SSD with ``log_a = Δ·A_h``,
    ``X = Δ·x``."""
    batch, heads, p, n_state, length = 2, 3, 4, 5, 37
    x = rng.standard_normal((batch, heads, length, p))
    dt = rng.uniform(0.01, 0.5, (batch, heads, length))
    a_h = -rng.uniform(0.5, 3.0, heads)
    b, c = rng.standard_normal((2, batch, heads, length, n_state))
    u = np.swapaxes(x, -1, -2).reshape(batch, heads * p, length)
    delta = np.repeat(dt, p, axis=1)
    a_mat = np.repeat(a_h, p)[:, None] * np.ones((1, n_state))
    y = ra.selective_scan(u, delta, a_mat, np.swapaxes(b, -1, -2), np.swapaxes(c, -1, -2),
                          method=method, chunk=8)
    for form in chk.FORMS:
        ours = ssd(c, b, dt[..., None] * x, log_a=dt * a_h[:, None], method=form,
                   chunk_size=8)
        ours = np.swapaxes(ours, -1, -2).reshape(batch, heads * p, length)
        assert chk.err(ours, y) <= 1e-12, form


def test_ssd_is_gla_with_one_gate_per_head(rng):
    q, k, v = chk.qkv(rng)
    g = -rng.uniform(0, 1, (2, 2, 9))
    s0 = rng.standard_normal((2, 2, 3, 2))
    assert chk.err(ssd(q, k, v, log_a=g, initial_state=s0),
                   ra.gated_linear_attention(q, k, v, log_gates=g[..., None], scale=1.0,
                                             initial_state=s0)) <= 1e-13


def test_streaming_equals_the_forward(rng):
    chk.streaming_equals_forward(MECH, rng, {"log_a": "log_a_t"})


@pytest.mark.parametrize("method", chk.FORMS)
def test_packed_batch_equals_its_sequences(rng, method):
    chk.packed_equals_sequences(MECH, rng, method)


def test_initial_states_chain(rng):
    chk.states_chain(MECH, rng)


@pytest.mark.parametrize("n, m", [(6, 6), (4, 7), (7, 5)])
def test_vjp_matches_finite_differences(rng, n, m):
    chk.vjp_matches_finite_differences(MECH, rng, n=n, m=m)


@pytest.mark.parametrize("n, m", [(8, 8), (5, 9), (9, 5)])
def test_vjp_matches_torch_autograd(rng, n, m):
    torch = pytest.importorskip("torch")
    chk.vjp_matches_torch_autograd(torch, MECH, rng, n=n, m=m)


def test_matches_flash_linear_attention_simple_gla_in_float64(rng, monkeypatch):
    torch = pytest.importorskip("torch")
    naive = pytest.importorskip("fla.ops.simple_gla.naive",
                                reason="flash-linear-attention is not installed")
    monkeypatch.setattr(torch.Tensor, "float", torch.Tensor.double)
    q, k, v = rng.standard_normal((3, 2, 3, 50, 8))
    g = -rng.uniform(0, 0.5, (2, 3, 50))
    s0 = rng.standard_normal((2, 3, 8, 8))
    bt = lambda x: torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 1, 2)))  # noqa
    o, s = naive.naive_recurrent_simple_gla(bt(q), bt(k), bt(v), bt(g), scale=0.5,
                                            initial_state=torch.from_numpy(s0),
                                            output_final_state=True)
    assert o.dtype == torch.float64
    theirs = np.swapaxes(o.numpy(), 1, 2)
    for method in chk.FORMS:
        ours, final = ssd(q, k, v, log_a=g, scale=0.5, initial_state=s0, method=method,
                          chunk_size=16, return_final_state=True)
        assert chk.err(ours, theirs) <= 1e-12 and chk.err(final, s.numpy()) <= 1e-12
    assert chk.err(ssd(q, k, v, log_a=g * 1.01, scale=0.5, initial_state=s0),
                   theirs) > 1e-4


@pytest.mark.slow
def test_a_million_tokens_in_the_recurrent_form(rng):
    chk.long_recurrent(MECH, rng)
