"""Helpers for checking an attention kernel against the refattn oracle.

:func:`assert_close` compares with one tolerance table per dtype (:data:`TOLERANCES`);
:func:`assert_as_accurate_as` applies the FlashAttention rule (the tested result is at
most ``factor`` times as far from the float64 oracle as a same-precision baseline);
:func:`low_precision_attention` is such a baseline. Hypothesis strategies for attention
inputs live in :mod:`refattn.testing.strategies` (needs ``hypothesis``).

>>> import numpy as np, ml_dtypes, refattn as ra
>>> rng = np.random.default_rng(0)
>>> q, k, v = rng.standard_normal((3, 2, 64, 16)).astype(ml_dtypes.bfloat16)
>>> oracle = ra.attention(q, k, v, causal=True)
>>> mine = ra.testing.low_precision_attention(q, k, v, "bfloat16", causal=True)
>>> ra.testing.assert_close(mine, oracle, dtype="bfloat16")
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..boundary.arrays import dtype_name, is_torch_tensor, to_float64

__all__ = ["TOLERANCES", "tolerance", "assert_close", "assert_as_accurate_as",
           "max_rel_error", "low_precision_attention", "low_precision_attention_vjp",
           "round_to"]

#: ``dtype name -> (rtol, atol)`` for attention outputs of order 1, computed in that
#: dtype (float32 accumulation for the 16-bit types) from the same inputs as the oracle.
#: Elements pass when ``|actual - expected| <= atol + rtol * |expected|``.
TOLERANCES = {
    "float64": (1e-10, 1e-12),
    "float32": (1e-5, 1e-5),
    "float16": (2e-3, 2e-3),
    "bfloat16": (1.6e-2, 1e-2),
}


def _dtype_name(dtype) -> str:
    if dtype is None:
        return "float64"
    if isinstance(dtype, str):
        name = dtype
    else:
        name = np.dtype(dtype).name
    if name not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype {name!r}; known: {sorted(TOLERANCES)} "
                         f"(or pass rtol= and atol=)")
    return name


def tolerance(dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for ``dtype`` (a name, NumPy dtype or ``ml_dtypes`` type)."""
    return TOLERANCES[_dtype_name(dtype)]


def _as_array(x, name):
    if is_torch_tensor(x):  # to float64 on the host
        x = x.detach().cpu().double().numpy()
    return to_float64(x, name, check_finite=False)


