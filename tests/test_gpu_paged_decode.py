"""The paged split-KV decode kernels (gpu/kernels/paged_decode.cu, unmodified) on the CPU
emulator, against the float64 oracles.

Every instantiation of ``paged_decode_split`` / ``paged_decode_merge`` runs through the
real launch path (``paged.plan``, ``paged.run`` with the emulator's CuPy-like module, the
selfcheck's NaN-poisoned buffers and tolerances) against ``refattn.paged_attention``,
with zero diagnostics: out-of-order block tables (NaN in every unread slot), lengths
0..300 incl. non-multiples of block_size, GQA / MQA, several query tokens (causal), more
splits than keys. The merge kernel alone against ``refattn.merge_partials`` (lse up to
+-200, empty splits, empty rows). Planted bugs are caught.
"""
from importlib import resources

import ml_dtypes
import numpy as np
import pytest

import refattn as ra
from refattn.gpu import emulator, kernels_spec as ks, launch, paged, selfcheck

STATUS = emulator.status()
needs_emulator = pytest.mark.skipif(not STATUS.startswith("ok"), reason=STATUS)
PagedCase = selfcheck.PagedCase


def _text() -> str:
    return resources.files("refattn.gpu").joinpath("kernels", "paged_decode.cu").read_text()


def _module(cp, text=None, names=None):
    """The paged source (or ``text``) built for the emulator as CuPy would build it,
    with ``#line`` directives so diagnostics name paged_decode.cu (the emulator's
    ``RawModule`` only recognises the forward sources)."""
    folder = resources.files("refattn.gpu").joinpath("kernels")
    code = emulator.assemble(_text() if text is None else text, "paged_decode.cu",
                             {h: folder.joinpath(h).read_text() for h in ks.HEADERS})
    names = names or [i.name for i in ks.paged_instantiations()]
    return cp.RawModule(code=code, options=(), name_expressions=names)


@pytest.fixture(scope="module")
def cp():
    if not STATUS.startswith("ok"):
        pytest.skip(STATUS)
    with emulator.installed() as mod:
        launch.module_cache[(0, ks.PAGED)] = _module(mod)
        yield mod


def check(cp, case, seed=0):
    """Run ``case`` as the selfcheck does: a split and a merge launch, both completed
    with no diagnostics, within the selfcheck's tolerances."""
    before = len(cp.launches)
    entry = selfcheck.run_paged_case(case, np.random.default_rng(seed))
    recs = cp.launches[before:]
    assert [r.kernel for r in recs] == entry["kernel"].split(" + ")
    for rec in recs:
        assert rec.completed and rec.diagnostics == [], "\n".join(map(str, rec.diagnostics))
    assert entry["passed"], entry
    return entry


def _param(dtype, d):
    marks = [] if d in (64, 128) else [pytest.mark.slow]
    return pytest.param(dtype, d, id=f"{dtype}-d{d}", marks=marks)


@needs_emulator
@pytest.mark.parametrize("dtype,d", [_param(t, d) for t in ks.DTYPES for d in ks.HEAD_DIMS])
def test_every_instantiation_matches_the_oracle(cp, dtype, d):
    """Three sequences (1, 37, 300 keys) in a shuffled pool, GQA 4/2, 3 splits; and 3
    query tokens per sequence (causal, bottom-right) with 6/2 heads."""
    entry = check(cp, PagedCase(dtype, d))
    assert entry["kernel"] == " + ".join(ks.paged_kernel_names(dtype, d))
    check(cp, PagedCase(dtype, d, hq=6, hkv=2, n=3, lens=(3, 50, 161)), seed=1)


FEATURES = [c for c in selfcheck.paged_cases(quick=True) if c.d == 64 and c != PagedCase(
    c.dtype, 64)]


@needs_emulator
@pytest.mark.parametrize("case", [pytest.param(c, id=c.label, marks=[] if c.dtype ==
                                               "float16" else [pytest.mark.slow])
                                  for c in FEATURES])
def test_features_match_the_oracle(cp, case):
    """More splits than keys with an empty sequence, MQA over two row tiles, 3 query
    tokens, block_size 1 with Hkv = Hq, block_size 32 with softcap, scale and the
    default num_splits."""
    check(cp, case)


@needs_emulator
@pytest.mark.parametrize("splits", [1, 4, 40])
def test_every_length_up_to_300(cp, splits):
    """Lengths around block boundaries (block_size 16) up to 300; 40 splits leave most
    chunks of the short sequences empty."""
    lens = (1, 2, 15, 16, 17, 31, 32, 33, 100, 255, 256, 257, 299, 300)
    check(cp, PagedCase("float16", 64, lens=lens, splits=splits), seed=splits)


MERGE_CASES = [(dt, d) for dt in ks.DTYPES for d in (64, 128)]


