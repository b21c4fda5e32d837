"""Checks that outlived the NumPy transliterations of the kernels, on the CPU emulator.

* the shared-memory swizzle of ``flash_fwd_fast``: ``refattn::SmemRows<D>`` itself (the
  device struct in gpu/kernels/mma.cuh, compiled by the emulator in flash_fast.cu's
  source with a small probe kernel appended) is a bijection onto 16-byte slots and
  bank-conflict free for the 8-row phases of ``ldmatrix``, and the plan's shared-memory
  byte count agrees with it;
* ``flash_attention`` refuses inf and NaN (``launch.check_finite``) before any launch,
  for NumPy and device arrays;
* device arrays stay on the device: the kernels get the caller's own buffers (by
  address, from each launch's record) and the results are device arrays, with no
  ``.get()`` of q, k, v or the output (flash_attention and paged_decode); misaligned
  device views are realigned before the launch (every buffer 16-byte aligned);
* a kernel with a planted bug fails the selfcheck, and the selfcheck's record says
  where (the rows, the column, the worst element).
The launch argument checks against the kernel's parameter list (count, types, dtypes,
contiguity, alignment, shared memory) are in test_gpu_emulator.py.
"""
import json
from importlib import resources

import ml_dtypes
import numpy as np
import pytest

import refattn as ra
from refattn.gpu import emulator, kernels_spec as ks, selfcheck

STATUS = emulator.status()
pytestmark = pytest.mark.skipif(not STATUS.startswith("ok"), reason=STATUS)

PROBE = r'''
#line 1 "swizzle_probe.cu"
// out[0..2] = C, STRIDE, ELEMS of refattn::SmemRows<D>; out[3 + r C + c] = offset(r, c)
template <int D>
__global__ void swizzle_probe(int* out, int rows) {
  using L = refattn::SmemRows<D>;
  if (threadIdx.x == 0) {
    out[0] = L::C;
    out[1] = L::STRIDE;
    out[2] = L::ELEMS;
  }
  for (int i = threadIdx.x; i < rows * L::C; i += blockDim.x)
    out[3 + i] = L::offset(i / L::C, i % L::C);
}
'''


