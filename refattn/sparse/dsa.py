r"""DSA, DeepSeek Sparse Attention (DeepSeek-AI 2025, "DeepSeek-V3.2: Pushing the
Frontier of Open Large Language Models", §2.1): a lightning indexer scores every key for
every query, each query keeps its ``topk`` best keys, and attention runs over those.

For query ``t`` (bottom-right aligned position ``t' = t + M - N``):

.. math::

    I_{t,s} = \sum_{j=1}^{H_I} w_{t,j}\, \operatorname{ReLU}(q^I_{t,j} \cdot k^I_s),
    \qquad S_t = \operatorname{top}_k \{ s \le t' : I_{t,s} \}, \qquad
    o_t = \operatorname{softmax}_{s \in S_t}(\text{scale}\; q_t k_s^\top)\, v_s ,

with ``H_I`` indexer heads, one indexer key per token shared by them (MQA), and the
selection **shared by every query and KV head** (DeepSeek-V3.2 runs MLA in MQA mode).
Ties in ``I`` go to the lower key index (ReLU makes exact ties at 0 common); a query that
sees fewer than ``topk`` keys keeps them all. The kept keys are attended exactly, so the
output equals :func:`refattn.attention` under the selection's mask.

**Shapes** (refattn's heads-first convention, in every ``layout``): indexer queries
``q_index (..., H_I, N, D_I)``, weights ``weights (..., H_I, N)`` (None: all 1),
indexer keys ``k_index (..., M, D_I)``; DeepSeek's code and flash-linear-attention's
``naive_dsa`` take ``(B, N, H_I, D_I)`` and ``(B, N, H_I)``: move the head axis first.
The indexer has no scale (a positive one changes no ranking).
Without an indexer (``q_index=None``) the attention's own queries and keys index:
``H_I = Hq`` heads of weight 1, head ``h`` scoring with its KV head's keys,
:math:`I_{t,s} = \sum_h \operatorname{ReLU}(q_{t,h} \cdot k_{s,h/G})` -- a stand-in for a
trained indexer (the registry's example and the analysis sweeps use it), not the paper's.

The paper's model is a decoder: ``causal=True`` is DSA as published; ``causal=False``
(refattn's default, as everywhere) chooses among all keys.

**Gradients** (:func:`dsa_attention_vjp`): ``q``, ``k``, ``v`` with the selection held
fixed. The indexer gets none: top-k is not differentiable, and in the paper the indexer
is trained by its own loss, the KL divergence from the main attention's distribution
(its inputs detached from the main graph), so the VJP returns no ``q_index``,
``k_index`` or ``weights`` entries.

**Memory.** One block of query rows at a time, never ``N x M``: the ``rows x M`` index
scores, and the ``topk`` keys of each row either gathered or, when ``topk`` is more than
``M / GATHER_COST`` (:mod:`refattn.sparse._common`), attended densely under a mask over
the span of keys the block's rows keep. (:func:`lightning_indexer` returns the whole
score matrix, for inspection.)
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_bool, check_int, check_size_memory, resolve_scale
from .._core.problem import Problem, prepare_qkv
from .._core.select import BLOCK_ELEMENTS, block_rows, topk_keep
from ..boundary.arrays import to_float64
from ..registry import attach, register
from ._common import (dense_is_cheaper, gather_attention, selection_vjp,
                      key_lists, ranked_indices, spread_rows)

__all__ = ["dsa_attention", "dsa_attention_matrix", "dsa_attention_vjp",
           "lightning_indexer"]


class _Indexer:
    """The indexer's arrays, flat: ``qi (B, H_I, N, D_I)``, ``ki (B, H_K, M, D_I)``
    (``H_K = 1``, or ``Hkv`` for the default indexer), ``w (B, H_I, N)``."""

    def __init__(self, pb, q, k, q_index, k_index, weights, check_finite):
        if q_index is None and k_index is None:
            if weights is not None:
                raise ValueError("weights weighs the indexer heads of q_index: give "
                                 "q_index and k_index with it")
            self.qi, self.ki = q, k
            self.w = np.ones(q.shape[:3])
            return
        if q_index is None or k_index is None:
            raise ValueError("give both q_index and k_index (the lightning indexer's "
                             "queries and keys), or neither (q and k index)")
        qi = to_float64(q_index, "q_index", check_finite=check_finite)
        ki = to_float64(k_index, "k_index", check_finite=check_finite)
        seen = f"q_index {qi.shape}, k_index {ki.shape}"
        if qi.ndim < 3 or ki.ndim < 2 or qi.shape[-1] != ki.shape[-1] or \
                qi.shape[-2] != pb.n or ki.shape[-2] != pb.m or qi.shape[-3] == 0:
            raise ValueError(f"q_index must be (..., H_I, N, D_I) and k_index "
                             f"(..., M, D_I) with N={pb.n}, M={pb.m} and the same D_I; "
                             f"got {seen}")
        hi = qi.shape[-3]
        if weights is None:
            w = np.ones(qi.shape[:-1])
        else:
            w = to_float64(weights, "weights", check_finite=check_finite)
            if w.ndim < 2 or w.shape[-2:] != (hi, pb.n):
                raise ValueError(f"weights must be (..., H_I, N) = (..., {hi}, {pb.n}), "
                                 f"one per indexer head and query; got {w.shape} with "
                                 f"{seen}")
        try:
            self.qi = _flat(qi, pb.batch_shape, qi.shape[-3:])
            self.ki = _flat(ki[..., None, :, :], pb.batch_shape, (1,) + ki.shape[-2:])
            self.w = _flat(w, pb.batch_shape, w.shape[-2:])
        except ValueError:
            raise ValueError(f"the batch dimensions of the indexer ({seen}, weights "
                             f"{w.shape}) must broadcast to those of q, k, v "
                             f"{pb.batch_shape}") from None

    def scores(self, b, rows, pos, causal):
        """``(r, M)`` index scores of the query rows ``rows`` of batch ``b``; ``-inf``
        where causality hides the key."""
        qi, ki, w = self.qi[b, :, rows], self.ki[b], self.w[b, :, rows]
        per, m = qi.shape[0] // ki.shape[0], ki.shape[1]
        hi = min(max(int(pos.max(initial=-1)) + 1, 0), m) if causal else m
        score = np.full((qi.shape[1], m), -np.inf)
        seen = score[:, :hi]                       # keys after every row: never scored
        seen[...] = 0.0
        for j in range(qi.shape[0]):               # one indexer head at a time
            seen += w[j, :, None] * np.maximum(qi[j] @ ki[j // per, :hi].T, 0.0)
        if causal:
            seen[np.arange(hi)[None, :] > pos[:, None]] = -np.inf
        return score


def _flat(x, batch_shape, tail):
    """``x`` broadcast to ``batch_shape + tail``, the batch dimensions flattened."""
    full = np.broadcast_to(x, tuple(batch_shape) + tuple(tail))
    return np.ascontiguousarray(full).reshape((-1,) + tuple(tail))


class _Plan:
    """The validated options, the indexer and the query-row blocks of one call."""

    def __init__(self, q, k, pb, topk, q_index, k_index, weights, causal, check_finite,
                 block_q):
        self.topk = check_int("topk", topk, minimum=1,
                              context=f" (keys kept per query; k has M={pb.m} keys)")
        self.causal = check_bool("causal", causal)
        self.indexer = _Indexer(pb, q, k, q_index, k_index, weights, check_finite)
        self.pos = np.arange(pb.n) + (pb.m - pb.n)
        self.width = min(self.topk, pb.m)
        per_key = (3 * pb.group if dense_is_cheaper(self.width, pb.m)
                   else pb.d + pb.dv + 3 + 2 * pb.group)
        per_row = 3 * pb.m + self.indexer.qi.shape[1] + self.width * per_key
        self.rows = (block_rows(block_q, 1, 1, 1) if block_q is not None
                     else max(1, BLOCK_ELEMENTS // max(per_row, 1)))


def _run(q, k, v, pb, plan, scale):
    """Yield ``(b, hk, heads, rows, chosen (r, M), (p, lse, out, kg, vg), cols)``."""
    for b in range(pb.batch):
        for r0 in range(0, pb.n, plan.rows):
            rows = slice(r0, min(r0 + plan.rows, pb.n))
            pos = plan.pos[rows]
            chosen = topk_keep(plan.indexer.scores(b, rows, pos, plan.causal), plan.topk)
            cols, live = key_lists(chosen, pb.m, plan.width)
            for hk, hs in ((h, slice(h * pb.group, (h + 1) * pb.group))
                           for h in range(pb.heads_kv)):
                res = gather_attention(q[b, hs, rows] * scale, k[b, hk],
                                       None if v is None else v[b, hk], cols, live)
                yield b, hk, hs, rows, chosen, res, cols


def lightning_indexer(q_index, k_index, weights=None, *, causal=False, check_finite=True,
                      memory_budget=None):
    r"""DSA's lightning indexer scores
    :math:`I_{t,s} = \sum_j w_{t,j} \operatorname{ReLU}(q^I_{t,j} \cdot k^I_s)`,
    float64 ``(..., N, M)``, ``-inf`` where ``causal`` hides the key (bottom-right
    aligned). ``q_index (..., H_I, N, D_I)``, ``k_index (..., M, D_I)``, ``weights
    (..., H_I, N)`` (None: 1). Forms the ``N x M`` matrix (``memory_budget`` bounds it).

    >>> import numpy as np, refattn as ra
    >>> qi = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])           # H_I = 2 heads, N = 1
    >>> ki = np.array([[1.0, -1.0], [2.0, 3.0]])               # M = 2 keys
    >>> ra.sparse.lightning_indexer(qi, ki, np.array([[0.5], [2.0]])).tolist()
    [[0.5, 7.0]]
    """
    qi = to_float64(q_index, "q_index", check_finite=check_finite)
    ki = to_float64(k_index, "k_index", check_finite=check_finite)
    seen = f"q_index {qi.shape}, k_index {ki.shape}, weights {np.shape(weights)}"
    if qi.ndim < 3 or ki.ndim < 2:
        raise ValueError(f"q_index must be (..., H_I, N, D_I) and k_index (..., M, D_I); "
                         f"got {seen}")
    try:
        batch = np.broadcast_shapes(qi.shape[:-3], ki.shape[:-2],
                                    () if weights is None else np.shape(weights)[:-2])
    except ValueError:
        raise ValueError(f"the batch dimensions of the indexer do not broadcast; got "
                         f"{seen}") from None
    pb = Problem(tuple(batch), 1, 1, qi.shape[-2], ki.shape[-2], qi.shape[-1], 0)
    plan_indexer = _Indexer(pb, None, None, qi, ki, weights, check_finite)
    pb.check_matrix_memory(memory_budget, "the lightning indexer's score matrix",
                           "refattn.sparse.dsa_attention")
    pos, causal = np.arange(pb.n) + (pb.m - pb.n), check_bool("causal", causal)
    out = np.stack([plan_indexer.scores(b, slice(0, pb.n), pos, causal)
                    for b in range(pb.batch)])
    return out.reshape(pb.batch_shape + (pb.n, pb.m))


@register(family="sparse", exact=False, time="O(N·M·H_I·D_I + N·topk·D)",
          state="O(M·(D + D_I)) KV and indexer-key cache", supports_causal=True,
          supports_mask=False, supports_gqa=True, position_free=False,
          example={"topk": 3}, budget=lambda n, b: {"topk": b})
def dsa_attention(q, k, v, *, topk, q_index=None, k_index=None, weights=None,
                  causal=False, scale=None, return_lse=False, return_selection=False,
                  check_finite=True, block_q=None):
    r"""DeepSeek Sparse Attention: attention over the ``topk`` keys the lightning indexer
    ranks highest for each query (module docstring; DeepSeek-V3.2, 2025).

    Parameters
    ----------
    q : ``(..., Hq, N, D)``; k : ``(..., Hkv, M, D)``; v : ``(..., Hkv, M, Dv)``.
    topk : keys kept per query (shared by all heads); ``topk >= M`` is exact attention.
    q_index, k_index, weights : the indexer, ``(..., H_I, N, D_I)``, ``(..., M, D_I)``,
        ``(..., H_I, N)`` (weights None: 1), heads-first in any ``layout``; all None: q
        and k index (module docstring).
    causal : DSA as published (``False`` chooses among all keys).
    scale : logit scale of the attention (default ``1/sqrt(D)``).
    return_lse : also return the ``(..., Hq, N)`` log-sum-exp over the kept keys.
    return_selection : also return the kept keys, int64 ``(..., N, topk)`` ascending,
        ``-1`` padded (flash-linear-attention's ``indices``, sorted).
    block_q : query rows per block (default: by memory).

    Returns
    -------
    float64 ``(..., Hq, N, Dv)`` (then the lse, then the selection, as asked).

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 10, 8))             # 2 heads, 10 tokens
    >>> qi, ki = rng.standard_normal((4, 10, 16)), rng.standard_normal((10, 16))
    >>> w = rng.standard_normal((4, 10))                       # H_I = 4, D_I = 16
    >>> out, sel = ra.sparse.dsa_attention(q, k, v, topk=3, q_index=qi, k_index=ki,
    ...                                    weights=w, causal=True, return_selection=True)
    >>> sel[:3].tolist()                              # early queries keep all they see
    [[0, -1, -1], [0, 1, -1], [0, 1, 2]]
    >>> keep = (sel[..., None] == np.arange(10)).any(-2)      # (N, M) selection mask
    >>> bool(np.allclose(out, ra.attention(q, k, v, mask=keep)))
    True
    """
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    plan = _Plan(q, k, pb, topk, q_index, k_index, weights, causal, check_finite, block_q)
    out, lse = pb.poisoned_outputs()
    return_selection = check_bool("return_selection", return_selection)
    if return_selection:
        check_size_memory(8.0 * pb.batch * pb.n * plan.topk, None,
                          "dsa_attention's selection", f"topk={plan.topk:,}",
                          f"topk <= {pb.m:,} (all the keys) or return_selection=False",
                          adjustable=False)
        sel = np.full((pb.batch, pb.n, plan.topk), -2, dtype=np.int64)
    for b, hk, hs, rows, chosen, (_, l, o, _, _), _ in _run(q, k, v, pb, plan,
                                                           resolve_scale(scale, pb.d)):
        out[b, hs, rows], lse[b, hs, rows] = o, l
        if hk == 0 and return_selection:   # -1 past the min(topk, M) keys there are
            sel[b, rows] = -1
            sel[b, rows, :plan.width] = ranked_indices(chosen, plan.width)
    result = pb.unflatten(out)
    extra = ((pb.unflatten(lse),) if return_lse else ()) + (
        (pb.unflatten(sel),) if return_selection else ())
    return (result,) + extra if extra else result


def dsa_attention_matrix(q, k, *, topk, q_index=None, k_index=None, weights=None,
                         causal=False, scale=None, check_finite=True, block_q=None,
                         memory_budget=None):
    """The implied matrix ``(..., Hq, N, M)`` of :func:`dsa_attention` (same arguments):
    the softmax over each query's kept keys, 0 elsewhere; row-stochastic (rows that see
    nothing are 0).

    >>> import numpy as np, refattn as ra
    >>> q = k = np.zeros((1, 3, 2))                   # every score ties: lowest keys
    >>> ra.sparse.dsa_attention_matrix(q, k, topk=2)[0]
    array([[0.5, 0.5, 0. ],
           [0.5, 0.5, 0. ],
           [0.5, 0.5, 0. ]])
    """
    q, k, _, pb = prepare_qkv(q, k, None, check_finite=check_finite, need_v=False)
    plan = _Plan(q, k, pb, topk, q_index, k_index, weights, causal, check_finite, block_q)
    pb.check_matrix_memory(memory_budget, "the implied matrix of dsa_attention",
                           "refattn.sparse.dsa_attention", copies=2)
    a = np.full((pb.batch, pb.heads_q, pb.n, pb.m), np.nan)
    for b, _, hs, rows, _, (p, *_), cols in _run(q, k, None, pb, plan,
                                                 resolve_scale(scale, pb.d)):
        block = np.zeros((len(p), rows.stop - rows.start, pb.m))
        spread_rows(block, cols, p)
        a[b, hs, rows] = block
    return pb.unflatten(a)


def dsa_attention_vjp(q, k, v, grad_out, *, topk, q_index=None, k_index=None,
                      weights=None, grad_lse=None, causal=False, scale=None,
                      return_lse=False, return_selection=False, check_finite=True,
                      block_q=None):
    """Gradients ``{"q", "k", "v"}`` of :func:`dsa_attention` with the selection held
    fixed: the softmax backward over each query's kept keys. The indexer's inputs get
    no entry (trained by their own loss in the paper; module docstring). ``grad_lse``:
    the cotangent of the returned lse.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 6, 4))
    >>> do = np.ones((1, 6, 4))
    >>> g = ra.vjp("dsa_attention", q, k, v, do, topk=6, causal=True)
    >>> ref = ra.vjp("attention", q, k, v, do, causal=True)      # every key kept: exact
    >>> sorted(g), all(np.allclose(g[x], ref[x]) for x in "qkv")
    (['k', 'q', 'v'], True)
    """
    shapes = tuple(np.shape(x) for x in (q, k, v))
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    plan = _Plan(q, k, pb, topk, q_index, k_index, weights, causal, check_finite, block_q)
    s = resolve_scale(scale, pb.d)
    return selection_vjp(_run(q, k, v, pb, plan, s), q, k, v, pb, grad_out, grad_lse, s,
                         shapes, check_finite)


attach(dsa_attention, implied=dsa_attention_matrix, vjp=dsa_attention_vjp)
