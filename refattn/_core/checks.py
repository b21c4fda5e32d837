"""Checking the parameters of a reference: one function per kind of value, each raising
``TypeError`` (wrong kind) or ``ValueError`` (out of range) that names the argument and
the value seen, and the memory budget every large allocation is checked against.
"""
from __future__ import annotations

import math

import numpy as np

from ..boundary.arrays import to_float64

__all__ = ["DEFAULT_MEMORY_BUDGET", "MemoryBudgetError", "check_memory", "resolve_budget",
           "check_size_memory", "check_state_memory",
           "is_int", "check_int",
           "check_count", "check_positive", "check_cotangent",
           "check_block", "check_bool", "check_choice", "resolve_scale",
           "resolve_softcap", "resolve_rng"]

#: Default limit, in bytes, on the working memory a dense (N x M materializing) reference
#: may allocate. Pass ``memory_budget=`` to a function to change it for one call.
DEFAULT_MEMORY_BUDGET = 8 * 2**30


class MemoryBudgetError(MemoryError):
    """A dense request would allocate more than its memory budget; raised before any
    large allocation, with the name of the memory-bounded alternative."""


def resolve_budget(budget) -> float:
    """``memory_budget``: bytes, a positive number (None: :data:`DEFAULT_MEMORY_BUDGET`)."""
    if budget is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (int, float, np.integer,
                                                                       np.floating)):
        raise TypeError(f"memory_budget must be a number of bytes, got {budget!r}")
    if not budget > 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {budget!r}")
    return float(budget)


def check_memory(nbytes: float, budget, what: str, alternative: str) -> None:
    """Raise :class:`MemoryBudgetError` before allocating ``nbytes`` beyond ``budget``."""
    budget = resolve_budget(budget)
    if nbytes > budget:
        raise MemoryBudgetError(
            f"{what} needs about {nbytes / 2**30:.1f} GiB of working memory, over the "
            f"memory budget of {budget / 2**30:.1f} GiB; use {alternative}, which runs in "
            f"memory independent of the sequence length, or raise memory_budget= if the "
            f"machine has room")


def check_size_memory(nbytes: float, budget, what: str, sizes: str,
                      alternative: str, *, adjustable: bool = True) -> None:
    """Raise :class:`MemoryBudgetError` before allocating ``nbytes`` beyond ``budget``
    for an array whose size a parameter sets rather than the sequence length (a number
    of features, slots, buckets, a state's dimensions): the message names the
    parameters (``sizes``, as ``"num_features=2**40"``) and the bounded
    ``alternative`` (and, where the caller takes ``memory_budget=``, ``adjustable``,
    that it can be raised).

    >>> try:
    ...     check_size_memory(2.0**43, None, "the random features", "num_features=2**40",
    ...                       "num_features <= 4096")
    ... except MemoryBudgetError as exc:
    ...     print(exc)                                 # doctest: +NORMALIZE_WHITESPACE
    the random features: about 8,192.0 GiB of memory for num_features=2**40, over the
    memory budget of 8.0 GiB; use num_features <= 4096, or raise memory_budget= if the
    machine has room
    """
    budget = resolve_budget(budget)
    if nbytes > budget:
        raise MemoryBudgetError(
            f"{what}: about {nbytes / 2**30:,.1f} GiB of memory for {sizes}, over the "
            f"memory budget of {budget / 2**30:,.1f} GiB; use {alternative}"
            + (", or raise memory_budget= if the machine has room" if adjustable else ""))


def check_state_memory(nbytes: float, budget, what: str, **sizes) -> None:
    """:func:`check_size_memory` for a streaming state of ``nbytes`` whose size is the
    product of ``sizes`` (keyword arguments: the ``init_state`` parameters it grows
    with, named in the message)."""
    shown = ", ".join(f"{k}={v:,}" if is_int(v) else f"{k}={v!r}" for k, v in sizes.items())
    check_size_memory(nbytes, budget, what, shown,
                      f"smaller {', '.join(sizes)} (the state grows with their product)")