def assert_close(actual, expected, *, dtype=None, rtol=None, atol=None,
                 name: str = "actual") -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise.

    ``dtype`` selects the row of :data:`TOLERANCES` (default: ``actual``'s dtype if it
    is in the table, else float64); ``rtol``/``atol`` override it. Equal infinities
    (a ``-inf`` lse of an empty row) match; an infinity matches nothing else (whatever
    the tolerance) and NaN never matches. On failure the message names
    the tensor, the number and fraction of failing elements, and the worst element with
    its index, both values and the allowed difference.
    """
    if dtype is None:
        dname = dtype_name(actual)
        dtype = dname if dname in TOLERANCES else "float64"
    dname = _dtype_name(dtype)
    table_rtol, table_atol = TOLERANCES[dname]
    rtol = table_rtol if rtol is None else float(rtol)
    atol = table_atol if atol is None else float(atol)
    a, e = _as_array(actual, name), _as_array(expected, "expected")
    if a.shape != e.shape:
        raise AssertionError(f"{name} has shape {a.shape}, expected shape {e.shape}")
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - e)
        allowed = atol + rtol * np.abs(e)
        ok = (a == e) | (np.isfinite(e) & (diff <= allowed))   # inf only matches itself
    if ok.all():
        return
    bad = ~ok
    with np.errstate(invalid="ignore"):          # inf - inf: the worst kind of miss
        excess = np.where(bad, np.nan_to_num(diff - allowed, nan=np.inf, posinf=np.inf),
                          -1.0)
    idx = np.unravel_index(int(np.argmax(excess)), a.shape)
    count = int(bad.sum())
    finite = np.isfinite(diff)
    max_diff = diff[finite].max() if finite.any() else np.nan
    relative = finite & (e != 0)
    max_rel = (diff[relative] / np.abs(e[relative])).max() if relative.any() else np.nan
    where = f"index {tuple(int(i) for i in idx)}" if a.ndim else "the scalar"
    raise AssertionError(
        f"{name} is not close to expected ({dname} tolerance rtol={rtol:g}, atol={atol:g})\n"
        f"  {count} of {a.size} elements ({count / a.size:.2%}) out of tolerance\n"
        f"  worst at {where}: {name}={float(a[idx])!r}, expected={float(e[idx])!r}, "
        f"|diff|={diff[idx]:.3g} > allowed {allowed[idx]:.3g}\n"
        f"  max finite |diff| {max_diff:.3g}, max relative diff {max_rel:.3g}")


def max_rel_error(actual, expected, *, normwise: bool = False) -> float:
    """The largest relative error of ``actual`` against ``expected``.

    Elementwise (default): ``max |actual - expected| / max(|expected|, 1)``, absolute for
    entries below 1 (attention outputs, log-sum-exps). ``normwise=True``:
    ``max |actual - expected| / max |expected|``, for results whose scale is set by their
    largest entries (recurrences, low-rank products); any difference from an all-zero
    ``expected`` is infinitely large. Non-finite entries must be equal (``-inf`` lse of
    an empty row): any other difference, and a shape mismatch, gives ``inf``, so
    ``max_rel_error(...) <= tol`` cannot pass a wrong answer. Complex arrays (S4D's
    parameters) are compared by modulus.

    >>> import numpy as np, refattn as ra
    >>> a, e = np.array([1.0, 200.0, -np.inf]), np.array([1.5, 201.0, -np.inf])
    >>> round(ra.testing.max_rel_error(a, e), 4), round(ra.testing.max_rel_error(
    ...     a, e, normwise=True), 4)
    (0.3333, 0.005)
    >>> ra.testing.max_rel_error(np.array([np.inf]), np.array([-np.inf]))
    inf
    """
    a, e = (np.asarray(x, np.complex128) if np.iscomplexobj(x) else _as_array(x, name)
            for x, name in ((actual, "actual"), (expected, "expected")))
    if a.shape != e.shape:
        return float("inf")
    finite = np.isfinite(e)
    same = (a == e) | (np.isnan(a) & np.isnan(e))
    if not np.array_equal(np.isfinite(a), finite) or not same[~finite].all():
        return float("inf")
    diff = np.abs(a[finite] - e[finite])
    if normwise:
        worst, scale = diff.max(initial=0.0), np.abs(e[finite]).max(initial=0.0)
        return float(worst / scale) if scale > 0 else (0.0 if worst == 0 else float("inf"))
    return float((diff / np.maximum(np.abs(e[finite]), 1.0)).max(initial=0.0))


def assert_as_accurate_as(actual, baseline, oracle, *, factor: float = 2.0,
                          atol: float = 0.0, name: str = "actual") -> None:
    """The FlashAttention rule: ``max|actual - oracle| <= factor * max|baseline - oracle|
    + atol``.

    ``oracle`` is the float64 reference; ``baseline`` a straightforward computation in
    the same precision as ``actual`` (e.g. :func:`low_precision_attention`). This judges
    a kernel against what its precision allows rather than against a fixed tolerance.
    """
    a, b = _as_array(actual, name), _as_array(baseline, "baseline")
    o = _as_array(oracle, "oracle")
    if not (a.shape == b.shape == o.shape):
        raise AssertionError(f"shapes differ: {name} {a.shape}, baseline {b.shape}, "
                             f"oracle {o.shape}")
    with np.errstate(invalid="ignore"):    # equal infinities (an empty row's lse) agree
        err_a = np.where(a == o, 0.0, np.abs(a - o))
        err_b = np.where(b == o, 0.0, np.abs(b - o))
    worst_b = float(np.nanmax(err_b)) if err_b.size else 0.0
    if np.isnan(err_a).any():
        idx = np.unravel_index(int(np.argmax(np.isnan(err_a))), a.shape)
        raise AssertionError(f"{name} has NaN at index {tuple(int(i) for i in idx)} "
                             f"(oracle {o[idx]!r})")
    worst_a = float(err_a.max()) if err_a.size else 0.0
    if worst_a > factor * worst_b + atol:
        idx = np.unravel_index(int(np.argmax(err_a)), a.shape)
        raise AssertionError(
            f"{name} is less accurate than its baseline allows: max error {worst_a:.3g} > "
            f"{factor:g} x baseline error {worst_b:.3g} + {atol:g}\n"
            f"  worst at index {tuple(int(i) for i in idx)}: {name}={a[idx]!r}, "
            f"oracle={o[idx]!r}, baseline={b[idx]!r}")


def round_to(x, dtype) -> np.ndarray:
    """Round to ``dtype`` (a name such as ``"bfloat16"`` or a dtype) and back to float64."""
    import ml_dtypes
    dt = getattr(ml_dtypes, dtype) if isinstance(dtype, str) and hasattr(ml_dtypes, dtype) \
        else np.dtype(dtype)
    return np.asarray(x).astype(dt).astype(np.float64)


def _precision(dtype) -> str:
    """The name of a working precision given as a name or a NumPy/``ml_dtypes`` type."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def _to_float32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32, copy=False)


