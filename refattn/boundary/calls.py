"""The arguments every registered mechanism and its VJP take besides their own: the
tensor layout, the causal alignment by name, and variable-length (packed) batches.

They are handled here once, around the mechanism, so that the mechanism itself sees
refattn's one form, heads-first ``q (B, Hq, N, D)``, ``k (B, Hkv, M, D)``,
``v (B, Hkv, M, Dv)``, and ``causal`` a bool:

* ``layout="bnhd"``: ``q (B, N, Hq, D)``, ``k (B, M, Hkv, D)``, ``v (B, M, Hkv, Dv)``, as
  FlashAttention and flash-linear-attention take them (and the mechanism's token-aligned
  arguments, e.g. GLA's ``log_gates``, likewise); the output comes back in the same
  layout. The log-sum-exp stays ``(B, Hq, N)`` (FlashAttention's ``softmax_lse``).
* ``causal="bottom_right"`` (the same as ``True``: key ``j`` is visible to query ``i``
  iff ``j <= i + M - N``, FlashAttention 2's convention) or ``"top_left"`` (``j <= i``,
  PyTorch's ``is_causal``). They differ only when ``N != M``; ``"top_left"`` is then
  computed as the mask ``masks.causal(align="top_left")`` and needs a mechanism that
  takes ``mask=``.
* ``cu_seqlens_q``, ``cu_seqlens_k`` (``(S + 1,)`` integers, 0 first, the totals last):
  ``S`` sequences packed along the tokens as FlashAttention's varlen API takes them,
  ``q (total_q, Hq, D)``, ``k (total_k, Hkv, D)``, ``v (total_k, Hkv, Dv)``; the output is
  ``(total_q, Hq, Dv)``, the log-sum-exp ``(Hq, total_q)``. Sequence ``s`` is computed on
  its own (exactly the per-sequence call; masks, causality and score modifiers see its
  own positions, batch index 0). Mechanisms that scan a state take
  flash-linear-attention's ``cu_seqlens`` instead.
"""
from __future__ import annotations

import functools
import inspect

import numpy as np

from .._core.checks import MemoryBudgetError, is_int, resolve_budget
from .._core.varlen import check_cu_seqlens
from .arrays import host_array

__all__ = ["with_boundary", "call_vjp", "BOUNDARY_PARAMS", "LAYOUTS", "CAUSAL_ALIGNMENTS"]

LAYOUTS = ("bhnd", "bnhd")
CAUSAL_ALIGNMENTS = ("bottom_right", "top_left")
BOUNDARY_PARAMS = ("layout", "cu_seqlens_q", "cu_seqlens_k")
_INPUTS = ("q", "k", "v")

DOC = """
    Every registered mechanism also takes (:mod:`refattn.boundary.calls`):
    ``layout`` ``"bhnd"`` (default, ``(B, H, N, D)``) or ``"bnhd"`` (``(B, N, H, D)``,
    FlashAttention's; the output likewise, the lse stays ``(B, H, N)``); ``causal``
    ``"bottom_right"`` (= ``True``, ``j <= i + M - N``) or ``"top_left"`` (``j <= i``,
    torch's ``is_causal``); ``cu_seqlens_q``, ``cu_seqlens_k`` for packed sequences
    ``(total, H, D)`` (FlashAttention's varlen; output ``(total_q, H, Dv)``, lse
    ``(H, total_q)``).
"""