def is_int(value) -> bool:
    """A Python or NumPy integer that is not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, *, minimum: int, context: str = "") -> int:
    """An integer ``>= minimum`` (bools rejected): ``TypeError`` for a non-integer,
    ``ValueError`` below the minimum, both naming ``name`` (and ``context``)."""
    if not is_int(value):
        raise TypeError(f"{name} must be an integer{context}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{context}, got {value!r}")
    return int(value)


def check_count(name: str, value, *, minimum: int = 0, allow_none: bool = False):
    """An integer ``>= minimum`` (or ``None`` when ``allow_none``): the sizes of masks
    and patterns. Anything else is a ``ValueError`` naming ``name``."""
    if value is None and allow_none:
        return None
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}"
                         f"{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def check_block(name: str, value):
    """``None`` (a default chosen by the caller), or a positive integer: block sizes and
    worker counts. A ``ValueError`` naming ``name`` otherwise."""
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def check_bool(name: str, value) -> bool:
    """``True`` or ``False`` (NumPy bools too); a ``TypeError`` naming ``name`` for
    anything else, so that ``causal="yes"`` or ``causal=1`` never passes silently."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


#: Older spellings of method names, still accepted: the chunked algorithmic form of a
#: recurrence is "chunkwise" everywhere (``chunked_attention`` is a mechanism).
SPELLINGS = {"chunked": "chunkwise"}


def check_choice(name: str, value, choices, *, none=None) -> str:
    """One of the strings ``choices`` (or an older spelling from :data:`SPELLINGS`);
    ``None`` means ``none`` where that is given. A ``ValueError`` listing the choices
    otherwise."""
    if value is None and none is not None:
        return none
    if isinstance(value, str):
        value = SPELLINGS.get(value, value)
        if value in choices:
            return value
    raise ValueError(f"{name} must be one of {tuple(choices)}"
                     f"{' or None' if none is not None else ''}, got {value!r}")


def resolve_scale(scale, d: int) -> float:
    """``scale=None`` means ``1/sqrt(D)``; otherwise a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a real number or None, got {scale!r}") from None
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return s


def check_positive(name: str, value, *, allow_none: bool = False):
    """A positive finite real number as a float (or ``None`` when ``allow_none``):
    ``TypeError`` for a non-number, ``ValueError`` for zero, negative, inf or NaN."""
    if value is None and allow_none:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number{' or None' if allow_none else ''}"
                        f", got {value!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return x


def resolve_softcap(softcap):
    """``softcap=None`` disables capping; otherwise a positive finite number."""
    return check_positive("softcap", softcap, allow_none=True)


def resolve_rng(rng, where: str) -> np.random.Generator:
    """The generator of a randomized reference: ``rng`` is an int seed (a fresh
    generator) or a ``numpy.random.Generator`` (used, and so advanced). There is no
    default: an oracle's randomness is always chosen by the caller."""
    if isinstance(rng, np.random.Generator):
        return rng
    if is_int(rng):
        if rng < 0:
            raise ValueError(f"{where}: rng seed must be a non-negative integer, got {rng!r}")
        return np.random.default_rng(int(rng))
    if rng is None:
        raise TypeError(f"{where} is randomized and needs rng= (an int seed or a "
                        f"numpy.random.Generator); the same rng gives the same result")
    raise TypeError(f"{where}: rng must be an int seed or a numpy.random.Generator, "
                    f"got {rng!r}")


def check_cotangent(grad, name: str, shape: tuple, *, check_finite: bool = True):
    """``grad`` as float64 with exactly ``shape`` (the output it is the cotangent of);
    ``None`` stays ``None`` (a zero cotangent). A ``ValueError`` names it and both
    shapes."""
    if grad is None:
        return None
    g = to_float64(grad, name, check_finite=check_finite)
    if g.shape != tuple(shape):
        raise ValueError(f"{name} must have the output's shape {tuple(shape)}, got "
                         f"{g.shape}")
    return g
