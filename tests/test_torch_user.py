"""refattn from a PyTorch user's test suite: torch tensors straight in (any dtype,
``requires_grad``), FlashAttention's ``(B, N, H, D)`` layout, causal alignment by name,
variable-length packed batches and paged KV caches. torch is a test peer only."""
import numpy as np
import pytest

import refattn
from refattn.testing import assert_close

torch = pytest.importorskip("torch")
sdpa = torch.nn.functional.scaled_dot_product_attention


def _qkv(shape_q, shape_kv, dtype, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=g).to(dtype)
    k, v = (torch.randn(shape_kv, generator=g).to(dtype) for _ in range(2))
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def _exact(*xs):
    """What a test holds, converted by hand: the float64 values of its tensors."""
    return [x.detach().double().numpy() for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sdpa_tensors_with_requires_grad_go_straight_in(dtype):
    q, k, v = _qkv((2, 4, 96, 32), (2, 4, 96, 32), dtype)
    expected = refattn.attention(q, k, v, causal=True)          # torch tensors in
    assert expected.dtype == np.float64
    np.testing.assert_array_equal(expected, refattn.attention(*_exact(q, k, v), causal=True))
    assert_close(sdpa(q, k, v, is_causal=True), expected)        # dtype's tolerance


def test_float8_tensors_are_read_bit_exactly():
    q, k, v = _qkv((1, 2, 16, 8), (1, 2, 16, 8), torch.float32, requires_grad=False)
    for dt in (torch.float8_e4m3fn, torch.float8_e5m2):
        q8, k8, v8 = (x.to(dt) for x in (q, k, v))
        np.testing.assert_array_equal(refattn.attention(q8, k8, v8),
                                      refattn.attention(*(x.float() for x in (q8, k8, v8))))


@pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs")
@pytest.mark.parametrize("n, m", [(5, 9), (9, 5)])
def test_causal_alignment_by_name_against_torch(n, m):
    from torch.nn.attention.bias import causal_lower_right
    q, k, v = _qkv((1, 2, n, 16), (1, 2, m, 16), torch.float64)
    top_left = sdpa(q, k, v, is_causal=True)                      # torch's is_causal
    bottom_right = sdpa(q, k, v, attn_mask=causal_lower_right(n, m))
    mine_tl = refattn.attention(q, k, v, causal="top_left")
    mine_br = refattn.attention(q, k, v, causal="bottom_right")
    assert_close(top_left, mine_tl, rtol=1e-13, atol=1e-13)
    rows = slice(max(0, n - m), None)   # torch gives NaN where bottom-right masks a row
    assert_close(bottom_right[..., rows, :], mine_br[..., rows, :], rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(mine_br, refattn.attention(q, k, v, causal=True))
    assert not np.allclose(mine_tl, mine_br)                    # they do differ at N != M


def test_top_left_needs_a_mask_argument_when_lengths_differ():
    q, k, v = _exact(*_qkv((1, 2, 5, 8), (1, 2, 9, 8), torch.float64))
    with pytest.raises(ValueError, match="causal='top_left' with N=5 != M=9"):
        refattn.linear_attention(q, k, v, causal="top_left")
    with pytest.raises(ValueError, match="causal must be True, False or one of"):
        refattn.attention(q, k, v, causal="lower_right")


def test_gqa_against_sdpa_enable_gqa():
    q, k, v = _qkv((2, 8, 40, 16), (2, 2, 40, 16), torch.float64)
    assert_close(sdpa(q, k, v, is_causal=True, enable_gqa=True),
                 refattn.attention(q, k, v, causal=True), rtol=1e-13, atol=1e-13)


def test_flash_attention_layout_bnhd():
    q, k, v = _qkv((2, 33, 4, 16), (2, 47, 2, 16), torch.float64)   # (B, N, H, D)
    out = refattn.attention(q, k, v, causal=True, layout="bnhd")
    assert out.shape == (2, 33, 4, 16)
    heads_first = [x.transpose(1, 2) for x in (q, k, v)]
    np.testing.assert_array_equal(out, refattn.attention(*heads_first, causal=True)
                                  .swapaxes(1, 2))
    do = torch.randn(out.shape, dtype=torch.float64)
    grads = refattn.vjp("attention", q, k, v, do, causal=True, layout="bnhd")
    ref = torch.autograd.grad(
        sdpa(*heads_first, attn_mask=_lower_right(33, 47), enable_gqa=True).transpose(1, 2),
        (q, k, v), do)
    for name, g in zip("qkv", ref):
        assert grads[name].shape == tuple(g.shape)
        assert_close(grads[name], g, rtol=1e-12, atol=1e-12, name=f"d{name}")


def _lower_right(n, m):
    return torch.ones(n, m, dtype=torch.bool).tril(m - n)


def test_a_likely_layout_mistake_is_named():
    q, k, v = _exact(*_qkv((2, 100, 4, 16), (2, 120, 2, 16), torch.float64))
    with pytest.raises(ValueError, match="pass layout='bnhd'"):
        refattn.attention(q, k, v)


def _packed_batch(lengths_q, lengths_k, hq=4, hkv=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    cu_q = np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lengths_k)]).astype(np.int32)
    q = torch.tensor(rng.standard_normal((cu_q[-1], hq, d)))
    k, v = (torch.tensor(rng.standard_normal((cu_k[-1], hkv, d))) for _ in range(2))
    return q, k, v, torch.tensor(cu_q), torch.tensor(cu_k)


