"""Planted bugs in the backward source (gpu/kernels/flash_bwd.cu) must be caught by the
CPU emulator.

Each mutation is a string replacement applied at test time to a copy of the source or of
a header it includes (``mma.cuh``'s tensor-core helpers, ``common.cuh``): the replaced
text must occur exactly once in those files, so a mutation that no longer applies fails
loudly instead of testing nothing. The mutant is compiled by the emulator (only the case's
instantiations), launched through the selfcheck's path (``backward.plan``, poisoned
buffers, ``backward.run``) and must be caught the way the table says:

* ``diagnostic``: a launch reports the listed kinds;
* ``error``: the emulator reports nothing, but a gradient misses the 2x rule by more
  than 5x (the allowed error being ``2 x baseline + atol``) or holds NaN.

The simple kernels' bugs run on float32 cases, the tensor-core kernels' on fp16/bf16.

The unmutated source passes every mutation case with no diagnostics (the control).
"""
from dataclasses import dataclass, field

import numpy as np
import pytest

from refattn.gpu import emulator, kernels_spec as ks, launch, selfcheck
from refattn.testing import tolerance
from test_gpu_emulator_mutations import assembled, kernel_files

STATUS = emulator.status()
pytestmark = [pytest.mark.slow,   # a build per mutant: a few seconds each
              pytest.mark.skipif(not STATUS.startswith("ok"), reason=STATUS)]
C = selfcheck.BackwardCase
GQA = C("simple", "float32", 64, batch=2, hq=4, hkv=2, n=37, m=45)
CAP = C("simple", "float32", 64, window=(9, 4), softcap=2.0, scale=0.5, n=70, m=83)
FAST = C("fast", "float16", 64, hq=4, hkv=2, n=90, m=75)               # GQA, tails
FAST_LONG = C("fast", "float16", 64, hq=2, hkv=1, n=70, m=200)         # 4 key tiles
FAST_EMPTY = C("fast", "float16", 64, causal=True, hq=2, hkv=1, n=150, m=61)   # empty rows
FAST_CAP = C("fast", "bfloat16", 32, window=(9, 4), softcap=2.0, scale=0.5, n=70, m=83)
WAIT_DKDV = "    cp_async_wait<1>();\n    __syncthreads();\n\n    const T* tQ"
PACK = ("  a[1] = Mma<T>::pack(c0[2], c0[3]);  // row g + 8, columns 0-7\n"
        "  a[2] = Mma<T>::pack(c1[0], c1[1]);  // row g,     columns 8-15\n")
COPY = "    cp_async16(dst + L::offset(r, c), g, valid ? 16 : 0);"


@dataclass(frozen=True)
class Mutation:
    name: str
    old: str
    new: str
    case: C
    caught_by: str         # "diagnostic" or "error"
    kinds: frozenset = field(default_factory=frozenset)


