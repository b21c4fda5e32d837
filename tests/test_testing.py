"""The helpers users check their kernels with, seen from the user's side."""
import ml_dtypes
import numpy as np
import pytest

import refattn
from refattn.testing import assert_as_accurate_as, assert_close, max_rel_error


def my_kernel(q, k, v, *, window=128, off_by_one=False):
    """A user's bf16 sliding-window kernel, emulated: float32 logits and softmax,
    probabilities rounded to bf16 before P @ V, float32 accumulation, bf16 output."""
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    s = q32 @ np.swapaxes(k32, -1, -2) / np.float32(np.sqrt(q.shape[-1]))
    dist = np.arange(q.shape[-2])[:, None] - np.arange(k.shape[-2])[None, :]
    keep = (dist >= 0) & ((dist < window) if off_by_one else (dist <= window))
    s = np.where(keep, s, -np.inf).astype(np.float32)
    p = np.exp(s - s.max(-1, keepdims=True))
    out = p.astype(ml_dtypes.bfloat16).astype(np.float32) @ v32 / p.sum(-1, keepdims=True)
    return out.astype(ml_dtypes.bfloat16)


@pytest.fixture
def qkv():
    rng = np.random.default_rng(0)
    return rng.standard_normal((3, 2, 4, 512, 64)).astype(ml_dtypes.bfloat16)


def test_users_view_passes_for_a_correct_kernel(qkv):
    q, k, v = qkv
    assert_close(my_kernel(q, k, v), refattn.attention(q, k, v, mask=refattn.masks.sliding_window(128)), dtype="bfloat16")


def test_users_view_catches_an_off_by_one_window(qkv):
    q, k, v = qkv
    with pytest.raises(AssertionError) as info:
        assert_close(my_kernel(q, k, v, off_by_one=True), refattn.attention(q, k, v, mask=refattn.masks.sliding_window(128)), dtype="bfloat16")
    message = str(info.value)
    assert "bfloat16 tolerance rtol=0.016, atol=0.01" in message
    assert "out of tolerance" in message and "worst at index (" in message
    # only rows that reach a full window (i >= 128) can differ
    worst_row = int(message.split("worst at index (")[1].split(")")[0].split(", ")[2])
    assert worst_row >= 128


def test_flash_rule_against_a_same_precision_baseline(qkv):
    q, k, v = (x[:, :1, :256] for x in qkv)
    mask = refattn.masks.sliding_window(128)
    oracle = refattn.attention(q, k, v, mask=mask)
    baseline = refattn.testing.low_precision_attention(q, k, v, "bfloat16", mask=mask)
    assert_as_accurate_as(my_kernel(q, k, v), baseline, oracle)
    sloppy = (my_kernel(q, k, v).astype(np.float32) * (1 + 2 ** -6)).astype(ml_dtypes.bfloat16)
    with pytest.raises(AssertionError, match="less accurate than its baseline allows"):
        assert_as_accurate_as(sloppy, baseline, oracle)


def test_assert_close_reports_the_worst_element():
    expected = np.zeros((2, 3))
    actual = expected.copy()
    actual[1, 2] = 0.5
    actual[0, 0] = 1e-13
    with pytest.raises(AssertionError) as info:
        assert_close(actual, expected, name="out")
    msg = str(info.value)
    assert "1 of 6 elements (16.67%)" in msg and "worst at index (1, 2): out=0.5" in msg
    assert_close(actual, expected, atol=0.6)


def test_assert_close_tolerances_and_special_values():
    assert refattn.testing.tolerance(ml_dtypes.bfloat16) == (1.6e-2, 1e-2)
    assert refattn.testing.tolerance("float32") == (1e-5, 1e-5)
    lse = np.array([-np.inf, 1.0])
    assert_close(lse, lse)                                  # equal infinities match
    with pytest.raises(AssertionError, match="worst at index \\(0,\\): actual=nan"):
        assert_close(np.array([np.nan, 1.0]), lse)
    with pytest.raises(AssertionError, match="shape"):
        assert_close(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="no tolerance for dtype 'int8'"):
        assert_close(np.zeros(3), np.zeros(3), dtype="int8")
    x32 = np.ones(3, np.float32)
    with pytest.raises(AssertionError, match="float32 tolerance"):   # dtype from actual
        assert_close(x32 * (1 + 1e-4), np.ones(3))


def test_max_rel_error_cannot_pass_a_wrong_answer():
    e = np.array([[0.5, -3.0, -np.inf], [200.0, 1e-3, 0.0]])
    assert max_rel_error(e.copy(), e) == 0.0
    a = e.copy()
    a[1, 0] = 202.0                                        # 1% off a large entry
    assert max_rel_error(a, e) == pytest.approx(0.01)
    assert max_rel_error(a, e, normwise=True) == pytest.approx(2 / 200)
    a = e.copy()
    a[0, 0] = 0.6                                          # absolute below 1
    assert max_rel_error(a, e) == pytest.approx(0.1)
    for wrong in (np.inf, np.nan, -1e300):
        a = e.copy()
        a[0, 2] = wrong                                    # the -inf lse must match
        assert max_rel_error(a, e) == np.inf
    a = e.copy()
    a[0, 1] = np.nan
    assert max_rel_error(a, e) == np.inf and max_rel_error(a, e, normwise=True) == np.inf
    assert max_rel_error(e[:1], e) == np.inf               # shapes must match
    assert max_rel_error(np.ones(3), np.zeros(3), normwise=True) == np.inf
    assert max_rel_error(np.zeros(3), np.zeros(3), normwise=True) == 0.0