class _Spec:
    """What the boundary needs to know of one mechanism."""

    def __init__(self, fn, token_kwargs, takes_mask):
        params = inspect.signature(fn).parameters
        self.name = fn.__name__
        self.token_kwargs = tuple(token_kwargs)
        self.native_varlen = "cu_seqlens" in params
        self.takes_mask = takes_mask
        positional = [p for p in params.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.grid = len(positional) > 3          # vision: (q, k, v, window/kernel_size)


def _resolve_layout(name, layout, packed):
    if layout is None:
        return "bhnd"
    if not isinstance(layout, str):
        raise TypeError(f"{name}: layout is the tensor layout, one of {LAYOUTS}; got "
                        f"{type(layout).__name__} of shape {np.shape(layout)} (a block "
                        f"pattern is block_sparse_attention's block_layout=)")
    if layout not in LAYOUTS:
        raise ValueError(f"{name}: layout must be one of {LAYOUTS}, got {layout!r}")
    if packed and layout == "bhnd":
        raise ValueError(f"{name}: packed sequences (cu_seqlens_q/cu_seqlens_k) are "
                         f"(total, H, D); leave layout unset or pass 'bnhd'")
    return layout


def _resolve_causal(spec, kwargs, n, m):
    """Turn a named alignment into the mechanism's ``causal``/``mask`` arguments."""
    causal = kwargs.get("causal")
    if not isinstance(causal, str):
        return kwargs
    if causal not in CAUSAL_ALIGNMENTS:
        raise ValueError(f"{spec.name}: causal must be True, False or one of "
                         f"{CAUSAL_ALIGNMENTS}, got {causal!r}")
    kwargs = dict(kwargs, causal=True)
    if causal == "top_left" and n != m:
        if not spec.takes_mask:
            raise ValueError(f"{spec.name}: causal='top_left' with N={n} != M={m} needs a "
                             f"mask= argument, which {spec.name} does not take; it "
                             f"computes causal=True bottom-right (j <= i + M - N)")
        from .. import masks
        user = kwargs.get("mask")
        top_left = masks.causal(align="top_left")
        kwargs.update(causal=False, mask=top_left if user is None else top_left & user)
    return kwargs


def _to_heads_first(x, what, spec):
    arr = host_array(x, what)
    if arr.ndim < 3:
        raise ValueError(f"{spec.name}: with layout='bnhd' {what} must be (..., N, H, D), "
                         f"got shape {arr.shape}")
    return np.swapaxes(arr, -3, -2)


def _token_axes(value, rank):
    """The axes ``layout='bnhd'`` swaps in a token-aligned argument: ``(-3, -2)`` when it
    has ``q``'s rank ``(..., N, H, C)``, ``(-2, -1)`` one rank less ``(..., N, H)`` (a gate
    per head and token), none otherwise (it broadcasts as it is)."""
    ndim = np.ndim(value)
    return (-3, -2) if ndim == rank and ndim >= 3 else (-2, -1) if (
        ndim == rank - 1 and ndim >= 2) else None


def _swap_token(value, axes):
    return value if axes is None else np.swapaxes(value, *axes)


def _lengths(q, k):
    """``(N, M)`` of heads-first ``q``, ``k`` (None when not arrays of rank >= 3)."""
    shapes = [np.shape(x) for x in (q, k)]
    if any(len(s) < 3 for s in shapes):
        return None, None
    return shapes[0][-2], shapes[1][-2]


def _call(spec, fn, args, kwargs, layout):
    """``fn`` on one (padded) batch, in ``layout``; returns its result in ``layout``."""
    if layout == "bnhd":
        if spec.grid:
            raise ValueError(f"{spec.name} takes token grids (..., H, *spatial, D); "
                             f"layout='bnhd' is not supported")
        args = tuple(_to_heads_first(x, name, spec) if i < 3 or name == "grad_out" else x
                     for i, (x, name) in enumerate(zip(args, _arg_names(args))))
        rank = np.ndim(args[0])
        token_axes = {key: _token_axes(kwargs[key], rank) for key in spec.token_kwargs
                      if kwargs.get(key) is not None}
        kwargs = {key: _swap_token(host_array(val, key), token_axes[key])
                  if token_axes.get(key) else val for key, val in kwargs.items()}
    if isinstance(kwargs.get("causal"), str):
        kwargs = _resolve_causal(spec, kwargs, *_lengths(*args[:2]))
    result = fn(*args, **kwargs)
    if layout == "bhnd":
        return result
    if isinstance(result, dict):                      # a VJP: gradients of the inputs
        return {key: np.swapaxes(g, -3, -2) if key in _INPUTS
                else _swap_token(g, token_axes.get(key)) for key, g in result.items()}
    if isinstance(result, tuple):                     # (out, lse, ...): out only
        return (np.swapaxes(result[0], -3, -2),) + result[1:]
    return np.swapaxes(result, -3, -2)


def _arg_names(args):
    """Names of the positional arrays: ``q, k, v`` then (a VJP) ``grad_out``."""
    return list(_INPUTS[:min(3, len(args))]) + ["grad_out"] * max(0, len(args) - 3)


def _packed(spec, x, what):
    arr = host_array(x, what)
    if arr.ndim != 3:
        raise ValueError(f"{spec.name}: with cu_seqlens_q/cu_seqlens_k, {what} must be "
                         f"packed (total, H, dim), got shape {arr.shape}")
    return arr


def _sequence(x, lo, hi):
    """Tokens ``lo:hi`` of packed ``(total, H, D)`` as a heads-first ``(1, H, n, D)``."""
    return np.swapaxes(x[lo:hi], 0, 1)[None]


def _packed_result(xs):
    """Per-sequence ``(1, H, n, D)`` results packed into ``(total, H, D)``."""
    return np.concatenate([np.swapaxes(x[0], 0, 1) for x in xs])


def _varlen(spec, fn, args, kwargs, cu_q, cu_k, grad):
    """Sequence by sequence over packed ``(total, H, D)`` inputs; outputs packed."""
    if spec.native_varlen:
        raise TypeError(f"{spec.name} scans a state: pass flash-linear-attention's "
                        f"cu_seqlens= (one batch of packed tokens) instead of "
                        f"cu_seqlens_q/cu_seqlens_k")
    if spec.grid:
        raise ValueError(f"{spec.name} takes token grids; cu_seqlens are not supported")
    if cu_q is None or cu_k is None:
        raise ValueError(f"{spec.name}: give both cu_seqlens_q and cu_seqlens_k")
    from ..masks.scores import ScoreMod
    bias = kwargs.get("bias")
    if bias is not None and not (callable(bias) or isinstance(bias, ScoreMod)):
        raise ValueError(f"{spec.name}: an array bias cannot be split into packed "
                         f"sequences; give a score modifier (refattn.masks.scores)")
    names = _arg_names(args)
    q, k, v = (_packed(spec, x, what) for x, what in zip(args[:3], names))
    cq = check_cu_seqlens(cu_q, q.shape[0], "cu_seqlens_q", what="total_q")
    ck = check_cu_seqlens(cu_k, k.shape[0], "cu_seqlens_k", what="total_k")
    if cq.size != ck.size:
        raise ValueError(f"cu_seqlens_q {cq.shape} and cu_seqlens_k {ck.shape} must "
                         f"describe the same number of sequences")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"{spec.name}: k {k.shape} and v {v.shape} must have the same "
                         f"packed length")
    extra = args[3:]
    if grad:
        extra = (_packed(spec, extra[0], "grad_out"),)
        dlse = kwargs.get("grad_lse")
        if dlse is not None:
            dlse = host_array(dlse, "grad_lse")
            if dlse.shape != (q.shape[1], q.shape[0]):
                raise ValueError(f"grad_lse must be (Hq, total_q) = "
                                 f"{(q.shape[1], q.shape[0])} with packed sequences, got "
                                 f"{dlse.shape}")
    pieces = []
    for s in range(cq.size - 1):
        (q0, q1), (k0, k1) = cq[s:s + 2], ck[s:s + 2]
        seq_args = (_sequence(q, q0, q1), _sequence(k, k0, k1), _sequence(v, k0, k1))
        seq_kwargs = dict(kwargs)
        if grad:
            seq_args += (_sequence(extra[0], q0, q1),)
            if kwargs.get("grad_lse") is not None:
                seq_kwargs["grad_lse"] = dlse[None, :, q0:q1]
        pieces.append(_call(spec, fn, seq_args, seq_kwargs, "bhnd"))
    return _join(pieces, grad)


