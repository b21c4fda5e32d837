r"""Checking gradients independently of the hand-derived VJPs: central finite differences.

For an output ``y = f(x)`` and a cotangent ``g``, the VJP ``(∂y/∂x)ᵀ g`` is the gradient
of the scalar ``L(x) = ⟨g, f(x)⟩``, estimated element by element with

.. math:: \frac{\partial L}{\partial x_i} \approx \frac{L(x + h e_i) - L(x - h e_i)}{2h},

whose error is ``O(h²)`` (truncation) plus ``O(ε / h)`` (rounding). The step is chosen
per input, ``h = ε^{1/3} · max(1, max|x|)``, which balances the two; on small well-scaled
problems the relative error is about ``1e-9``. It costs two calls per element: small
shapes only.

>>> import numpy as np, refattn as ra
>>> from refattn.testing.gradients import numerical_vjp
>>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 3, 2))
>>> g = np.ones((1, 3, 2))
>>> num = numerical_vjp(ra.attention, dict(q=q, k=k, v=v), g, causal=True)
>>> exact = ra.vjp("attention", q, k, v, g, causal=True)
>>> all(ra.testing.max_rel_error(exact[x], num[x], normwise=True) < 1e-7 for x in "qkv")
True
"""
from __future__ import annotations

import numpy as np

__all__ = ["numerical_vjp"]


def _pairing(out, grad_out) -> float:
    """``⟨grad_out, out⟩`` for an array output or a tuple of them (``None`` cotangents
    count as zero; ``-inf`` entries with a zero cotangent are skipped)."""
    outs = out if isinstance(out, tuple) else (out,)
    grads = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    total = 0.0
    for o, g in zip(outs, grads):
        if g is not None:
            o, g = np.broadcast_arrays(np.asarray(o, dtype=np.float64), g)
            used = g != 0
            total += float(np.sum(g[used] * o[used]))
    return total


def numerical_vjp(fn, inputs: dict, grad_out, *, wrt=None, step=None, **kwargs) -> dict:
    """Central-difference gradients of ``⟨grad_out, fn(**inputs, **kwargs)⟩``.

    ``inputs``: the differentiable arguments by name (float arrays); ``wrt``: the names to
    differentiate (default: all of ``inputs``); ``grad_out``: an array of the output's
    shape, or a tuple matching a tuple output (``None`` for a part with no cotangent);
    ``step``: ``h`` for every input instead of the per-input default. Returns
    ``{name: gradient}``, each of its input's shape, float64.
    """
    inputs = {name: np.array(x, dtype=np.float64) for name, x in inputs.items()}
    grads = {}
    for name in (wrt or tuple(inputs)):
        x = inputs[name]
        h = step or np.cbrt(np.finfo(np.float64).eps) * max(1.0, float(np.abs(x).max(initial=0)))
        grad = np.zeros(x.shape)
        for i in np.ndindex(x.shape):
            keep = x[i]
            x[i] = hi = keep + h
            up = _pairing(fn(**inputs, **kwargs), grad_out)
            x[i] = lo = keep - h
            down = _pairing(fn(**inputs, **kwargs), grad_out)
            x[i] = keep
            grad[i] = (up - down) / (hi - lo)      # the steps as represented
        grads[name] = grad
    return grads
