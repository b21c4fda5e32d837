"""Quantized keys and values: int8 per token, int8 per channel in token groups (KIVI)
and fp8 e4m3, with their error bounds (:func:`quantization_error`) -- what the quantized
KV cache (:func:`refattn.kvcache.quantized_init`) stores.
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_int
from ..boundary.arrays import to_float64
from .dense import attention

__all__ = ["KINDS", "quantize", "dequantize", "quantization_error"]

#: The quantization schemes :func:`quantize` knows.
KINDS = ("int8", "int8-channel", "fp8")


def quantize(x, kind, *, group_size=32):
    """Quantize keys or values ``x (..., T, D)``; returns ``(codes, scales)`` with
    ``dequantize(codes, scales, group_size=...) ~ x``.

    ``x`` must be real and finite: a NaN or infinity has no code (it would poison the
    scale of its whole row or group), so it raises ``ValueError`` naming ``x`` and the
    first bad index; complex or non-numeric input raises ``TypeError``.

    ``kind="int8"``: symmetric per-token int8 (one scale per row of ``D``),
    ``scale = max|x| / 127`` (1 for an all-zero row),
    ``code = clip(round_half_to_even(x / scale), -127, 127)``; so
    ``|x - code·scale| <= scale / 2``. ``kind="int8-channel"``: the same rule with one scale
    per channel for each group of ``group_size`` consecutive tokens (KIVI, Liu et al. 2024:
    keys have outlier channels, which per-token scales spread over the whole row); scales
    ``(..., ceil(T / group_size), D)``, the last group possibly shorter.
    ``kind="fp8"``: ``ml_dtypes.float8_e4m3fn`` (round to nearest even, no scale; finite
    inputs must satisfy ``|x| <= 448``), relative error ``<= 2**-4`` for normals
    (``|x| >= 2**-6``) and absolute ``<= 2**-10`` below.

    >>> x = np.array([[1.0, -0.5, 0.25], [0.5, 0.25, -0.25]])
    >>> c, s = quantize(x, "int8")
    >>> c, dequantize(c, s).round(4)
    (array([[127, -64,  32],
           [127,  64, -64]], dtype=int8), array([[ 1.    , -0.5039,  0.252 ],
           [ 0.5   ,  0.252 , -0.252 ]]))
    >>> c, s = quantize(x, "int8-channel", group_size=2)     # one scale per column
    >>> c, s.shape
    (array([[ 127, -127,  127],
           [  64,   64, -127]], dtype=int8), (1, 3))
    """
    return quantize_named(x, kind, group_size, "x")


def quantize_named(x, kind, group_size, name):
    """:func:`quantize` with the input called ``name`` in its errors (``k_t``, ``v_t``
    in the quantized cache)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    x = to_float64(x, name)
    if kind in ("int8", "int8-channel"):
        if kind == "int8":
            top = np.abs(x).max(axis=-1, keepdims=True)
        else:
            if x.ndim < 2:
                raise ValueError(f"int8-channel quantizes (..., tokens, channels); got "
                                 f"{name} of shape {x.shape}")
            g = check_int("group_size", group_size, minimum=1)
            starts = np.arange(0, x.shape[-2], g)
            top = np.maximum.reduceat(np.abs(x), starts, axis=-2) if x.shape[-2] else \
                np.zeros(x.shape[:-2] + (0, x.shape[-1]))
        # top / 127 of a subnormal can round to 0: the smallest positive scale then
        scale = np.where(top > 0, np.maximum(top / 127.0, np.nextafter(0.0, 1.0)), 1.0)
        full = scale if kind == "int8" else _expand(scale, group_size, x.shape[-2])
        return np.clip(np.rint(x / full), -127, 127).astype(np.int8), scale
    if kind == "fp8":
        import ml_dtypes
        big = np.abs(x) > 448
        if big.any():
            at = tuple(int(i) for i in np.argwhere(big)[0])
            raise ValueError(f"fp8 e4m3 holds |x| <= 448; {name} {x.shape} has "
                             f"{float(x[at])!r} at index {at}")
        return x.astype(ml_dtypes.float8_e4m3fn), None


def _expand(scales, group_size, tokens):
    """Per-group channel scales ``(..., groups, D)`` repeated to ``(..., tokens, D)``."""
    return np.repeat(scales, group_size, axis=-2)[..., :tokens, :]


def dequantize(codes, scales, *, group_size=None):
    """Inverse of :func:`quantize`: ``codes · scales`` (int8; pass ``group_size`` for
    ``"int8-channel"`` codes) or ``codes`` as float64 (fp8). Example: see
    :func:`quantize`."""
    out = codes.astype(np.float64)
    if scales is None:
        return out
    return out * (scales if group_size is None else
                  _expand(scales, group_size, codes.shape[-2]))


def quantization_error(q, k, v, kind="int8", *, group_size=32):
    """Error of a quantized cache vs the float64 cache for queries ``q (..., Hq, N, D)``,
    keys ``k``, values ``v`` (causal decoding; int8-channel quantizes every group, the
    last one too, so this bounds what a cache holding a float64 residual would show).
    Returns a dict: ``key_max_abs``, ``value_max_abs`` (max elementwise dequantization
    errors), ``key_bound``, ``value_bound`` (the per-element bound: ``scale/2`` for int8,
    ``max(|x|·2**-4, 2**-10)`` for fp8, maximized), and ``out_max_abs`` (max |output
    difference|).

    >>> import numpy as np
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 6, 4))
    >>> e = quantization_error(q, k, v, "int8")
    >>> e["key_max_abs"] <= e["key_bound"], e["out_max_abs"] < 0.05
    (True, True)
    """
    k, v = to_float64(k, "k"), to_float64(v, "v")
    res = {}
    group = group_size if kind == "int8-channel" else None
    recon = {}
    for name, x in (("key", k), ("value", v)):
        c, s = quantize_named(x, kind, group_size, name[0])
        recon[name] = dequantize(c, s, group_size=group)
        err = np.abs(recon[name] - x)
        bound = (np.maximum(np.abs(x) * 2.0**-4, 2.0**-10) if kind == "fp8" else
                 (s if group is None else _expand(s, group, x.shape[-2])) / 2)
        res[f"{name}_max_abs"] = float(err.max(initial=0.0))
        res[f"{name}_bound"] = float(np.broadcast_to(bound, x.shape).max(initial=0.0))
        res[f"{name}_within_bound"] = bool((err <= bound).all())
    res["out_max_abs"] = float(np.abs(attention(q, recon["key"], recon["value"], causal=True)
                                      - attention(q, k, v, causal=True)).max(initial=0.0))
    return res