def _join(pieces, grad):
    """Packed results from per-sequence ones: token-aligned pieces concatenated along
    the tokens, anything else (a VJP's bias or table gradient) summed."""
    if grad:
        return {key: _packed_result([p[key] for p in pieces]) if key in _INPUTS
                else sum(p[key] for p in pieces) for key in pieces[0]}
    if isinstance(pieces[0], tuple):                  # (out, lse)
        if len(pieces[0]) != 2:
            raise ValueError("with cu_seqlens_q/cu_seqlens_k a mechanism may return its "
                             "output and lse only")
        lse = np.concatenate([p[1][0] for p in pieces], axis=-1)
        return _packed_result([p[0] for p in pieces]), lse
    return _packed_result(pieces)


def _boundary_call(spec, fn, args, kwargs, grad=False):
    layout = kwargs.pop("layout", None)
    cu_q, cu_k = kwargs.pop("cu_seqlens_q", None), kwargs.pop("cu_seqlens_k", None)
    packed = cu_q is not None or cu_k is not None
    layout = _resolve_layout(spec.name, layout, packed)
    if packed:
        return _varlen(spec, fn, args, kwargs, cu_q, cu_k, grad)
    return _call(spec, fn, args, kwargs, layout)


def _needs_boundary(kwargs) -> bool:
    return (any(kwargs.get(p) is not None for p in BOUNDARY_PARAMS)
            or isinstance(kwargs.get("causal"), str))


