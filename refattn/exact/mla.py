r"""Multi-head latent attention (MLA, DeepSeek-V2): exact attention whose keys and values
are expanded, per head, from one small latent vector per token.

DeepSeek-V2 (DeepSeek-AI 2024, arXiv 2405.04434, §2.1) caches per token ``j`` only the
latent :math:`c_j = W^{DKV} h_j` (width ``d_c``, 512) and one decoupled RoPE key
:math:`k^R_j = \operatorname{RoPE}(W^{KR} h_j)` (width ``d_R``, 64) shared by all heads.
Head ``i`` sees

.. math::

    k_{j,i} = [W^{UK}_i c_j \,;\, k^R_j], \quad v_{j,i} = W^{UV}_i c_j, \quad
    q_{t,i} = [q^C_{t,i} \,;\, q^R_{t,i}], \quad
    o_{t,i} = \sum_j \operatorname{softmax}_j\big(\tfrac{q_{t,i} \cdot k_{j,i}}
    {\sqrt{d_h + d_R}}\big)\, v_{j,i}

(:func:`mla_attention`, the naive form). Since :math:`q^C \cdot W^{UK}_i c =
(W^{UK\top}_i q^C) \cdot c`, the query can be absorbed into the latent:

.. math::

    \tilde q_{t,i} = W^{UK\top}_i q^C_{t,i}, \quad
    o_{t,i} = W^{UV}_i \sum_j \operatorname{softmax}_j\big(
    \text{scale}\,(\tilde q_{t,i} \cdot c_j + q^R_{t,i} \cdot k^R_j)\big)\, c_j

(:func:`mla_attention_absorbed`): multi-query attention over the latent cache
``[c; k^R]`` (``d_c + d_R = 576`` wide) with ``c`` (512 wide) as the values, the form
FlashMLA and FlashInfer's MLA decode kernels compute, never expanding keys or values. The
scale stays ``1/sqrt(d_h + d_R)`` (``1/sqrt(192)`` in DeepSeek-V2/V3), not
``1/sqrt(576)``. :func:`mla_init_state` / :func:`mla_step` decode with a cache of
``(d_c + d_R)`` numbers per token, whatever the number of heads.

These are attention oracles, not layers: the projections ``W^{DKV}``, ``W^{KR}``,
``W^Q``, the latent's RMSNorm, RoPE and ``W^O`` are outside them. Shapes, and their names
in HuggingFace's ``DeepseekV2Attention`` / DeepSeek-V3's inference ``MLA``:

* ``q_nope (..., H, N, d_nope)``: ``q_nope`` (:math:`q^C`, ``d_nope = d_h``);
* ``q_rope (..., H, N, d_rope)``: ``q_pe`` after RoPE;
* ``c_kv (..., M, d_c)``: ``kv_a_layernorm(compressed_kv)``, the normalized latent the
  cache holds (``kv_cache``);
* ``k_rope (..., M, d_rope)``: ``k_pe`` after RoPE, one for all heads (``pe_cache``);
* ``w_uk (H, d_nope, d_c)``, ``w_uv (H, d_v, d_c)``: the paper's :math:`W^{UK}_i`,
  :math:`W^{UV}_i`, i.e. ``kv_b_proj.weight.view(H, d_nope + d_v, d_c)`` split on axis 1
  (DeepSeek-V3's ``wkv_b[:, :d_nope]`` and ``wkv_b[:, -d_v:]``);
* output ``(..., H, N, d_v)``, before ``o_proj``.

Leading batch dimensions broadcast; ``layout="bnhd"`` takes ``q_nope``, ``q_rope`` (and
gives the output) as ``(..., N, H, d)``, FlashMLA's query layout. MLA is registered with
its own inputs (``refattn.mechanisms(all_inputs=True)``, ``refattn list``): the
registry's q, k, v property tests cannot call it, since its keys and values exist only
through its weights; its own tests check each form against the others, HuggingFace's
``DeepseekV2Attention`` and torch autograd.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .._core.checks import check_choice, check_cotangent, check_int, resolve_scale
from .._core.problem import sum_to_shape
from ..boundary.arrays import to_float64
from ..boundary.calls import LAYOUTS, call_vjp
from ..registry import attach, register
from ..streaming import State, Window
from .dense import attention, attention_vjp

__all__ = ["mla_attention", "mla_attention_absorbed", "mla_attention_vjp",
           "MLACacheState", "mla_init_state", "mla_cache_from", "mla_step",
           "mla_cache_nbytes"]


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """A validated MLA call, float64 and heads-first."""

    q_nope: np.ndarray
    q_rope: np.ndarray
    c_kv: np.ndarray
    k_rope: np.ndarray
    w_uk: np.ndarray
    w_uv: np.ndarray | None
    bnhd: bool
    batch_k: tuple        # broadcast batch dims of c_kv and k_rope
    out_shape: tuple      # the output's shape, in the caller's layout

    @property
    def scale_dim(self) -> int:
        """``d_nope + d_rope``: the default scale is ``1/sqrt`` of it."""
        return self.q_nope.shape[-1] + self.q_rope.shape[-1]

    def latents(self):
        """``c_kv`` and ``k_rope`` broadcast to the keys' batch dims."""
        m = self.c_kv.shape[-2]
        return (np.broadcast_to(self.c_kv, self.batch_k + (m, self.c_kv.shape[-1])),
                np.broadcast_to(self.k_rope, self.batch_k + (m, self.k_rope.shape[-1])))

    def in_layout(self, x):
        """Heads-first ``x`` in the caller's layout, or the caller's ``x`` heads-first
        (the swap is its own inverse)."""
        return np.swapaxes(x, -3, -2) if self.bnhd else x


