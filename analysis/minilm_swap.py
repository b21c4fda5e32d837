r"""MiniLM-L6 with its attention replaced: the float64 NumPy forward of
:mod:`refattn.analysis.minilm` with the softmax attention of every layer handed to a
function of your choice.

``attend(q, k, v, *, layer, mask)`` gets the heads of one layer, ``q, k, v`` of shape
``(B, 12, N, 32)`` (queries *not* scaled; the model's scale is ``1/√32``, refattn's
default), ``layer`` (0-based) and ``mask``, the boolean key mask ``(B, 1, 1, N)`` that
:meth:`MiniLM.forward <refattn.analysis.minilm.MiniLM.forward>` passes to
:func:`refattn.attention` (all ``True`` without padding). It returns the ``(B, 12, N,
32)`` context. Everything else (embeddings, projections, LayerNorms, GELU
feed-forward) is computed exactly as in :meth:`MiniLM.forward`, operation for
operation, so that

.. math::
    \text{forward\_with}(\text{model}, \text{ids}, \text{exact\_attend}) =
    \text{model.forward}(\text{ids}).\text{hidden\_states}

bit for bit (the tests check it). :func:`mechanism_attend` adapts a registered
mechanism: ``refattn.mechanisms()[name].fn(q, k, v, **params)``, with ``params``
computed per sequence length (a budget of ``b`` keys per query means
``spec.budget(N, b)`` at each ``N``).

Sentence embeddings are the checkpoint's (sentence-transformers' ``all-MiniLM-L6-v2``):
the mean of the last hidden states over the real tokens, L2-normalized
(:func:`sentence_embeddings`).

>>> import numpy as np
>>> from refattn.analysis.minilm_swap import sentence_embeddings
>>> h = np.array([[[3.0, 4.0], [0.0, 0.0]]])          # (B, N, C), second token padding
>>> sentence_embeddings(h, np.array([[True, False]])).tolist()
[[0.6, 0.8]]
"""
from __future__ import annotations

import functools
import inspect

import numpy as np

import refattn as ra

from .minilm import gelu

__all__ = ["forward_with", "exact_attend", "mechanism_attend", "budget_params",
           "sentence_embeddings", "NotApplicable"]


class NotApplicable(ValueError):
    """A mechanism cannot replace the attention of this model (reason in the message)."""


def exact_attend(q, k, v, *, layer, mask):
    """The model's own attention: :func:`refattn.attention` with the key mask and scale
    ``1/√Dh``, the call :meth:`MiniLM.forward` makes (so swapping it in changes nothing,
    bit for bit)."""
    return ra.attention(q, k, v, mask=mask, scale=1.0 / np.sqrt(q.shape[-1]))


def mechanism_attend(name, params=None, *, budget=None, rng=None):
    """An ``attend`` function running the registered mechanism ``name``.

    ``params``: its keyword arguments (default ``spec.example``), or ``budget`` (keys per
    query) for :func:`budget_params` at each sequence length ``N``. ``rng``: seed of
    a randomized mechanism (each layer draws from ``[rng, layer]``). Raises
    :class:`NotApplicable` for a mechanism that needs a token grid (vision), has no budget
    when one is asked, or would need a key mask it does not take (padded batches).

    >>> import numpy as np
    >>> attend = mechanism_attend("sliding_window_attention", budget=4)
    >>> q = np.random.default_rng(0).standard_normal((1, 2, 16, 8))
    >>> attend(q, q, q, layer=0, mask=np.ones((1, 1, 1, 16), bool)).shape
    (1, 2, 16, 8)
    """
    specs = ra.mechanisms()
    if name not in specs:
        raise ValueError(f"unknown mechanism {name!r}; registered: {sorted(specs)}")
    spec = specs[name]
    reason = not_applicable_reason(spec, budget=budget is not None)
    if reason:
        raise NotApplicable(f"{name}: {reason}")
    if params is not None and budget is not None:
        raise ValueError(f"{name}: give params or budget, not both")

    def attend(q, k, v, *, layer, mask):
        n = q.shape[-2]
        kw = dict(budget_params(name, n, budget) if budget is not None
                  else (spec.example if params is None else params))
        if spec.randomized and "rng" not in kw:
            kw["rng"] = np.random.default_rng([0 if rng is None else int(rng), layer])
        if mask is not None and not np.all(mask):
            if not spec.supports_mask:
                raise NotApplicable(f"{name} takes no key mask, so it cannot run on a "
                                    f"padded batch; give sequences of one length")
            kw["mask"] = mask
        return spec.fn(q, k, v, **kw)

    attend.__name__ = f"{name}_attend"
    return attend


