"""Planted bugs in the real kernel sources must be caught by the CPU emulator.

Each mutation is a string replacement applied at test time to a copy of
``gpu/kernels/flash_fast.cu`` or ``flash_simple.cu`` or of a header they include
(``mma.cuh``'s tensor-core helpers, ``common.cuh``): the replaced text must occur exactly
once in the kernel's files, so a mutation that no longer applies fails loudly instead of
testing nothing. The mutant is compiled by the emulator, launched through the selfcheck's
path (plan, poisoned buffers, launch.run) on a small case, and must be caught the way the
table says:

* ``diagnostic``: the launch reports the listed kinds (memory-model, pipeline and warp
  bugs, which may or may not change the numbers on a given run of real hardware);
* ``error``: the emulator reports nothing (the bug breaks no memory or warp rule) but the
  output misses the selfcheck's tolerance by more than 5x (fragment-layout bugs).

The unmutated source passes the same cases with no diagnostics (the control).
"""
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import pytest

from refattn.gpu import emulator, kernels_spec as ks, launch, selfcheck
from refattn.testing import tolerance

STATUS = emulator.status()
pytestmark = [pytest.mark.slow,   # a build per mutant: about 3-5 s each
              pytest.mark.skipif(not STATUS.startswith("ok"), reason=STATUS)]
Case = selfcheck.Case
FAST = Case("fast", "float16", 64, hq=2, hkv=1, n=150, m=130)          # GQA, odd N and M
FAST_EMPTY = Case("fast", "float16", 64, causal=True, n=150, m=61)     # tiles with no key
FAST_HALF = Case("fast", "float16", 64, hq=2, hkv=1, n=68, m=130)      # rows 68.. past N
SIMPLE = Case("simple", "float32", 64, hq=2, hkv=1, n=37, m=51)


@dataclass(frozen=True)
class Mutation:
    name: str
    kernel: str            # "fast" or "simple"
    old: str
    new: str
    case: Case
    caught_by: str         # "diagnostic" or "error"
    kinds: frozenset = field(default_factory=frozenset)


WAIT = "    cp_async_wait<1>();  // everything but the prefetch just issued has landed\n"
SYNC1 = "    __syncthreads();\n\n    const T* tK"
SYNC2 = ("    __syncthreads();  // all warps are done with this stage before it is "
         "refilled\n")
P_FRAGS = ("      a[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);          "
           "// row g + 8, keys 0-7\n"
           "      a[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);  "
           "// row g,     keys 8-15\n")
COPY = "    cp_async16(dst + L::offset(r, c), g, valid ? 16 : 0);"
MUTATIONS = [
    Mutation("missing-wait-group", "fast", WAIT, "", FAST, "diagnostic",
             frozenset({"pending-read"})),
    Mutation("wait-group-too-lax", "fast", "cp_async_wait<1>();  // everything",
             "cp_async_wait<2>();  // everything", FAST, "diagnostic",
             frozenset({"pending-read"})),
    Mutation("missing-syncthreads-after-wait", "fast", SYNC1, "\n    const T* tK", FAST,
             "diagnostic", frozenset({"race-raw"})),
    Mutation("missing-syncthreads-before-refill", "fast", SYNC2, "", FAST, "diagnostic",
             frozenset({"race-war"})),
    Mutation("wrong-final-wait", "fast", "  cp_async_wait<0>();\n\n  // Finish",
             "  cp_async_wait<1>();\n\n  // Finish", FAST_EMPTY, "diagnostic",
             frozenset({"cp-async-outstanding"})),
    Mutation("shuffle-skipped-by-some-lanes", "fast",
             "      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));",
             "      if (tig < 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));",
             FAST,
             "diagnostic", frozenset({"collective-mismatch"})),
    Mutation("missing-zero-fill", "fast", COPY,
             "    if (valid) cp_async16(dst + L::offset(r, c), g, 16);", FAST, "diagnostic",
             frozenset({"uninitialized-read"})),
    Mutation("half-warp-returns-early", "fast",
             "  const int wrow = warp * 16;  // first row of this warp inside the tile\n",
             "  const int wrow = warp * 16;  // first row of this warp inside the tile\n"
             "  if (r0 + wrow + g >= N) return;  // \"nothing to do\" for rows past N\n",
             FAST_HALF, "diagnostic", frozenset({"collective-exited"})),
    Mutation("missing-row-guard", "simple", "  if (i >= N) return;  // no block-level",
             "  // no block-level", SIMPLE, "diagnostic", frozenset({"memory-fault"})),
    Mutation("swapped-mma-b-registers", "fast", "Mma<T>::run(s[2 * n2], a, bk[0], bk[1]);",
             "Mma<T>::run(s[2 * n2], a, bk[1], bk[0]);", FAST, "error"),
    Mutation("dropped-trans", "fast", '"ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16',
             '"ldmatrix.sync.aligned.m8n8.x4.shared.b16', FAST, "error"),
    Mutation("swapped-p-fragments", "fast", P_FRAGS, P_FRAGS.replace("a[1] =", "a[x] =")
             .replace("a[2] =", "a[1] =").replace("a[x] =", "a[2] ="), FAST, "error"),
    Mutation("mismatched-swizzle", "fast", COPY,
             "    cp_async16(dst + (r * L::STRIDE + c) * 8, g, valid ? 16 : 0);", FAST,
             "error"),
    # The upper half-warp skips the w = 16 step and meets the others at the same call in
    # the next iteration (a collective is identified by its call site, not its dynamic
    # instance); after a row's last key it has one shuffle less to do and exits while the
    # lower half's last shuffle reads from it.
    Mutation("reduction-step-skipped-by-half-warp", "simple",
             "dot += __shfl_xor_sync(0xffffffffu, dot, w);",
             "if (lane < 16 || w < 16) dot += __shfl_xor_sync(0xffffffffu, dot, w);",
             SIMPLE,
             "diagnostic", frozenset({"shuffle-inactive-source"})),
]


