"""Run every kernel against the float64 references and write a JSON record.

``python -m refattn.gpu.selfcheck [--out DIR] [--quick] [--seed S] [--match RE]`` draws fresh random
inputs (odd lengths, every dtype, both variants, every head dim, causal, windows, GQA,
MQA, softcap, N != M, rows with no key, block masks: BigBird, Longformer, documents),
runs :func:`refattn.gpu.flash_attention`'s kernels into NaN-poisoned outputs with K/V
followed by NaN in memory, and compares with :func:`refattn.attention` (float64):

* float32: ``refattn.testing.assert_close`` with the float32 tolerances;
* float16 / bfloat16: the FlashAttention rule, ``max|out - oracle| <= 2 max|base -
  oracle| + atol`` with ``base`` = :func:`refattn.testing.low_precision_attention` and
  ``atol`` the dtype's table atol;
* the log-sum-exp within ``1e-3`` (``-inf`` exactly where the oracle has it).

The paged split-KV decode kernels (:mod:`refattn.gpu.paged`) run on
:func:`paged_cases` (every dtype and head dim; out-of-order block tables with NaN in the
unread blocks and block tails, lengths 0..300 not multiples of the block size, GQA / MQA,
several query tokens, more splits than keys) into NaN-poisoned outputs and partials,
against :func:`refattn.paged_attention` (float64) under the same rules, the baseline being
:func:`~refattn.testing.low_precision_attention` on each sequence's gathered keys.

The backward kernels (:mod:`refattn.gpu.backward`) run on :func:`backward_cases`
(every instantiation, then causal with rows with no key, windows, GQA / MQA, softcap,
block masks) from the oracle's ``o`` (rounded to the dtype) and float32 ``lse`` into
NaN-poisoned ``dq, dk, dv`` and ``delta``, against :func:`refattn.vjp` ``("attention")``
(float64) by the same 2x rule for every dtype, the baseline being
:func:`~refattn.testing.low_precision_attention_vjp`.

The record carries the device, driver, CuPy version, commit, the sha256 of the kernel
sources (:func:`refattn.gpu.kernels_spec.sources_sha256`), the seed, and each case's
errors and pass/fail. Exit status 0 only when every case passes.

The case list is built without a device:

>>> cs = cases(quick=True)
>>> len(cs) > 10, {c.variant for c in cs} == {"simple", "fast"}
(True, True)
>>> paged_cases(quick=True)[0].label
'paged float32 d64 H4/2 n1 bs16 L(1, 37, 300) S3'
>>> backward_cases(quick=True)[0].label
'bwd simple float32 d64 B2 H4/2 N37 M45'

"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import asdict, dataclass

import numpy as np

from . import kernels_spec as ks

__all__ = ["Case", "cases", "make_inputs", "block_mask_for", "run_case", "diagnose", "record",
           "main", "PagedCase", "paged_cases", "make_paged_inputs", "run_paged_case",
           "BackwardCase", "backward_cases", "run_backward_case"]

LSE_ATOL = 1e-3


@dataclass(frozen=True)
class Case:
    """One check: shapes, dtype, variant and masking."""

    variant: str
    dtype: str
    d: int
    batch: int = 1
    hq: int = 2
    hkv: int = 2
    n: int = 77
    m: int = 77
    causal: bool = False
    window: tuple | int | None = None
    softcap: float | None = None
    scale: float | None = None
    mask: str | None = None  # "bigbird", "longformer", "document"

    @property
    def label(self) -> str:
        parts = [self.variant, self.dtype, f"d{self.d}", f"B{self.batch}",
                 f"H{self.hq}/{self.hkv}", f"N{self.n}", f"M{self.m}"]
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append(f"window{self.window}")
        if self.softcap:
            parts.append(f"softcap{self.softcap}")
        if self.mask:
            parts.append(self.mask)
        return " ".join(parts)


def cases(quick: bool = False) -> list[Case]:
    """Every instantiation on a plain case, then the features on a few head dims."""
    out = []
    dims = (64, 128) if quick else ks.HEAD_DIMS
    for variant in ks.VARIANTS:
        for dtype in ks.DTYPES:
            for d in dims:
                out.append(Case(variant, dtype, d, batch=2, hq=3, hkv=3, n=93, m=117))
            feat_d = 64
            out += [
                Case(variant, dtype, feat_d, causal=True, n=131, m=131),
                Case(variant, dtype, feat_d, causal=True, n=70, m=201),        # decode-like
                Case(variant, dtype, feat_d, causal=True, n=150, m=61),        # empty rows
                Case(variant, dtype, feat_d, window=(17, 5), n=200, m=190),
                Case(variant, dtype, feat_d, window=40, causal=True, n=257, m=257),
                Case(variant, dtype, feat_d, hq=6, hkv=2, n=65, m=129),        # GQA
                Case(variant, dtype, feat_d, hq=4, hkv=1, n=33, m=95),         # MQA
                Case(variant, dtype, feat_d, softcap=5.0, scale=0.5, n=100, m=100),
                Case(variant, dtype, feat_d, mask="bigbird", n=300, m=300),
                Case(variant, dtype, feat_d, mask="longformer", n=250, m=250),
                Case(variant, dtype, feat_d, mask="document", causal=True, n=280, m=280),
                Case(variant, dtype, feat_d, n=1, m=1),
            ]
            if not quick:
                out += [Case(variant, dtype, 128, causal=True, hq=4, hkv=2, n=513, m=700),
                        Case(variant, dtype, 256, window=(30, 30), n=190, m=190),
                        Case(variant, dtype, 32, mask="bigbird", hq=4, hkv=2, n=300, m=300),
                        Case(variant, dtype, 96, causal=True, softcap=10.0, n=99, m=99)]
    return out


def block_mask_for(case: Case):
    """The refattn mask of a case's ``mask`` name (None when it has none)."""
    import refattn as ra
    mk = ra.masks
    if case.mask is None:
        return None
    if case.mask == "bigbird":
        return (mk.block_window(1, 32) | mk.global_tokens([0, 1, 2])
                | mk.random_blocks(2, 32, rng=7))
    if case.mask == "longformer":
        return mk.sliding_window(24, 24) | mk.global_tokens([0, 5, 99])
    if case.mask == "document":
        ids = np.repeat(np.arange(10), -(-case.m // 10))[:case.m]
        return mk.document(np.sort(np.r_[ids[:-7], np.full(7, 10)]))
    raise ValueError(f"unknown mask {case.mask!r}")


def make_inputs(case: Case, rng) -> tuple:
    """Random ``q, k, v`` of the case's dtype (NumPy; bfloat16 via ml_dtypes)."""
    import ml_dtypes
    dt = ml_dtypes.bfloat16 if case.dtype == "bfloat16" else np.dtype(case.dtype)
    q = rng.standard_normal((case.batch, case.hq, case.n, case.d)).astype(dt)
    k = rng.standard_normal((case.batch, case.hkv, case.m, case.d)).astype(dt)
    v = rng.standard_normal((case.batch, case.hkv, case.m, case.d)).astype(dt)
    return q, k, v


def _poisoned_device(x):
    """A CuPy copy of NumPy ``x`` whose memory is followed by NaN (reads past the end show)."""
    import cupy
    bits = x.view(np.uint16) if x.dtype.name == "bfloat16" else x
    nan = np.full(4096, np.nan, np.float32).astype(x.dtype)
    nan = nan.view(np.uint16) if x.dtype.name == "bfloat16" else nan
    buf = cupy.asarray(np.concatenate([bits.ravel(), nan]))
    return buf[:x.size].reshape(x.shape)


def run_case(case: Case, rng) -> dict:
    """Run one case on the device; returns its record entry."""
    import cupy
    import ml_dtypes

    import refattn as ra
    from refattn.testing import low_precision_attention, tolerance

    from . import host, launch

    q, k, v = make_inputs(case, rng)
    bmask = block_mask_for(case)
    p = host.plan(q.shape, k.shape, v.shape, case.dtype, causal=case.causal,
                  window=case.window, scale=case.scale, softcap=case.softcap,
                  block_mask=bmask, variant=case.variant)
    qd, kd, vd = (_poisoned_device(x) for x in (q, k, v))
    elem = np.uint16 if case.dtype == "bfloat16" else np.dtype(case.dtype)
    nan = np.array(np.nan, np.float32).astype(np.dtype(case.dtype) if case.dtype != "bfloat16"
                                              else ml_dtypes.bfloat16).view(elem).item()
    out = cupy.full(p.out_shape(), nan, dtype=elem)
    lse = cupy.full(p.lse_shape(), np.nan, dtype=cupy.float32)
    launch.run(p, qd, kd, vd, out, lse)
    cupy.cuda.Device().synchronize()
    out_h = out.get()
    if case.dtype == "bfloat16":
        out_h = out_h.view(ml_dtypes.bfloat16)
    out64, lse_h = out_h.astype(np.float64), lse.get().astype(np.float64)

    mask = host.reference_mask(case.causal, case.window, bmask, case.n, case.m)
    kwargs = dict(mask=mask, scale=case.scale, softcap=case.softcap)
    oracle, oracle_lse = ra.attention(q, k, v, return_lse=True, **kwargs)
    entry = {"case": case.label, **{k_: (list(v_) if isinstance(v_, tuple) else v_)
                                   for k_, v_ in asdict(case).items()},
             "kernel": p.kernel, "visited_tiles": (None if p.tiles is None
                                                   else round(p.tiles.visited_fraction, 4))}
    nan_count = int(np.isnan(out64).sum() + np.isnan(lse_h).sum())
    err = float(np.abs(out64 - oracle).max()) if out64.size else 0.0
    same_inf = np.array_equal(np.isneginf(lse_h), np.isneginf(oracle_lse))
    fin = np.isfinite(oracle_lse)
    lse_err = float(np.abs(lse_h[fin] - oracle_lse[fin]).max()) if fin.any() else 0.0
    rtol, atol = tolerance(case.dtype)
    if case.dtype == "float32":
        allowed = atol + rtol * np.abs(oracle)
        ok_out = bool((np.abs(out64 - oracle) <= allowed).all())
        entry.update(max_abs_err=err, rule="float32 table (rtol, atol) = "
                     f"({rtol:g}, {atol:g})")
    else:
        base = low_precision_attention(q, k, v, case.dtype, **kwargs)
        base_err = float(np.abs(base - oracle).max()) if base.size else 0.0
        ok_out = err <= 2 * base_err + atol
        entry.update(max_abs_err=err, baseline_err=base_err,
                     rule=f"err <= 2 x baseline + {atol:g}")
    entry.update(lse_err=lse_err, lse_inf_match=bool(same_inf), nan_count=nan_count)
    entry["passed"] = bool(ok_out and nan_count == 0 and same_inf and lse_err <= LSE_ATOL)
    if not entry["passed"]:
        entry["diagnosis"] = diagnose(out64, oracle, lse_h, oracle_lse, p.block_q,
                                      atol if case.dtype != "float32" else
                                      atol + rtol * float(np.abs(oracle).max(initial=0)))
    return entry


def diagnose(out, oracle, lse, oracle_lse, block_q: int, tol: float) -> dict:
    """Where a failing case goes wrong, for whoever debugs the kernel: the worst element,
    how many elements/rows/columns are off by more than ``tol`` (or NaN), which rows
    (also modulo the query tile and the 16-row warp slice) and columns.

    >>> o = np.zeros((1, 1, 70, 8)); o[0, 0, 65, 3] = 1.0
    >>> d = diagnose(o, np.zeros_like(o), np.zeros((1, 1, 70)), np.zeros((1, 1, 70)), 64, 0.1)
    >>> d["worst_index"], d["bad_rows"], d["bad_rows_mod_block"], d["bad_cols"]
    ([0, 0, 65, 3], [65], [1], [3])
    """
    with np.errstate(invalid="ignore"):
        diff = np.abs(out - oracle)
    bad = ~(diff <= tol)                      # NaN counts as bad
    worst = np.unravel_index(int(np.nanargmax(np.where(np.isnan(diff), np.inf, diff))),
                             diff.shape) if diff.size else ()
    rows = np.flatnonzero(bad.any(axis=(0, 1, 3))) if bad.ndim == 4 else np.array([], int)
    cols = np.flatnonzero(bad.any(axis=(0, 1, 2))) if bad.ndim == 4 else np.array([], int)
    lse_bad = ~((np.abs(lse - oracle_lse) <= 1e-3) | (lse == oracle_lse))
    return {"worst_index": [int(i) for i in worst], "n_bad": int(bad.sum()),
            "bad_rows": rows[:20].tolist(), "n_bad_rows": int(len(rows)),
            "bad_rows_mod_block": sorted(set((rows % block_q).tolist()))[:20],
            "bad_rows_mod_16": sorted(set((rows % 16).tolist())),
            "bad_cols": cols[:20].tolist(), "n_bad_cols": int(len(cols)),
            "lse_bad_rows": np.flatnonzero(lse_bad.any(axis=(0, 1)))[:20].tolist()}


@dataclass(frozen=True)
class PagedCase:
    """One paged decode check: sequence lengths, query tokens per sequence, splits."""

    dtype: str
    d: int
    hq: int = 4
    hkv: int = 2
    lens: tuple = (1, 37, 300)
    n: int = 1              # query tokens per sequence (1: q is (B, Hq, D))
    block_size: int = 16
    splits: int | None = 3  # None: the default
    softcap: float | None = None
    scale: float | None = None
    variant: str = "paged"

    @property
    def label(self) -> str:
        parts = ["paged", self.dtype, f"d{self.d}", f"H{self.hq}/{self.hkv}", f"n{self.n}",
                 f"bs{self.block_size}", f"L{self.lens}", f"S{self.splits}"]
        if self.softcap:
            parts.append(f"softcap{self.softcap}")
        return " ".join(parts)


def paged_cases(quick: bool = False) -> list[PagedCase]:
    """Every paged instantiation on three sequences, then the features at D = 64."""
    out = []
    dims = (64, 128) if quick else ks.HEAD_DIMS
    for dtype in ks.DTYPES:
        out += [PagedCase(dtype, d) for d in dims]
        out += [
            PagedCase(dtype, 64, lens=(5, 20, 0), splits=16),             # splits > keys
            PagedCase(dtype, 64, hq=16, hkv=1, lens=(129, 64), splits=2),   # MQA, 2 tiles
            PagedCase(dtype, 64, hq=6, hkv=2, n=3, lens=(3, 50, 161)),      # 3 tokens
            PagedCase(dtype, 64, hkv=4, lens=(7, 33, 300), block_size=1, splits=5),
            PagedCase(dtype, 64, lens=(250, 31), block_size=32, splits=None, softcap=5.0,
                      scale=0.5),
        ]
    return out


def make_paged_inputs(case: PagedCase, rng) -> tuple:
    """``q, key_cache, value_cache, block_table, seq_lens`` (NumPy; bfloat16 via
    ml_dtypes): the pages of all sequences in a shuffled pool with 3 spare blocks, NaN in
    every slot no sequence reads, block tables padded with -1."""
    import ml_dtypes
    dt = ml_dtypes.bfloat16 if case.dtype == "bfloat16" else np.dtype(case.dtype)
    bs, lens = case.block_size, np.array(case.lens, np.int32)
    pages = [-(-int(n) // bs) for n in lens]
    width = max(pages) + 1
    order = rng.permutation(sum(pages) + 3)
    table = np.full((len(lens), width), -1, np.int32)
    pool = np.full((2, len(order), bs, case.hkv, case.d), np.nan)
    used = 0
    for b, (n_pages, length) in enumerate(zip(pages, lens)):
        table[b, :n_pages] = order[used:used + n_pages]
        used += n_pages
        t = np.arange(length)
        pool[:, table[b, t // bs], t % bs] = rng.standard_normal(
            (2, length, case.hkv, case.d))
    shape = (len(lens), case.hq, case.d) if case.n == 1 else (len(lens), case.n, case.hq,
                                                                case.d)
    q = rng.standard_normal(shape).astype(dt)
    return q, pool[0].astype(dt), pool[1].astype(dt), table, lens


def _paged_reference(case: PagedCase, q, kc, vc, table, lens):
    """Oracle ``(out, lse)`` in the kernel's shapes, and the low-precision baseline."""
    import refattn as ra
    from refattn.testing import low_precision_attention
    batch, n = len(lens), case.n
    qq = q.reshape(batch * n, case.hq, case.d)
    cu = np.arange(0, batch * n + 1, n) if n > 1 else None
    kw = dict(scale=case.scale, softcap=case.softcap)
    o, lse = ra.paged_attention(qq, kc, vc, table, lens, cu_seqlens_q=cu, return_lse=True,
                                **kw)
    base = np.zeros_like(o)
    if case.dtype != "float32":
        for b, length in enumerate(lens):
            if length == 0:
                continue
            t = np.arange(length)
            k, v = (pool[table[b, t // case.block_size], t % case.block_size].transpose(
                1, 0, 2) for pool in (kc, vc))
            qb = qq[b * n:(b + 1) * n].transpose(1, 0, 2)
            base[b * n:(b + 1) * n] = low_precision_attention(
                qb, k, v, case.dtype, causal=True, **kw).transpose(1, 0, 2)
    return o.reshape(q.shape), lse.T.reshape(q.shape[:-1]), base.reshape(q.shape)


def run_paged_case(case: PagedCase, rng) -> dict:
    """Run one paged decode case (split + merge launches) on the device."""
    import cupy
    import ml_dtypes

    from refattn.testing import tolerance

    from . import paged
    q, kc, vc, table, lens = make_paged_inputs(case, rng)
    p = paged.plan(q.shape, kc.shape, vc.shape, table.shape, lens.shape, case.dtype,
                   num_splits=case.splits, scale=case.scale, softcap=case.softcap,
                   max_len=int(lens.max()))
    paged.check_indices(p, table, lens)
    qd, kd, vd = (_poisoned_device(x) for x in (q, kc, vc))
    elem = np.uint16 if case.dtype == "bfloat16" else np.dtype(case.dtype)
    host_dt = ml_dtypes.bfloat16 if case.dtype == "bfloat16" else np.dtype(case.dtype)
    nan = np.array(np.nan, np.float32).astype(host_dt).view(elem).item()
    out = cupy.full(p.out_shape(), nan, dtype=elem)
    lse = cupy.full(p.lse_shape(), np.nan, dtype=cupy.float32)
    partials = tuple(cupy.full(s, np.nan, dtype=cupy.float32) for s in p.partial_shapes())
    paged.run(p, qd, kd, vd, cupy.asarray(table), cupy.asarray(lens), out, lse, partials)
    cupy.cuda.Device().synchronize()
    out_h = out.get()
    if case.dtype == "bfloat16":
        out_h = out_h.view(ml_dtypes.bfloat16)
    out64, lse_h = out_h.astype(np.float64), lse.get().astype(np.float64)
    oracle, oracle_lse, base = _paged_reference(case, q, kc, vc, table, lens)
    entry = {"case": case.label, **{k_: (list(v_) if isinstance(v_, tuple) else v_)
                                   for k_, v_ in asdict(case).items()},
             "kernel": f"{p.kernel} + {p.merge_kernel}", "num_splits": p.num_splits}
    nan_count = int(np.isnan(out64).sum() + np.isnan(lse_h).sum())
    err = float(np.abs(out64 - oracle).max())
    same_inf = np.array_equal(np.isneginf(lse_h), np.isneginf(oracle_lse))
    fin = np.isfinite(oracle_lse)
    lse_err = float(np.abs(lse_h[fin] - oracle_lse[fin]).max()) if fin.any() else 0.0
    rtol, atol = tolerance(case.dtype)
    if case.dtype == "float32":
        ok_out = bool((np.abs(out64 - oracle) <= atol + rtol * np.abs(oracle)).all())
        entry.update(max_abs_err=err, rule=f"float32 table (rtol, atol) = ({rtol:g}, "
                     f"{atol:g})")
    else:
        base_err = float(np.abs(base - oracle).max())
        ok_out = err <= 2 * base_err + atol
        entry.update(max_abs_err=err, baseline_err=base_err,
                     rule=f"err <= 2 x baseline + {atol:g}")
    entry.update(lse_err=lse_err, lse_inf_match=bool(same_inf), nan_count=nan_count)
    entry["passed"] = bool(ok_out and nan_count == 0 and same_inf and lse_err <= LSE_ATOL)
    return entry


@dataclass(frozen=True)
class BackwardCase(Case):
    """One backward check (the forward case's fields)."""

    @property
    def label(self) -> str:
        return "bwd " + super().label


def backward_cases(quick: bool = False) -> list[BackwardCase]:
    """Every backward instantiation on a GQA case, then the features at D = 64."""
    out, C = [], BackwardCase
    dims = (64, 128) if quick else ks.HEAD_DIMS
    for dtype in ks.DTYPES:
        out += [C(variant, dtype, d, batch=2, hq=4, hkv=2, n=37, m=45) for d in dims
                for variant in ks.VARIANTS if variant == "simple" or (
                    dtype != "float32" and d in ks.BACKWARD_FAST_DIMS)]
        for variant in ks.VARIANTS:
            out += [
                C(variant, dtype, 64, causal=True, hq=3, hkv=1, n=90, m=41),  # empty rows
                C(variant, dtype, 64, window=(9, 4), softcap=4.0, scale=0.4, n=70, m=83),
                C(variant, dtype, 64, mask="longformer", hq=4, hkv=2, n=130, m=130),
            ]
        if not quick:
            out += [C("fast", dtype, 128, mask="bigbird", causal=True, n=150, m=150),
                    C("fast", dtype, 32, mask="document", n=100, m=100)]
    return out


def run_backward_case(case: BackwardCase, rng) -> dict:
    """Run one backward case (preprocess, dk/dv and dq launches) on the device."""
    import cupy
    import ml_dtypes

    import refattn as ra
    from refattn.testing import low_precision_attention_vjp, tolerance

    from . import backward, host

    q, k, v = make_inputs(case, rng)
    do = rng.standard_normal(q.shape).astype(q.dtype)
    bmask = block_mask_for(case)
    p = backward.plan(q.shape, k.shape, v.shape, case.dtype, causal=case.causal,
                      window=case.window, scale=case.scale, softcap=case.softcap,
                      block_mask=bmask, variant=case.variant)
    mask = host.reference_mask(case.causal, case.window, bmask, case.n, case.m)
    kwargs = dict(mask=mask, scale=case.scale, softcap=case.softcap)
    o, lse = ra.attention(q, k, v, return_lse=True, **kwargs)
    o = o.astype(q.dtype)
    elem = np.uint16 if case.dtype == "bfloat16" else np.dtype(case.dtype)
    host_dt = ml_dtypes.bfloat16 if case.dtype == "bfloat16" else np.dtype(case.dtype)
    nan = np.array(np.nan, np.float32).astype(host_dt).view(elem).item()
    outs = [cupy.full(s, nan, dtype=elem) for s in p.grad_shapes()]
    delta = cupy.full(p.lse_shape(), np.nan, dtype=cupy.float32)
    backward.run(p, *(_poisoned_device(x) for x in (q, k, v, o, do)),
                 cupy.asarray(lse.astype(np.float32)), *outs, delta)
    cupy.cuda.Device().synchronize()
    got = [x.get().view(ml_dtypes.bfloat16) if case.dtype == "bfloat16" else x.get()
           for x in outs]
    oracle = ra.vjp("attention", q, k, v, do, **kwargs)
    base = low_precision_attention_vjp(q, k, v, do, case.dtype, **kwargs)
    atol = tolerance(case.dtype)[1]
    entry = {"case": case.label, **{k_: (list(v_) if isinstance(v_, tuple) else v_)
                                   for k_, v_ in asdict(case).items()},
             "kernel": f"{p.preprocess_kernel} + {p.dkdv_kernel} + {p.dq_kernel}",
             "rule": f"err <= 2 x baseline + {atol:g} per gradient"}
    ok, nan_count = True, 0
    for name, g in zip("qkv", got):
        g64 = g.astype(np.float64)
        nan_count += int(np.isnan(g64).sum())
        err = float(np.abs(g64 - oracle[name]).max()) if g64.size else 0.0
        base_err = float(np.abs(base[name] - oracle[name]).max()) if g64.size else 0.0
        entry.update({f"d{name}_err": err, f"d{name}_baseline_err": base_err})
        ok = ok and err <= 2 * base_err + atol
    entry.update(max_abs_err=max(entry[f"d{n}_err"] for n in "qkv"),
                 baseline_err=max(entry[f"d{n}_baseline_err"] for n in "qkv"),
                 nan_count=nan_count)
    entry["passed"] = bool(ok and nan_count == 0)
    return entry


def _commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def record(entries: list, seed: int) -> dict:
    """The JSON record of a selfcheck run."""
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return {
        "what": "refattn.gpu selfcheck",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "compute_capability": f"{props['major']}.{props['minor']}",
        "driver": cupy.cuda.runtime.driverGetVersion(),
        "runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "cupy": cupy.__version__,
        "python": platform.python_version(),
        "commit": _commit(),
        "kernel_sources_sha256": ks.sources_sha256(),
        "seed": seed,
        "passed": all(e["passed"] for e in entries),
        "n_cases": len(entries),
        "n_failed": sum(not e["passed"] for e in entries),
        "cases": entries,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m refattn.gpu.selfcheck",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".", help="folder for selfcheck-<date>.json")
    ap.add_argument("--quick", action="store_true", help="a small subset (for sanitizers)")
    ap.add_argument("--seed", type=int, default=None, help="default: fresh entropy")
    ap.add_argument("--match", default=None,
                    help="only cases whose label matches this regular expression")
    args = ap.parse_args(argv)
    from . import missing_device
    if why := missing_device("selfcheck"):
        print(why, file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
    rng = np.random.default_rng(seed)
    entries = []
    todo = [(run_case, c) for c in cases(args.quick)]
    todo += [(run_paged_case, c) for c in paged_cases(args.quick)]
    todo += [(run_backward_case, c) for c in backward_cases(args.quick)]
    todo = [(f, c) for f, c in todo if args.match is None or re.search(args.match, c.label)]
    for run_one, case in todo:
        try:
            e = run_one(case, rng)
        except Exception as exc:  # a launch or compile failure is a failed case
            e = {"case": case.label, "passed": False, "error": f"{type(exc).__name__}: {exc}"}
        entries.append(e)
        print(f"{'ok  ' if e['passed'] else 'FAIL'} {e['case']}: "
              + (f"err {e.get('max_abs_err', float('nan')):.3g}"
                 f" (base {e.get('baseline_err', float('nan')):.3g})"
                 + (f" lse {e['lse_err']:.3g}" if "lse_err" in e else "")
                 if "error" not in e else e["error"]), flush=True)
    rec = record(entries, seed)
    os.makedirs(args.out, exist_ok=True)
    stamp = rec["date"].replace(":", "").replace("-", "")
    kind = "match-" if args.match else ("quick-" if args.quick else "")
    path = os.path.join(args.out, f"selfcheck-{kind}{stamp}.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)
    print(f"{rec['n_cases'] - rec['n_failed']}/{rec['n_cases']} cases passed; "
          f"sources {rec['kernel_sources_sha256'][:12]}; record {path}")
    return 0 if rec["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
