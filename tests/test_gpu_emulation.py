"""A NumPy transliteration of ``flash_fwd_fast`` (gpu/kernels/flash_fast.cu) run on the
CPU with the PTX ISA's semantics of ``ldmatrix`` (``.x4``, ``.trans``) and
``mma.m16n8k16.row.col`` fragments, against the float64 oracle.

This checks the kernel's index algebra without a GPU: the shared-memory swizzle, the
ldmatrix lane addresses, the fragment coordinates of S, P and O, the P-to-A-fragment
repacking, the tile ranges of the band, the masks, the online softmax and the finish.
It does not run the CUDA code: a transliteration can drift from the source, and timing,
races and the hardware are untested until the device selfcheck passes.

Shared memory starts as NaN, so a read of a location no load wrote shows up; every A/B
fragment element must be supplied by exactly one lane.
"""
import ml_dtypes
import numpy as np
import pytest

import refattn as ra
from refattn.gpu import host, kernels_spec as ks

LANE = np.arange(32)
G, TIG = LANE >> 2, LANE & 3


class SmemRows:
    """Mirror of ``refattn::SmemRows<D>``."""

    def __init__(self, d):
        self.C = d // 8
        c = self.C
        self.STRIDE = c if (c % 8 == 0 or c == 4) else (c + 1 if c % 2 == 0 else c)
        self.ELEMS = self.STRIDE * 8

    def offset(self, r, c):
        r, c = np.asarray(r), np.asarray(c)
        if self.C % 8 == 0:
            sc = c ^ (r & 7)
        elif self.C == 4:
            sc = c ^ ((r >> 1) & 3)
        else:
            sc = c
        return (r * self.STRIDE + sc) * 8


def ldmatrix_x4(smem, addr, trans=False):
    """``addr``: (32,) element offsets, lane l giving row l % 8 of matrix l // 8.
    Returns (32, 4, 2): register i of lane l holds two 16-bit values."""
    out = np.empty((32, 4, 2), np.float32)
    for i in range(4):
        rows = np.stack([smem[a:a + 8] for a in addr[8 * i:8 * i + 8]])  # (8 rows, 8 cols)
        if trans:
            out[:, i, 0] = rows[2 * TIG, G]
            out[:, i, 1] = rows[2 * TIG + 1, G]
        else:
            out[:, i, 0] = rows[G, 2 * TIG]
            out[:, i, 1] = rows[G, 2 * TIG + 1]
    return out


def mma(d, a, b0, b1):
    """d (32, 4) f32 += A (16x16 from a (32, 4, 2)) @ B (16x8 from b0, b1 (32, 2))."""
    A = np.full((16, 16), np.nan)
    B = np.full((16, 8), np.nan)
    for j in range(2):
        A[G, 2 * TIG + j] = a[:, 0, j]
        A[G + 8, 2 * TIG + j] = a[:, 1, j]
        A[G, 2 * TIG + 8 + j] = a[:, 2, j]
        A[G + 8, 2 * TIG + 8 + j] = a[:, 3, j]
        B[2 * TIG + j, G] = b0[:, j]
        B[2 * TIG + 8 + j, G] = b1[:, j]
    # every element supplied (a lane-mapping error would leave NaN from the fill ...
    # unless the data itself is NaN, which the callers below never pass to mma)
    assert not np.isnan(A).any() and not np.isnan(B).any()
    D = A @ B
    for j in range(2):
        d[:, j] = np.float32(d[:, j] + D[G, 2 * TIG + j])
        d[:, 2 + j] = np.float32(d[:, 2 + j] + D[G + 8, 2 * TIG + j])