def with_boundary(fn, token_kwargs=(), takes_mask=False):
    """``fn`` (a mechanism ``fn(q, k, v, *rest, **kwargs)``; ``token_kwargs``: its keyword
    arrays laid out like ``q``; ``takes_mask``: it takes ``mask=``) taking the module's
    boundary arguments as well; calls without them go straight to ``fn``."""
    spec = _Spec(fn, token_kwargs, takes_mask)

    @functools.wraps(fn)
    def mechanism(*args, **kwargs):
        if kwargs.get("memory_budget") is not None:    # checked even where it goes unused
            resolve_budget(kwargs["memory_budget"])
        try:
            if not _needs_boundary(kwargs):
                result = fn(*args, **kwargs)
            else:
                result = _boundary_call(spec, fn, args, kwargs)
        except FloatingPointError as exc:       # from a mechanism it calls: say whose
            raise FloatingPointError(f"{spec.name}: {exc}") from exc
        except (MemoryError, ValueError) as exc:
            if isinstance(exc, MemoryBudgetError) or not _out_of_memory(exc):
                raise
            raise _too_big(spec.name, kwargs, exc) from exc
        if kwargs.get("check_finite", True):
            _check_finite_result(spec.name, result, args)
        return result

    sig = inspect.signature(fn)
    new = [inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY, default=None)
           for p in BOUNDARY_PARAMS if p not in sig.parameters]
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    mechanism.__signature__ = sig.replace(parameters=params[:at] + new + params[at:])
    mechanism.__doc__ = (fn.__doc__ or "").rstrip() + "\n" + DOC
    mechanism.boundary = spec
    return mechanism


def _out_of_memory(exc) -> bool:
    """NumPy's ways of refusing an allocation."""
    return isinstance(exc, MemoryError) or any(
        text in str(exc) for text in ("array is too big", "Maximum allowed size exceeded",
                                      "Unable to allocate"))


def _too_big(name, kwargs, exc) -> MemoryBudgetError:
    """A :class:`MemoryBudgetError` for an allocation NumPy refused, naming the integer
    arguments most likely to blame (the largest ones given)."""
    sizes = sorted(((v, k) for k, v in kwargs.items() if is_int(v) and v > 1),
                   reverse=True)[:3]
    shown = ", ".join(f"{k}={v:,}" for v, k in sizes) or "the input shapes"
    return MemoryBudgetError(
        f"{name}: an array it needs is larger than this machine can allocate ({exc}); the "
        f"sizes come from {shown}: reduce them (or the sequence length)")


def _check_finite_result(name, result, args, what="output"):
    """Raise instead of returning non-finite values computed from finite inputs (the
    inputs were checked): in practice logits that overflow float64."""
    values = result.values() if isinstance(result, dict) else (
        [result[0]] if isinstance(result, tuple) else [result])
    for value in values:
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(
                value).all():
            sizes = [float(np.max(np.abs(host_array(x, "input")), initial=0.0))
                     for x in args[:2]]
            raise FloatingPointError(
                f"{name}: its {what} has non-finite values although every input is finite: "
                f"its scores (logits, features or states) overflow float64 (max |q| = "
                f"{sizes[0]:.3g}, max |k| = {sizes[-1]:.3g}); rescale q or k")


def call_vjp(mechanism, rule, inputs, kwargs) -> dict:
    """``rule(*inputs, **kwargs)``, the VJP of the registered ``mechanism`` (wrapped by
    :func:`with_boundary`), with the boundary arguments handled as for its forward:
    ``grad_out`` in the output's layout, gradients in their inputs' layouts."""
    spec = getattr(mechanism, "boundary", None)
    if spec is None or not _needs_boundary(kwargs):
        grads = rule(*inputs, **kwargs)
    else:
        grads = _boundary_call(spec, rule, inputs, dict(kwargs), grad=True)
    if spec is not None and kwargs.get("check_finite", True):
        _check_finite_result(spec.name, grads, inputs, what="gradient")
    return grads
