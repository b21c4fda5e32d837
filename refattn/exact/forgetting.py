r"""Forgetting attention (Lin, Nikishin, He, Courville 2025, "Forgetting Transformer:
Softmax Attention with a Forget Gate"): causal softmax attention whose logits are biased
by the cumulative log forget gates between key and query,

.. math::

    O = \operatorname{softmax}(S + F) V, \qquad
    F_{ij} = \sum_{l=j+1}^{i'} \log f_l = c_{i'} - c_j, \qquad
    c_t = \sum_{l \le t} \log f_l, \qquad j \le i',

with one forget gate :math:`f_t \in (0, 1]` per token and query head (FoX computes
:math:`f_t = \sigma(w_f^\top x_t + b_f)`, outside attention, like the "Pro" block's output
gate, QK-norm and KV-shift). Query :math:`i` is at position :math:`i' = i + M - N`
(bottom-right, as decoding with a KV cache), the gates cover all :math:`M` positions.

The bias is computed blockwise from the prefix sums :math:`c` (never an ``N x M`` matrix
beyond a tile) as a score modifier of the exact engine, so the dense, tiled and sparse
(tile and gather) paths, masks, softcap, GQA and learned sinks all apply. The prefix sums
are compensated (a double-double running sum, Kahan/Knuth's TwoSum), so
:math:`c_{i'} - c_j` is accurate relative to itself, not to :math:`|c|`: at 1M tokens
plain float64 prefix sums lose about six digits of a nearby bias.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .. import masks
from .._core.checks import check_bool, check_choice
from .._core.problem import prepare_qkv, sum_to_shape
from ..boundary.arrays import to_float64
from ..masks.scores import ScoreMod
from ..registry import attach, register
from .dense import attention, attention_probs, attention_vjp
from .tiled import tiled_attention, tiled_attention_vjp

__all__ = ["forgetting_attention", "forgetting_attention_matrix",
           "forgetting_attention_vjp", "forget_gate_bias"]

METHODS = ("tiled", "dense", "sparse")


@njit(cache=True, nogil=True)
def _prefix_sums(x):  # pragma: no cover - compiled
    """Inclusive prefix sums of each row of ``x (R, M)`` as ``hi + lo`` (TwoSum)."""
    hi, lo = np.empty_like(x), np.empty_like(x)
    for r in range(x.shape[0]):
        s = e = 0.0
        for t in range(x.shape[1]):
            y = x[r, t]
            total = s + y
            z = total - s
            e += (s - (total - z)) + (y - z)
            s = total
            hi[r, t], lo[r, t] = s, e
    return hi, lo


class _ForgetBias(ScoreMod):
    """``s + c[i'] - c[j]`` with ``c`` the compensated prefix sums of ``log_f`` stored
    ``(B|1, H|1, M)``; its parameter gradient is that of ``log_f``."""

    additive = True

    def __init__(self, log_f, shape):
        self.shape = shape                              # as the caller gave it
        flat = log_f.reshape(-1, log_f.shape[-1])
        hi, lo = _prefix_sums(np.ascontiguousarray(flat))
        self.hi, self.lo = hi.reshape(log_f.shape), lo.reshape(log_f.shape)
        self.name = f"forget_gate_bias{tuple(shape)}"

    def _index(self, b, h):
        return (np.asarray(b) if self.hi.shape[0] > 1 else np.zeros((), np.int64),
                np.asarray(h) if self.hi.shape[1] > 1 else np.zeros((), np.int64))

    def _apply(self, score, b, h, q_idx, kv_idx, n, m):
        bi, hi = self._index(b, h)
        i = np.maximum(np.asarray(q_idx) + (m - n), 0)   # rows before the keys see none
        j = np.asarray(kv_idx)
        return score + ((self.hi[bi, hi, i] - self.hi[bi, hi, j])
                        + (self.lo[bi, hi, i] - self.lo[bi, hi, j]))

    def _parameter_gradient(self):
        def add(grad, dscore, b, heads, rows, cols, n, m):
            """``dc[i'] += Σ_j dS_ij``, ``dc[j] -= Σ_i dS_ij`` (``grad`` holds ``dc``)."""
            bi = b if grad.shape[0] > 1 else 0
            per_row, per_col = dscore.sum(axis=-1), dscore.sum(axis=-2)   # (G, r), (G, c)
            pos = rows + (m - n)
            seen = pos >= 0
            if grad.shape[1] > 1:
                grad[bi, heads[:, None], pos[None, seen]] += per_row[:, seen]
                grad[bi, heads[:, None], cols[None, :]] -= per_col
            else:
                grad[bi, 0, pos[seen]] += per_row[:, seen].sum(axis=0)
                grad[bi, 0, cols] -= per_col.sum(axis=0)

        def result(grad, batch_shape):
            """``d log_f_l = Σ_{t >= l} dc_t``, in the caller's shape of ``log_f``."""
            dlog = np.flip(np.cumsum(np.flip(grad, -1), axis=-1), -1)
            lead = tuple(batch_shape) if grad.shape[0] > 1 else (1,) * len(batch_shape)
            return sum_to_shape(dlog.reshape(lead + grad.shape[1:]), self.shape)
        return np.zeros(self.hi.shape), add, result


def forget_gate_bias(log_f, q_shape, k_shape, *, check_finite=True) -> ScoreMod:
    """The score modifier ``s + Σ_{l=j+1..i'} log f_l`` of :func:`forgetting_attention`
    for queries and keys of shapes ``q_shape (..., Hq, N, D)``, ``k_shape
    (..., Hkv, M, D)``: pass it as ``bias=`` to :func:`refattn.attention` (with
    ``causal=True``), :func:`refattn.tiled_attention` or :func:`refattn.sparse_attention`;
    their VJPs then return the gradient of ``log_f`` under ``"bias"``.

    ``log_f``: log forget gates, ``<= 0``, broadcastable to ``(..., Hq, M)``.

    >>> import numpy as np, refattn as ra
    >>> from refattn.exact.forgetting import forget_gate_bias
    >>> f = forget_gate_bias(np.log(0.5) * np.ones(3), (1, 3, 4), (1, 3, 4))
    >>> np.exp(f.materialize(3, 3)[0]).round(3)       # f^(i - j) below the diagonal
    array([[1.  , 2.  , 4.  ],
           [0.5 , 1.  , 2.  ],
           [0.25, 0.5 , 1.  ]])
    """
    q_shape, k_shape = tuple(q_shape), tuple(k_shape)
    batch = np.broadcast_shapes(q_shape[:-3], k_shape[:-3])
    return _forget_bias(log_f, batch, q_shape[-3], k_shape[-2], check_finite)


def _forget_bias(log_f, batch_shape, heads_q, m, check_finite):
    """Validated ``log_f`` as a :class:`_ForgetBias` for batch dims ``batch_shape``."""
    lf = to_float64(log_f, "log_f", check_finite=check_finite)
    full = tuple(batch_shape) + (heads_q, m)
    try:
        fits = np.broadcast_shapes(lf.shape, full) == full
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"log_f must broadcast to (..., Hq, M) = {full}: one log forget "
                         f"gate per query head and key position; got shape {lf.shape} "
                         f"(flash-linear-attention's g (B, T, HQ) is g.transpose(1, 2))")
    if check_finite and (lf > 0).any():
        raise ValueError(f"log_f must be <= 0 (the log of forget gates in (0, 1]); got "
                         f"max {lf.max():.3g} in log_f {lf.shape}: pass np.log(f), not "
                         f"the gates f themselves")
    nb = len(batch_shape)
    a = lf.reshape((1,) * (nb + 2 - lf.ndim) + lf.shape)
    lead = tuple(batch_shape) if any(s != 1 for s in a.shape[:nb]) else (1,) * nb
    a = np.broadcast_to(a, lead + (a.shape[nb], m))
    return _ForgetBias(np.ascontiguousarray(a).reshape((-1,) + a.shape[nb:]), lf.shape)


def _setup(q, k, v, log_f, mask, causal, method, check_finite):
    """Validate; returns ``(bias, method)``."""
    check_bool("causal", causal)
    check_bool("check_finite", check_finite)
    method = check_choice("method", method, METHODS)
    _, _, _, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    return _forget_bias(log_f, pb.batch_shape, pb.heads_q, pb.m, check_finite), method


def _sparse_masks(mask):
    """``sparse_attention``'s ``mask`` and ``causal``: the user's mask and the causal one
    (combined by the engine, which knows the batch shape of an array mask)."""
    return (masks.causal(), False) if mask is None else (mask, True)


@register(family="exact", exact=False, time="O(N·M·D)", state="O(M·D) KV cache",
          supports_causal=True, supports_mask=True, supports_gqa=True, position_free=False,
          example={"log_f": -0.3})
def forgetting_attention(q, k, v, *, log_f, mask=None, causal=True, scale=None,
                         softcap=None, sinks=None, return_lse=False, method="tiled",
                         block_q=None, block_k=None, workers=None, check_finite=True,
                         memory_budget=None):
    """Forgetting attention (module docstring for the equations; FoX, Lin et al. 2025).

    q : ``(..., Hq, N, D)``; k : ``(..., Hkv, M, D)``; v : ``(..., Hkv, M, Dv)`` (GQA).
    log_f : log forget gates ``log f_t <= 0``, broadcastable to ``(..., Hq, M)``: one per
        query head and key position, heads-first in either ``layout`` (as the lse;
        flash-linear-attention's ``g (B, T, HQ)`` is ``g.transpose(1, 2)``). A number
        gives ALiBi-like decay ``log f · (i' - j)``.
    mask : an extra mask (``causal() & mask``). Forgetting attention is causal by
        definition: ``causal=`` is accepted and changes nothing.
    scale, softcap, sinks, return_lse : as :func:`refattn.attention` (the bias is added
        after the softcap; ``lse`` includes it).
    method : ``"tiled"`` (default, :func:`refattn.tiled_attention`, O(block) memory),
        ``"dense"`` (:func:`refattn.attention`, checks ``memory_budget``) or ``"sparse"``
        (:func:`refattn.sparse_attention`: skips the tiles the causal mask and ``mask``
        empty, gathers scattered pairs); all agree to float64 rounding.
    block_q, block_k, workers : tile sizes and threads of the tiled and sparse paths.

    Returns float64 ``(..., Hq, N, Dv)``, and the lse ``(..., Hq, N)`` if ``return_lse``.

    >>> import numpy as np, refattn as ra
    >>> from refattn.exact import forgetting_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 6, 4))
    >>> log_f = np.log(rng.uniform(0.5, 1.0, (2, 6)))
    >>> out = forgetting_attention(q, k, v, log_f=log_f)
    >>> c = np.cumsum(log_f, -1)
    >>> bias = c[:, :, None] - c[:, None, :]               # Σ log f between j and i
    >>> bool(np.allclose(out, ra.attention(q, k, v, bias=bias, causal=True)))
    True
    """
    bias, method = _setup(q, k, v, log_f, mask, causal, method, check_finite)
    common = dict(scale=scale, softcap=softcap, sinks=sinks, bias=bias,
                  return_lse=return_lse, check_finite=check_finite)
    if method == "dense":
        return attention(q, k, v, mask=mask, causal=True, memory_budget=memory_budget,
                         **common)
    if method == "tiled":
        return tiled_attention(q, k, v, mask=mask, causal=True, block_q=block_q,
                               block_k=block_k, workers=workers, **common)
    from ..sparse.engine import sparse_attention
    mask, causal = _sparse_masks(mask)
    return sparse_attention(q, k, v, mask, causal=causal, block_q=block_q,
                            block_k=block_k, workers=workers, **common)


def forgetting_attention_matrix(q, k, *, log_f, mask=None, causal=True, scale=None,
                                softcap=None, sinks=None, method=None, block_q=None,
                                block_k=None, workers=None, check_finite=True,
                                memory_budget=None):
    """The attention matrix ``softmax(S + F)`` ``(..., Hq, N, M)`` of
    :func:`forgetting_attention` (rows sum to 1, or to ``1 - P_sink`` with sinks)."""
    bias, _ = _setup(q, k, None, log_f, mask, causal, "dense", check_finite)
    return attention_probs(q, k, mask=mask, causal=True, scale=scale, softcap=softcap,
                           sinks=sinks, bias=bias, check_finite=check_finite,
                           memory_budget=memory_budget)


def forgetting_attention_vjp(q, k, v, grad_out, *, log_f, grad_lse=None, mask=None,
                             causal=True, scale=None, softcap=None, sinks=None,
                             method="tiled", block_q=None, block_k=None, workers=None,
                             check_finite=True, memory_budget=None):
    r"""Gradients of :func:`forgetting_attention`: ``{"q", "k", "v", "log_f"}`` (and
    ``"sinks"``), each in its input's shape.

    The engine's softmax backward (:func:`refattn.exact.dense.attention_vjp`) gives
    ``dS``; the bias ``c_{i'} - c_j`` sends it to the prefix sums,
    ``dc_t = Σ_j dS_{tj} - Σ_i dS_{it}`` (rows at position ``t``, keys at ``t``), and
    ``c_t = Σ_{l<=t} log f_l`` gives :math:`d\log f_l = \sum_{t \ge l} dc_t`, summed over
    the dimensions ``log_f`` broadcasts. ``method`` picks the dense, tiled
    (FlashAttention-2's backward) or sparse (tiles) backward.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 5, 4))
    >>> g = ra.vjp("forgetting_attention", q, k, v, np.ones((1, 5, 4)), log_f=-0.5)
    >>> sorted(g), g["log_f"].shape
    (['k', 'log_f', 'q', 'v'], ())
    """
    bias, method = _setup(q, k, v, log_f, mask, causal, method, check_finite)
    common = dict(grad_lse=grad_lse, scale=scale, softcap=softcap, sinks=sinks, bias=bias,
                  check_finite=check_finite)
    if method == "dense":
        grads = attention_vjp(q, k, v, grad_out, mask=mask, causal=True,
                              memory_budget=memory_budget, **common)
    elif method == "tiled":
        grads = tiled_attention_vjp(q, k, v, grad_out, mask=mask, causal=True,
                                    block_q=block_q, block_k=block_k, workers=workers,
                                    **common)
    else:
        from ..sparse.engine import sparse_attention_vjp
        mask, causal = _sparse_masks(mask)
        grads = sparse_attention_vjp(q, k, v, grad_out, mask=mask, causal=causal,
                                     block_q=block_q, block_k=block_k, workers=workers,
                                     **common)
    grads["log_f"] = grads.pop("bias")
    return grads


attach(forgetting_attention, implied=forgetting_attention_matrix,
       vjp=forgetting_attention_vjp)
