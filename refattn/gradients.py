r"""Gradients: float64 vector-Jacobian products (VJPs), the oracle for backward kernels.

For a function ``y = f(x_1, ..., x_n)`` and a cotangent ``grad_out`` of ``y``'s shape, the
VJP returns ``dx_i = (∂y/∂x_i)ᵀ grad_out`` for every differentiable input, in the
input's own shape: a broadcast input gets its gradient summed over the broadcast
dimensions (grouped-query attention: a KV head's gradient sums over the query heads that
share it). Each mechanism's VJP is written by hand beside its forward, registered with
``attach(fn, vjp=...)``; :func:`vjp` finds it.

>>> import numpy as np, refattn as ra
>>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 5, 4))
>>> do = np.ones((2, 5, 4))
>>> grads = ra.vjp("attention", q, k, v, do, causal=True)
>>> sorted(grads), grads["k"].shape
(['k', 'q', 'v'], (2, 5, 4))

Discrete choices (top-k selections, hash buckets, clusters) are held fixed, as
implementations train them; fully masked rows have zero gradients.
"""
from __future__ import annotations

from ._core.checks import check_cotangent
from ._core.problem import sum_to_shape
from .boundary.calls import call_vjp

__all__ = ["vjp", "has_vjp", "check_cotangent", "sum_to_shape"]


def _rule(fn):
    """The VJP attached to ``fn`` (a registered mechanism, or a function carrying its own
    ``fn.vjp``), with the name to report and the mechanism (None: not registered)."""
    from . import registry
    specs = registry.mechanisms()
    if isinstance(fn, str):
        if fn in specs:
            return specs[fn].vjp, fn, specs[fn].fn
        import refattn
        target = getattr(refattn, fn, None)
        if not callable(target):
            raise ValueError(f"vjp: no mechanism or function named {fn!r}; registered: "
                             f"{sorted(specs)}")
        fn = target
    name = getattr(fn, "__name__", repr(fn))
    spec = specs.get(name)
    if spec is not None and spec.fn is fn:
        return spec.vjp, name, fn
    return getattr(fn, "vjp", None), name, None


def has_vjp(fn) -> bool:
    """Whether :func:`vjp` can differentiate ``fn`` (a function or a registered name)."""
    return _rule(fn)[0] is not None


def vjp(fn, *inputs, **kwargs) -> dict:
    """Gradients of ``fn(*inputs[:-1], **kwargs)`` for the cotangent ``inputs[-1]``.

    ``fn``: a registered mechanism (its function or name, e.g. ``"attention"``) or another
    differentiable function of refattn (``refattn.linear_rnn`` ...). The positional
    arguments are the forward's differentiable inputs (``q, k, v``; ``a, b, x``; ...),
    then ``grad_out`` (the cotangent of the output, its shape); every other argument of
    the forward (``mask``, ``window``, ``kernel_size``, ...) is given by keyword.
    ``grad_lse=`` (softmax mechanisms) is the cotangent of the returned log-sum-exp. Returns a dict from each
    differentiable input's parameter name (``q``, ``k``, ``v``, ``bias``, ``log_gates``,
    ...) to its float64 gradient, in that input's shape. A registered mechanism's VJP
    takes its boundary arguments too (``layout``, ``causal`` by name, ``cu_seqlens_q``/
    ``cu_seqlens_k``: :mod:`refattn.boundary.calls`), ``grad_out`` laid out as the output
    and each gradient as its input.
    """
    rule, name, mechanism = _rule(fn)
    if rule is None:
        from . import registry
        have = sorted(n for n, s in registry.mechanisms().items() if s.vjp is not None)
        raise TypeError(f"{name} has no VJP in refattn (mechanisms with one: {have})")
    return call_vjp(mechanism, rule, inputs, kwargs)
