"""The registry of attention mechanisms.

Each mechanism registers itself with :func:`register` where it is defined; property
tests, ``refattn list`` and the analysis iterate over :func:`mechanisms`, so a new
mechanism is tested and analysed by being registered. The registered name is the
function's name.

>>> import refattn as ra
>>> spec = ra.mechanisms()["attention"]
>>> spec.family, spec.exact, spec.supports_causal
('exact', True, True)
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Mechanism", "register", "mechanisms"]

#: Keyword arguments every softmax-style mechanism shares; ``params`` lists the others.
COMMON_PARAMS = frozenset({"mask", "causal", "scale", "bias", "softcap", "return_lse",
                           "check_finite", "memory_budget", "rng"})


@dataclass(frozen=True)
class Mechanism:
    """What the rest of refattn needs to know about one attention mechanism.

    ``fn(q, k, v, **kwargs)`` computes it; ``implied_matrix(q, k, **kwargs)``, where one
    exists, returns the ``(..., Hq, N, M)`` matrix ``A`` with ``fn(q, k, v) == A @ v``.
    ``example`` holds keyword arguments that make a small, valid call (tests use it).
    ``position_free``: without a mask or causality the output does not depend on the
    order of the keys (permuting keys and values together changes nothing).
    ``self_attention_only``: queries and keys must have the same length (``N == M``),
    as when both are hashed or clustered together.
    ``mask``: for mask-defined mechanisms, ``mask(**params)`` builds the
    :class:`refattn.masks.Mask` they compute exact attention under.
    ``init_state``/``step``: the streaming form (:mod:`refattn.streaming`), where one
    exists; ``constant_state``: its state does not grow with the tokens seen.
    ``budget(n, b)``: for mechanisms that approximate softmax attention over the same keys,
    the keyword arguments that spend about ``b`` keys (or features, landmarks, rank) per
    query at sequence length ``n`` -- the analysis sweeps ``b`` to trace error against
    cost; None: the mechanism is analysed at ``example`` only, or is not such an
    approximation (retention, memories).
    """

    name: str
    family: str
    exact: bool
    fn: Callable
    time: str
    state: str
    params: tuple = ()
    supports_causal: bool = False
    supports_mask: bool = False
    supports_gqa: bool = True
    supports_streaming: bool = False
    randomized: bool = False
    position_free: bool = True
    row_stochastic: bool = True
    self_attention_only: bool = False
    implied_matrix: Callable | None = None
    mask: Callable | None = None
    init_state: Callable | None = None
    step: Callable | None = None
    constant_state: bool = False
    budget: Callable | None = None
    example: dict = field(default_factory=dict)
    doc: str = ""


_REGISTRY: dict[str, Mechanism] = {}


def register(*, family: str, exact: bool, time: str, state: str, implied=None,
             example=None, streaming=None, **flags):
    """Decorator that registers ``fn`` under ``fn.__name__``.

    ``implied``: the implied-matrix function, or the name of one defined later in the
    same module (resolved when :func:`mechanisms` is called); ``streaming``: the names
    (or functions) ``(init_state, step)`` of its streaming form, resolved the same way.
    """
    def deco(fn):
        sig = inspect.signature(fn)
        params = tuple(p for p, spec in sig.parameters.items()
                       if spec.kind is inspect.Parameter.KEYWORD_ONLY
                       and p not in COMMON_PARAMS)
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"mechanism {fn.__name__!r} is registered twice")
        _REGISTRY[fn.__name__] = dict(
            name=fn.__name__, family=family, exact=exact, fn=fn, time=time, state=state,
            params=params, randomized="rng" in sig.parameters, implied=implied,
            example=dict(example or {}), doc=(inspect.getdoc(fn) or "").split("\n")[0],
            streaming=streaming, flags=flags)
        return fn
    return deco


def _resolve(entry) -> Mechanism:
    module = inspect.getmodule(entry["fn"])

    def named(x):
        return getattr(module, x) if isinstance(x, str) else x
    init_state, step = (named(x) for x in entry["streaming"] or (None, None))
    flags = dict(entry["flags"])
    flags.setdefault("supports_streaming", init_state is not None)
    return Mechanism(name=entry["name"], family=entry["family"], exact=entry["exact"],
                     fn=entry["fn"], time=entry["time"], state=entry["state"],
                     params=entry["params"], randomized=entry["randomized"],
                     implied_matrix=named(entry["implied"]), example=dict(entry["example"]),
                     doc=entry["doc"], init_state=init_state, step=step, **flags)


def mechanisms() -> dict[str, Mechanism]:
    """All registered mechanisms, name -> :class:`Mechanism`, in registration order."""
    return {name: _resolve(entry) for name, entry in _REGISTRY.items()}
