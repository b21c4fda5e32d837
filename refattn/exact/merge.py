r"""Combining attentions over disjoint key sets through their log-sum-exps: the merge
step of split-KV (flash-decoding) and ring attention, and split-KV decoding built on it.
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_int
from ..boundary.arrays import to_float64
from .dense import attention

__all__ = ["merge_partials", "split_kv_decode"]


def merge_partials(outs, lses):
    r"""Merge attention outputs computed over disjoint key sets.

    Given parts ``(o_s, lse_s)`` from attending to key shards ``K_s`` (split-KV
    decoding, ring attention), the attention over their union is

    .. math:: \text{lse} = \log \sum_s e^{\text{lse}_s}, \qquad
              o = \sum_s e^{\text{lse}_s - \text{lse}} \, o_s .

    ``outs``: sequence (or stacked array) of ``(..., N, Dv)``; ``lses``: of
    ``(..., N)``. Returns ``(out, lse)``, float64. Parts with lse ``-inf`` (no key kept)
    contribute nothing; rows where every part is empty give 0 and ``-inf``.

    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(1)
    >>> q, k, v = rng.standard_normal((3, 1, 4, 8))
    >>> a = ra.attention(q, k[..., :2, :], v[..., :2, :], return_lse=True)
    >>> b = ra.attention(q, k[..., 2:, :], v[..., 2:, :], return_lse=True)
    >>> out, lse = ra.merge_partials([a[0], b[0]], [a[1], b[1]])
    >>> bool(np.allclose(out, ra.attention(q, k, v)))
    True
    """
    if isinstance(outs, np.ndarray):
        outs = list(outs)
    if isinstance(lses, np.ndarray):
        lses = list(lses)
    if len(outs) != len(lses) or len(outs) == 0:
        raise ValueError(f"merge_partials needs one lse per output and at least one part; "
                         f"got {len(outs)} outputs and {len(lses)} lses")
    outs = [to_float64(x, f"outs[{i}]") for i, x in enumerate(outs)]
    lses = [to_float64(x, f"lses[{i}]", check_finite=False) for i, x in enumerate(lses)]
    for name, parts in (("outs", outs), ("lses", lses)):
        if len({x.shape for x in parts}) > 1:
            raise ValueError(f"merge_partials: every part of {name} must have one shape "
                             f"(the same queries), got {[x.shape for x in parts]}")
    o, lse = np.stack(outs), np.stack(lses)
    if o.shape[:-1] != lse.shape:
        raise ValueError(f"each out must have shape lse.shape + (Dv,); got outs "
                         f"{[np.shape(x) for x in outs]} and lses {[np.shape(x) for x in lses]}")
    if np.isnan(lse).any() or np.isposinf(lse).any():
        raise ValueError("lses must be finite or -inf (an empty part)")
    top = lse.max(axis=0)
    safe = np.where(np.isneginf(top), 0.0, top)
    w = np.exp(lse - safe)                     # (parts, ..., N), 0 for empty parts
    total = w.sum(axis=0)
    live = total > 0
    out = np.zeros(o.shape[1:])
    np.divide(np.einsum("s...n,s...nd->...nd", w, o), total[..., None], out=out,
              where=live[..., None])
    with np.errstate(divide="ignore"):
        merged = np.where(live, safe + np.log(total), -np.inf)
    return out, merged


def split_kv_decode(q_t, k_cache, v_cache, splits, *, scale=None):
    """Split-KV (flash-decoding) attention of one query token over a cache.

    ``q_t (*b, Hq, D)``, ``k_cache (*b, Hkv, L, D)``, ``v_cache (*b, Hkv, L, Dv)``; the
    cache is cut into ``splits`` contiguous shards (empty shards allowed when
    ``splits > L``), each attended separately with its lse, and merged by
    :func:`refattn.merge_partials`: ``o = sum_s exp(lse_s - lse) o_s``. Returns
    ``(*b, Hq, Dv)``.

    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 8)); k, v = rng.standard_normal((2, 1, 5, 8))
    >>> bool(np.allclose(split_kv_decode(q, k, v, 3), ra.attention(q[:, None], k, v)[:, 0]))
    True
    """
    splits = check_int("splits", splits, minimum=1)
    q_t = np.asarray(q_t, dtype=np.float64)
    if q_t.ndim < 2:
        raise ValueError(f"q_t must have shape (*batch, Hq, D), got {q_t.shape}")
    length = np.shape(k_cache)[-2]
    bounds = np.linspace(0, length, splits + 1).round().astype(int)
    outs, lses = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi == lo:
            continue
        o, lse = attention(q_t[..., None, :], np.asarray(k_cache)[..., lo:hi, :],
                           np.asarray(v_cache)[..., lo:hi, :], scale=scale, return_lse=True)
        outs.append(o)
        lses.append(lse)
    if not outs:
        raise ValueError("k_cache holds no tokens (L = 0)")
    return merge_partials(outs, lses)[0][..., 0, :]
