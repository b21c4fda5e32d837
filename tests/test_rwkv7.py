"""RWKV-7's generalized (diagonal-plus-low-rank) delta rule
(refattn.recurrent.generalized_delta_rule): forms, implied matrix and streaming agree
(<= 1e-11, float64), also with decays near 0 and near 1; packed sequences equal their own
calls bit for bit; the VJP matches central finite differences (<= 1e-7) and PyTorch
float64 autograd through the update as written (<= 1e-12); flash-linear-attention's
``dplr_recurrence`` (run in float64: it casts with ``.float()``; its ``dplr_chunkwise``
allocates float32 buffers and cannot) agrees to <= 1e-12, with RWKV-7's ``a = -κ̂``,
``b = κ̂ ⊙ a_7``; DeltaNet is a special case;
a million tokens run in the recurrent form (slow)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refattn.recurrent import deltanet, generalized_delta_rule
from refattn.testing import strategies as rst

import delta_rule_checks as chk

DECAYS = {"normal": (0.05, 1.0), "near0": (30.0, 700.0), "near1": (1e-12, 1e-7)}


def _make(rng, shape, d, regime):
    """RWKV-7's parameterisation: ``a = -κ̂``, ``b = κ̂ ⊙ a_7`` (``κ̂`` unit, ``a_7`` in
    (0, 1)), so the transition stays a contraction."""
    lo, hi = DECAYS[regime]
    kappa = rng.standard_normal(tuple(shape) + (d,))
    kappa /= np.linalg.norm(kappa, axis=-1, keepdims=True)
    return {"a": -kappa, "b": kappa * rng.uniform(0, 1, kappa.shape),
            "log_w": -rng.uniform(lo, hi, kappa.shape)}


def _update(torch, s, k, v, ins):
    u = torch.einsum("...d,...de->...e", ins["a"], s)
    return (torch.exp(ins["log_w"])[..., None] * s
            + ins["b"][..., :, None] * u[..., None, :] + k[..., :, None] * v[..., None, :])


MECH = chk.Mech("generalized_delta_rule", _make, _update)


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


def test_deltanet_is_a_special_case(rng):
    q, k, v = chk.qkv(rng)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = rng.uniform(0, 1, (2, 2, 9))
    for method in chk.FORMS:
        a = generalized_delta_rule(q, k, beta[..., None] * v, a=-beta[..., None] * k, b=k,
                                   log_w=0.0, method=method)
        assert chk.err(a, deltanet(q, k, v, beta=beta, method=method)) <= 1e-14


def test_streaming_equals_the_forward(rng):
    chk.streaming_equals_forward(MECH, rng, {"a": "a_t", "b": "b_t", "log_w": "log_w_t"})


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


def test_bad_inputs_name_themselves(rng):
    q, k, v = chk.qkv(rng)
    with pytest.raises(ValueError, match=r"log_w must be <= 0"):
        generalized_delta_rule(q, k, v, a=0.0, b=0.0, log_w=0.5)
    with pytest.raises(ValueError, match=r"a must broadcast to \(\.\.\., Hkv, M, D\) = "
                                         r"\(2, 2, 9, 3\), got shape \(4,\)"):
        generalized_delta_rule(q, k, v, a=np.ones(4), b=0.0, log_w=-0.1)


# --------------------------------------------------------------------------- FLA
@pytest.fixture
def fla64(monkeypatch):
    """flash-linear-attention's dplr references cast with ``.float()``: made float64
    here (checked by the output's dtype and a <= 1e-12 agreement)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("fla.ops.generalized_delta_rule.dplr.naive",
                        reason="flash-linear-attention is not installed")
    monkeypatch.setattr(torch.Tensor, "float", torch.Tensor.double)
    return torch


def test_matches_flash_linear_attention_dplr_in_float64(rng, fla64):
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence
    torch = fla64
    q, k, v = rng.standard_normal((3, 2, 3, 64, 8))
    ins = _make(rng, (2, 3, 64), 8, "normal")
    s0 = rng.standard_normal((2, 3, 8, 8)).astype(np.float32).astype(np.float64)
    t = {name: torch.from_numpy(x) for name, x in dict(q=q, k=k, v=v, **ins).items()}
    theirs = [dplr_recurrence(t["q"], t["k"], t["v"], t["a"], t["b"], t["log_w"],
                              initial_state=torch.from_numpy(s0))]
    for o, s in theirs:
        assert o.dtype == torch.float64
        for method in chk.FORMS:
            ours, final = generalized_delta_rule(q, k, v, **ins, initial_state=s0,
                                                 method=method, chunk_size=16,
                                                 return_final_state=True)
            assert chk.err(ours, o.numpy()) <= 1e-12 and chk.err(final, s.numpy()) <= 1e-12
    swapped = generalized_delta_rule(q, k, v, a=ins["b"], b=ins["a"], log_w=ins["log_w"],
                                     initial_state=s0)       # the roles of a and b matter
    assert chk.err(swapped, theirs[0][0].numpy()) > 1e-3


@pytest.mark.slow
def test_a_million_tokens_in_the_recurrent_form(rng):
    chk.long_recurrent(MECH, rng)