def _float32_attention(q, k, v, *, mask=None, causal=False, scale=None, bias=None,
                       softcap=None, check_finite=True, memory_budget=None) -> np.ndarray:
    """:func:`low_precision_attention`'s float32 model: the dense loop of
    :func:`refattn.attention`, one ``(G, N, M)`` block per (batch, KV head), in float32."""
    from .._core.checks import check_memory
    from .._core.logits import make_logits
    from .._core.problem import prepare_qkv
    from .._core.softmax import finish_rows, softmax_rows
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    logits = make_logits(pb, mask=mask, causal=causal, scale=scale, bias=bias,
                         softcap=softcap, check_finite=check_finite)
    check_memory(pb.group * pb.n * pb.m * 12.0, memory_budget,
                 "low_precision_attention(dtype='float32')",
                 "refattn.tiled_attention as the oracle and a shorter problem for this "
                 "baseline (it forms a head group's N x M logits)")
    q_scaled = _to_float32(q) * np.float32(logits.scale)        # fl32(scale * q)
    k, v = _to_float32(k), _to_float32(v)
    rows, cols = np.arange(pb.n), np.arange(pb.m)
    out = np.full((pb.batch, pb.heads_q, pb.n, pb.dv), np.nan, np.float32)
    lse = np.empty((pb.batch, pb.heads_q, pb.n))                 # not returned
    for b, hk, hs in pb.kv_groups():
        heads = np.arange(hs.start, hs.stop)
        s = _to_float32(logits.block(q_scaled[b, hs], k[b, hk], b, heads, rows, cols))
        row_max, row_sum = softmax_rows(s)        # float32 row max, exp and row sum
        finish_rows(s @ v[b, hk], row_max, row_sum, out[b, hs], lse[b, hs])
    return pb.unflatten(out).astype(np.float64)


def low_precision_attention(q, k, v, dtype, **kwargs) -> np.ndarray:
    """Attention as a FlashAttention-style kernel working in ``dtype`` computes it,
    emulated: the same-precision baseline for :func:`assert_as_accurate_as`.

    ``q (..., Hq, N, D)``, ``k (..., Hkv, M, D)``, ``v (..., Hkv, M, Dv)`` and
    :func:`refattn.attention`'s keyword arguments (``mask``, ``causal``, ``scale``,
    ``bias``, ``softcap``, ...); returns ``O = softmax(S) V`` ``(..., Hq, N, Dv)`` as
    float64 values on ``dtype``'s grid. Each precision is modelled on what its kernels
    do, so the baseline makes the errors a correct kernel cannot avoid:

    * ``"float32"``: every step in float32 arithmetic, as float32 kernels compute
      (PyTorch's float32 SDPA, ``refattn.gpu``'s float32 kernel): inputs rounded to
      float32; logits ``S = fl32(scale·Q) Kᵀ`` by a float32 matmul, softcap and mask
      in float32 (a ``bias`` score modifier evaluated wide, rounded to float32);
      softmax in float32 (row max, ``exp``, row sum ``l``); ``O = fl32(P̃ V) / l``
      with float32 accumulation.
    * 16-bit types (``"float16"``, ``"bfloat16"``) and narrower: inputs rounded to
      ``dtype``; logits and softmax exact (a kernel keeps them in float32, far below
      ``dtype``'s rounding); ``P`` rounded to ``dtype`` before ``P @ V``, accumulated
      wide; the output rounded to ``dtype``.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 64, 16))
    >>> q, k, v = (x.astype(np.float32) for x in (q, k, v))
    >>> oracle = ra.attention(q, k, v, causal=True)
    >>> base = ra.testing.low_precision_attention(q, k, v, "float32", causal=True)
    >>> 1e-8 < ra.testing.max_rel_error(base, oracle) < 1e-5     # float32 rounding
    True
    """
    if _precision(dtype) == "float32":
        return _float32_attention(q, k, v, **kwargs)
    from ..exact.dense import attention_probs
    q, k, v = (round_to(_as_array(x, name), dtype) for x, name in ((q, "q"), (k, "k"),
                                                                  (v, "v")))
    probs = round_to(attention_probs(q, k, **kwargs), dtype)
    group = q.shape[-3] // k.shape[-3]
    v = np.repeat(v, group, axis=-3)
    return round_to(probs @ v, dtype)