def _prepare(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, layout, check_finite) -> _Inputs:
    """Convert and check one call's arrays; errors name the argument and the shapes."""
    bnhd = check_choice("layout", layout, LAYOUTS, none="bhnd") == "bnhd"
    qn, qr, c, r, wk = (to_float64(x, name, check_finite=check_finite) for x, name in (
        (q_nope, "q_nope"), (q_rope, "q_rope"), (c_kv, "c_kv"), (k_rope, "k_rope"),
        (w_uk, "w_uk")))
    wv = None if w_uv is None else to_float64(w_uv, "w_uv", check_finite=check_finite)
    for x, name in ((qn, "q_nope"), (qr, "q_rope")):
        if x.ndim < 3:
            form = "(..., N, H, d) (layout='bnhd')" if bnhd else "(..., H, N, d)"
            raise ValueError(f"{name} must be {form}, got shape {x.shape}")
    if qr.shape[:-1] != qn.shape[:-1]:
        raise ValueError(f"q_nope and q_rope must share every dimension but the last; got "
                         f"q_nope {qn.shape}, q_rope {qr.shape}")
    given = qn.shape
    if bnhd:
        qn, qr = np.swapaxes(qn, -3, -2), np.swapaxes(qr, -3, -2)
    if c.ndim < 2:
        raise ValueError(f"c_kv must be (..., M, d_c), got shape {c.shape}")
    if r.ndim < 2 or r.shape[-2:] != (c.shape[-2], qr.shape[-1]):
        raise ValueError(f"k_rope must be (..., M, d_rope) with M = {c.shape[-2]} of c_kv "
                         f"{c.shape} and d_rope = {qr.shape[-1]} of q_rope; got k_rope "
                         f"{r.shape}")
    try:
        batch_k = np.broadcast_shapes(c.shape[:-2], r.shape[:-2])
        batch = np.broadcast_shapes(qn.shape[:-3], batch_k)
    except ValueError:
        raise ValueError(f"the batch dimensions of q_nope {given}, c_kv {c.shape} and "
                         f"k_rope {r.shape} do not broadcast") from None
    h, n, d_nope = qn.shape[-3:]
    d_c = c.shape[-1]
    if wk.shape != (h, d_nope, d_c):
        raise ValueError(f"w_uk must have shape (H, d_nope, d_c) = {(h, d_nope, d_c)} (H, "
                         f"d_nope of q_nope {given}; d_c of c_kv {c.shape}); got w_uk "
                         f"{wk.shape}")
    if wv is not None and (wv.ndim != 3 or wv.shape[0] != h or wv.shape[2] != d_c):
        raise ValueError(f"w_uv must have shape (H, d_v, d_c) with H = {h} of q_nope "
                         f"{given} and d_c = {d_c} of c_kv {c.shape}; got w_uv {wv.shape}")
    dv = d_c if wv is None else wv.shape[1]
    out_shape = tuple(batch) + ((n, h) if bnhd else (h, n)) + (dv,)
    return _Inputs(qn, qr, c, r, wk, wv, bnhd, tuple(batch_k), out_shape)


