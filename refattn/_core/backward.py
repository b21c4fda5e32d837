"""What the softmax references' backward passes share: validating the inputs and the
cotangents exactly as the forward does, and handing the gradients back in the shapes the
caller passed (broadcast batch dimensions summed, GQA heads summed per KV head).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..boundary.arrays import to_float64
from .checks import check_cotangent
from .logits import Logits, make_logits
from .problem import Problem, prepare_qkv

__all__ = ["SoftmaxBackward", "softmax_backward", "head_summed_product",
           "softmax_block_vjp", "sink_gradient"]


@dataclass
class SoftmaxBackward:
    """A validated backward call: flat ``q, k, v`` and cotangents ``do (B, Hq, N, Dv)``,
    ``dlse (B, Hq, N)`` (None: zero), the logit pipeline, the score modifier's parameter
    accumulator (``None`` when it has no parameters), and the caller's input shapes."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    do: np.ndarray
    dlse: np.ndarray | None
    pb: Problem
    logits: Logits
    parameter: tuple | None
    shapes: tuple

    def saved(self, out, lse):
        """The forward's ``out`` and ``lse`` given with a backward call, checked and flat
        (``None`` when neither is given: the backward recomputes them)."""
        if (out is None) != (lse is None):
            raise ValueError("give both out and lse (the forward's results with "
                             "return_lse=True), or neither")
        if out is None:
            return None
        pb, lead = self.pb, self.pb.batch_shape + (self.pb.heads_q, self.pb.n)
        out = check_cotangent(out, "out", lead + (pb.dv,))
        lse = to_float64(lse, "lse", check_finite=False)
        if lse.shape != lead or np.isnan(lse).any() or np.isposinf(lse).any():
            raise ValueError(f"lse must be the forward's log-sum-exp, shape {lead}, finite "
                             f"or -inf; got shape {lse.shape}")
        return (out.reshape(pb.batch, pb.heads_q, pb.n, pb.dv),
                lse.reshape(pb.batch, pb.heads_q, pb.n))

    def gradients(self, dq, dk, dv, dsinks=None) -> dict:
        """The flat gradients as ``{"q", "k", "v"}`` (and ``"bias"``, and ``"sinks"``
        ``(Hq,)`` when the call has sink logits) in the caller's shapes."""
        grads = {name: self.pb.input_gradient(g, shape)
                 for name, g, shape in zip("qkv", (dq, dk, dv), self.shapes)}
        if self.parameter is not None:
            grad, _, result = self.parameter
            grads["bias"] = result(grad, self.pb.batch_shape)
        if self.logits.sinks is not None:
            grads["sinks"] = np.zeros(self.pb.heads_q) if dsinks is None else dsinks
        return grads


def sink_gradient(sinks: np.ndarray, lse: np.ndarray, delta: np.ndarray) -> np.ndarray:
    r"""The gradient of the sink logits ``sinks (H,)`` from ``lse (..., H, r)`` (which
    includes the sinks) and ``delta = rowsum(dO ∘ O) - dlse`` of the same shape:
    ``P_sink = exp(s_h - lse)`` is the probability the sink takes, and since
    ``∂O_i/∂s_h = -P_sink,i O_i`` and ``∂lse_i/∂s_h = P_sink,i``,

    .. math:: rac{\partial L}{\partial s_h} = -\sum_i P_{	ext{sink},i} D_i

    summed over every row of head ``h``. Rows with lse ``-inf`` (no key, no sink)
    contribute 0."""
    with np.errstate(invalid="ignore"):
        p_sink = np.exp(sinks[:, None] - lse)
    p_sink[np.isneginf(lse)] = 0.0
    p_sink *= delta
    return -p_sink.reshape(-1, *lse.shape[-2:]).sum(axis=(0, 2))


def softmax_backward(q, k, v, grad_out, grad_lse, *, mask, causal, scale, bias, softcap,
                     check_finite, sinks=None) -> SoftmaxBackward:
    """Validate a softmax backward call (inputs first, then ``grad_out`` of shape
    ``(..., Hq, N, Dv)`` and ``grad_lse`` of shape ``(..., Hq, N)``; ``sinks`` the
    learned sink logits ``(Hq,)`` or None)."""
    shapes = tuple(np.shape(x) for x in (q, k, v))
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    logits = make_logits(pb, mask=mask, causal=causal, scale=scale, bias=bias,
                         softcap=softcap, check_finite=check_finite, sinks=sinks)
    lead = pb.batch_shape + (pb.heads_q, pb.n)
    do = check_cotangent(grad_out, "grad_out", lead + (pb.dv,), check_finite=check_finite)
    dlse = check_cotangent(grad_lse, "grad_lse", lead, check_finite=check_finite)
    parameter = None if logits.score_mod is None else logits.score_mod._parameter_gradient()
    return SoftmaxBackward(q, k, v, do.reshape(pb.batch, pb.heads_q, pb.n, pb.dv),
                           None if dlse is None else dlse.reshape(pb.batch, pb.heads_q, pb.n),
                           pb, logits, parameter, shapes)


def head_summed_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``Σ_g a[g]ᵀ b[g]`` for ``a (G, r, c)``, ``b (G, r, d)`` -> ``(c, d)``: a key
    block's gradient summed over the query heads that share it, as one BLAS product."""
    rows = math.prod(a.shape[:-1])                # (explicit: -1 is ambiguous at M = 0)
    return a.reshape(rows, a.shape[-1]).T @ b.reshape(rows, b.shape[-1])


def softmax_block_vjp(p, vals, do, dlse):
    """The backward of one softmax block ``O = P · vals``: ``p (G, r, L)`` the
    probabilities (empty rows 0), ``vals (L, Dv)``, ``do (G, r, Dv)``, ``dlse (G, r)`` or
    None. Returns ``(dS (G, r, L), dvals (L, Dv))`` with ``dS = P ∘ (dO valsᵀ - D)``,
    ``D = rowsum(dO ∘ O) - dlse`` (the gradient of the logits) and ``dvals = Σ_g PᵀdO``."""
    delta = np.einsum("grd,grd->gr", do, p @ vals)
    if dlse is not None:
        delta -= dlse
    ds = do @ vals.T
    ds -= delta[..., None]
    ds *= p
    return ds, head_summed_product(p, do)