@pytest.mark.parametrize("fn", ["attention", "tiled_attention", "sliding_window_attention"])
def test_varlen_batch_equals_per_sequence_calls(fn):
    lengths = [1, 17, 300, 64, 129]
    q, k, v, cu_q, cu_k = _packed_batch(lengths, lengths)
    kwargs = {"window": 32} if fn == "sliding_window_attention" else {}
    f = getattr(refattn, fn)
    out, lse = f(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True,
                 return_lse=True, **kwargs)
    assert out.shape == (sum(lengths), 4, 16) and lse.shape == (4, sum(lengths))
    for s in range(len(lengths)):
        rows = slice(int(cu_q[s]), int(cu_q[s + 1]))
        one, one_lse = f(*(x[rows].transpose(0, 1) for x in (q, k, v)), causal=True,
                         return_lse=True, **kwargs)
        np.testing.assert_array_equal(out[rows], one.swapaxes(0, 1))
        np.testing.assert_array_equal(lse[:, rows], one_lse)


def test_varlen_gradients_against_torch_per_sequence():
    lengths_q, lengths_k = [3, 1, 20, 7, 12], [5, 4, 20, 7, 30]   # cross-attention lengths
    q, k, v, cu_q, cu_k = _packed_batch(lengths_q, lengths_k)
    do = torch.randn(q.shape[0], 4, 16, dtype=torch.float64)
    grads = refattn.vjp("attention", q, k, v, do, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                        causal=True)
    tq, tk, tv = (x.clone().requires_grad_(True) for x in (q, k, v))
    outs = []
    for s in range(5):
        rq, rk = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
        n, m = rq.stop - rq.start, rk.stop - rk.start
        outs.append(sdpa(*(x[r].transpose(0, 1) for x, r in ((tq, rq), (tk, rk), (tv, rk))),
                         attn_mask=_lower_right(n, m), enable_gqa=True).transpose(0, 1))
    ref = torch.autograd.grad(torch.cat(outs), (tq, tk, tv), do)
    for name, g in zip("qkv", ref):
        assert_close(grads[name], g, rtol=1e-12, atol=1e-12, name=f"d{name}")


def test_varlen_errors_name_the_argument():
    q, k, v, cu_q, cu_k = _packed_batch([3, 4], [3, 4])
    with pytest.raises(ValueError, match="cu_seqlens_q must rise from 0 to total_q = 7"):
        refattn.attention(q, k, v, cu_seqlens_q=torch.tensor([0, 3, 6]), cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match="give both cu_seqlens_q and cu_seqlens_k"):
        refattn.attention(q, k, v, cu_seqlens_q=cu_q)
    with pytest.raises(ValueError, match=r"must be packed \(total, H, dim\)"):
        refattn.attention(q[None], k[None], v[None], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match="an array bias cannot be split"):
        refattn.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                          bias=np.zeros((7, 7)))
    with pytest.raises(ValueError, match="packed sequences .* are \\(total, H, D\\)"):
        refattn.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, layout="bhnd")
    with pytest.raises(TypeError, match="block pattern is block_sparse_attention's "
                                        "block_layout="):
        refattn.attention(q, k, v, layout=np.ones((2, 2), bool))


def test_no_framework_is_imported_by_refattn():
    import subprocess
    import sys
    code = ("import sys, refattn, refattn.gpu; "
            "bad = [m for m in ('torch', 'jax', 'cupy', 'tensorflow') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_flex_attention_mods_written_with_torch():
    import warnings
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    slopes = torch.exp2(-torch.arange(1, 5) * 2.0)              # captured tensors
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([40, 25, 31]))

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def same_doc_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    q, k, v = _qkv((2, 4, 96, 16), (2, 4, 96, 16), torch.float64, requires_grad=False)
    block_mask = flex.create_block_mask(same_doc_causal, 2, 4, 96, 96, device="cpu",
                                        BLOCK_SIZE=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # eager, without torch.compile
        expected = flex.flex_attention(q, k, v, score_mod=alibi, block_mask=block_mask)
    mine = refattn.attention(q, k, v, mask=same_doc_causal, bias=alibi)
    assert_close(expected, mine, rtol=1e-13, atol=1e-13)


def test_paged_cache_equals_the_contiguous_cache():
    rng = np.random.default_rng(3)
    block_size, hkv, d = 16, 2, 16
    lengths = [1, 40, 300, 17, 64]
    pool = sum(-(-n // block_size) for n in lengths) + 3
    key_cache = torch.tensor(rng.standard_normal((pool, block_size, hkv, d)))
    value_cache = torch.tensor(rng.standard_normal((pool, block_size, hkv, d)))
    free = rng.permutation(pool)                              # blocks out of order
    table = torch.full((len(lengths), 19), -1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(lengths):
        blocks = -(-n // block_size)
        table[s, :blocks] = torch.tensor(free[used:used + blocks])
        used += blocks
    q = torch.tensor(rng.standard_normal((len(lengths), 8, d)))   # one decode token each
    out = refattn.paged_attention(q, key_cache, value_cache, table,
                                  torch.tensor(lengths, dtype=torch.int32))
    for s, n in enumerate(lengths):
        ids = table[s, :-(-n // block_size)].long()
        k = key_cache[ids].reshape(-1, hkv, d)[:n].transpose(0, 1)
        v = value_cache[ids].reshape(-1, hkv, d)[:n].transpose(0, 1)
        np.testing.assert_array_equal(out[s], refattn.attention(q[s, :, None], k, v)[:, 0])