def _expanded(p: _Inputs):
    """The naive form's per-head ``q (*b, H, N, d_nope + d_rope)``,
    ``k (*bk, H, M, d_nope + d_rope)`` and ``v (*bk, H, M, d_v)``."""
    c, r = p.latents()
    h, m = p.w_uk.shape[0], c.shape[-2]
    k_nope = c[..., None, :, :] @ np.swapaxes(p.w_uk, -1, -2)      # W^UK_i c_j
    k_rope = np.broadcast_to(r[..., None, :, :], p.batch_k + (h, m, r.shape[-1]))
    v = c[..., None, :, :] @ np.swapaxes(p.w_uv, -1, -2)           # W^UV_i c_j
    return (np.concatenate([p.q_nope, p.q_rope], axis=-1),
            np.concatenate([k_nope, k_rope], axis=-1), v)


_INPUTS = ("q_nope", "q_rope", "c_kv", "k_rope", "w_uk", "w_uv")


@register(family="exact", exact=True, time="O(N·M·H·(d_nope + d_rope + d_v))",
          state="O(M·(d_c + d_rope)) latent cache", inputs=_INPUTS, supports_causal=True,
          supports_mask=True, supports_gqa=False)
def mla_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, *, mask=None, causal=False,
                  scale=None, bias=None, softcap=None, return_lse=False, layout="bhnd",
                  check_finite=True, memory_budget=None):
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434, §2.1), naive form: each
    head's keys ``[W^UK_i c_j; k^R_j]`` and values ``W^UV_i c_j`` are expanded from the
    latent, then :func:`refattn.attention` runs on the ``H`` heads.

    Parameters
    ----------
    q_nope : ``(..., H, N, d_nope)``, the queries' content part :math:`q^C`.
    q_rope : ``(..., H, N, d_rope)``, the queries' RoPE part (already rotated).
    c_kv : ``(..., M, d_c)``, the latent per key token (after the latent's RMSNorm).
    k_rope : ``(..., M, d_rope)``, the decoupled RoPE key (rotated), shared by all heads.
    w_uk : ``(H, d_nope, d_c)``, :math:`W^{UK}_i` (``k^C_{j,i} = w_uk[i] @ c_j``).
    w_uv : ``(H, d_v, d_c)``, :math:`W^{UV}_i` (``v_{j,i} = w_uv[i] @ c_j``).
    mask, causal, bias, softcap : as :func:`refattn.attention` (``causal`` bottom-right
        when ``N != M``, or ``"top_left"``), over ``(..., H, N, M)``.
    scale : default ``1/sqrt(d_nope + d_rope)``.
    return_lse : also return the log-sum-exp ``(..., H, N)``.
    layout : ``"bhnd"`` (default) or ``"bnhd"``: ``q_nope``, ``q_rope`` and the output
        as ``(..., N, H, d)``; the lse stays ``(..., H, N)``.

    Returns float64 ``(..., H, N, d_v)`` (and the lse). Gradients: :func:`mla_attention_vjp`
    (``refattn.vjp(mla_attention, q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, grad_out)``).

    >>> import numpy as np, refattn as ra
    >>> from refattn.exact import mla_attention
    >>> rng = np.random.default_rng(0)
    >>> qn, qr = rng.standard_normal((2, 4, 5, 8)), rng.standard_normal((2, 4, 5, 2))
    >>> c, kr = rng.standard_normal((2, 6, 16)), rng.standard_normal((2, 6, 2))
    >>> w_uk, w_uv = rng.standard_normal((4, 8, 16)), rng.standard_normal((4, 3, 16))
    >>> out = mla_attention(qn, qr, c, kr, w_uk, w_uv, causal=True)
    >>> out.shape                                   # (batch, heads, N, d_v)
    (2, 4, 5, 3)
    >>> k = np.concatenate([np.einsum("bmc,hdc->bhmd", c, w_uk),
    ...                     np.broadcast_to(kr[:, None], (2, 4, 6, 2))], -1)
    >>> v = np.einsum("bmc,hvc->bhmv", c, w_uv)
    >>> bool(np.allclose(out, ra.attention(np.concatenate([qn, qr], -1), k, v,
    ...                                    causal=True)))
    True
    """
    p = _prepare(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, layout, check_finite)
    if p.w_uv is None:
        raise TypeError("mla_attention: w_uv must be an array (H, d_v, d_c); the latent "
                        "output without W^UV is mla_attention_absorbed(..., w_uv=None)")
    q, k, v = _expanded(p)
    res = attention(q, k, v, mask=mask, causal=causal, scale=resolve_scale(
        scale, p.scale_dim), bias=bias, softcap=softcap, return_lse=return_lse,
        check_finite=check_finite, memory_budget=memory_budget)
    if return_lse:
        return p.in_layout(res[0]), res[1]
    return p.in_layout(res)


def mla_attention_absorbed(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, *, mask=None,
                           causal=False, scale=None, bias=None, softcap=None,
                           return_lse=False, layout="bhnd", check_finite=True,
                           memory_budget=None):
    r"""Multi-head latent attention, absorbed (decoding) form: the same result as
    :func:`mla_attention` without ever forming per-head keys or values.

    .. math::

        \tilde q_{t,i} = W^{UK\top}_i q^C_{t,i}, \quad
        O^{lat}_i = \operatorname{softmax}\big(\text{scale}\,
        [\tilde Q_i; Q^R_i][C; K^R]^\top\big)\, C, \quad O_i = O^{lat}_i W^{UV\top}_i

    The middle step is multi-query attention (one KV head for all ``H`` query heads) with
    query ``[q̃; q^R]`` and keys ``[c; k^R]`` of width ``d_c + d_rope`` (576 in
    DeepSeek-V2/V3) and values ``c`` (``d_c``, 512): what FlashMLA's
    ``flash_mla_with_kvcache(q, kv_cache, ..., head_dim_v=512, softmax_scale=...)`` and
    FlashInfer's MLA decode compute. ``w_uv=None`` returns that latent output
    ``O^lat (..., H, N, d_c)`` itself, the oracle for such a kernel. Arguments as
    :func:`mla_attention`; the scale defaults to ``1/sqrt(d_nope + d_rope)``, not to
    ``1/sqrt(d_c + d_rope)``.

    >>> import numpy as np
    >>> from refattn.exact import mla_attention, mla_attention_absorbed
    >>> rng = np.random.default_rng(0)
    >>> qn, qr = rng.standard_normal((4, 3, 8)), rng.standard_normal((4, 3, 2))
    >>> c, kr = rng.standard_normal((7, 16)), rng.standard_normal((7, 2))
    >>> w_uk, w_uv = rng.standard_normal((4, 8, 16)), rng.standard_normal((4, 3, 16))
    >>> out = mla_attention_absorbed(qn, qr, c, kr, w_uk, w_uv, causal=True)
    >>> bool(np.allclose(out, mla_attention(qn, qr, c, kr, w_uk, w_uv, causal=True)))
    True
    >>> mla_attention_absorbed(qn, qr, c, kr, w_uk, None).shape     # latent output
    (4, 3, 16)
    """
    p = _prepare(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, layout, check_finite)
    c, r = p.latents()
    q_abs = np.concatenate([p.q_nope @ p.w_uk, p.q_rope], axis=-1)   # [q̃; q^R]
    cache = np.concatenate([c, r], axis=-1)[..., None, :, :]         # (*bk, 1, M, d_c+d_R)
    o_lat, lse = attention(q_abs, cache, c[..., None, :, :], mask=mask, causal=causal,
                           scale=resolve_scale(scale, p.scale_dim), bias=bias,
                           softcap=softcap, return_lse=True, check_finite=check_finite,
                           memory_budget=memory_budget)
    out = o_lat if p.w_uv is None else o_lat @ np.swapaxes(p.w_uv, -1, -2)
    return (p.in_layout(out), lse) if return_lse else p.in_layout(out)


def mla_attention_vjp(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, grad_out, *, grad_lse=None,
                      mask=None, causal=False, scale=None, bias=None, softcap=None,
                      layout="bhnd", check_finite=True, memory_budget=None):
    r"""Gradients of :func:`mla_attention`: ``{"q_nope", "q_rope", "c_kv", "k_rope",
    "w_uk", "w_uv"}`` (and ``"bias"`` as :func:`refattn.attention_vjp` gives it), each in
    its input's shape (broadcast batch dimensions summed; ``q_*`` in ``layout``).

    :func:`refattn.attention_vjp` gives ``dQ``, ``dK``, ``dV`` of the expanded heads;
    the chain rule through :math:`k_{j,i} = [W^{UK}_i c_j; k^R_j]`,
    :math:`v_{j,i} = W^{UV}_i c_j` then gives

    .. math::

        dc_j = \textstyle\sum_i W^{UK\top}_i dk^C_{j,i} + W^{UV\top}_i dv_{j,i}, \quad
        dk^R_j = \textstyle\sum_i dk^R_{j,i}, \\
        dW^{UK}_i = \textstyle\sum_j dk^C_{j,i} c_j^\top, \quad
        dW^{UV}_i = \textstyle\sum_j dv_{j,i} c_j^\top

    (summed over the batch for the weights); ``dq^C``, ``dq^R`` are the two parts of
    ``dQ``. ``grad_out (..., H, N, d_v)`` (in ``layout``), ``grad_lse (..., H, N)``.

    >>> import numpy as np, refattn as ra
    >>> from refattn.exact import mla_attention
    >>> rng = np.random.default_rng(0)
    >>> x = [rng.standard_normal(s) for s in ((2, 3, 4), (2, 3, 2), (5, 6), (5, 2),
    ...                                        (2, 4, 6), (2, 3, 6))]
    >>> g = ra.vjp(mla_attention, *x, np.ones((2, 3, 3)), causal=True)
    >>> [g[n].shape for n in ("q_nope", "c_kv", "w_uk")]
    [(2, 3, 4), (5, 6), (2, 4, 6)]
    """
    p = _prepare(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, layout, check_finite)
    if p.w_uv is None:
        raise TypeError("mla_attention_vjp: w_uv must be an array (H, d_v, d_c)")
    do = p.in_layout(check_cotangent(grad_out, "grad_out", p.out_shape,
                                     check_finite=check_finite))
    q, k, v = _expanded(p)
    kwargs = dict(grad_lse=grad_lse, mask=mask, causal=causal, bias=bias, softcap=softcap,
                  scale=resolve_scale(scale, p.scale_dim), check_finite=check_finite,
                  memory_budget=memory_budget)
    grads = call_vjp(attention, attention_vjp, (q, k, v, do), kwargs)
    d_nope = p.q_nope.shape[-1]
    dk_nope, dk_rope, dv = grads["k"][..., :d_nope], grads["k"][..., d_nope:], grads["v"]
    c, _ = p.latents()
    heads = len(p.batch_k)                                     # the head axis of dk, dv
    dc = (dk_nope @ p.w_uk).sum(axis=heads) + (dv @ p.w_uv).sum(axis=heads)
    lead = tuple(range(heads))
    out = {"q_nope": p.in_layout(grads["q"][..., :d_nope]),
           "q_rope": p.in_layout(grads["q"][..., d_nope:]),
           "c_kv": sum_to_shape(dc, p.c_kv.shape),
           "k_rope": sum_to_shape(dk_rope.sum(axis=heads), p.k_rope.shape),
           "w_uk": (np.swapaxes(dk_nope, -1, -2) @ c[..., None, :, :]).sum(axis=lead),
           "w_uv": (np.swapaxes(dv, -1, -2) @ c[..., None, :, :]).sum(axis=lead)}
    if "bias" in grads:
        out["bias"] = grads["bias"]
    return out


mla_attention.vjp = mla_attention_vjp
attach(mla_attention, vjp=mla_attention_vjp)


# ------------------------------------------------------------------ decoding
def mla_cache_nbytes(n: int, *, batch_shape=(), d_latent: int = 512,
                     d_rope: int = 64) -> int:
    """Bytes of a float64 MLA cache after ``n`` tokens:
    ``prod(batch)·n·(d_latent + d_rope)·8``, independent of the number of heads
    (DeepSeek-V2's 512 + 64 by default).

    >>> mla_cache_nbytes(1000)                      # 1000 tokens x 576 numbers x 8 bytes
    4608000
    """
    n = check_int("n", n, minimum=0)
    batch = int(np.prod([check_int("batch_shape entries", b, minimum=1)
                         for b in batch_shape], dtype=np.int64))
    return batch * n * (check_int("d_latent", d_latent, minimum=1)
                        + check_int("d_rope", d_rope, minimum=0)) * 8


@dataclasses.dataclass(frozen=True)
class MLACacheState(State):
    """MLA's KV cache: the latents ``c_kv (*b, t, d_c)`` and RoPE keys
    ``k_rope (*b, t, d_rope)`` of the ``t`` tokens seen, held in a
    :class:`refattn.streaming.Window` (amortized O(1) appends, no state ever changes),
    and the layer's up-projections ``w_uk (H, d_nope, d_c)``, ``w_uv (H, d_v, d_c)``
    (parameters, not state: ``nbytes`` counts the cached tokens only)."""

    cache: Window
    w_uk: np.ndarray
    w_uv: np.ndarray
    batch_shape: tuple
    scale: float

    @property
    def c_kv(self) -> np.ndarray:
        return self.cache.keys_view

    @property
    def k_rope(self) -> np.ndarray:
        return self.cache.values_view

    @property
    def nbytes(self) -> int:
        return self.c_kv.nbytes + self.k_rope.nbytes

    def nbytes_after(self, n: int) -> int:
        """Bytes held after ``n`` tokens (:func:`mla_cache_nbytes`)."""
        return mla_cache_nbytes(n, batch_shape=self.batch_shape,
                                d_latent=self.c_kv.shape[-1], d_rope=self.k_rope.shape[-1])


def _weights(w_uk, w_uv):
    wk, wv = to_float64(w_uk, "w_uk"), to_float64(w_uv, "w_uv")
    if wk.ndim != 3 or wv.ndim != 3 or wk.shape[::2] != wv.shape[::2]:
        raise ValueError(f"w_uk and w_uv must have shapes (H, d_nope, d_c) and "
                         f"(H, d_v, d_c); got w_uk {wk.shape}, w_uv {wv.shape}")
    return wk, wv


def mla_init_state(*, w_uk, w_uv, d_rope, batch_shape=(), scale=None) -> MLACacheState:
    """An empty MLA cache for causal decoding with :func:`mla_step`; ``scale`` defaults to
    ``1/sqrt(d_nope + d_rope)``.

    >>> import numpy as np
    >>> from refattn.exact import mla_attention
    >>> rng = np.random.default_rng(0)
    >>> qn, qr = rng.standard_normal((4, 5, 8)), rng.standard_normal((4, 5, 2))
    >>> c, kr = rng.standard_normal((5, 16)), rng.standard_normal((5, 2))
    >>> w_uk, w_uv = rng.standard_normal((4, 8, 16)), rng.standard_normal((4, 3, 16))
    >>> s, outs = mla_init_state(w_uk=w_uk, w_uv=w_uv, d_rope=2), []
    >>> for t in range(5):
    ...     o, s = mla_step(s, qn[:, t], qr[:, t], c[t], kr[t]); outs.append(o)
    >>> bool(np.allclose(np.stack(outs, 1), mla_attention(qn, qr, c, kr, w_uk, w_uv,
    ...                                                   causal=True)))
    True
    >>> s.nbytes, s.nbytes_after(5)                 # 5 tokens x (16 + 2) x 8 bytes
    (720, 720)
    """
    wk, wv = _weights(w_uk, w_uv)
    d_rope = check_int("d_rope", d_rope, minimum=0)
    b = tuple(check_int("batch_shape entries", x, minimum=1) for x in batch_shape)
    return MLACacheState(position=0, cache=Window.empty(b + (wk.shape[2],), b + (d_rope,)),
                         w_uk=wk, w_uv=wv, batch_shape=b,
                         scale=resolve_scale(scale, wk.shape[1] + d_rope))


def mla_cache_from(c_kv, k_rope, *, w_uk, w_uv, scale=None) -> MLACacheState:
    """An MLA cache already holding ``c_kv (*b, t, d_c)``, ``k_rope (*b, t, d_rope)``
    (after a prefill), ready for :func:`mla_step`.

    >>> import numpy as np
    >>> from refattn.exact import mla_attention
    >>> rng = np.random.default_rng(1)
    >>> qn, qr = rng.standard_normal((2, 1, 4)), rng.standard_normal((2, 1, 2))
    >>> c, kr = rng.standard_normal((6, 8)), rng.standard_normal((6, 2))
    >>> w_uk, w_uv = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 4, 8))
    >>> s = mla_cache_from(c[:5], kr[:5], w_uk=w_uk, w_uv=w_uv)
    >>> o, s = mla_step(s, qn[:, 0], qr[:, 0], c[5], kr[5])
    >>> bool(np.allclose(o, mla_attention(qn, qr, c, kr, w_uk, w_uv)[:, 0])), s.position
    (True, 6)
    """
    wk, wv = _weights(w_uk, w_uv)
    c, r = to_float64(c_kv, "c_kv"), to_float64(k_rope, "k_rope")
    if c.ndim < 2 or r.shape[:-1] != c.shape[:-1] or c.shape[-1] != wk.shape[2]:
        raise ValueError(f"c_kv and k_rope must have shapes (*batch, t, d_c) and "
                         f"(*batch, t, d_rope) with d_c = {wk.shape[2]} of w_uk "
                         f"{wk.shape}; got c_kv {c.shape}, k_rope {r.shape}")
    t = c.shape[-2]
    return MLACacheState(position=t, cache=Window(c.copy(), r.copy(), 0, t, [t]), w_uk=wk,
                         w_uv=wv, batch_shape=c.shape[:-2],
                         scale=resolve_scale(scale, wk.shape[1] + r.shape[-1]))


def _token(x, name, expected, what):
    arr = to_float64(x, name)
    if arr.shape != expected:
        raise ValueError(f"{name} must have shape {expected} {what} to match the state, "
                         f"got {arr.shape}")
    return arr


def mla_step(state: MLACacheState, q_nope_t, q_rope_t, c_kv_t, k_rope_t):
    """Append token ``t``'s ``c_kv_t (*b, d_c)`` and ``k_rope_t (*b, d_rope)``; attend
    ``q_nope_t (*b, H, d_nope)``, ``q_rope_t (*b, H, d_rope)`` to every cached token in
    the absorbed form (``q̃ = W^UKᵀ q^C``, logits ``q̃·c + q^R·k^R``, output
    ``W^UV (P c)``). Returns ``(out_t (*b, H, d_v), new_state)``; the old state is
    unchanged. Example: see :func:`mla_init_state`."""
    b, (h, d_nope, d_c) = state.batch_shape, state.w_uk.shape
    d_rope = state.k_rope.shape[-1]
    qn = _token(q_nope_t, "q_nope_t", b + (h, d_nope), "(batch dims, H, d_nope)")
    qr = _token(q_rope_t, "q_rope_t", b + (h, d_rope), "(batch dims, H, d_rope)")
    c_t = _token(c_kv_t, "c_kv_t", b + (d_c,), "(batch dims, d_c)")
    r_t = _token(k_rope_t, "k_rope_t", b + (d_rope,), "(batch dims, d_rope)")
    new = state.replace(position=state.position + 1,
                        cache=state.cache.append(c_t, r_t, keep=len(state.cache)))
    c, r = new.c_kv, new.k_rope                         # (*b, t, d_c), (*b, t, d_rope)
    q_lat = (qn[..., None, :] @ state.w_uk)[..., 0, :]            # (*b, H, d_c)
    logits = (q_lat @ np.swapaxes(c, -1, -2) + qr @ np.swapaxes(r, -1, -2)) * state.scale
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)                                      # (*b, H, t)
    o_lat = (weights @ c) / weights.sum(axis=-1, keepdims=True)   # (*b, H, d_c)
    out = (state.w_uv @ o_lat[..., None])[..., 0]                 # (*b, H, d_v)
    return out, new


attach(mla_attention, init_state=mla_init_state, step=mla_step)
