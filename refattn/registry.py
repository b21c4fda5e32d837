"""The registry of attention mechanisms.

Each mechanism registers itself with :func:`register` where it is defined and gives the
forms defined after it (implied matrix, streaming pair, VJP) with :func:`attach`, by
function. Property tests, ``refattn list`` and the analysis iterate over
:func:`mechanisms`, so a new mechanism is tested and analysed by being registered; the
registry is complete once ``refattn`` is imported. The registered name is the function's
name.

>>> import refattn as ra
>>> spec = ra.mechanisms()["attention"]
>>> spec.family, spec.exact, spec.supports_causal
('exact', True, True)
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable

from .boundary.calls import with_boundary

__all__ = ["Mechanism", "register", "attach", "mechanisms", "QKV"]

#: Keyword arguments every softmax-style mechanism shares; ``params`` lists the others.
COMMON_PARAMS = frozenset({"mask", "causal", "scale", "bias", "softcap", "return_lse",
                           "check_finite", "memory_budget", "rng"})
#: The positional inputs of a mechanism the property tests and the analysis can call.
QKV = ("q", "k", "v")


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
    ``vjp``: its gradient (vector-Jacobian product), where one is attached.
    ``inputs``: its positional inputs; :data:`QKV` for every mechanism that
    :func:`mechanisms` returns by default. Others (MLA: queries, a latent cache and the
    up-projections) are listed with ``mechanisms(all_inputs=True)``.
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
    vjp: Callable | None = None
    example: dict = field(default_factory=dict)
    doc: str = ""
    inputs: tuple = QKV


#: The options a mechanism taking ``**options`` passes to the exact/sparse engine.
ENGINE_OPTIONS = COMMON_PARAMS | {"method", "block_q", "block_k", "workers"}

_REGISTRY: dict[str, dict] = {}


def register(*, family: str, exact: bool, time: str, state: str, example=None, tokens=(),
             inputs=QKV, **flags):
    """Decorator that registers ``fn`` under ``fn.__name__``.

    ``family``: the package the mechanism lives in (``"sparse"``, ``"linear"``, ...);
    ``time``, ``state``: its asymptotic cost; ``example``: keyword arguments of a small
    valid call; ``tokens``: its keyword arrays laid out like ``q`` (``(B, H, N, *)``,
    moved with it by ``layout=``); ``inputs``: its positional inputs when they are not
    ``(q, k, v)`` (such a mechanism handles its boundary arguments itself);
    ``flags``: the other :class:`Mechanism` fields. Forms
    defined after the forward (its implied matrix, streaming pair, VJP) are given with
    :func:`attach`. The registered function takes the boundary arguments as well
    (``layout``, ``causal`` by name, ``cu_seqlens_q``/``cu_seqlens_k``:
    :mod:`refattn.boundary.calls`).
    """
    def deco(fn):
        sig = inspect.signature(fn)
        params = tuple(p for p, spec in sig.parameters.items()
                       if spec.kind is inspect.Parameter.KEYWORD_ONLY
                       and p not in COMMON_PARAMS)
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"mechanism {fn.__name__!r} is registered twice")
        unknown = set(flags) - {f.name for f in dataclasses.fields(Mechanism)}
        if unknown:
            raise TypeError(f"register({fn.__name__}): unknown fields {sorted(unknown)}")
        inputs_ = tuple(inputs)
        wrapped = (with_boundary(fn, tokens, flags.get("supports_mask", False))
                   if inputs_ == QKV else fn)
        _REGISTRY[fn.__name__] = dict(inputs=inputs_,
            name=fn.__name__, family=family, exact=exact, fn=wrapped, time=time, state=state,
            params=params, randomized="rng" in sig.parameters,
            example=dict(example or {}), doc=(inspect.getdoc(fn) or "").split("\n")[0],
            **flags)
        return wrapped
    return deco


def attach(mechanism, *, implied=None, init_state=None, step=None, vjp=None,
           constant_state=None) -> None:
    """Give a registered mechanism (its function or name) the forms defined after it:
    ``implied(q, k, **kwargs)``, its implied matrix; ``init_state``/``step``, its
    streaming form (:mod:`refattn.streaming`; both or neither), and whether that state
    is ``constant_state``; ``vjp``, its gradient. Each form is attached once: a second
    attachment raises instead of silently replacing the first.

    >>> import refattn as ra
    >>> ra.mechanisms()["attention"].implied_matrix is ra.attention_probs
    True
    """
    name = mechanism if isinstance(mechanism, str) else getattr(mechanism, "__name__", None)
    if name not in _REGISTRY or not (isinstance(mechanism, str)
                                     or _REGISTRY[name]["fn"] is mechanism):
        raise ValueError(f"attach: {mechanism!r} is not a registered mechanism")
    if (init_state is None) != (step is None):
        raise ValueError(f"attach({name}): give both init_state and step, or neither")
    entry = _REGISTRY[name]
    for form, fn in (("implied", implied), ("init_state", init_state), ("step", step),
                     ("vjp", vjp)):
        if fn is None:
            continue
        if not callable(fn):
            raise TypeError(f"attach({name}): {form} must be a function, got {fn!r}")
        if entry.get(form) is not None:
            raise ValueError(f"attach({name}): {form} is already attached "
                             f"({entry[form].__name__})")
        entry[form] = fn
    if init_state is not None:
        entry["init_state"], entry["step"] = _checked_stream(name, entry["fn"], init_state,
                                                             step)
    if constant_state is not None:
        entry["constant_state"] = bool(constant_state)


def _checked_stream(name, forward, init_state, step):
    """The streaming pair as the registry hands it out: ``init_state`` takes the forward's
    keyword arguments too (those with no streaming meaning, such as ``method``, are
    dropped; anything else unknown is a ``TypeError``), and ``step`` refuses what is not a
    state of this mechanism."""
    from .streaming import State
    own = {p for p, spec in inspect.signature(init_state).parameters.items()
           if spec.kind is not spec.VAR_KEYWORD}
    forward_sig = inspect.signature(forward).parameters
    forward_params = set(forward_sig) | (ENGINE_OPTIONS if any(   # **options: the engine's
        p.kind is p.VAR_KEYWORD for p in forward_sig.values()) else set())
    classes: set = set()

    @functools.wraps(init_state)
    def checked_init_state(**kwargs):
        unknown = sorted(k for k in kwargs if k not in own and k not in forward_params)
        if unknown:
            raise TypeError(f"{name}'s init_state got unknown keyword(s) {unknown}; it "
                            f"takes {sorted(own)} and {name}'s own options")
        state = init_state(**{k: v for k, v in kwargs.items() if k in own})
        classes.add(type(state))
        return state

    @functools.wraps(step)
    def checked_step(state, *tokens, **kwargs):
        if not isinstance(state, State) or (classes and type(state) not in classes
                                            and not isinstance(state, tuple(classes))):
            raise TypeError(f"{name}'s step needs the state its init_state returned, got "
                            f"{type(state).__name__}")
        return step(state, *tokens, **kwargs)
    return checked_init_state, checked_step


def mechanisms(*, all_inputs: bool = False) -> dict[str, Mechanism]:
    """The registered mechanisms called as ``fn(q, k, v, ...)``, name ->
    :class:`Mechanism`, in registration order; ``all_inputs=True``: every registered
    mechanism, also those with other inputs (``spec.inputs``, e.g. MLA's latent cache).

    >>> import refattn as ra
    >>> "mla_attention" in ra.mechanisms(), "mla_attention" in ra.mechanisms(all_inputs=True)
    (False, True)
    """
    out = {}
    for name, entry in _REGISTRY.items():
        if not all_inputs and entry["inputs"] != QKV:
            continue
        fields = dict(entry)
        fields["implied_matrix"] = fields.pop("implied", None)
        fields.setdefault("supports_streaming", fields.get("init_state") is not None)
        out[name] = Mechanism(**fields)
    return out