@pytest.fixture(scope="module")
def swizzle():
    """``d -> (C, STRIDE, ELEMS, offsets (rows, C))`` from the real ``SmemRows<d>``."""
    names = [f"swizzle_probe<{d}>" for d in ks.HEAD_DIMS]
    module = emulator.build(emulator.kernel_source("fast") + PROBE, names)
    cp = emulator.cupy_like()
    rows = 64

    def probe(d):
        fn = module.get_function(f"swizzle_probe<{d}>")
        fn.is_device = lambda a: isinstance(a, cp.ndarray)
        out = cp.full(3 + rows * d // 8, -1, np.int32)
        rec = fn((1, 1, 1), (128, 1, 1), (out, np.int32(rows)))
        assert rec.completed and rec.diagnostics == []
        got = out.get()
        return (*got[:3].tolist(), got[3:].reshape(rows, d // 8))
    return probe


@pytest.mark.parametrize("d", ks.HEAD_DIMS)
def test_swizzle_is_a_bijection_and_conflict_free(swizzle, d):
    """Each (row, chunk) of a 64-row tile gets its own 16-byte slot inside the tile's
    rows x STRIDE slots, and the 8 rows an ldmatrix phase reads (rows 8a..8a+7, one
    logical chunk; every ldmatrix of the kernel reads rows so aligned) fall in 8
    different 16-byte bank groups (a 128-byte line is the 32 banks)."""
    c, stride, elems, off = swizzle(d)
    assert c == d // 8 and stride >= c and elems == 8 * stride
    rows = off.shape[0]
    assert (off % 8 == 0).all(), "chunks must start 16-byte aligned (cp.async, ldmatrix)"
    slots = off // 8
    assert len(np.unique(slots)) == slots.size, "two chunks share a slot"
    assert slots.min() == 0 and slots.max() < rows * stride
    for a in range(rows // 8):
        for ch in range(c):
            groups = slots[8 * a:8 * a + 8, ch] % 8
            assert len(set(groups.tolist())) == 8, (d, a, ch, groups)
    # the host's shared-memory size (the launch asks for it) is the device layout's
    bm, bn, _ = ks.tiles(d)
    for dtype in ("float16", "bfloat16"):
        assert ks.shared_memory_bytes("fast", dtype, d) == (bm + 4 * bn) * elems * 2


@pytest.fixture(scope="module")
def cp():
    with emulator.installed() as mod:
        yield mod


def _dt(dtype):
    return ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_non_finite_inputs_are_refused(cp, dtype):
    """inf or NaN in q, k or v: a ValueError naming the argument, its shape and the first
    bad index, before any launch (NumPy and device arrays, bfloat16 as uint16 bits);
    ``check_finite=False`` launches."""
    import refattn.gpu as gpu
    q = np.ones((2, 8, 64), _dt(dtype))
    k = q.copy()
    k[1, 3, 5] = np.inf
    v = q.copy()
    v[0, 0, 0] = np.nan
    bits = (lambda x: x.view(np.uint16)) if dtype == "bfloat16" else (lambda x: x)
    launches = len(cp.launches)
    for args, bad in (((q, k, q), r"k \(2, 8, 64\) contains non-finite.*\(1, 3, 5\)"),
                      ((q, q, v), r"v \(2, 8, 64\) contains non-finite.*\(0, 0, 0\)"),
                      ((cp.asarray(bits(k)), cp.asarray(bits(q)), cp.asarray(bits(q))),
                       r"q \(2, 8, 64\) contains non-finite.*\(1, 3, 5\)")):
        with pytest.raises(ValueError, match=bad):
            gpu.flash_attention(*args)
    assert len(cp.launches) == launches
    out = gpu.flash_attention(q, k, q, check_finite=False, variant="simple")
    assert out.shape == q.shape and len(cp.launches) == launches + 1
    assert cp.launches[-1].completed and cp.launches[-1].diagnostics == []


@pytest.fixture
def no_host_copies(cp, monkeypatch):
    """Addresses of the device arrays whose ``.get()`` or ``asnumpy`` was called."""
    fetched = []
    real_get = cp.ndarray.get

    def get(self, *a, **kw):
        fetched.append(self.data.ptr)
        return real_get(self, *a, **kw)
    monkeypatch.setattr(cp.ndarray, "get", get)
    monkeypatch.setattr(cp, "asnumpy", lambda a: fetched.append(a.data.ptr) or real_get(a))
    return fetched


@pytest.mark.parametrize("dtype,d", [("float16", 128), ("bfloat16", 64)])
def test_flash_attention_keeps_device_arrays_on_the_device(cp, no_host_copies, dtype, d):
    """Device arrays in (bfloat16 as uint16 bits): the kernel reads the caller's own
    buffers and writes the returned device array; nothing comes back to the host."""
    import refattn.gpu as gpu
    rng = np.random.default_rng(12)
    host = [rng.standard_normal((2, 40, d)).astype(_dt(dtype)) for _ in range(3)]
    q, k, v = (cp.asarray(x.view(np.uint16) if dtype == "bfloat16" else x) for x in host)
    out = gpu.flash_attention(q, k, v, window=(5, 5))
    assert no_host_copies == []
    rec = cp.launches[-1]
    assert rec.kernel == ks.kernel_name("fast", dtype, d)
    assert rec.completed and rec.diagnostics == []
    assert [a for a, _ in rec.buffers[:4]] == [x.data.ptr for x in (q, k, v, out)]
    assert isinstance(out, cp.ndarray) and out.dtype == q.dtype and out.shape == q.shape
    assert rec.shared_mem == ks.shared_memory_bytes("fast", dtype, d)
    got = out.get().view(_dt(dtype))
    want = ra.attention(*host, mask=ra.masks.sliding_window(5, 5))
    ra.testing.assert_close(got, want, dtype=dtype)


def test_paged_decode_keeps_device_arrays_on_the_device(cp, no_host_copies):
    """q and the pools stay where they are; the index arrays (only they) are read on the
    host for the bounds checks, as documented, and are launched from the device too."""
    import refattn.gpu as gpu
    case = selfcheck.PagedCase("float16", 64, hq=4, hkv=2, lens=(37, 5))
    host = selfcheck.make_paged_inputs(case, np.random.default_rng(3))
    q, kc, vc, table, lens = (cp.asarray(x) for x in host)
    out, lse = gpu.paged_decode(q, kc, vc, table, lens, num_splits=2, return_lse=True)
    assert set(no_host_copies) <= {table.data.ptr, lens.data.ptr}
    split, merge = cp.launches[-2:]
    assert (split.kernel, merge.kernel) == ks.paged_kernel_names("float16", 64)
    assert all(r.completed and r.diagnostics == [] for r in (split, merge))
    assert [a for a, _ in split.buffers[:5]] == [x.data.ptr for x in (q, kc, vc, table,
                                                                       lens)]
    assert [a for a, _ in merge.buffers[2:4]] == [out.data.ptr, lse.data.ptr]
    assert isinstance(out, cp.ndarray) and isinstance(lse, cp.ndarray)
    want = ra.paged_attention(*host)
    ra.testing.assert_close(out.get(), want, dtype="float16")


def test_misaligned_device_views_are_realigned_before_the_launch(cp):
    """A view starting 2 bytes into a device buffer: the kernel's ``cp.async`` needs
    16-byte aligned rows, so launch.to_device copies it; every buffer the kernel gets is
    16-byte aligned and the launch is clean."""
    import refattn.gpu as gpu
    rng = np.random.default_rng(13)
    x = rng.standard_normal((3, 2, 33, 64)).astype(np.float16)
    raw = [cp.asarray(np.concatenate([[0], y.ravel()]).astype(np.float16)) for y in x]
    q, k, v = (r[1:].reshape(2, 33, 64) for r in raw)
    assert all(y.data.ptr % 16 == 2 for y in (q, k, v))
    out = gpu.flash_attention(q, k, v, causal=True)
    rec = cp.launches[-1]
    assert rec.completed and rec.diagnostics == []
    assert all(a % 16 == 0 for a, _ in rec.buffers)
    ra.testing.assert_close(out.get(), ra.attention(*x, mask=ra.masks.causal()),
                            dtype="float16")


ROW = "    if (i < N) {\n"
STORE = "        orow[8 * t + 2 * tig] = from_float<T>(acc[t][2 * r] * inv);\n"
BROKEN = [   # (name, old, new, bad rows, bad columns): rows 65 / 70 of head 1 only
    ("forgets-row-65", ROW, "    if (i < N && !(i == 65 && h == 1)) {\n", [65],
     list(range(64))),
    ("one-element-off", STORE, STORE.replace(
        "* inv)", "* inv + (i == 70 && h == 1 && t == 0 && tig == 2 ? 0.25f : 0.f))"),
     [70], [4]),
]
CASE = "fast float16 d64 B1 H2/2 N131 M131 causal"


@pytest.mark.slow   # a build per planted bug (cached afterwards)
@pytest.mark.parametrize("name,old,new,rows,cols", BROKEN, ids=[b[0] for b in BROKEN])
def test_the_selfcheck_diagnoses_a_broken_kernel(tmp_path, capsys, name, old, new, rows,
                                                 cols):
    """A kernel that leaves one output row unwritten (the poisoned buffer keeps NaN) or
    gets one element wrong: ``python -m refattn.gpu.selfcheck`` fails with exit status 1,
    prints FAIL for the case, and its record says which rows and columns are off."""
    text = resources.files("refattn.gpu").joinpath("kernels", "flash_fast.cu").read_text()
    assert text.count(old) == 1, f"{name}: the planted bug no longer applies"
    cp = emulator.cupy_like(sources={"fast": text.replace(old, new)}, prebuild=False)
    with emulator.installed(cp):
        rc = selfcheck.main(["--quick", "--match", f"^{CASE}$", "--seed", "1",
                             "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert rc == 1 and f"FAIL {CASE}: err" in printed and "0/1 cases passed" in printed
    rec = json.loads(next(tmp_path.glob("selfcheck-*.json")).read_text())
    assert not rec["passed"] and rec["n_failed"] == 1
    assert rec["device"] == emulator.DEVICE_NAME
    (entry,) = rec["cases"]
    assert len(cp.launches) == 1 and cp.launches[0].diagnostics == []
    diag = entry["diagnosis"]
    assert diag["bad_rows"] == rows and diag["n_bad_rows"] == len(rows), diag
    assert diag["bad_cols"] == cols[:20] and diag["n_bad_cols"] == len(cols), diag
    assert diag["worst_index"][1:3] == [1, rows[0]], diag
    if name == "forgets-row-65":
        assert entry["nan_count"] == 64 + 1 and diag["lse_bad_rows"] == [65]
    else:
        assert entry["nan_count"] == 0 and diag["n_bad"] == 1 and diag["lse_bad_rows"] == []