def kernel_files(cu: str, old: str = "", new: str = "") -> dict:
    """``{file name: text}``: the ``.cu`` file ``cu`` (of ``gpu/kernels/``) and the headers
    it includes; with ``old``, the one file that holds it, exactly once, gets ``new`` in
    its place (test_gpu_backward_mutations.py plants its bugs with this too)."""
    folder = resources.files("refattn.gpu").joinpath("kernels")
    files = {cu: folder.joinpath(cu).read_text()}
    files.update({h: folder.joinpath(h).read_text() for h in ks.HEADERS
                  if f'#include "{h}"' in files[cu]})
    if old:
        where = [f for f, text in files.items() if old in text]
        assert sum(text.count(old) for text in files.values()) == 1, \
            f"the mutation no longer applies: {old!r} in {where}"
        files[where[0]] = files[where[0]].replace(old, new)
    return files


def assembled(cu: str, files: dict) -> str:
    """``files`` (from :func:`kernel_files`) as the emulator compiles ``cu``: the headers
    inlined with ``#line`` directives, so diagnostics name the file that holds the line."""
    return emulator.assemble(files[cu], cu, {h: files[h] for h in ks.HEADERS if h in files})


def _files(kernel: str, old: str = "", new: str = "") -> dict:
    return kernel_files(ks.SOURCES[kernel], old, new)


def _run(kernel: str, files: dict, case: Case):
    code = assembled(ks.SOURCES[kernel], files)
    name = ks.kernel_name(case.variant, case.dtype, case.d)
    cp = emulator.cupy_like(prebuild=False)
    with emulator.installed(cp):
        launch.module_cache[(0, name)] = cp.RawModule(code=code, name_expressions=[name])
        entry = selfcheck.run_case(case, np.random.default_rng(7))
    assert len(cp.launches) == 1
    return entry, cp.launches[0]


def _allowed(entry, dtype):
    rtol, atol = tolerance(dtype)
    return 2 * entry.get("baseline_err", 0.0) + atol


@pytest.mark.parametrize("case", sorted({m.case for m in MUTATIONS}, key=str), ids=str)
def test_control_the_real_source_passes_every_mutation_case(case):
    entry, rec = _run(case.variant, _files(case.variant), case)
    assert rec.completed and rec.diagnostics == [], [str(d) for d in rec.diagnostics]
    assert entry["passed"], entry


def test_there_are_enough_planted_bugs_of_both_kinds():
    assert len(MUTATIONS) >= 10 and len({m.name for m in MUTATIONS}) == len(MUTATIONS)
    assert {m.caught_by for m in MUTATIONS} == {"diagnostic", "error"}


@pytest.mark.parametrize("mut", MUTATIONS, ids=lambda m: m.name)
def test_planted_bug_is_caught(mut):
    files = _files(mut.kernel, mut.old, mut.new)
    entry, rec = _run(mut.kernel, files, mut.case)
    kinds = {d.kind for d in rec.diagnostics}
    report = "\n".join(str(d) for d in rec.diagnostics)
    assert not entry["passed"] or kinds, f"{mut.name} was not caught: {entry}"
    if mut.caught_by == "diagnostic":
        assert mut.kinds <= kinds, f"{mut.name}: expected {set(mut.kinds)}, got:\n{report}"
        assert {d.file for d in rec.diagnostics} <= {"", *files}, report
    else:
        assert kinds == set(), f"{mut.name} should break no rule, got:\n{report}"
        assert rec.completed and entry["nan_count"] == 0
        assert entry["max_abs_err"] > 5 * _allowed(entry, mut.case.dtype), entry
