"""DeltaNet (refattn.recurrent.deltanet): its recurrent, chunkwise (WY/UT transform) and
parallel forms, the implied matrix and the streaming steps agree (<= 1e-11, float64);
packed sequences equal their own calls bit for bit; the VJP matches central finite
differences (<= 1e-7) and PyTorch float64 autograd through the delta rule as written
(<= 1e-12); flash-linear-attention's ``delta_rule_recurrence`` (run in float64) agrees
to <= 1e-12; a million tokens run in the recurrent form (slow)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import refattn as ra
from refattn.recurrent import deltanet
from refattn.testing import strategies as rst

import delta_rule_checks as chk


def _make(rng, shape, d, regime):
    return {"beta": rng.uniform(0.0, 2.0 if regime == "normal" else 1.0, shape)}


def _update(torch, s, k, v, ins):
    beta = ins["beta"][..., None]
    return s + k[..., :, None] * (beta * (v - torch.einsum("...de,...d->...e", s, k)))[
        ..., None, :]


MECH = chk.Mech("deltanet", _make, _update, {"normalize_qk": True})
RAW = chk.Mech("deltanet", lambda rng, shape, d, regime: {
    "beta": rng.uniform(0, 1, shape) / (2 * d)}, _update)            # unnormalised keys


@pytest.mark.parametrize("n, m", [(9, 9), (4, 11), (11, 6), (40, 40)])
@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
def test_forms_agree(rng, n, m, chunk):
    chk.forms_agree(MECH, rng, n=n, m=m, chunk=chunk)
    chk.forms_agree(RAW, rng, n=n, m=m, chunk=chunk)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2 ** 32 - 1))
def test_forms_agree_on_random_shapes(data, seed):
    sh = data.draw(rst.shapes(max_batch_dims=1, max_len=24, max_dim=8))
    chk.forms_agree(MECH, np.random.default_rng(seed), n=sh.n, m=sh.m,
                    chunk=data.draw(st.integers(1, 30)), batch=sh.batch or (1,), hq=sh.hq,
                    hkv=sh.hkv, d=sh.d, dv=sh.dv)


def test_beta_one_overwrites_and_beta_zero_keeps(rng):
    """With unit keys, β = 1 stores exactly v under k (a query k reads back v);
    β = 0 writes nothing."""
    k = rng.standard_normal((1, 1, 1, 5))
    k /= np.linalg.norm(k)
    v = rng.standard_normal((1, 1, 2, 3))
    s0 = rng.standard_normal((1, 1, 5, 3))
    out = deltanet(k[..., [0, 0], :], k[..., [0, 0], :], v, beta=np.array([[[1.0, 1.0]]]),
                   scale=1.0, initial_state=s0)
    np.testing.assert_allclose(out[0, 0], v[0, 0], rtol=1e-13, atol=1e-13)
    kept, final = deltanet(k, k, v[..., :1, :], beta=0.0, initial_state=s0,
                           return_final_state=True)
    assert np.array_equal(final, s0)


def test_streaming_equals_the_forward(rng):
    chk.streaming_equals_forward(MECH, rng, {"beta": "beta_t"})


@pytest.mark.parametrize("method", chk.FORMS)
def test_packed_batch_equals_its_sequences(rng, method):
    chk.packed_equals_sequences(MECH, rng, method)


def test_initial_states_chain(rng):
    chk.states_chain(MECH, rng)


@pytest.mark.parametrize("n, m", [(6, 6), (4, 7), (7, 5)])
@pytest.mark.parametrize("mech", [MECH, RAW], ids=["normalized", "raw"])
def test_vjp_matches_finite_differences(rng, mech, n, m):
    chk.vjp_matches_finite_differences(mech, rng, n=n, m=m)


@pytest.mark.parametrize("n, m", [(8, 8), (5, 9), (9, 5)])
@pytest.mark.parametrize("mech", [MECH, RAW], ids=["normalized", "raw"])
def test_vjp_matches_torch_autograd(rng, mech, n, m):
    torch = pytest.importorskip("torch")
    chk.vjp_matches_torch_autograd(torch, mech, rng, n=n, m=m)


def test_normalize_qk_is_the_call_on_unit_vectors(rng):
    q, k, v = chk.qkv(rng)
    unit = [x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k)]
    np.testing.assert_allclose(deltanet(q, k, v, beta=0.5, normalize_qk=True),
                               deltanet(*unit, v, beta=0.5), rtol=1e-13, atol=1e-15)
    k[..., 2, :] = 0.0                                     # a zero key writes nothing
    out = deltanet(q, k, v, beta=0.5, normalize_qk=True)
    assert np.isfinite(out).all()
    g = ra.vjp("deltanet", q, k, v, np.ones(out.shape), beta=0.5, normalize_qk=True)
    assert not g["k"][..., 2, :].any() and np.isfinite(g["q"]).all()


def test_layout_bnhd_moves_beta_with_k(rng):
    q, k, v = chk.qkv(rng)
    beta = rng.uniform(0, 1, (2, 2, 9))                     # (B, Hkv, M)
    ref = deltanet(q, k, v, beta=beta, normalize_qk=True)
    t = lambda x: np.swapaxes(x, -3, -2)                  # noqa: E731
    out = deltanet(t(q), t(k), t(v), beta=np.swapaxes(beta, -2, -1), normalize_qk=True,
                   layout="bnhd")                        # beta (B, M, Hkv) like k
    np.testing.assert_array_equal(t(out), ref)
    out = deltanet(t(q), t(k), t(v), beta=0.5, normalize_qk=True, layout="bnhd")
    np.testing.assert_array_equal(t(out), deltanet(q, k, v, beta=0.5, normalize_qk=True))


def test_bad_inputs_name_themselves(rng):
    q, k, v = chk.qkv(rng)
    with pytest.raises(ValueError, match=r"beta must broadcast to \(\.\.\., Hkv, M\) = "
                                         r"\(2, 2, 9\), got shape \(3,\)"):
        deltanet(q, k, v, beta=np.ones(3))
    with pytest.raises(ValueError, match=r"initial_state must have shape"):
        deltanet(q, k, v, beta=0.5, initial_state=np.zeros((2, 2, 3, 3)))
    with pytest.raises(ValueError, match="method"):
        deltanet(q, k, v, beta=0.5, method="scan")
    with pytest.raises(ValueError, match="non-finite"):
        deltanet(q, k, v, beta=np.nan)
    with pytest.raises(ra.MemoryBudgetError, match="chunkwise"):
        deltanet(q, k, v, beta=0.5, method="parallel", memory_budget=100)


# --------------------------------------------------------------------------- FLA
@pytest.fixture
def fla64(monkeypatch):
    """flash-linear-attention's naive delta rule casts with ``.float()``: made float64
    here, so it computes in float64 (checked by its output's dtype and a <= 1e-12
    agreement float32 could not reach)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("fla.ops.delta_rule.naive",
                        reason="flash-linear-attention is not installed")
    monkeypatch.setattr(torch.Tensor, "float", torch.Tensor.double)
    return torch


def test_matches_flash_linear_attention_naive_in_float64(rng, fla64):
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    torch = fla64
    q, k, v = rng.standard_normal((3, 2, 3, 50, 8))
    q, k = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    beta = rng.uniform(0, 1, (2, 3, 50))
    s0 = rng.standard_normal((2, 3, 8, 8)).astype(np.float32).astype(np.float64)
    o, s = delta_rule_recurrence(*(torch.from_numpy(x) for x in (q, k, v, beta)),
                                 initial_state=torch.from_numpy(s0))
    assert o.dtype == torch.float64
    for method in chk.FORMS:
        ours, final = deltanet(q, k, v, beta=beta, initial_state=s0, method=method,
                               chunk_size=16, return_final_state=True)
        assert chk.err(ours, o.numpy()) <= 1e-12 and chk.err(final, s.numpy()) <= 1e-12
    wrong = deltanet(q, k, v, beta=beta * 0.99, initial_state=s0)
    assert chk.err(wrong, o.numpy()) > 1e-4


@pytest.mark.slow
def test_a_million_tokens_in_the_recurrent_form(rng):
    out = chk.long_recurrent(MECH, rng)
    assert np.abs(out[..., -1, :]).max() > 0