def low_precision_attention_vjp(q, k, v, grad_out, dtype, *, grad_lse=None, mask=None,
                                causal=False, scale=None, bias=None, softcap=None) -> dict:
    """The gradients a FlashAttention-2-style backward in ``dtype`` computes, emulated:
    the same-precision baseline for :func:`assert_as_accurate_as` on ``dq``, ``dk``,
    ``dv``, as :func:`low_precision_attention` is for the output. Returns
    ``{"q", "k", "v"}`` (and ``"bias"`` for an array bias) as float64, in the inputs'
    shapes; ``grad_out (..., Hq, N, Dv)``, ``grad_lse (..., Hq, N)`` or None.

    * ``"float32"``: every step in float32 arithmetic: ``q``, ``k``, ``v``, ``grad_out``
      rounded to float32; logits, softmax (a ``bias`` score modifier evaluated wide),
      ``D = rowsum(dO ∘ O)``, ``dV = PᵀdO``, ``dS = P ∘ (dO Vᵀ - D)``, ``dQ = dS K``
      and ``dK = dSᵀQ`` as float32 products, summed over blocks of query rows wide.
    * 16-bit types and narrower: inputs rounded to ``dtype``; logits and softmax exact
      (float32 in a kernel); ``O`` and ``P`` rounded before ``D`` and ``dV``, ``dS``
      rounded before ``dQ`` and ``dK``, products accumulated wide; the gradients
      rounded to ``dtype``.

    >>> import numpy as np, refattn as ra
    >>> q, k, v, do = np.random.default_rng(0).standard_normal((4, 2, 32, 16))
    >>> base = ra.testing.low_precision_attention_vjp(q, k, v, do, "float32")
    >>> oracle = ra.vjp("attention", q, k, v, do)
    >>> 1e-9 < ra.testing.max_rel_error(base["k"], oracle["k"]) < 1e-5
    True
    """
    from .._core.backward import softmax_backward
    from ..exact.dense import dense_backward
    inputs = ((q, "q"), (k, "k"), (v, "v"), (grad_out, "grad_out"))
    if _precision(dtype) == "float32":
        bw = softmax_backward(q, k, v, grad_out, grad_lse, mask=mask, causal=causal,
                              scale=scale, bias=bias, softcap=softcap, check_finite=True)
        narrow = {name: _to_float32(getattr(bw, name)) for name in ("q", "k", "v", "do")}
        if bw.dlse is not None:
            narrow["dlse"] = _to_float32(bw.dlse)
        grads = dense_backward(dataclasses.replace(bw, **narrow), rounding=_to_float32)
        return {name: g.astype(np.float64) for name, g in grads.items()}
    q, k, v, grad_out = (round_to(_as_array(x, name), dtype) for x, name in inputs)
    bw = softmax_backward(q, k, v, grad_out, grad_lse, mask=mask, causal=causal,
                          scale=scale, bias=bias, softcap=softcap, check_finite=True)
    return dense_backward(bw, rounding=lambda x: round_to(x, dtype))


def __getattr__(name):
    if name == "strategies":  # import hypothesis only when asked for
        import importlib
        return importlib.import_module(f"{__name__}.strategies")
    raise AttributeError(f"module 'refattn.testing' has no attribute {name!r}")
