r"""Reformer LSH attention (Kitaev, Kaiser & Levskaya, "Reformer: The Efficient
Transformer", ICLR 2020), float64 reference.

**Hash.** Angular locality-sensitive hashing by a random rotation: for a vector
:math:`x \in \mathbb{R}^D` and :math:`R \in \mathbb{R}^{D \times b/2}` with i.i.d.
:math:`\mathcal N(0, 1)` entries,

.. math:: h(x) = \arg\max\,[\,xR\,;\,-xR\,] \in \{0, \dots, b - 1\}

(``b = n_buckets``, even). With two buckets, two vectors at angle :math:`\theta` collide
with probability :math:`1 - \theta/\pi`; with ``n_hashes`` independent rotations the
probability of colliding in at least one round is :math:`1 - (\theta/\pi)^{r}`.

**Attention in one round** :math:`r`. Queries (and keys) are sorted by
``(bucket, position)``; the sorted sequence is cut into chunks of ``chunk_size``
(the last one may be shorter) and the queries of chunk :math:`c` see the keys of the
key chunks :math:`c-1` and :math:`c` (chunk 0 has no previous chunk; there is no
wrap-around). The set attended by query :math:`i` is

.. math:: P_i^{(r)} = \{\, j : h_r(q_i) = h_r(k_j),\
          \lfloor s_r(j)/m\rfloor \in \{\lfloor s_r(i)/m\rfloor - 1,
          \lfloor s_r(i)/m\rfloor\},\ (j \le i \text{ if causal}) \,\}

(:math:`s_r` the sorted rank, :math:`m` the chunk size) — the paper's Eqs. (3)-(5):
within the chunk window, keys of another bucket are masked.

**Several rounds** are combined by log-sum-exp with the paper's duplicate correction
(Eq. 7): with :math:`N_{ij} = |\{r' : j \in P_i^{(r')}\}|`,

.. math::

    \ell_{ij} = \text{scale}\; q_i \cdot k_j - \log N_{ij}, \qquad
    \text{lse}_i^{(r)} = \log \sum_{j \in P_i^{(r)}} e^{\ell_{ij}}, \qquad
    o_i = \sum_r e^{\text{lse}_i^{(r)} - \text{lse}_i}\, o_i^{(r)},
    \quad \text{lse}_i = \log \sum_r e^{\text{lse}_i^{(r)}},

which equals softmax attention restricted to the union :math:`\bigcup_r P_i^{(r)}`
with every key counted once. :math:`N_{ij}` counts the rounds in which the pair is
*actually attended* (same bucket **and** inside the chunk window **and** causal), so
the equality is exact, not only when buckets fit in chunks.

**Shared-QK** (``shared_qk=True``, the paper's setting): the keys are the queries
normalized to unit length, :math:`k_j = q_j / \lVert q_j\rVert` (0 for a zero query), so a
token always hashes into its own bucket; the values of ``k`` are not used (``k`` may be
``None``; if given, only its shape is checked). A token attends to itself only when
nothing else is available: its own logit is *replaced* by :data:`SELF_LOGIT` ``= -1e5``
(as in the reference implementations) rather than ``-inf``, so its weight underflows to
exactly 0 as soon as any other key of logit above about ``-1e5 + 745`` is attended.
The duplicate correction applies to this pair too (it is attended in every round), so
a token alone in all rounds gets weight 1 and lse exactly ``SELF_LOGIT``.
With GQA each query head's keys are its own normalized queries; values come from KV head
``h // (Hq // Hkv)``.

**Separate Q and K** (``shared_qk=False``, default): ``q`` and ``k`` are hashed with the
same rotations and sorted separately; query chunk :math:`c` sees key chunks
:math:`c-1, c`. A query's bucket may then hold no key at all (the imbalance the paper
gives as the reason for sharing QK), so here the key at the query's own position is
always attended as well (an extra part :math:`\{i\}` in the union, with its true logit,
included in :math:`N_{ii}`). Every row is therefore a convex combination, also when
causal. This rule is refattn's, not the paper's.

**Memory.** The forward sorts every round once (``O(n_hashes·N)`` integers per head),
then takes the sorted chunks a slice at a time (logits, masks and gathered rows within
``_BLOCK_BYTES``), merging each round's partial softmax into the output online; its
working memory beyond the layout does not grow with ``N``. The implied matrix and the
VJP form every round's chunks at once (``O(n_hashes·N·chunk_size)`` per head).

Buckets can be passed in (``buckets=``) instead of drawn, which lets a kernel under test
and this oracle use identical hashes. Rotations are drawn as
``rng.standard_normal((n_hashes, D, n_buckets // 2))`` and shared by all batch elements
and heads, so the drawn buckets are those of :func:`lsh_buckets` with the same ``rng``.
"""
from __future__ import annotations