def emulate_fast(q, k, v, p, dt):
    """Run ``flash_fwd_fast`` block by block. q (B, Hq, N, D) etc. already on the dtype's
    grid (float32 values); returns out (B, Hq, N, D) float64 and lse (B, Hq, N)."""
    bm, bn, warps = p.block_q, p.block_k, p.block[0] // 32
    d, n, m = p.d, p.n, p.m
    L = SmemRows(d)
    NT, DT = bn // 8, d // 8
    rnd = (lambda x: np.asarray(x, np.float32).astype(dt).astype(np.float32))
    out = np.full((p.batch, p.heads_q, n, d), np.nan)
    lse = np.full((p.batch, p.heads_q, n), np.nan)
    left, right, offset = p.left, p.right, m - n
    t = p.tiles
    log2e = np.float32(1.4426950408889634)

    def load_tile(smem, base, src, row0, limit, rows):
        for idx in range(rows * L.C):
            r, c = idx // L.C, idx % L.C
            o = base + int(L.offset(r, c))
            smem[o:o + 8] = src[row0 + r, c * 8:c * 8 + 8] if row0 + r < limit else 0

    for b in range(p.batch):
        for h in range(p.heads_q):
            hk = h // p.group
            for qt in range(p.grid[0]):
                smem = np.full((bm + 4 * bn) * L.ELEMS, np.nan, np.float32)
                sQ, sK, sV = 0, bm * L.ELEMS, bm * L.ELEMS + 2 * bn * L.ELEMS
                r0 = qt * bm
                if t is not None:
                    first, count = int(t.indptr[qt]), int(t.indptr[qt + 1] - t.indptr[qt])
                else:
                    r_last = min(r0 + bm, n) - 1
                    j_min = max(0, r0 + offset - left)
                    j_max = min(m - 1, r_last + offset + right)
                    first = j_min // bn
                    count = 0 if j_min > j_max else j_max // bn - first + 1
                key_tile = (lambda it: int(t.tile_k[first + it])) if t is not None else \
                    (lambda it: first + it)
                load_tile(smem, sQ, q[b, h], r0, n, bm)
                if count > 0:
                    load_tile(smem, sK, k[b, hk], key_tile(0) * bn, m, bn)
                    load_tile(smem, sV, v[b, hk], key_tile(0) * bn, m, bn)
                acc = np.zeros((warps, DT, 32, 4), np.float32)
                row_max = np.full((warps, 2, 32), -np.inf, np.float32)
                row_sum = np.zeros((warps, 2, 32), np.float32)
                for it in range(count):
                    stage = it & 1
                    if it + 1 < count:
                        nk = key_tile(it + 1) * bn
                        load_tile(smem, sK + (stage ^ 1) * bn * L.ELEMS, k[b, hk], nk, m, bn)
                        load_tile(smem, sV + (stage ^ 1) * bn * L.ELEMS, v[b, hk], nk, m, bn)
                    tK, tV = sK + stage * bn * L.ELEMS, sV + stage * bn * L.ELEMS
                    c0 = key_tile(it) * bn
                    bit = int(t.tile_bits[first + it]) if t is not None else -1
                    for warp in range(warps):
                        wrow = warp * 16
                        s = np.zeros((NT, 32, 4), np.float32)
                        for kk in range(d // 16):
                            a = ldmatrix_x4(smem, sQ + L.offset(wrow + (LANE & 15),
                                                               2 * kk + (LANE >> 4)))
                            for n2 in range(NT // 2):
                                mat = LANE >> 3
                                bk = ldmatrix_x4(smem, tK + L.offset(
                                    16 * n2 + (mat >> 1) * 8 + (LANE & 7), 2 * kk + (mat & 1)))
                                mma(s[2 * n2], a, bk[:, 0], bk[:, 1])
                                mma(s[2 * n2 + 1], a, bk[:, 2], bk[:, 3])
                        i_lo, i_hi = r0, r0 + bm - 1
                        band_full = (i_lo + offset - (c0 + bn - 1) >= -right) and \
                            (i_hi + offset - c0 <= left)
                        need_mask = bit >= 0 or c0 + bn > m or not band_full
                        for nn in range(NT):
                            for e in range(4):
                                x = s[nn, :, e] * np.float32(p.scale)
                                if p.softcap > 0:
                                    x = np.float32(p.softcap) * np.tanh(x / np.float32(p.softcap))
                                x = (x * log2e).astype(np.float32)
                                if need_mask:
                                    rl = wrow + G + 8 * (e >> 1)
                                    cl = 8 * nn + 2 * TIG + (e & 1)
                                    dist = (r0 + rl) + offset - (c0 + cl)
                                    keep = (c0 + cl < m) & (dist <= left) & (dist >= -right)
                                    if bit >= 0:
                                        words = t.bits[bit, rl, cl >> 5]
                                        keep &= ((words >> (cl & 31).astype(np.uint32)) & 1) == 1
                                    x = np.where(keep, x, -np.inf).astype(np.float32)
                                s[nn, :, e] = x
                        alpha = np.zeros((2, 32), np.float32)
                        for r in range(2):
                            mx = row_max[warp, r].copy()
                            for nn in range(NT):
                                mx = np.maximum(mx, np.maximum(s[nn, :, 2 * r], s[nn, :, 2 * r + 1]))
                            mx = np.maximum(mx, mx[LANE ^ 1])
                            mx = np.maximum(mx, mx[LANE ^ 2])
                            base = np.where(mx == -np.inf, 0, mx).astype(np.float32)
                            alpha[r] = np.exp2(row_max[warp, r] - base)
                            tot = np.zeros(32, np.float32)
                            for nn in range(NT):
                                s[nn, :, 2 * r] = np.exp2(s[nn, :, 2 * r] - base)
                                s[nn, :, 2 * r + 1] = np.exp2(s[nn, :, 2 * r + 1] - base)
                                tot += s[nn, :, 2 * r] + s[nn, :, 2 * r + 1]
                            row_sum[warp, r] = row_sum[warp, r] * alpha[r] + tot
                            row_max[warp, r] = mx
                        acc[warp][:, :, 0:2] *= alpha[0][None, :, None]
                        acc[warp][:, :, 2:4] *= alpha[1][None, :, None]
                        for kk in range(bn // 16):
                            a = np.empty((32, 4, 2), np.float32)
                            a[:, 0] = rnd(s[2 * kk][:, 0:2])
                            a[:, 1] = rnd(s[2 * kk][:, 2:4])
                            a[:, 2] = rnd(s[2 * kk + 1][:, 0:2])
                            a[:, 3] = rnd(s[2 * kk + 1][:, 2:4])
                            for d2 in range(DT // 2):
                                mat = LANE >> 3
                                bv = ldmatrix_x4(smem, tV + L.offset(
                                    16 * kk + (mat & 1) * 8 + (LANE & 7), 2 * d2 + (mat >> 1)),
                                    trans=True)
                                mma(acc[warp, 2 * d2], a, bv[:, 0], bv[:, 1])
                                mma(acc[warp, 2 * d2 + 1], a, bv[:, 2], bv[:, 3])
                for warp in range(warps):
                    wrow = warp * 16
                    for r in range(2):
                        l_ = row_sum[warp, r].copy()
                        l_ = l_ + l_[LANE ^ 1]
                        l_ = l_ + l_[LANE ^ 2]
                        inv = np.where(l_ > 0, 1 / np.where(l_ > 0, l_, 1), 0).astype(np.float32)
                        for lane in range(32):
                            i = r0 + wrow + G[lane] + 8 * r
                            if i >= n:
                                continue
                            for tt in range(DT):
                                for j in range(2):
                                    out[b, h, i, 8 * tt + 2 * TIG[lane] + j] = rnd(
                                        acc[warp, tt, lane, 2 * r + j] * inv[lane])
                            if TIG[lane] == 0:
                                lse[b, h, i] = ((row_max[warp, r, lane] + np.log2(l_[lane]))
                                                * np.log(2)) if l_[lane] > 0 else -np.inf
    return out, lse


CASES = [
    dict(d=64, n=70, m=130),
    dict(d=32, n=50, m=77, causal=True),
    dict(d=96, n=40, m=33, causal=True),             # N > M: empty rows
    dict(d=128, n=65, m=100, window=(20, 7)),
    dict(d=64, n=90, m=90, softcap=3.0, scale=0.4, hq=4, hkv=2),
    dict(d=64, n=150, m=150, mask="bigbird"),
    dict(d=256, n=20, m=45, causal=True),
]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_fast_kernel_transliteration_matches_oracle(case, dtype):
    case = dict(case)
    d, n, m = case.pop("d"), case.pop("n"), case.pop("m")
    hq, hkv = case.pop("hq", 2), case.pop("hkv", 1)
    mask_name = case.pop("mask", None)
    bmask = None
    if mask_name == "bigbird":
        bmask = (ra.masks.block_window(1, 32) | ra.masks.global_tokens([0, 1])
                 | ra.masks.random_blocks(1, 32, rng=5))
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    rng = np.random.default_rng(n * 1000 + m)
    q = rng.standard_normal((1, hq, n, d)).astype(dt)
    k = rng.standard_normal((1, hkv, m, d)).astype(dt)
    v = rng.standard_normal((1, hkv, m, d)).astype(dt)
    p = host.plan(q.shape, k.shape, v.shape, dtype, block_mask=bmask, variant="fast", **case)
    assert p.source == "fast"
    f32 = [x.astype(np.float32) for x in (q, k, v)]
    out, lse = emulate_fast(*f32, p, dt)
    mask = host.reference_mask(case.get("causal", False), case.get("window"), bmask, n, m)
    kw = dict(mask=mask, scale=case.get("scale"), softcap=case.get("softcap"))
    oracle, oracle_lse = ra.attention(q, k, v, return_lse=True, **kw)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    base = ra.testing.low_precision_attention(q, k, v, dtype, **kw)
    ra.testing.assert_as_accurate_as(out, base, oracle, factor=2.0,
                                     atol=ra.testing.tolerance(dtype)[1])
    assert np.array_equal(np.isneginf(lse), np.isneginf(oracle_lse))
    fin = np.isfinite(oracle_lse)
    assert np.abs(lse[fin] - oracle_lse[fin]).max() < 1e-3


@pytest.mark.parametrize("d", ks.HEAD_DIMS)
def test_swizzle_is_a_bijection_and_conflict_free(d):
    """Each (row, chunk) gets its own 16-byte slot, and the 8 rows an ldmatrix phase reads
    (rows 8a..8a+7, one logical chunk) fall in 8 different 16-byte bank groups."""
    L = SmemRows(d)
    rows = 64
    r, c = np.meshgrid(np.arange(rows), np.arange(L.C), indexing="ij")
    slots = L.offset(r, c) // 8
    assert len(np.unique(slots)) == rows * L.C
    assert slots.min() >= 0 and slots.max() < rows * L.STRIDE
    for a in range(rows // 8):
        for ch in range(L.C):
            groups = (L.offset(np.arange(8 * a, 8 * a + 8), ch) // 8) % 8
            assert len(set(groups.tolist())) == 8, (d, a, ch)
    # the Python mirror agrees with the Python byte count of the plan
    bm, bn, _ = ks.tiles(d)
    assert ks.shared_memory_bytes("fast", "float16", d) == (bm + 4 * bn) * L.ELEMS * 2


def test_transliteration_uses_the_kernels_index_expressions():
    """Guard against drift: the lane-address and repacking expressions emulated above
    appear verbatim in the CUDA source (``LANE`` here is ``lane`` there)."""
    src = ks.source("fast")
    for expr in ["ldmatrix_x4(a, sQ + L::offset(wrow + (lane & 15), 2 * kk + (lane >> 4)))",
                 "16 * n2 + (mat >> 1) * 8 + (lane & 7),",
                 "2 * kk + (mat & 1)));",
                 "16 * kk + (mat & 1) * 8 + (lane & 7),",
                 "2 * d2 + (mat >> 1)));",
                 "Mma<T>::run(s[2 * n2], a, bk[0], bk[1]);",
                 "Mma<T>::run(s[2 * n2 + 1], a, bk[2], bk[3]);",
                 "Mma<T>::run(acc[2 * d2], a, bv[0], bv[1]);",
                 "Mma<T>::run(acc[2 * d2 + 1], a, bv[2], bv[3]);",
                 "a[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);",
                 "a[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);",
                 "a[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);",
                 "a[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);",
                 "if (C % 8 == 0) sc = c ^ (r & 7);",
                 "else if (C == 4) sc = c ^ ((r >> 1) & 3);",
                 "const int rl = wrow + g + 8 * (e >> 1), cl = 8 * n + 2 * tig + (e & 1);",
                 "orow[8 * t + 2 * tig] = from_float<T>(acc[t][2 * r] * inv);",
                 "first = (int)(j_min / BN);",
                 "const long long j_min = max(0LL, r0 + offset - left);",
                 "const long long j_max = min((long long)M - 1, r_last + offset + right);",
                 "const bool need_mask = bit >= 0 || c0 + BN > M || !band_full;"]:
        assert expr in src, expr