def _sdpa_gradients(attn_mask=None, causal=False):
    """A user's bf16 backward: PyTorch SDPA (math backend) gradients for fixed inputs."""
    torch = pytest.importorskip("torch")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rng = np.random.default_rng(0)
    q, k, v = (torch.tensor(x, dtype=torch.bfloat16, requires_grad=True)
               for x in rng.standard_normal((3, 2, 4, 256, 64)))
    do = torch.tensor(rng.standard_normal((2, 4, 256, 64)), dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                               is_causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return [x.detach().float().numpy() for x in (q, k, v, do)], grads   # bf16 -> f32: exact


def test_users_view_of_gradients_passes_for_a_correct_backward():
    (q, k, v, do), (dq, dk, dv) = _sdpa_gradients(causal=True)
    oracle = refattn.vjp("attention", q, k, v, do, causal=True)
    baseline = refattn.testing.low_precision_attention_vjp(q, k, v, do, "bfloat16",
                                                           causal=True)
    for name, mine in zip("qkv", (dq, dk, dv)):
        assert_as_accurate_as(mine, baseline[name], oracle[name], name=f"d{name}")


def test_users_view_of_gradients_catches_a_leaking_causal_mask():
    torch = pytest.importorskip("torch")
    leak = torch.ones(256, 256, dtype=torch.bool).tril(1)      # one future key per row
    (q, k, v, do), (dq, dk, dv) = _sdpa_gradients(attn_mask=leak)
    oracle = refattn.vjp("attention", q, k, v, do, causal=True)
    baseline = refattn.testing.low_precision_attention_vjp(q, k, v, do, "bfloat16",
                                                           causal=True)
    with pytest.raises(AssertionError, match=r"dq is less accurate than its baseline "
                                             r"allows: .*\n  worst at index \(\d+, \d+, "
                                             r"\d+, \d+\)"):
        assert_as_accurate_as(dq, baseline["q"], oracle["q"], name="dq")


def _bf16_accumulated_dk(q, k, v, do, block_q):
    """``dK`` as a backward that keeps its ``dK`` accumulator in bf16 computes it: ``dS``
    rounded to bf16, ``dK ← bf16(dK + dSᵀQ·scale)`` after each ``block_q`` query rows (as
    PyTorch 2.13's CPU flash backward does: emulating it reproduced its bf16 ``dK``
    exactly). Non-causal, float64 arithmetic otherwise."""
    from refattn.testing import round_to
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = round_to(p @ v, "bfloat16")
    delta = (do * out).sum(-1)
    dk = np.zeros(k.shape)
    for r in range(0, q.shape[-2], block_q):
        rs = slice(r, r + block_q)
        ds = round_to(p[..., rs, :] * (do[..., rs, :] @ np.swapaxes(v, -1, -2)
                                       - delta[..., rs, None]), "bfloat16")
        dk = round_to(dk + np.swapaxes(ds, -1, -2) @ q[..., rs, :] / np.sqrt(q.shape[-1]),
                      "bfloat16")
    return dk


def test_users_view_of_gradients_flags_a_bf16_gradient_accumulator():
    """The baseline accumulates wide, as FlashAttention-2 does (fp32 ``dK``, ``dV`` in
    registers, ``dQ`` in an fp32 buffer). A backward that re-rounds ``dK`` to bf16 after
    every 256-row query block is 3x less accurate here and fails the 2x rule."""
    rng = np.random.default_rng(1)
    q, k, v, do = (refattn.testing.round_to(x, "bfloat16")
                   for x in rng.standard_normal((4, 1, 2, 1000, 64)))
    oracle = refattn.vjp("attention", q, k, v, do)
    baseline = refattn.testing.low_precision_attention_vjp(q, k, v, do, "bfloat16")
    with pytest.raises(AssertionError, match="dk is less accurate than its baseline"):
        assert_as_accurate_as(_bf16_accumulated_dk(q, k, v, do, 256), baseline["k"],
                              oracle["k"], name="dk")
    one_block = _bf16_accumulated_dk(q, k, v, do, 1000)     # a single rounding: passes
    assert_as_accurate_as(one_block, baseline["k"], oracle["k"], name="dk")


@pytest.mark.parametrize("actual, expected", [(np.inf, -np.inf), (-np.inf, np.inf),
                                              (1.0, np.inf), (np.inf, 1.0),
                                              (np.nan, np.nan), (np.nan, 1.0)])
def test_assert_close_cannot_pass_a_mismatched_infinity(actual, expected):
    with pytest.raises(AssertionError, match="not close to expected"):
        assert_close(np.array([actual]), np.array([expected]), rtol=1e300, atol=1e300)
    assert_close(np.array([-np.inf, 2.0]), np.array([-np.inf, 2.0]))


@pytest.mark.parametrize("actual, expected", [(np.inf, -np.inf), (np.nan, 1.0), (1.0, np.inf)])
def test_flash_rule_cannot_pass_a_mismatched_infinity_or_nan(actual, expected):
    baseline = np.array([expected, 1.0])
    with pytest.raises(AssertionError, match="dq"):
        assert_as_accurate_as(np.array([actual, 1.0]), baseline, np.array([expected, 1.0]),
                              atol=1e300, name="dq")


def test_flash_rule_matches_equal_infinities():
    lse = np.array([-np.inf, 0.5])
    assert_as_accurate_as(lse, lse, lse, name="lse")


@pytest.mark.parametrize("bad", [np.array(["a", "b"]), np.array([1 + 1j, 2.0])])
def test_helpers_refuse_non_real_arrays_naming_them(bad):
    good = np.ones(2)
    with pytest.raises(TypeError, match="dq must have a real numeric dtype"):
        assert_close(bad, good, name="dq")
    with pytest.raises(TypeError, match="dq must have a real numeric dtype"):
        assert_as_accurate_as(bad, good, good, name="dq")
    with pytest.raises(AssertionError, match="dq has shape"):
        assert_close(good[:1], good, name="dq")