MUTATIONS = [
    Mutation("softcap-derivative-dropped", "slope = scale * (1.f - t * t);",
             "slope = scale;", CAP, "error"),
    Mutation("softcap-derivative-sign", "slope = scale * (1.f - t * t);",
             "slope = scale * (1.f + t * t);", CAP, "error"),
    Mutation("delta-dropped-in-dq", "expf(s - lse_i) * (dp - delta_i) * slope",
             "expf(s - lse_i) * dp * slope", GQA, "error"),
    Mutation("delta-dropped-in-dkdv",
             "const float ds = p * (dp - delta[qbase + i]) * slope;",
             "const float ds = p * dp * slope;", GQA, "error"),
    Mutation("gqa-head-mapping-in-dkdv", "const int h = hk * group + hh;",
             "const int h = hh * Hkv + hk;", GQA, "error"),
    Mutation("gqa-head-mapping-in-dq", "const int hk = h / (Hq / Hkv);\n"
             "  const long long offset = (long long)M - N;\n  const long long row",
             "const int hk = h % Hkv;\n"
             "  const long long offset = (long long)M - N;\n  const long long row",
             GQA, "error"),
    Mutation("band-sides-swapped-in-dkdv",
             "bool keep = refattn::in_band(i, j, offset, left, right);\n        if",
             "bool keep = refattn::in_band(i, j, offset, right, left);\n        if",
             CAP, "error"),
    Mutation("missing-key-row-guard", "  if (j >= M) return;  // no block-level",
             "  // no block-level", GQA, "diagnostic", frozenset({"memory-fault"})),
    # The upper half-warp skips the w = 16 step and exits one shuffle early while the
    # lower half's last shuffle reads from it.
    Mutation("reduction-step-skipped-by-half-warp",
             "for (int w = 16; w > 0; w >>= 1) x += __shfl_xor_sync(0xffffffffu, x, w);",
             "for (int w = 16; w > 0; w >>= 1)\n"
             "    if ((threadIdx.x & 31) < 16 || w < 16) "
             "x += __shfl_xor_sync(0xffffffffu, x, w);",
             GQA, "diagnostic", frozenset({"shuffle-inactive-source"})),
    # the tensor-core kernels
    Mutation("fast-missing-wait-group", WAIT_DKDV,
             "    __syncthreads();\n\n    const T* tQ", FAST, "diagnostic",
             frozenset({"pending-read"})),
    Mutation("fast-missing-syncthreads-after-wait", WAIT_DKDV,
             "    cp_async_wait<1>();\n\n    const T* tQ", FAST, "diagnostic",
             frozenset({"race-raw"})),
    Mutation("fast-missing-syncthreads-before-refill",
             "    __syncthreads();  // all warps are done with this stage before it is "
             "refilled\n", "", FAST_LONG, "diagnostic", frozenset({"race-war"})),
    Mutation("fast-missing-syncthreads-before-q-refill",
             "    __syncthreads();  // every warp is done with this Q, dO stage before its "
             "refill\n", "", FAST, "diagnostic", frozenset({"race-war"})),
    Mutation("fast-missing-zero-fill", COPY,
             "    if (valid) cp_async16(dst + L::offset(r, c), g, 16);", FAST,
             "diagnostic", frozenset({"uninitialized-read"})),
    Mutation("fast-missing-fully-masked-guard",
             "return lse == -INFINITY ? INFINITY : lse * kLog2e;", "return lse * kLog2e;",
             FAST_EMPTY, "error"),
    Mutation("fast-dropped-trans", '"ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16',
             '"ldmatrix.sync.aligned.m8n8.x4.shared.b16', FAST, "error"),
    Mutation("fast-swapped-mma-b-registers", "Mma<T>::run(c[2 * n2], a, b[0], b[1]);",
             "Mma<T>::run(c[2 * n2], a, b[1], b[0]);", FAST, "error"),
    Mutation("fast-swapped-a-fragments", PACK, PACK.replace("a[1] =", "a[x] =")
             .replace("a[2] =", "a[1] =").replace("a[x] =", "a[2] ="), FAST, "error"),
    Mutation("fast-gqa-head-mapping-in-dkdv", "(long long)b * Hq + hk * group + it / count",
             "(long long)b * Hq + hk + it / count * Hkv", FAST, "error"),
    Mutation("fast-delta-dropped", "return p * (dp - delta) * slope;",
             "return p * dp * slope;", FAST, "error"),
    Mutation("fast-softcap-derivative-dropped", "slope = scale * (1.f - t * t);",
             "slope = scale;", FAST_CAP, "error"),
]


def _files(old: str = "", new: str = "") -> dict:
    return kernel_files("flash_bwd.cu", old, new)


def _run(files: dict, case):
    code = assembled("flash_bwd.cu", files)
    cp = emulator.cupy_like(prebuild=False)
    with emulator.installed(cp):
        names = list(ks.backward_kernel_names(case.variant, case.dtype, case.d))
        launch.module_cache[(0, ks.BACKWARD)] = cp.RawModule(code=code,
                                                             name_expressions=names)
        try:
            entry = selfcheck.run_backward_case(case, np.random.default_rng(7))
        except emulator.EmulatorError as exc:   # a fatal diagnostic may stop the launch
            entry = {"passed": False, "error": str(exc)}
    return entry, cp.launches


def _allowed(entry, dtype):
    return 2 * entry["baseline_err"] + tolerance(dtype)[1]


@pytest.mark.parametrize("case", sorted({m.case for m in MUTATIONS}, key=str), ids=str)
def test_control_the_real_source_passes_every_mutation_case(case):
    entry, recs = _run(_files(), case)
    assert len(recs) == 3 and all(r.completed and r.diagnostics == [] for r in recs)
    assert entry["passed"], entry


def test_there_are_enough_planted_bugs_of_both_kinds():
    assert len(MUTATIONS) >= 5 and len({m.name for m in MUTATIONS}) == len(MUTATIONS)
    assert {m.caught_by for m in MUTATIONS} == {"diagnostic", "error"}


@pytest.mark.parametrize("mut", MUTATIONS, ids=lambda m: m.name)
def test_planted_bug_is_caught(mut):
    files = _files(mut.old, mut.new)
    entry, recs = _run(files, mut.case)
    diags = [d for r in recs for d in r.diagnostics]
    kinds = {d.kind for d in diags}
    report = "\n".join(str(d) for d in diags)
    assert not entry["passed"] or kinds, f"{mut.name} was not caught: {entry}"
    if mut.caught_by == "diagnostic":
        assert mut.kinds <= kinds, f"{mut.name}: expected {set(mut.kinds)}, got:\n{report}"
        assert {d.file for d in diags} <= {"", *files}, report
    else:
        assert kinds == set(), f"{mut.name} should break no rule, got:\n{report}"
        assert all(r.completed for r in recs)
        assert entry["nan_count"] > 0 or entry["max_abs_err"] > 5 * _allowed(
            entry, mut.case.dtype), entry
