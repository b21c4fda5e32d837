"""Kimi Delta Attention (refattn.recurrent.kda): forms, implied matrix and streaming
agree (<= 1e-11, float64), also with gates near 0 and near 1; packed sequences equal
their own calls bit for bit; the VJP matches central finite differences (<= 1e-7) and
PyTorch float64 autograd through the KDA update as written (<= 1e-12);
flash-linear-attention's ``naive_recurrent_kda`` / ``naive_chunk_kda`` agree at their
float32 accuracy (they cast with ``.to(torch.float)``); a constant gate is Gated
DeltaNet; a million tokens run in the recurrent form (slow)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refattn.recurrent import gated_deltanet, kimi_delta_attention
from refattn.testing import strategies as rst

import delta_rule_checks as chk

GATES = {"normal": (0.05, 1.0), "near0": (30.0, 700.0), "near1": (1e-12, 1e-7)}


def _make(rng, shape, d, regime):
    lo, hi = GATES[regime]
    return {"beta": rng.uniform(0, 1, shape),
            "log_gates": -rng.uniform(lo, hi, tuple(shape) + (d,))}


def _update(torch, s, k, v, ins):
    s = torch.exp(ins["log_gates"])[..., None] * s
    beta = ins["beta"][..., None]
    return s + k[..., :, None] * (beta * (v - torch.einsum("...de,...d->...e", s, k)))[
        ..., None, :]


MECH = chk.Mech("kimi_delta_attention", _make, _update, {"normalize_qk": True})


@pytest.mark.parametrize("regime", list(GATES))
@pytest.mark.parametrize("n, m", [(9, 9), (4, 11), (11, 6), (40, 40)])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_forms_agree(rng, regime, n, m, chunk):
    chk.forms_agree(MECH, rng, n=n, m=m, chunk=chunk, regime=regime)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2 ** 32 - 1),
       regime=st.sampled_from(list(GATES)))
def test_forms_agree_on_random_shapes(data, seed, regime):
    sh = data.draw(rst.shapes(max_batch_dims=1, max_len=24, max_dim=8))
    chk.forms_agree(MECH, np.random.default_rng(seed), n=sh.n, m=sh.m,
                    chunk=data.draw(st.integers(1, 30)), batch=sh.batch or (1,), hq=sh.hq,
                    hkv=sh.hkv, d=sh.d, dv=sh.dv, regime=regime)


def test_a_gate_constant_over_channels_is_gated_deltanet(rng):
    q, k, v = chk.qkv(rng)
    beta, g = rng.uniform(0, 1, (2, 2, 9)), -rng.uniform(0, 1, (2, 2, 9))
    for method in chk.FORMS:
        a = kimi_delta_attention(q, k, v, beta=beta, log_gates=g[..., None],
                                 normalize_qk=True, method=method)
        b = gated_deltanet(q, k, v, beta=beta, log_gates=g, normalize_qk=True,
                           method=method)
        assert chk.err(a, b) <= 1e-14, method


def test_streaming_equals_the_forward(rng):
    chk.streaming_equals_forward(MECH, rng, {"beta": "beta_t", "log_gates": "log_gates_t"})


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


def test_layout_bnhd_moves_the_channel_gates(rng):
    q, k, v = chk.qkv(rng)
    beta, g = rng.uniform(0, 1, (2, 2, 9)), -rng.uniform(0, 1, (2, 2, 9, 3))
    ref = kimi_delta_attention(q, k, v, beta=beta, log_gates=g)
    t = lambda x: np.swapaxes(x, -3, -2)                  # noqa: E731
    out = kimi_delta_attention(t(q), t(k), t(v), beta=np.swapaxes(beta, -2, -1),
                               log_gates=t(g), layout="bnhd")   # beta (B, M, Hkv) like k
    np.testing.assert_array_equal(t(out), ref)


def test_matches_flash_linear_attention_naive_references(rng):
    """float32 arithmetic in their code: agreement at float32 accuracy (<= 1e-5
    normwise), a 1% change in one gate failing it."""
    torch = pytest.importorskip("torch")
    naive = pytest.importorskip("fla.ops.kda.naive",
                                reason="flash-linear-attention is not installed")
    q, k, v = rng.standard_normal((3, 2, 3, 70, 8))
    q, k = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    beta = rng.uniform(0, 1, (2, 3, 70))
    g = -rng.uniform(0.0, 0.3, (2, 3, 70, 8))
    s0 = rng.standard_normal((2, 3, 8, 8)).astype(np.float32).astype(np.float64)
    ours, final = kimi_delta_attention(q, k, v, beta=beta, log_gates=g, initial_state=s0,
                                       return_final_state=True)
    bt = lambda x: torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 1, 2)))  # noqa
    for fn, kw in ((naive.naive_recurrent_kda, {}), (naive.naive_chunk_kda,
                                                     {"chunk_size": 14})):
        o, s = fn(bt(q), bt(k), bt(v), bt(g), bt(beta), initial_state=torch.from_numpy(s0),
                  output_final_state=True, **kw)
        theirs = np.swapaxes(o.double().numpy(), 1, 2)
        assert chk.err(ours, theirs) <= 1e-5, fn.__name__
        assert chk.err(final, s.double().numpy()) <= 1e-5, fn.__name__
    g2 = g.copy()
    g2[0, 0, 5, 2] *= 1.01
    assert chk.err(kimi_delta_attention(q, k, v, beta=beta, log_gates=g2,
                                        initial_state=s0), theirs) > 1e-5


@pytest.mark.slow
def test_a_million_tokens_in_the_recurrent_form(rng):
    chk.long_recurrent(MECH, rng)
