"""NumPy transliterations of ``flash_fwd_fast`` (gpu/kernels/flash_fast.cu, run with the
PTX ISA's semantics of ``ldmatrix`` ``.x4``/``.trans`` and ``mma.m16n8k16.row.col``
fragments) and ``flash_fwd_simple``, against the float64 oracle; and a fake CuPy that
runs them, so the whole Python path (plan, array hand-over, module cache, launch
arguments checked against the kernel's parameter list in the source, results back,
the selfcheck itself) runs on the CPU.

This checks the kernel's index algebra without a GPU: the shared-memory swizzle, the
ldmatrix lane addresses, the fragment coordinates of S, P and O, the P-to-A-fragment
repacking, the tile ranges of the band, the masks, the online softmax and the finish.
It does not run the CUDA code: a transliteration can drift from the source, and timing,
races and the hardware are untested until the device selfcheck passes.

Shared memory starts as NaN, so a read of a location no load wrote shows up; every A/B
fragment element must be supplied by exactly one lane.
"""
import re
import sys
import types

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


def emulate_fast(q, k, v, o, lse, B, Hq, Hkv, N, M, scale, softcap, left, right,
                 indptr, tile_k, tile_bits, bits, use_list, *, D, BM, BN, WARPS, grid, dt):
    """Run ``flash_fwd_fast<T, D, BM, BN, WARPS>`` block by block on its launch arguments.
    q (B, Hq, N, D), k/v (B, Hkv, M, D) float32 values on T's grid; writes o (same shape
    as q, float32 values rounded to T) and lse (B, Hq, N) float32."""
    L = SmemRows(D)
    NT, DT = BN // 8, D // 8
    rnd = (lambda x: np.asarray(x, np.float32).astype(dt).astype(np.float32))
    offset = M - N
    log2e = np.float32(1.4426950408889634)

    def load_tile(smem, base, src, row0, limit, rows):
        for idx in range(rows * L.C):
            r, c = idx // L.C, idx % L.C
            off = base + int(L.offset(r, c))
            smem[off:off + 8] = src[row0 + r, c * 8:c * 8 + 8] if row0 + r < limit else 0

    for b in range(grid[2]):
        for h in range(grid[1]):
            hk = h // (Hq // Hkv)
            for block_x in range(grid[0]):
                qt = grid[0] - 1 - block_x
                smem = np.full((BM + 4 * BN) * L.ELEMS, np.nan, np.float32)
                sQ, sK, sV = 0, BM * L.ELEMS, BM * L.ELEMS + 2 * BN * L.ELEMS
                r0 = qt * BM
                if use_list:
                    first, count = int(indptr[qt]), int(indptr[qt + 1] - indptr[qt])
                else:
                    r_last = min(r0 + BM, N) - 1
                    j_min = max(0, r0 + offset - left)
                    j_max = min(M - 1, r_last + offset + right)
                    first = j_min // BN
                    count = 0 if j_min > j_max else j_max // BN - first + 1
                key_tile = (lambda it: int(tile_k[first + it])) if use_list else \
                    (lambda it: first + it)
                load_tile(smem, sQ, q[b, h], r0, N, BM)
                if count > 0:
                    load_tile(smem, sK, k[b, hk], key_tile(0) * BN, M, BN)
                    load_tile(smem, sV, v[b, hk], key_tile(0) * BN, M, BN)
                acc = np.zeros((WARPS, DT, 32, 4), np.float32)
                row_max = np.full((WARPS, 2, 32), -np.inf, np.float32)
                row_sum = np.zeros((WARPS, 2, 32), np.float32)
                for it in range(count):
                    stage = it & 1
                    if it + 1 < count:
                        nk = key_tile(it + 1) * BN
                        load_tile(smem, sK + (stage ^ 1) * BN * L.ELEMS, k[b, hk], nk, M, BN)
                        load_tile(smem, sV + (stage ^ 1) * BN * L.ELEMS, v[b, hk], nk, M, BN)
                    tK, tV = sK + stage * BN * L.ELEMS, sV + stage * BN * L.ELEMS
                    c0 = key_tile(it) * BN
                    bit = int(tile_bits[first + it]) if use_list else -1
                    for warp in range(WARPS):
                        wrow = warp * 16
                        s = np.zeros((NT, 32, 4), np.float32)
                        for kk in range(D // 16):
                            a = ldmatrix_x4(smem, sQ + L.offset(wrow + (LANE & 15),
                                                               2 * kk + (LANE >> 4)))
                            for n2 in range(NT // 2):
                                mat = LANE >> 3
                                bk = ldmatrix_x4(smem, tK + L.offset(
                                    16 * n2 + (mat >> 1) * 8 + (LANE & 7), 2 * kk + (mat & 1)))
                                mma(s[2 * n2], a, bk[:, 0], bk[:, 1])
                                mma(s[2 * n2 + 1], a, bk[:, 2], bk[:, 3])
                        i_lo, i_hi = r0, r0 + BM - 1
                        band_full = (i_lo + offset - (c0 + BN - 1) >= -right) and \
                            (i_hi + offset - c0 <= left)
                        need_mask = bit >= 0 or c0 + BN > M or not band_full
                        for nn in range(NT):
                            for e in range(4):
                                x = s[nn, :, e] * np.float32(scale)
                                if softcap > 0:
                                    x = np.float32(softcap) * np.tanh(x / np.float32(softcap))
                                x = (x * log2e).astype(np.float32)
                                if need_mask:
                                    rl = wrow + G + 8 * (e >> 1)
                                    cl = 8 * nn + 2 * TIG + (e & 1)
                                    dist = (r0 + rl) + offset - (c0 + cl)
                                    keep = (c0 + cl < M) & (dist <= left) & (dist >= -right)
                                    if bit >= 0:
                                        words = bits[bit, rl, cl >> 5]
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
                        for kk in range(BN // 16):
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
                for warp in range(WARPS):
                    wrow = warp * 16
                    for r in range(2):
                        l_ = row_sum[warp, r].copy()
                        l_ = l_ + l_[LANE ^ 1]
                        l_ = l_ + l_[LANE ^ 2]
                        inv = np.where(l_ > 0, 1 / np.where(l_ > 0, l_, 1), 0).astype(np.float32)
                        for lane in range(32):
                            i = r0 + wrow + G[lane] + 8 * r
                            if i >= N:
                                continue
                            for tt in range(DT):
                                for j in range(2):
                                    o[b, h, i, 8 * tt + 2 * TIG[lane] + j] = rnd(
                                        acc[warp, tt, lane, 2 * r + j] * inv[lane])
                            if TIG[lane] == 0:
                                lse[b, h, i] = ((row_max[warp, r, lane] + np.log2(l_[lane]))
                                                * np.log(2)) if l_[lane] > 0 else -np.inf


def emulate_simple(q, k, v, o, lse, B, Hq, Hkv, N, M, scale, softcap, left, right,
                   indptr, tile_k, tile_bits, bits, use_list, *, D, BM, BN, grid, dt):
    """Run ``flash_fwd_simple<T, D, BM, BN>``: rows of one query tile vectorized, keys in
    order, the kernel's per-key float32 update."""
    with np.errstate(invalid="ignore"):   # masked keys: both np.where branches evaluate
        _simple_rows(q, k, v, o, lse, Hq, Hkv, N, M, scale, softcap, left, right, indptr,
                     tile_k, tile_bits, bits, use_list, D, BM, BN, grid, dt)


def _simple_rows(q, k, v, o, lse, Hq, Hkv, N, M, scale, softcap, left, right, indptr,
                 tile_k, tile_bits, bits, use_list, D, BM, BN, grid, dt):
    rnd = (lambda x: np.asarray(x, np.float32).astype(dt).astype(np.float32))
    offset = M - N
    rows_total = min(grid[0] * 4, N)
    for b in range(grid[2]):
        for h in range(grid[1]):
            hk = h // (Hq // Hkv)
            for qt in range(-(-rows_total // BM)):
                i = np.arange(qt * BM, min(qt * BM + BM, rows_total))
                qv = q[b, h, i]
                acc = np.zeros((len(i), D), np.float32)
                m_ = np.full(len(i), -np.inf, np.float32)
                l_ = np.zeros(len(i), np.float32)
                n_k = -(-M // BN)
                start, stop = (int(indptr[qt]), int(indptr[qt + 1])) if use_list else (0, n_k)
                for it in range(start, stop):
                    kt = int(tile_k[it]) if use_list else it
                    bit = int(tile_bits[it]) if use_list else -1
                    c0 = kt * BN
                    for j in range(c0, min(c0 + BN, M)):
                        dist = i + offset - j
                        keep = (dist <= left) & (dist >= -right)
                        if bit >= 0:
                            col = j - c0
                            keep &= ((bits[bit, i - qt * BM, col >> 5] >> np.uint32(col & 31))
                                     & 1) == 1
                        dot = (qv * k[b, hk, j]).sum(axis=1, dtype=np.float32)
                        s = dot * np.float32(scale)
                        if softcap > 0:
                            s = np.float32(softcap) * np.tanh(s / np.float32(softcap))
                        m_new = np.where(keep, np.maximum(m_, s), m_)
                        alpha = np.where(keep, np.exp(m_ - m_new), 1).astype(np.float32)
                        p = np.where(keep, np.exp(s - m_new), 0).astype(np.float32)
                        l_ = l_ * alpha + p
                        acc = acc * alpha[:, None] + p[:, None] * v[b, hk, j][None, :]
                        m_ = m_new.astype(np.float32)
                inv = np.where(l_ > 0, 1 / np.where(l_ > 0, l_, 1), 0).astype(np.float32)
                o[b, h, i] = rnd(acc * inv[:, None])
                lse[b, h, i] = np.where(l_ > 0, m_ + np.log(np.where(l_ > 0, l_, 1)), -np.inf)


def emulate_plan(q, k, v, p, dt):
    """The fast or simple kernel of plan ``p`` on float32 inputs; returns (out, lse)."""
    t = p.tiles
    lists = ((t.indptr, t.tile_k, t.tile_bits, t.bits, 1) if t is not None
             else (None, None, None, None, 0))
    out = np.full(q.shape[:-1] + (p.d,), np.nan, np.float32)
    lse = np.full(q.shape[:-1], np.nan, np.float32)
    args = (q, k, v, out, lse, p.batch, p.heads_q, p.heads_kv, p.n, p.m, p.scale, p.softcap,
            p.left, p.right, *lists)
    if p.source == "fast":
        emulate_fast(*args, D=p.d, BM=p.block_q, BN=p.block_k, WARPS=p.block[0] // 32,
                     grid=p.grid, dt=dt)
    else:
        emulate_simple(*args, D=p.d, BM=p.block_q, BN=p.block_k, grid=p.grid, dt=dt)
    return out.astype(np.float64), lse.astype(np.float64)


CASES = [
    dict(d=64, n=70, m=130),
    dict(d=32, n=50, m=77, causal=True),
    dict(d=96, n=40, m=33, causal=True),             # N > M: empty rows
    dict(d=128, n=65, m=100, window=(20, 7)),
    dict(d=64, n=90, m=90, softcap=3.0, scale=0.4, hq=4, hkv=2),
    dict(d=64, n=150, m=150, mask="bigbird"),
    dict(d=256, n=20, m=45, causal=True),
]


@pytest.mark.parametrize("variant", ["fast", "simple"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_kernel_transliteration_matches_oracle(case, dtype, variant):
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
    p = host.plan(q.shape, k.shape, v.shape, dtype, block_mask=bmask, variant=variant, **case)
    assert p.source == variant
    f32 = [x.astype(np.float32) for x in (q, k, v)]
    out, lse = emulate_plan(*f32, p, dt)
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
                 "const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;",
                 "const long long j_min = max(0LL, r0 + offset - left);",
                 "const long long j_max = min((long long)M - 1, r_last + offset + right);",
                 "const bool need_mask = bit >= 0 || c0 + BN > M || !band_full;"]:
        assert expr in src, expr


# ----------------------------------------------------------------- a fake CuPy device
class FakeDeviceArray(np.ndarray):
    """A NumPy array posing as a CuPy array (``.get()``, ``.data.ptr``)."""

    def get(self):
        return np.array(self)

    @property
    def data(self):
        return type("Mem", (), {"ptr": self.ctypes.data})()


FakeDeviceArray.__module__ = "cupy._fake"

_SIG = re.compile(r"(flash_fwd_\w+)\(([^)]*)\)\s*\{", re.S)
_ELEM = {"float": np.float32, "__half": np.float16, "__nv_bfloat16": np.uint16,
         "int": np.int32, "unsigned": np.uint32}


def _signature(source, kernel):
    """``[(type, name)]`` of the kernel's parameters, read from the CUDA source."""
    for name, params in _SIG.findall(source):
        if name == kernel:
            out = []
            for prm in params.split(","):
                words = prm.replace("*", " * ").replace("__restrict__", "").split()
                out.append((" ".join(words[:-1]), words[-1]))
            return out
    raise AssertionError(f"no kernel {kernel} in the source")


class FakeKernel:
    """Checks a launch against the kernel's signature and runs the emulator."""

    launches = []

    def __init__(self, source, name):
        self.source, self.name = source, name
        self.max_dynamic_shared_size_bytes = 0

    def __call__(self, grid, block, args, shared_mem=0):
        kernel, targs = self.name.split("<")
        targs = [a.strip() for a in targs.rstrip(">").split(",")]
        tmap = {"T": _ELEM[targs[0]]}
        sig = _signature(self.source, kernel)
        assert len(sig) == len(args), (len(sig), len(args))
        for (typ, pname), arg in zip(sig, args):
            base = typ.replace("const", "").replace("*", "").strip()
            if "*" in typ:
                assert isinstance(arg, FakeDeviceArray), pname
                assert arg.dtype == tmap.get(base, _ELEM.get(base)), (pname, arg.dtype)
                assert arg.flags.c_contiguous and arg.ctypes.data % 16 == 0, pname
            else:
                want = {"int": np.int32, "long long": np.int64, "float": np.float32}[base]
                assert type(arg) is want, (pname, type(arg))
        assert len(grid) == len(block) == 3 and all(g > 0 for g in grid)
        if shared_mem > 48 * 1024:
            assert self.max_dynamic_shared_size_bytes >= shared_mem
        FakeKernel.launches.append((self.name, grid, block, shared_mem))
        dt = ml_dtypes.bfloat16 if targs[0] == "__nv_bfloat16" else tmap["T"]

        def val(x):   # device bits -> float32 values
            return (x.view(ml_dtypes.bfloat16) if targs[0] == "__nv_bfloat16"
                    else np.asarray(x)).astype(np.float32)

        q, k, v, o, lse = args[:5]
        bsz, hq, hkv, n, m = (int(a) for a in args[5:10])
        d = int(targs[1])
        qf = val(q).reshape(bsz, hq, n, d)
        kf, vf = (val(x).reshape(bsz, hkv, m, d) for x in (k, v))
        of = np.full((bsz, hq, n, d), np.nan, np.float32)
        lf = np.asarray(lse).reshape(bsz, hq, n)
        use_list = int(args[18])
        lists = [np.asarray(a) for a in args[14:18]]
        if use_list:
            lists[3] = lists[3].reshape(lists[3].shape[0], int(targs[2]), int(targs[3]) // 32)
        rest = (float(args[10]), float(args[11]), int(args[12]), int(args[13]), *lists, use_list)
        if kernel == "flash_fwd_fast":
            emulate_fast(qf, kf, vf, of, lf, bsz, hq, hkv, n, m, *rest, D=d, BM=int(targs[2]),
                         BN=int(targs[3]), WARPS=int(targs[4]), grid=grid, dt=dt)
            assert block == (32 * int(targs[4]), 1, 1)
        else:
            emulate_simple(qf, kf, vf, of, lf, bsz, hq, hkv, n, m, *rest, D=d,
                           BM=int(targs[2]), BN=int(targs[3]), grid=grid, dt=dt)
            assert block == (128, 1, 1)
        written = ~np.isnan(of)
        obits = of.astype(dt).view(o.dtype) if targs[0] == "__nv_bfloat16" else of.astype(o.dtype)
        np.asarray(o).reshape(of.shape)[written] = obits[written]


class FakeModule:
    def __init__(self, code, options, name_expressions):
        assert "--std=c++17" in options and len(name_expressions) == 1
        assert "flash_fwd" in code and "#include \"common.cuh\"" not in code
        self.code, self.names = code, name_expressions

    def get_function(self, name):
        assert name in self.names
        return FakeKernel(self.code, name)


def make_fake_cupy():
    """A module with the parts of CuPy that refattn.gpu uses, over NumPy."""
    fake = types.ModuleType("cupy")
    fake.__version__ = "fake"
    dev = lambda a: np.asarray(a).view(FakeDeviceArray)   # noqa: E731
    fake.ndarray = FakeDeviceArray
    fake.asarray = lambda a, dtype=None: dev(np.array(a, dtype=dtype))
    fake.empty = lambda shape, dtype=np.float32: dev(np.empty(shape, dtype))
    fake.zeros = lambda shape, dtype=np.float32: dev(np.zeros(shape, dtype))
    fake.full = lambda shape, value, dtype=None: dev(np.full(shape, value, dtype))
    fake.ascontiguousarray = lambda a: dev(np.ascontiguousarray(a))
    fake.broadcast_to = lambda a, shape: dev(np.broadcast_to(a, shape))
    fake.isfinite = np.isfinite
    for name in ("float16", "float32", "uint16", "int16", "int32", "uint32"):
        setattr(fake, name, getattr(np, name))
    fake.RawModule = FakeModule
    fake.get_default_memory_pool = lambda: types.SimpleNamespace(free_all_blocks=lambda: None)
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1, driverGetVersion=lambda: 0, runtimeGetVersion=lambda: 0,
        getDeviceProperties=lambda i: {"name": b"CPU emulation", "major": 9, "minor": 0})
    device = lambda *a: types.SimpleNamespace(id=0, synchronize=lambda: None)  # noqa: E731
    fake.cuda = types.SimpleNamespace(runtime=runtime, Device=device)
    return fake


@pytest.fixture
def fake_cupy(monkeypatch):
    from refattn.gpu import launch
    monkeypatch.setitem(sys.modules, "cupy", make_fake_cupy())
    monkeypatch.setattr(launch, "module_cache", {})
    FakeKernel.launches.clear()
    return sys.modules["cupy"]


@pytest.mark.parametrize("variant", ["fast", "simple"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_flash_attention_end_to_end_on_the_emulator(fake_cupy, variant, dtype):
    """The whole Python path (checks, plan, hand-over, module cache, launch arguments
    against the kernel's signature, results back) with the emulated kernels."""
    import refattn.gpu as gpu
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, 4, 70, 64)).astype(dt)
    k = rng.standard_normal((1, 2, 90, 64)).astype(dt)   # batch broadcast, GQA
    v = rng.standard_normal((1, 2, 90, 64)).astype(dt)
    mask = ra.masks.global_tokens([0, 1]) | ra.masks.sliding_window(10, 10)
    out, lse = gpu.flash_attention(q, k, v, block_mask=mask, causal=True, return_lse=True,
                                   variant=variant)
    assert out.dtype == dt and out.shape == (2, 4, 70, 64) and lse.dtype == np.float32
    ref_mask = mask & ra.masks.causal()
    oracle, oracle_lse = ra.attention(q, k, v, mask=ref_mask, return_lse=True)
    ra.testing.assert_close(out, oracle, dtype=dtype)
    assert np.abs(lse - oracle_lse).max() < 1e-3
    name, grid, block, smem = FakeKernel.launches[-1]
    want = "flash_fwd_simple" if variant == "simple" or dtype == "float32" else "flash_fwd_fast"
    assert name.startswith(want) and grid[1:] == (4, 2)
    # module cache: a second call compiles nothing new
    from refattn.gpu import launch
    cached = dict(launch.module_cache)
    gpu.flash_attention(q, k, v, variant=variant)
    assert set(launch.module_cache) == set(cached) | set(launch.module_cache)
    assert all(launch.module_cache[key] is mod for key, mod in cached.items())


def test_device_arrays_stay_on_the_device(fake_cupy):
    import refattn.gpu as gpu
    rng = np.random.default_rng(12)
    q, k, v = (fake_cupy.asarray(rng.standard_normal((2, 40, 128)).astype(np.float16))
               for _ in range(3))
    out = gpu.flash_attention(q, k, v, window=(5, 5))
    assert isinstance(out, FakeDeviceArray) and FakeKernel.launches[-1][3] == 81920
    ra.testing.assert_close(out.get(), ra.attention(q.get(), k.get(), v.get(),
                                                    mask=ra.masks.sliding_window(5, 5)),
                            dtype="float16")


@pytest.mark.parametrize("label", ["fast bfloat16 d64 B1 H2/2 N150 M61 causal",
                                   "simple float16 d64 B1 H2/2 N250 M250 longformer",
                                   "fast float16 d64 B1 H4/1 N33 M95"])
def test_selfcheck_cases_pass_on_the_emulator(fake_cupy, label):
    """The selfcheck itself (poisoned buffers, oracle, FA rule, record) on the emulator."""
    from refattn.gpu import selfcheck
    case = next(c for c in selfcheck.cases(quick=True) if c.label == label)
    entry = selfcheck.run_case(case, np.random.default_rng(0))
    assert entry["passed"], entry
    rec = selfcheck.record([entry], seed=0)
    assert rec["passed"] and rec["device"] == "CPU emulation"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_non_finite_inputs_are_refused(fake_cupy, dtype):
    import refattn.gpu as gpu
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    q = np.ones((2, 8, 64), dt)
    k = q.copy()
    k[1, 3, 5] = np.inf
    with pytest.raises(ValueError, match=r"k \(2, 8, 64\) contains non-finite.*\(1, 3, 5\)"):
        gpu.flash_attention(q, k, q)
    v = q.copy()
    v[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="v .* non-finite"):
        gpu.flash_attention(q, q, v)
    out = gpu.flash_attention(q, k, q, check_finite=False, variant="simple")
    assert out.shape == q.shape


def test_selfcheck_fails_a_broken_kernel(fake_cupy, monkeypatch):
    """A kernel that forgets one output row, or gets one element wrong, fails the selfcheck
    and the record says where."""
    from refattn.gpu import selfcheck
    real = emulate_fast

    def forgets_row_65(q, k, v, o, lse, *args, **kw):
        real(q, k, v, o, lse, *args, **kw)
        o[:, :, 65] = np.nan             # unwritten: the poisoned buffer keeps NaN

    def off_by_a_bit(q, k, v, o, lse, *args, **kw):
        real(q, k, v, o, lse, *args, **kw)
        o[0, 1, 70, 5] += 0.25

    case = next(c for c in selfcheck.cases(quick=True)
                if c.label == "fast float16 d64 B1 H2/2 N131 M131 causal")
    for broken, rows in ((forgets_row_65, [65]), (off_by_a_bit, [70])):
        monkeypatch.setattr(sys.modules[__name__], "emulate_fast", broken)
        entry = selfcheck.run_case(case, np.random.default_rng(1))
        assert not entry["passed"]
        assert entry["diagnosis"]["bad_rows"] == rows, entry["diagnosis"]