@functools.lru_cache(maxsize=4096)
def budget_params(name, n, budget) -> dict:
    """``spec.budget(n, budget)`` for registered mechanism ``name`` at length ``n``;
    where ``budget > n`` and the mechanism refuses those parameters (a rank, a landmark
    or a packed count cannot exceed ``N``), ``spec.budget(n, n)`` -- all the keys'
    worth. Decided by a call on small random inputs of length ``n``, so the choice is
    deterministic.

    >>> budget_params("linformer_attention", 8, 64), budget_params("topk_attention", 8, 64)
    ({'rank': 8}, {'topk': 64})
    """
    spec = ra.mechanisms()[name]
    params = dict(spec.budget(n, budget))
    if budget <= n:
        return params
    probe = np.random.default_rng(0).standard_normal((3, 1, 1, n, 4))
    try:
        spec.fn(*probe, **params, **({"rng": 0} if spec.randomized else {}))
    except ValueError:
        return dict(spec.budget(n, n))
    return params


def not_applicable_reason(spec, *, budget=True) -> str:
    """Why ``spec`` cannot replace a BERT encoder's self-attention at a budget ('' when
    it can): a vision mechanism (it needs a token grid), an exact mechanism (it *is* the
    exact row), or one without a registered ``budget`` (a recurrence or memory with no
    keys-per-query knob, or a fixed-cost feature map)."""
    if spec.family == "vision" or "grid" in inspect.signature(spec.fn).parameters:
        return "needs a 2-D token grid (vision); a text encoder has a sequence"
    if spec.exact:
        return "exact: it computes the exact row"
    if budget and spec.budget is None:
        return ("registers no budget (no keys-per-query knob: a recurrence, a memory or a "
                "fixed feature map)")
    return ""


def forward_with(model, input_ids, attend, attention_mask=None, *, all_layers=False):
    """Run ``model`` (a loaded :class:`~refattn.analysis.minilm.MiniLM`) on ``input_ids``
    ``(B, N)`` with ``attend`` computing every layer's attention.

    Returns the last hidden state ``(B, N, 384)``, or with ``all_layers`` the
    ``(L + 1, B, N, 384)`` stack of :attr:`MiniLMOutput.hidden_states`. Raises
    ``ValueError`` for ids or masks of the wrong shape (as :meth:`MiniLM.forward`) and
    when ``attend`` returns a context of the wrong shape.
    """
    c = model.config
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"input_ids must be integers of shape (B, N), got {ids.dtype} "
                        f"{ids.shape}")
    bsz, n = ids.shape
    if not 1 <= n <= c.max_position_embeddings or ids.min() < 0 \
            or ids.max() >= c.vocab_size:
        raise ValueError(f"input_ids {ids.shape} must have 1..{c.max_position_embeddings} "
                         f"positions and values in [0, {c.vocab_size})")
    mask = (np.ones(ids.shape, bool) if attention_mask is None
            else np.asarray(attention_mask, dtype=bool))
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}; expected {ids.shape}")
    w = model.weights
    types = np.zeros(ids.shape, dtype=np.int64)
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][:n][None]
         + w["embeddings.token_type_embeddings.weight"][types])
    x = model._ln(x, "embeddings.LayerNorm")
    L, H, Dh = c.num_hidden_layers, c.num_attention_heads, c.head_dim
    hidden = np.empty((L + 1, bsz, n, c.hidden_size)) if all_layers else None
    if all_layers:
        hidden[0] = x
    keep = mask[:, None, None, :]

    def heads(t):
        return np.ascontiguousarray(t.reshape(bsz, n, H, Dh).transpose(0, 2, 1, 3))

    for layer in range(L):
        p = f"encoder.layer.{layer}."
        q = heads(model._dense(x, p + "attention.self.query"))
        k = heads(model._dense(x, p + "attention.self.key"))
        v = heads(model._dense(x, p + "attention.self.value"))
        ctx = np.asarray(attend(q, k, v, layer=layer, mask=keep))
        if ctx.shape != q.shape:
            raise ValueError(f"attend returned shape {ctx.shape} at layer {layer}; "
                             f"expected {q.shape}")
        ctx = ctx.transpose(0, 2, 1, 3).reshape(bsz, n, c.hidden_size)
        a = model._ln(x + model._dense(ctx, p + "attention.output.dense"),
                      p + "attention.output.LayerNorm")
        f = model._dense(gelu(model._dense(a, p + "intermediate.dense")),
                         p + "output.dense")
        x = model._ln(a + f, p + "output.LayerNorm")
        if all_layers:
            hidden[layer + 1] = x
    return hidden if all_layers else x


def sentence_embeddings(hidden, attention_mask=None):
    """Mean of ``hidden (B, N, C)`` over the real tokens (``attention_mask (B, N)``,
    default all), L2-normalized: ``(B, C)`` unit vectors, as sentence-transformers
    pools ``all-MiniLM-L6-v2``."""
    hidden = np.asarray(hidden, dtype=np.float64)
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be (B, N, C), got shape {hidden.shape}")
    m = (np.ones(hidden.shape[:2]) if attention_mask is None
         else np.asarray(attention_mask, dtype=np.float64))
    if m.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask {m.shape} does not match hidden "
                         f"{hidden.shape[:2]}")
    pooled = (hidden * m[..., None]).sum(1) / np.maximum(m.sum(1), 1e-9)[:, None]
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
