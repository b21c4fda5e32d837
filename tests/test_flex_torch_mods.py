"""FlexAttention mods written with torch, as attention-gym writes them (ALiBi over a
captured slope tensor, a document mask over a captured id tensor, a ``torch.tanh``
softcap, ``and_masks`` of a sliding window and causality), run through torch's
FlexAttention (eager, CPU, float64) and through refattn with the same numbers.

FlexAttention has no backward on CPU ("FlexAttention does not support backward on
CPU"), so the gradients are compared with torch autograd through the same math: SDPA on
the mask FlexAttention itself builds from the mod (``create_mask``), and for score mods
``softmax(score_mod(q kᵀ / √D, b, h, i, j)) v`` on broadcast index tensors.
"""
import math
import re
import sys
import warnings

import numpy as np
import pytest

import refattn as ra

torch = pytest.importorskip("torch")
flex = pytest.importorskip("torch.nn.attention.flex_attention")

B, H, N, D = 2, 8, 160, 16

# ---------------------------------------------------------- attention-gym-style mods
#: attention-gym's ``generate_alibi_bias``: float32 slopes 2^(-8 (h + 1) / H).
ALIBI_SLOPES = torch.exp2(-((torch.arange(H) + 1) * 8.0 / H))


def alibi(score, b, h, q_idx, kv_idx):
    bias = ALIBI_SLOPES[h] * (kv_idx - q_idx)
    return score + bias


#: attention-gym's document masking: four packed documents of N = 160 tokens.
DOCUMENT_ID = torch.repeat_interleave(torch.arange(4), torch.tensor([30, 50, 17, 63]))


def document_causal(b, h, q_idx, kv_idx):
    causal = q_idx >= kv_idx
    same_doc = DOCUMENT_ID[q_idx] == DOCUMENT_ID[kv_idx]
    return causal & same_doc


SOFTCAP = 2.0


def tanh_softcap(score, b, h, q_idx, kv_idx):
    return SOFTCAP * torch.tanh(score / SOFTCAP)


def tanh_softcap_derivative(score, b, h, q_idx, kv_idx):
    return 1 - torch.tanh(score / SOFTCAP) ** 2


WINDOW = 24


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return q_idx - kv_idx <= WINDOW


#: FlexAttention's combinator: ``b.new_ones((), dtype=torch.bool) & ...``.
sliding_window_causal = flex.and_masks(causal_mask, sliding_window)


# ---------------------------------------------------------------------- helpers
def inputs(n=N, m=N, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, length, D, dtype=torch.float64, generator=g,
                        requires_grad=requires_grad) for length in (n, m, m)]