import numpy as np

from .._core.checks import check_bool, check_cotangent, check_int, resolve_scale
from .._core.problem import prepare_qkv
from .._core.softmax import finish_rows
from ..registry import attach, register
from .lsh_chunks import (_BLOCK_BYTES, SELF_LOGIT, _chunk_slices, _combine_weights,
                         _head_groups, _keys_from_windows, _layout, _merge_part,
                         _round_softmax, _rounds, _self_logit, _unsort, _whole_rounds)
from .lsh_hash import (_check_n_buckets, _given_buckets, _hash, _rotations,
                       check_hash_memory, lsh_buckets)

__all__ = ["lsh_attention", "lsh_attention_matrix", "lsh_attention_vjp", "lsh_buckets",
           "SELF_LOGIT", "DEFAULT_CHUNK_SIZE"]

#: Default number of sorted queries per chunk.
DEFAULT_CHUNK_SIZE = 64


def _per_query_head(x, kv_of):
    """``x (B·Hkv, ...)`` for each query head ``(B·Hq, ...)``: ``x`` itself without GQA
    (no copy of the keys or values), else its heads repeated."""
    return x if len(kv_of) == len(x) else x[kv_of]        # Hq == Hkv: the identity


def _setup(q, k, v, *, n_buckets, n_hashes, chunk_size, shared_qk, causal, scale, rng,
           buckets, check_finite, what, memory_budget=None, sliced=False):
    """Validate; return flat per-query-head inputs and buckets.

    ``qf, kf (P, N, D)``, ``vf (P, N, Dv)`` or None, ``bq, bk (R, P, N)`` with
    ``P = B * Hq`` (KV heads repeated to query heads; the inputs themselves without
    GQA), and the problem sizes. ``sliced``: the memory check counts the forward's
    slices of sorted chunks, not every round's chunks at once.
    """
    n_buckets = _check_n_buckets(n_buckets)
    n_hashes = check_int("n_hashes", n_hashes, minimum=1)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    check_bool("shared_qk", shared_qk)
    check_bool("causal", causal)
    if k is None:
        if not shared_qk:
            raise TypeError("k is None: keys are needed unless shared_qk=True")
        ref = q if v is None else v
        k = np.zeros(np.shape(ref)[:-1] + np.shape(q)[-1:])   # shape only, never used
    qshape, kshape = np.shape(q), np.shape(k)
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    if pb.n != pb.m:
        raise ValueError(f"{what} is self-attention: queries and keys are hashed and "
                         f"sorted into the same chunks, so q and k must have the same "
                         f"length (N == M); got q {qshape}, k {kshape}")
    scale = resolve_scale(scale, pb.d)
    p_total, c = pb.batch * pb.heads_q, max(1, min(chunk_size, pb.n))
    padded = -(-pb.n // c) * c
    chunks = padded * (80.0 * c + 24 * (pb.d + pb.dv))    # a round's sorted chunks, 1 head
    if sliced:                    # the sorted layout; the chunks a slice at a time
        one = c * (80.0 * c + 24 * (pb.d + pb.dv))            # one chunk, one round
        per_round, fixed = 96.0 * p_total * padded, 8.0 * p_total * pb.n * (pb.dv + 2)

        def at_once(r):                   # a slice: every round of at least one chunk
            return min(r * chunks, max(r * one, _BLOCK_BYTES))
    else:                         # every round's sorted chunks at once
        per_round, fixed, at_once = 16.0 * p_total * pb.n + chunks, 0.0, None
    check_hash_memory(n_hashes, n_buckets, pb.d if buckets is None else 0, pb.batch * (
        pb.heads_q + pb.heads_kv) * pb.n, memory_budget, what, per_round=per_round,
        fixed=fixed, rounds_at_once=at_once)
    kv_of = (np.arange(pb.batch)[:, None] * pb.heads_kv
             + np.arange(pb.heads_q)[None, :] // pb.group).reshape(-1)   # (P,)
    qf = q.reshape(p_total, pb.n, pb.d)
    if shared_qk:
        norm = np.sqrt(np.einsum("pnd,pnd->pn", qf, qf))[..., None]
        kf = np.divide(qf, norm, out=np.zeros_like(qf), where=norm > 0)
    else:
        kf = _per_query_head(k.reshape(pb.batch * pb.heads_kv, pb.n, pb.d), kv_of)
    vf = None if v is None else _per_query_head(
        v.reshape(pb.batch * pb.heads_kv, pb.n, pb.dv), kv_of)

    if buckets is None:
        rot = _rotations(rng, n_hashes, pb.d, n_buckets)
        bq = _hash(q, rot).reshape(n_hashes, p_total, pb.n)
        if shared_qk:
            bk = bq
        else:
            bk = _hash(k, rot).reshape(n_hashes, pb.batch * pb.heads_kv, pb.n)[:, kv_of]
    elif shared_qk:
        if isinstance(buckets, (tuple, list)):
            raise TypeError("with shared_qk=True, buckets must be one integer array "
                            "(n_hashes, ..., Hq, N): queries and keys share their buckets")
        bq = _given_buckets(buckets, "buckets", n_hashes, n_buckets, pb.batch_shape,
                            pb.heads_q, pb.n).reshape(n_hashes, p_total, pb.n)
        bk = bq
    else:
        if not (isinstance(buckets, (tuple, list)) and len(buckets) == 2):
            raise TypeError("with shared_qk=False, buckets must be a pair (query_buckets "
                            "(n_hashes, ..., Hq, N), key_buckets (n_hashes, ..., Hkv, N))")
        bq = _given_buckets(buckets[0], "buckets[0] (query buckets)", n_hashes, n_buckets,
                            pb.batch_shape, pb.heads_q, pb.n).reshape(n_hashes, p_total,
                                                                      pb.n)
        bk = _given_buckets(buckets[1], "buckets[1] (key buckets)", n_hashes, n_buckets,
                            pb.batch_shape, pb.heads_kv, pb.n)
        bk = bk.reshape(n_hashes, pb.batch * pb.heads_kv, pb.n)[:, kv_of]
    return qf, kf, vf, bq, bk, scale, max(1, min(chunk_size, pb.n)), pb


_COMMON_DOC = """
    q : array ``(..., Hq, N, D)``
    k : array ``(..., Hkv, N, D)``, ``Hq`` a multiple of ``Hkv`` (GQA: query head ``h``
        uses KV head ``h // (Hq // Hkv)``). Must have the same length as ``q`` (LSH is
        self-attention; ``N != M`` raises ``ValueError``). With ``shared_qk=True`` its
        values are not used and it may be ``None``.
    n_buckets : even integer >= 2, buckets per hash round.
    n_hashes : hash rounds (default 1).
    chunk_size : sorted queries per chunk (default 64); ``N`` need not be a multiple
        (the last chunk is shorter).
    shared_qk : keys are the unit-normalized queries, self-attention is replaced by
        ``SELF_LOGIT`` (default False: hash ``q`` and ``k`` separately, and always attend
        the own-position key as well; see the module docstring).
    causal : query ``i`` attends only keys ``j <= i``.
    scale : float, default ``1/sqrt(D)``.
    rng : int seed or ``numpy.random.Generator`` for the rotations; required unless
        ``buckets`` is given. The same ``rng`` gives bit-identical results.
    buckets : optional precomputed buckets replacing the drawn ones: shared-QK, one int
        array ``(n_hashes, ..., Hq, N)``; separate QK, a pair ``(query_buckets
        (n_hashes, ..., Hq, N), key_buckets (n_hashes, ..., Hkv, N))``; values in
        ``[0, n_buckets)``.
    check_finite : raise on non-finite inputs (default).
    memory_budget : bytes (default 8 GiB) of the rounds' working memory: more raises
        :class:`refattn.MemoryBudgetError` naming ``n_hashes`` and ``n_buckets``."""


@register(family="sparse", exact=False,
          time="O(n_hashes·N·(chunk_size·(D + n_hashes) + log N))",
          state="O(n_hashes·N) sorted layout per head, chunks a bounded slice at a time "
                "(the VJP: O(n_hashes·N·chunk_size))", supports_causal=True,
          supports_mask=False, supports_gqa=True, position_free=False,
          self_attention_only=True,
          example={"n_buckets": 4, "n_hashes": 2, "chunk_size": 4},
          budget=lambda n, b: {"n_buckets": max(2, n // b // 2 * 2), "n_hashes": 2,
                               "chunk_size": max(1, b // 2)})
def lsh_attention(q, k, v, *, n_buckets, n_hashes=1, chunk_size=DEFAULT_CHUNK_SIZE,
                  shared_qk=False, causal=False, scale=None, rng=None, buckets=None,
                  return_lse=False, check_finite=True, memory_budget=None):
    r"""Reformer LSH attention (Kitaev et al. 2020), hashed and chunked softmax attention.

    Softmax attention restricted to the keys that hash into the query's bucket and lie
    in its sorted chunk or the previous one, over ``n_hashes`` rounds combined by
    log-sum-exp with the duplicate correction:

    .. math::

        o_i = \sum_r e^{\text{lse}^{(r)}_i - \text{lse}_i} \sum_{j \in P^{(r)}_i}
        \frac{e^{\ell_{ij}}}{e^{\text{lse}^{(r)}_i}} v_j,\qquad
        \ell_{ij} = \text{scale}\, q_i\cdot k_j - \log N_{ij}

    (definitions of :math:`P^{(r)}_i`, :math:`N_{ij}` in :mod:`refattn.lsh`); this is
    softmax attention over :math:`\bigcup_r P_i^{(r)}`, each key counted once.

    Parameters
    ----------%s
    v : array ``(..., Hkv, N, Dv)``.
    return_lse : also return the log-sum-exp of the corrected logits ``(..., Hq, N)``.

    Returns
    -------
    float64 ``(..., Hq, N, Dv)`` (and ``(..., Hq, N)`` lse). Every row attends at least
    one key, so the output is a convex combination of value rows.

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> from refattn.lsh import lsh_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 10, 8))        # 2 heads, N = 10, D = 8
    >>> out = lsh_attention(q, k, v, n_buckets=4, n_hashes=2, chunk_size=4, rng=1)
    >>> out.shape
    (2, 10, 8)
    >>> # one bucket for everything and one chunk: exact attention
    >>> same = np.zeros((3, 2, 10), dtype=int)               # (n_hashes, Hq, N)
    >>> exact = lsh_attention(q, k, v, n_buckets=2, n_hashes=3, chunk_size=10,
    ...                       buckets=(same, same))
    >>> bool(np.allclose(exact, ra.attention(q, k, v), rtol=1e-13))
    True
    """
    qf, kf, vf, bq, bk, scale, chunk, pb = _setup(
        q, k, v, n_buckets=n_buckets, n_hashes=n_hashes, chunk_size=chunk_size,
        shared_qk=shared_qk, causal=causal, scale=scale, rng=rng, buckets=buckets,
        check_finite=check_finite, what="lsh_attention", memory_budget=memory_budget,
        sliced=True)
    p_total = pb.batch * pb.heads_q
    out = np.full((p_total, pb.n, pb.dv), np.nan)
    lse = np.full((p_total, pb.n), np.nan)
    for hs in _head_groups(p_total, bq.shape[0], pb.n, chunk, pb.d, pb.dv):
        bqh, bkh, qh, kh, vh = bq[:, hs], bk[:, hs], qf[hs], kf[hs], vf[hs]
        layout = _layout(bqh, bkh, chunk, shared_qk)
        acc = out[hs]                                        # a view: summed in place
        if shared_qk:
            acc[...] = 0.0
            state = (acc, np.full(vh.shape[:-1], -np.inf), np.zeros(vh.shape[:-1]))
        else:                                                # the own-position part
            acc[...] = vh
            state = (acc, _self_logit(qh, kh, bqh, bkh, layout, scale),
                     np.ones(vh.shape[:-1]))
        for chunks in _chunk_slices(layout[0].shape[2], bq.shape[0], hs.stop - hs.start,
                                    chunk, pb.d, pb.dv):
            qi, kw, s = _rounds(qh, kh, bqh, bkh, layout, shared_qk=shared_qk,
                                causal=causal, scale=scale, chunks=chunks)
            total, lse_r = _round_softmax(s)                 # s now holds exp(s - max)
            pidx = np.arange(s.shape[1])[None, :, None, None]
            o_r = np.matmul(s, vh[pidx, np.maximum(kw, 0)])  # (R, P, nc', C, Dv)
            np.divide(o_r, total[..., None], out=o_r, where=total[..., None] > 0)
            o_r[total == 0] = 0.0
            for r in range(len(qi)):                         # one round at a time
                _merge_part(state, o_r[r], lse_r[r], qi[r])
        _, row_max, row_sum = state
        row_max[np.isneginf(row_max)] = 0.0
        finish_rows(acc, row_max, row_sum, acc, lse[hs])
    out = out.reshape(pb.batch_shape + (pb.heads_q, pb.n, pb.dv))
    lse = lse.reshape(pb.batch_shape + (pb.heads_q, pb.n))
    return (out, lse) if return_lse else out


if lsh_attention.__doc__:      # None under python -OO
    lsh_attention.__doc__ = lsh_attention.__doc__ % _COMMON_DOC


def lsh_attention_matrix(q, k, *, n_buckets, n_hashes=1, chunk_size=DEFAULT_CHUNK_SIZE,
                         shared_qk=False, causal=False, scale=None, rng=None, buckets=None,
                         check_finite=True, memory_budget=None):
    r"""The implied attention matrix of :func:`lsh_attention`: float64
    ``(..., Hq, N, N)`` ``A`` with ``lsh_attention(q, k, v, **kw) == A @ v`` (``v``'s
    KV heads repeated for GQA), for the same keyword arguments (same ``rng``).

    .. math:: A_{ij} = \sum_r e^{\text{lse}^{(r)}_i - \text{lse}_i}\,
              \mathbf 1[j \in P^{(r)}_i]\, e^{\ell_{ij} - \text{lse}^{(r)}_i}
              = \mathbf 1\big[j \in \textstyle\bigcup_r P^{(r)}_i\big]\,
              e^{\text{scale}\, q_i\cdot k_j - \text{lse}^{\text{union}}_i}

    Rows are non-negative and sum to 1.

    Parameters
    ----------%s
    memory_budget : bytes allowed for the ``(..., Hq, N, N)`` result (default
        ``refattn.DEFAULT_MEMORY_BUDGET``); beyond it raises
        :class:`refattn.MemoryBudgetError` before allocating.

    Example
    -------
    >>> import numpy as np
    >>> from refattn.lsh import lsh_attention, lsh_attention_matrix
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 1, 9, 4))
    >>> a = lsh_attention_matrix(q, None, n_buckets=2, chunk_size=3, shared_qk=True,
    ...                          causal=True, rng=3)
    >>> bool(np.allclose(a.sum(-1), 1.0)), bool(np.allclose(np.triu(a[0], 1), 0.0))
    (True, True)
    >>> float(a[0, 0, 0])            # the first token has only itself to attend to
    1.0
    >>> bool(np.allclose(a @ v, lsh_attention(q, None, v, n_buckets=2, chunk_size=3,
    ...                  shared_qk=True, causal=True, rng=3), rtol=1e-13))
    True
    """
    qf, kf, _, bq, bk, scale, chunk, pb = _setup(
        q, k, None, n_buckets=n_buckets, n_hashes=n_hashes, chunk_size=chunk_size,
        shared_qk=shared_qk, causal=causal, scale=scale, rng=rng, buckets=buckets,
        check_finite=check_finite, what="lsh_attention_matrix", memory_budget=memory_budget)
    p_total = pb.batch * pb.heads_q
    pb.check_matrix_memory(memory_budget, "the implied matrix of lsh_attention_matrix",
                           "refattn.lsh.lsh_attention", m=pb.n)
    a = np.zeros((p_total, pb.n, pb.n))
    for hs in _head_groups(p_total, bq.shape[0], pb.n, chunk, pb.d, 0):
        qi, kw, s, self_logit = _whole_rounds(qf[hs], kf[hs], bq[:, hs], bk[:, hs],
                                              chunk=chunk, shared_qk=shared_qk,
                                              causal=causal, scale=scale)
        total, lse_sorted = _round_softmax(s)
        lse_r = _unsort(lse_sorted, qi, pb.n)
        if self_logit is not None:
            lse_r = np.concatenate([lse_r, self_logit[None]], axis=0)
        _, w = _combine_weights(lse_r)                        # (parts, P, N)
        block = a[hs]                                         # a view
        n_rounds, p_count = s.shape[:2]
        # weight of pair (i, j) in round r: w_r[i] * exp(s - max) / total
        rr = np.arange(n_rounds)[:, None, None, None]
        pp = np.arange(p_count)[None, :, None, None]
        w_sorted = w[rr, pp, np.maximum(qi, 0)]               # (R, P, nc, C)
        with np.errstate(invalid="ignore", divide="ignore"):
            scale_rows = np.where(total > 0, w_sorted / np.where(total > 0, total, 1), 0)
        contrib = s * scale_rows[..., None]                   # (R, P, nc, C, 2C)
        i_idx = np.broadcast_to(qi[..., :, None], s.shape)
        j_idx = np.broadcast_to(kw[..., None, :], s.shape)
        p_idx = np.broadcast_to(np.arange(p_count)[None, :, None, None, None], s.shape)
        for r in range(n_rounds):           # a pair occurs at most once per round
            keep = (i_idx[r] >= 0) & (j_idx[r] >= 0) & (contrib[r] > 0)
            block[p_idx[r][keep], i_idx[r][keep], j_idx[r][keep]] += contrib[r][keep]
        if self_logit is not None:
            diag = np.arange(pb.n)
            block[:, diag, diag] += w[-1]
    return a.reshape(pb.batch_shape + (pb.heads_q, pb.n, pb.n))


if lsh_attention_matrix.__doc__:
    lsh_attention_matrix.__doc__ = lsh_attention_matrix.__doc__ % _COMMON_DOC


def lsh_attention_vjp(q, k, v, grad_out, *, n_buckets, n_hashes=1,
                      chunk_size=DEFAULT_CHUNK_SIZE, shared_qk=False, causal=False,
                      scale=None, rng=None, buckets=None, grad_lse=None, check_finite=True,
                      memory_budget=None):
    r"""Gradients of :func:`lsh_attention` with the **hash buckets held fixed** (drawn
    from the same ``rng`` as the forward -- pass the same int seed, a ``Generator``
    advances -- or given as ``buckets``), as Reformer trains: the rotations, the sorted
    order, the chunks and hence the attended sets :math:`P_i^{(r)}` and the duplicate
    counts :math:`N_{ij}` are constants. The forward is softmax attention over the union
    :math:`U_i = igcup_r P_i^{(r)}` (with the own-position key in separate-QK mode)
    with logits :math:`s_{ij} = 	ext{scale}\; q_i\cdot k_j` (the corrections
    :math:`-\log N_{ij}` cancel against the :math:`N_{ij}` occurrences), so with
    :math:`P_{ij} = e^{s_{ij} - 	ext{lse}_i}` on :math:`U_i`:

    .. math:: dV_j = \sum_i P_{ij}\, dO_i, \quad
              dS_{ij} = P_{ij} (dO_i \cdot v_j - D_i), \quad
              D_i = dO_i\cdot O_i - dlse_i, \quad
              dq_i = 	ext{scale} \sum_j dS_{ij} k_j, \quad
              dk_j = 	ext{scale} \sum_i dS_{ij} q_i,

    computed per round and chunk window as the forward (each occurrence of a pair
    carries :math:`P_{ij}/N_{ij}`), never forming ``N x N``. **Shared-QK**: the
    self-pair's logit is the constant :data:`SELF_LOGIT` (its :math:`dS` reaches no
    input; its weight still gives ``dV``), and the keys are the normalized queries
    :math:`\hat q_j = q_j / \lVert q_j
Vert`, so
    :math:`dq_j \mathrel{+}= (dk_j - \hat q_j (\hat q_j\cdot dk_j)) / \lVert q_j
Vert`
    (0 for a zero query); ``k`` is unused and gets a zero gradient (no ``"k"`` entry when
    ``k`` is None). ``grad_out (..., Hq, N, Dv)``; ``grad_lse (..., Hq, N)`` or None.
    Returns ``{"q", "k", "v"}`` float64 in the inputs' shapes (GQA: a KV head's
    gradient sums over its query heads).

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 6, 4))
    >>> one = np.zeros((2, 1, 6), dtype=int)              # one bucket, one chunk: exact
    >>> g = ra.vjp("lsh_attention", q, k, v, np.ones((1, 6, 4)), n_buckets=2, n_hashes=2,
    ...            chunk_size=6, buckets=(one, one))
    >>> dense = ra.vjp("attention", q, k, v, np.ones((1, 6, 4)))
    >>> all(np.allclose(g[x], dense[x]) for x in "qkv")
    True
    """
    shapes = {"q": np.shape(q), "k": None if k is None else np.shape(k), "v": np.shape(v)}
    qf, kf, vf, bq, bk, scale, chunk, pb = _setup(
        q, k, v, n_buckets=n_buckets, n_hashes=n_hashes, chunk_size=chunk_size,
        shared_qk=shared_qk, causal=causal, scale=scale, rng=rng, buckets=buckets,
        check_finite=check_finite, what="lsh_attention_vjp", memory_budget=memory_budget)
    p_total, n = pb.batch * pb.heads_q, pb.n
    lead = pb.batch_shape + (pb.heads_q, n)
    do = check_cotangent(grad_out, "grad_out", lead + (pb.dv,),
                         check_finite=check_finite).reshape(p_total, n, pb.dv)
    dlse = check_cotangent(grad_lse, "grad_lse", lead, check_finite=check_finite)
    dlse = None if dlse is None else dlse.reshape(p_total, n)
    dq, dk, dv = np.zeros(qf.shape), np.zeros(kf.shape), np.zeros(vf.shape)
    for hs in _head_groups(p_total, bq.shape[0], n, chunk, pb.d, pb.dv, copies=8):
        qi, kw, s, self_logit = _whole_rounds(qf[hs], kf[hs], bq[:, hs], bk[:, hs],
                                              chunk=chunk, shared_qk=shared_qk,
                                              causal=causal, scale=scale)
        total, lse_sorted = _round_softmax(s)                # s now holds exp(s - max)
        lse_r = _unsort(lse_sorted, qi, n)
        if self_logit is not None:
            lse_r = np.concatenate([lse_r, self_logit[None]], axis=0)
        _, w = _combine_weights(lse_r)                        # (parts, P, N)
        r_count, p_count = s.shape[:2]
        rr = np.arange(r_count)[:, None, None, None]
        pidx = np.arange(p_count)[None, :, None, None]
        qpos, kpos = np.maximum(qi, 0), np.maximum(kw, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            row = np.where(total > 0, w[rr, pidx, qpos] / np.where(total > 0, total, 1), 0)
        s *= row[..., None]                  # P_ij / N_ij for each occurrence of a pair
        vg, kg, qg = vf[hs][pidx, kpos], kf[hs][pidx, kpos], qf[hs][pidx, qpos]
        dog = do[hs][pidx, qpos]                              # (R, P, nc, C, Dv)
        out = _unsort(np.matmul(s, vg), qi, n).sum(axis=0)    # (P, N, Dv)
        if self_logit is not None:
            out += w[-1][..., None] * vf[hs]
        delta = np.einsum("pnd,pnd->pn", do[hs], out)
        if dlse is not None:
            delta -= dlse[hs]
        dv_win = np.matmul(np.swapaxes(s, -1, -2), dog)       # (R, P, nc, 2C, Dv)
        ds = np.matmul(dog, np.swapaxes(vg, -1, -2))          # dP, then dS in place
        ds -= delta[pidx, qpos][..., None]
        ds *= s
        del s
        if shared_qk:                                         # SELF_LOGIT is a constant
            ds[qi[..., :, None] == kw[..., None, :]] = 0.0
        dq[hs] += scale * _unsort(np.matmul(ds, kg), qi, n).sum(axis=0)
        dk[hs] += scale * _keys_from_windows(np.matmul(np.swapaxes(ds, -1, -2), qg), kw,
                                             n).sum(axis=0)
        dv[hs] += _keys_from_windows(dv_win, kw, n).sum(axis=0)
        if self_logit is not None:                            # the own-position part
            w_self = w[-1]
            dv[hs] += w_self[..., None] * do[hs]
            ds_self = w_self * (np.einsum("pnd,pnd->pn", do[hs], vf[hs]) - delta)
            dq[hs] += scale * ds_self[..., None] * kf[hs]
            dk[hs] += scale * ds_self[..., None] * qf[hs]
    kv_shape = (pb.batch, pb.heads_kv, pb.heads_q // pb.heads_kv, n)
    grad_v = dv.reshape(kv_shape + (pb.dv,)).sum(axis=2)
    grads = {}
    if shared_qk:                        # keys are the normalized queries
        norm = np.sqrt(np.einsum("pnd,pnd->pn", qf, qf))[..., None]
        radial = np.einsum("pnd,pnd->pn", kf, dk)[..., None] * kf
        dq += np.divide(dk - radial, norm, out=np.zeros_like(dk), where=norm > 0)
        grads["q"] = pb.input_gradient(dq.reshape(pb.batch, pb.heads_q, n, pb.d),
                                       shapes["q"])
        if shapes["k"] is not None:
            grads["k"] = np.zeros(shapes["k"])
    else:
        grads["q"] = pb.input_gradient(dq.reshape(pb.batch, pb.heads_q, n, pb.d),
                                       shapes["q"])
        grads["k"] = pb.input_gradient(dk.reshape(kv_shape + (pb.d,)).sum(axis=2),
                                       shapes["k"])
    grads["v"] = pb.input_gradient(grad_v, shapes["v"])
    return grads


attach(lsh_attention, implied=lsh_attention_matrix, vjp=lsh_attention_vjp)