@needs_emulator
@pytest.mark.parametrize("dtype,d", MERGE_CASES)
def test_merge_kernel_equals_merge_partials(cp, dtype, d):
    """Partials with lse in [-200, 200] (no overflow without the max subtraction being
    right), empty splits (-inf) and a row whose splits are all empty."""
    rng = np.random.default_rng(d)
    rows, splits = 9, 7
    o = rng.standard_normal((rows, splits, d)).astype(np.float32)
    lse = rng.uniform(-200, 200, (rows, splits)).astype(np.float32)
    lse[1, 2:5] = -np.inf
    lse[4] = -np.inf
    o[4] = 0.0
    want_o, want_lse = ra.merge_partials(list(o.transpose(1, 0, 2)), list(lse.T))
    elem = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
    out = cp.full((rows, d), 0x7FC0 if dtype == "bfloat16" else np.nan, elem)
    got_lse = cp.full((rows,), np.nan, np.float32)
    name = ks.paged_kernel_names(dtype, d)[1]
    fn = launch.module_cache[(0, ks.PAGED)].get_function(name)
    args = (cp.asarray(o), cp.asarray(lse), out, got_lse, np.int32(rows), np.int32(splits))
    rec = fn((-(-rows // 4), 1, 1), (128, 1, 1), args)
    assert rec.completed and rec.diagnostics == []
    got = out.get().view(ml_dtypes.bfloat16) if dtype == "bfloat16" else out.get()
    ra.testing.assert_close(got, want_o, dtype=dtype)
    assert np.array_equal(np.isneginf(got_lse.get()), np.isneginf(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(got_lse.get()[fin], want_lse[fin], rtol=1e-6)
    assert (got[4] == 0).all()


@needs_emulator
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_paged_decode_end_to_end(cp, dtype):
    """The public function through the emulator's CuPy-like module: NumPy in and out,
    decode and 2 query tokens, lse paired with the output (the oracle's transpose)."""
    case = PagedCase(dtype, 64, hq=8, hkv=2, lens=(40, 9, 130))
    q, kc, vc, table, lens = selfcheck.make_paged_inputs(case, np.random.default_rng(5))
    out, lse = ra.gpu.paged_decode(q, kc, vc, table, lens, num_splits=2, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == (3, 8)
    want, want_lse = ra.paged_attention(q, kc, vc, table, lens, return_lse=True)
    ra.testing.assert_close(out, want, dtype=dtype)
    assert np.abs(lse - want_lse.T).max() < 1e-3
    q2 = np.random.default_rng(6).standard_normal((3, 2, 8, 64)).astype(q.dtype)
    out2 = ra.gpu.paged_decode(q2, kc, vc, table, lens)
    want2 = ra.paged_attention(q2.reshape(6, 8, 64), kc, vc, table, lens,
                               cu_seqlens_q=[0, 2, 4, 6]).reshape(q2.shape)
    ra.testing.assert_close(out2, want2, dtype=dtype)
    assert all(r.diagnostics == [] for r in cp.launches[-4:])


# ------------------------------------------------------------------ host-side checks
def _plan(**kw):
    args = dict(q_shape=(2, 8, 64), key_shape=(10, 16, 2, 64), value_shape=(10, 16, 2, 64),
                table_shape=(2, 5), lens_shape=(2,), dtype="float16")
    args.update(kw)
    return paged.plan(**args)


@pytest.mark.parametrize("kw,match", [
    (dict(q_shape=(2, 8, 48)), r"head dimension D.*q \(2, 8, 48\)"),
    (dict(q_shape=(2, 8, 128)), r"share the head dimension"),
    (dict(q_shape=(8, 64)), r"q must be \(B, Hq, D\)"),
    (dict(q_shape=(2, 7, 64)), r"Hq=7 must be a positive multiple of KV heads Hkv=2"),
    (dict(value_shape=(10, 16, 2, 32)), r"equal-shaped pools"),
    (dict(table_shape=(3, 5)), r"block_table must be \(B, max_blocks\) with B=2"),
    (dict(lens_shape=(3,)), r"seq_lens must be \(B,\) = \(2,\)"),
    (dict(num_splits=0), r"num_splits"),
])
def test_plan_refuses_bad_shapes_naming_them(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _plan(**kw)


def test_plan_packs_gqa_rows_and_tiles_them():
    p = _plan(q_shape=(2, 3, 16, 64), num_splits=5)      # 3 tokens x group 8 = 24 rows
    assert (p.rows, p.grid, p.merge_grid) == (8, (5, 6, 2), (24, 1, 1))
    assert p.out_shape() == (2, 3, 16, 64) and p.lse_shape() == (2, 3, 16)
    assert p.partial_shapes() == ((2, 3, 16, 5, 64), (2, 3, 16, 5))
    assert _plan(dtype="float16").num_splits == 1         # 80 keys: one split


def test_index_checks_name_the_entry():
    p = _plan()
    table = np.array([[3, 1, -1, -1, -1], [0, 9, 10, -1, -1]], np.int32)
    paged.check_indices(p, table, np.array([20, 32]))      # padding never read
    with pytest.raises(ValueError, match=r"block_table\[1, 2\] = 10 is not a block"):
        paged.check_indices(p, table, np.array([20, 33]))
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 81 is outside \[0, 80\]"):
        paged.check_indices(p, table, np.array([81, 3]))
    p3 = _plan(q_shape=(2, 3, 8, 64))
    with pytest.raises(ValueError, match=r"3 query tokens but seq_lens\[1\] = 2"):
        paged.check_indices(p3, table, np.array([20, 2]))


def test_paged_decode_refuses_before_the_device():
    q = np.zeros((2, 8, 64), np.float16)
    pool = np.zeros((10, 16, 2, 64), np.float32)
    with pytest.raises(TypeError, match="share one dtype.*key_cache float32"):
        ra.gpu.paged_decode(q, pool, pool, np.zeros((2, 5), np.int32), np.ones(2, np.int32))
    with pytest.raises(TypeError, match="block_table must be an integer array"):
        ra.gpu.paged_decode(q, pool.astype(np.float16), pool.astype(np.float16),
                            np.zeros((2, 5)), np.ones(2, np.int32))


def test_the_paged_source_is_hashed_and_compiled(monkeypatch):
    assert ks.ALL_SOURCES[ks.PAGED] == "paged_decode.cu"
    assert {i.name for i in ks.all_instantiations()} >= {i.name for i in
                                                         ks.paged_instantiations()}
    assert len(ks.paged_instantiations()) == 2 * len(ks.DTYPES) * len(ks.HEAD_DIMS)
    before = ks.sources_sha256()
    real = ks._read
    monkeypatch.setattr(ks, "_read", lambda n: real(n) + (" " if n == "paged_decode.cu"
                                                          else ""))
    assert ks.sources_sha256() != before


# ------------------------------------------------------------------ planted bugs
MUTATIONS = [
    # the merge's weights e^{lse_s} without the maximum: overflow at lse > 88
    ("merge-without-max-subtraction",
     "const float base = mx == -INFINITY ? 0.f : mx;", "const float base = 0.f;",
     PagedCase("float32", 64, lens=(60, 300), splits=4, scale=6.0)),
    ("split-boundary-off-by-one",
     "k1 = min(len, k0 + chunk);", "k1 = min(len, k0 + chunk + 1);",
     PagedCase("float32", 64, lens=(60, 300), splits=4)),
    ("causal-bound-off-by-one",
     "(r0 + r) / group + len - n : -1;", "(r0 + r) / group + len - n + 1 : -1;",
     PagedCase("float32", 64, hq=4, hkv=2, n=3, lens=(3, 50, 161))),
    ("logical-instead-of-physical-block",
     "block_table[(long long)b * max_blocks + j / block_size]", "j / block_size",
     PagedCase("float32", 64, lens=(60, 300), splits=4)),
    ("key-group-reduction-one-step-short",
     "for (int w = LPK / 2; w > 0; w >>= 1) dot +=",
     "for (int w = LPK / 4; w > 0; w >>= 1) dot +=",
     PagedCase("float32", 64, lens=(60, 300), splits=4)),
    ("groups-combined-with-max-not-rescaled",
     "sW[gg * ROWS + r] = total > 0.f ? expf(sW[gg * ROWS + r] - mx) * inv : 0.f;",
     "sW[gg * ROWS + r] = total > 0.f ? inv : 0.f;",
     PagedCase("float32", 64, lens=(60, 300), splits=4)),
]


@needs_emulator
@pytest.mark.parametrize("name,old,new,case", [
    pytest.param(*m, id=m[0], marks=[] if i == 0 else [pytest.mark.slow])
    for i, m in enumerate(MUTATIONS)])
def test_planted_bug_is_caught(name, old, new, case):
    real = _text()
    assert real.count(old) == 1, f"{name}: the mutation no longer applies"
    names = list(ks.paged_kernel_names(case.dtype, case.d))
    cp = emulator.cupy_like()
    with emulator.installed(cp):
        launch.module_cache[(0, ks.PAGED)] = _module(cp, real, names)
        control = selfcheck.run_paged_case(case, np.random.default_rng(7))
        launch.module_cache[(0, ks.PAGED)] = _module(cp, real.replace(old, new), names)
        entry = selfcheck.run_paged_case(case, np.random.default_rng(7))
    assert control["passed"] and all(r.diagnostics == [] for r in cp.launches[:2]), control
    assert not entry["passed"], f"{name} was not caught: {entry}"