def flex_out(q, k, v, *, mask_mod=None, score_mod=None):
    """FlexAttention in eager mode on the CPU (its block mask in 32 x 32 blocks, so the
    document and window masks skip blocks)."""
    block_mask = None if mask_mod is None else flex.create_block_mask(
        mask_mod, B, H, q.shape[-2], k.shape[-2], device="cpu", BLOCK_SIZE=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        out = flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    return out.numpy()


def ra_args(q, k, v):
    return [t.detach().numpy() for t in (q, k, v)]


def assert_rel(actual, expected, tol=1e-12):
    err = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


# ------------------------------------------------------------- forward vs FlexAttention
@pytest.mark.parametrize("n, m", [(N, N), (96, N)])
def test_alibi_with_captured_slope_tensor(n, m):
    q, k, v = inputs(n, m)
    out = ra.attention(*ra_args(q, k, v), bias=alibi)
    assert_rel(out, flex_out(q, k, v, score_mod=alibi))


@pytest.mark.parametrize("fn", [ra.attention, ra.tiled_attention, ra.sparse_attention],
                         ids=lambda f: f.__name__)
def test_document_mask_over_captured_id_tensor(fn):
    q, k, v = inputs()
    out = fn(*ra_args(q, k, v), mask=document_causal)
    assert_rel(out, flex_out(q, k, v, mask_mod=document_causal))


def test_tanh_softcap_written_with_torch():
    q, k, v = inputs(seed=1)
    q = q * 3  # logits beyond the cap, so the cap matters
    out = ra.attention(*ra_args(q, k, v), bias=tanh_softcap)
    expected = flex_out(q, k, v, score_mod=tanh_softcap)
    assert_rel(out, expected)
    assert np.max(np.abs(ra.attention(*ra_args(q, k, v)) - expected)) > 1e-2


@pytest.mark.parametrize("fn", [ra.attention, ra.sparse_attention],
                         ids=lambda f: f.__name__)
def test_sliding_window_and_causal_through_and_masks(fn):
    q, k, v = inputs(seed=2)
    out = fn(*ra_args(q, k, v), mask=sliding_window_causal)
    assert_rel(out, flex_out(q, k, v, mask_mod=sliding_window_causal))
    window = ra.attention(*ra_args(q, k, v), causal=True,
                          mask=ra.masks.sliding_window(WINDOW))
    assert_rel(out, window)


def test_score_mod_and_mask_mod_together():
    q, k, v = inputs(seed=3)
    out = ra.attention(*ra_args(q, k, v), mask=document_causal, bias=alibi)
    block_mask = flex.create_block_mask(document_causal, B, H, N, N, device="cpu",
                                        BLOCK_SIZE=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = flex.flex_attention(q, k, v, score_mod=alibi, block_mask=block_mask)
    assert_rel(out, expected.numpy())


def test_mods_that_refer_to_torch_go_to_torch_first_without_warnings():
    q, k, v = ra_args(*inputs(seed=3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # NumPy warns when it meets ALIBI_SLOPES[h]
        ra.attention(q, k, v, bias=alibi, mask=document_causal)
    assert [str(w.message) for w in caught] == []


def test_mask_object_from_a_torch_mod_materializes_and_composes():
    mask = ra.masks.from_function(document_causal) & ra.masks.sliding_window(WINDOW)
    keep = mask.materialize(N, N)
    expected = flex.create_mask(document_causal, 1, 1, N, N, device="cpu")[0, 0].numpy()
    i, j = np.arange(N)[:, None], np.arange(N)[None, :]
    np.testing.assert_array_equal(keep, expected & (i - j <= WINDOW))
    labels = mask.classify_tiles(N, N, 32, 32)
    assert labels.dtype == np.int8 and (labels == ra.masks.EMPTY).any()


# ------------------------------------------------------------------ without torch
ALIBI_SLOPES_NP = ALIBI_SLOPES.numpy().astype(np.float64)  # powers of two: exact
DOCUMENT_ID_NP = DOCUMENT_ID.numpy()


def alibi_np(score, b, h, q_idx, kv_idx):
    return score + ALIBI_SLOPES_NP[h] * (kv_idx - q_idx)


def document_causal_np(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (DOCUMENT_ID_NP[q_idx] == DOCUMENT_ID_NP[kv_idx])


def tanh_softcap_np(score, b, h, q_idx, kv_idx):
    return SOFTCAP * np.tanh(score / SOFTCAP)


def sliding_window_causal_np(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= WINDOW)


CASES = [("alibi", {"bias": alibi}, {"bias": alibi_np}),
         ("document", {"mask": document_causal}, {"mask": document_causal_np}),
         ("softcap", {"bias": tanh_softcap}, {"bias": tanh_softcap_np}),
         ("window", {"mask": sliding_window_causal}, {"mask": sliding_window_causal_np})]


@pytest.mark.parametrize("torch_kw, numpy_kw", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_numpy_written_mods_need_no_torch(monkeypatch, torch_kw, numpy_kw):
    q, k, v = ra_args(*inputs(seed=4))
    expected = ra.attention(q, k, v, **torch_kw)
    monkeypatch.delitem(sys.modules, "torch")  # as if the caller never imported torch
    assert_rel(ra.attention(q, k, v, **numpy_kw), expected)


def test_torch_written_mod_without_torch_imported_says_so(monkeypatch):
    q, k, v = ra_args(*inputs(seed=4))
    monkeypatch.delitem(sys.modules, "torch")
    with pytest.raises(TypeError, match=r"score_mod 'tanh_softcap' failed on NumPy "
                       r"arrays \(score \(1, 160, 160\), b \(\), h \(1, 1, 1\).*torch "
                       r"is not imported"):
        ra.attention(q, k, v, bias=tanh_softcap)


# ------------------------------------------------------------------ broken mods
SHORT_ID = DOCUMENT_ID[:100]


def short_document(b, h, q_idx, kv_idx):
    return SHORT_ID[q_idx] == SHORT_ID[kv_idx]


def test_broken_torch_mod_names_itself_and_both_errors():
    q, k, v = ra_args(*inputs())
    with pytest.raises(IndexError) as info:
        ra.attention(q, k, v, mask=short_document)
    message = str(info.value)
    assert message.startswith("mask_mod 'short_document' failed on torch tensors and on "
                              "NumPy arrays (b (), h (1, 1, 1), q_idx (1, 160, 1), "
                              "kv_idx (1, 1, 160)):")
    assert re.search(r"\n  torch: IndexError: index 1\d\d is out of bounds for dimension 0 "
                     r"with size 100\n  NumPy: IndexError: ", message)
    assert isinstance(info.value.__cause__, IndexError)


def test_broken_numpy_mod_names_itself():
    slopes = np.array([0.5, 0.25])  # two heads' slopes for eight heads

    def two_head_alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * np.abs(q_idx - kv_idx)

    q, k, v = ra_args(*inputs())
    with pytest.raises(IndexError, match=r"score_mod 'two_head_alibi' failed on NumPy "
                       r"arrays and on torch tensors .*\n  NumPy: IndexError: index 2 is "
                       r"out of bounds"):
        ra.attention(q, k, v, bias=two_head_alibi)


def test_torch_mask_mod_returning_numbers_is_refused():
    def float_mask(b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, 1.0, 0.0)

    q, k, v = ra_args(*inputs())
    with pytest.raises(TypeError, match="mask function float_mask returned dtype float64; "
                       "a mask_mod must return booleans"):
        ra.attention(q, k, v, mask=float_mask)


def test_captured_tensor_that_requires_grad_is_detached():
    slopes = ALIBI_SLOPES.to(torch.float64).requires_grad_()

    def learned_alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    q, k, v = inputs(seed=5)
    assert_rel(ra.attention(*ra_args(q, k, v), bias=learned_alibi),
               ra.attention(*ra_args(q, k, v), bias=alibi))


# --------------------------------------------------------------------- gradients
def autograd(q, k, v, do, *, keep=None, score_mod=None):
    """torch autograd of softmax(score_mod(q kᵀ/√D)) v with ``keep`` a boolean mask."""
    if score_mod is None:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    else:
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        n, m = s.shape[-2:]
        s = score_mod(s, torch.arange(B)[:, None, None, None],
                      torch.arange(H)[None, :, None, None], torch.arange(n)[:, None],
                      torch.arange(m)[None, :])
        if keep is not None:
            s = s.masked_fill(~keep, -math.inf)
        out = torch.softmax(s, dim=-1) @ v
    return dict(zip("qkv", (g.numpy() for g in torch.autograd.grad(out, (q, k, v), do))))


@pytest.mark.parametrize("mask_mod", [document_causal, sliding_window_causal],
                         ids=["document", "window"])
def test_vjp_with_torch_mask_mod(mask_mod):
    q, k, v = inputs(seed=6, requires_grad=True)
    do = torch.randn(B, H, N, D, dtype=torch.float64, generator=torch.Generator()
                     .manual_seed(7))
    keep = flex.create_mask(mask_mod, 1, 1, N, N, device="cpu")  # Flex's evaluation
    expected = autograd(q, k, v, do, keep=keep)
    got = ra.vjp("attention", *ra_args(q, k, v), do.numpy(), mask=mask_mod)
    for name in "qkv":
        assert_rel(got[name], expected[name])


@pytest.mark.parametrize("n, m", [(N, N), (96, N)])
def test_vjp_with_torch_score_mods_and_torch_derivatives(n, m):
    q, k, v = inputs(n, m, seed=8, requires_grad=True)
    q3 = (3 * q).detach().requires_grad_()
    do = torch.randn(B, H, n, D, dtype=torch.float64, generator=torch.Generator()
                     .manual_seed(9))
    cases = [(ra.scores.from_function(tanh_softcap, derivative=tanh_softcap_derivative),
              tanh_softcap, None),
             (ra.scores.from_function(alibi, derivative=lambda s, b, h, i, j:
                                      torch.ones_like(s)), alibi,
              flex.create_mask(causal_mask, 1, 1, n, m, device="cpu"))]
    for bias, score_mod, keep in cases:
        expected = autograd(q3, k, v, do, score_mod=score_mod, keep=keep)
        got = ra.vjp("attention", *ra_args(q3, k, v), do.numpy(), bias=bias,
                     mask=None if keep is None else causal_mask)
        for name in "qkv":
            assert_rel(got[name], expected[name])


def test_broken_torch_derivative_names_its_score_mod():
    def bad_derivative(score, b, h, q_idx, kv_idx):
        return 1 - torch.tanh(score / SOFTCAP) ** 2 * ALIBI_SLOPES[:2]  # (2,) vs M

    q, k, v = inputs(seed=10)
    bias = ra.scores.from_function(tanh_softcap, derivative=bad_derivative)
    with pytest.raises(RuntimeError, match=r"derivative of score_mod 'tanh_softcap' failed "
                       r"on torch tensors and on NumPy arrays \(score \(1, 160, 160\)"):
        ra.vjp("attention", *ra_args(q, k, v), np.ones((B, H, N, D)), bias=bias)
