"""The row softmax shared by every softmax reference: exponentiate against the row
maximum, finish ``out = acc / rowsum`` and ``lse = rowmax + log(rowsum)``, and the rule
that a row which keeps no key gives output 0 and lse ``-inf`` (never NaN).

A learned sink logit ``s_h`` (gpt-oss; FlashAttention 3's and FlashInfer's ``sinks``) is
one more term of the denominator with no value,
``P_ij = exp(S_ij) / (exp(s_h) + Σ_j exp(S_ij))``: :func:`merge_sinks` adds it to a
finished row state, so ``lse`` includes it and a row that keeps no key gives output 0
and lse ``s_h``.
"""
from __future__ import annotations

import numpy as np

from .threads import run_items

__all__ = ["softmax_rows", "finish_rows", "normalize_rows", "merge_sinks"]


def softmax_rows(s: np.ndarray):
    """Exponentiate ``s`` in place as ``exp(s - rowmax)``; return ``(rowmax, rowsum)``.

    Rows that are entirely ``-inf`` get rowmax 0 (so no ``-inf - -inf``) and rowsum 0.
    Large blocks are split into row bands worked on by parallel threads.
    """
    row_max = np.zeros(s.shape[:-1])
    row_sum = np.zeros(s.shape[:-1])
    if s.shape[-1] == 0:
        return row_max, row_sum

    def band(rows):
        part = s[..., rows, :]
        top = part.max(axis=-1)
        top[np.isneginf(top)] = 0.0
        part -= top[..., None]
        np.exp(part, out=part)
        row_max[..., rows] = top
        row_sum[..., rows] = part.sum(axis=-1)

    n = s.shape[-2]
    step = max(1, -(-n // 8))
    run_items(band, [slice(i, i + step) for i in range(0, n, step)], work=s.size)
    return row_max, row_sum


def finish_rows(acc: np.ndarray, row_max: np.ndarray, row_sum: np.ndarray, out, lse) -> None:
    """``out = acc / rowsum`` and ``lse = rowmax + log(rowsum)``, with 0 and ``-inf``
    for rows that kept no key (NaN from NaN inputs propagates)."""
    empty = row_sum == 0
    np.divide(acc, row_sum[..., None], out=out, where=~empty[..., None])
    out[empty] = 0.0
    with np.errstate(divide="ignore"):
        lse[...] = np.where(empty, -np.inf, row_max + np.log(row_sum))


def merge_sinks(acc: np.ndarray, row_max: np.ndarray, row_sum: np.ndarray, sinks):
    """Add a sink logit per row (``sinks`` broadcastable to ``row_max``; ``-inf``: none)
    to the finished softmax state of ``acc (..., X)`` (unnormalised rows, rescaled in
    place), ``row_max`` (finite; any value where ``row_sum`` is 0) and ``row_sum``:
    returns the new ``(row_max, row_sum)`` for :func:`finish_rows`. A ``-inf`` sink
    changes nothing, bit for bit."""
    sinks = np.broadcast_to(sinks, row_max.shape)
    top = np.where(row_sum > 0, row_max, -np.inf)      # rows that kept no key: no max
    new_max = np.maximum(top, sinks)
    new_max[np.isneginf(new_max)] = 0.0                # no key and no sink: stays empty
    alpha = np.exp(top - new_max)
    acc *= alpha[..., None]
    return new_max, row_sum * alpha + np.exp(sinks - new_max)


def normalize_rows(s: np.ndarray, sinks=None) -> np.ndarray:
    """Turn masked logits ``s`` (``-inf`` = dropped) into probabilities in place and
    return the log-sum-exp. Rows that keep no key become 0 with lse ``-inf``; rows
    containing NaN stay NaN. ``sinks``, broadcastable to ``s.shape[:-1]``: sink logits
    in the denominator (:func:`merge_sinks`)."""
    row_max, row_sum = softmax_rows(s)
    if sinks is not None:
        row_max, row_sum = merge_sinks(s, row_max, row_sum, sinks)
    live = (row_sum > 0) | np.isnan(row_sum)
    np.divide(s, row_sum[..., None], out=s, where=live[..., None])
    s[~live] = 0.0
    with np.errstate(divide="ignore"):
        return np.where(live, row_max + np.log(row_sum), -np.inf)
