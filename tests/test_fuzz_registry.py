"""Bad input over the whole registry: every registered mechanism (a new one is fuzzed by
being registered) must answer bad shapes, dtypes, values and parameters with a
``ValueError``, ``TypeError`` or ``MemoryBudgetError`` that names the argument, never a
raw NumPy/Numba/Python exception and never a silent answer."""
import contextlib
import inspect
import os
import re
import warnings

import numpy as np
import pytest

import refattn as ra
from refattn import MemoryBudgetError

CHECKED = (ValueError, TypeError, MemoryBudgetError)
SPECS = ra.mechanisms()


def _call(spec, q=None, k=None, v=None, **changes):
    """``spec.fn`` on small valid inputs (token grids for vision) with ``changes``."""
    kwargs = dict(spec.example)
    if spec.randomized and "rng" not in kwargs:
        kwargs["rng"] = 0
    rng = np.random.default_rng(0)
    shape = (1, 1, 4, 4, 4) if spec.family == "vision" else (1, 2, 12, 4)
    base = rng.standard_normal(shape)
    args = [base if x is None else x for x in (q, k, v)]
    if spec.family == "vision":      # the grid argument is positional
        for key in ("kernel_size", "window", "ratio"):
            if key in kwargs:
                args.append(kwargs.pop(key))
    kwargs.update(changes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spec.fn(*args, **kwargs)


def _integer_params(spec):
    return [p for p, v in spec.example.items()
            if not isinstance(v, bool) and isinstance(v, (int, np.integer))]


CASES = [(name, p) for name, spec in SPECS.items() for p in _integer_params(spec)]


@pytest.mark.parametrize("name, param", CASES)
@pytest.mark.parametrize("bad", [-1, 0.5, "x", None, True])
def test_bad_integer_parameters_name_themselves(name, param, bad):
    spec = SPECS[name]
    default = inspect.signature(spec.fn).parameters[param].default
    if bad is None and (param == "rng" or default is None):
        pytest.skip(f"{param}=None is valid (its default) or tested elsewhere (rng)")
    try:
        _call(spec, **{param: bad})
    except CHECKED as exc:
        assert param in str(exc), f"{name}({param}={bad!r}): {type(exc).__name__}: {exc}"
        return
    if bad == -1 or bad == 0.5 or bad == "x" or bad is None:
        pytest.fail(f"{name}({param}={bad!r}) returned without error")


# ------------------------------------------------------------ huge integer parameters
@contextlib.contextmanager
def _address_space_guard(extra=8 * 2**30):
    """Lower the soft address-space limit to what this process maps now plus ``extra``
    (restored after), so that a size missing its pre-check fails at once with NumPy's
    ``MemoryError`` (which the tests below reject) instead of allocating terabytes."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = mapped + extra if hard == resource.RLIM_INFINITY else min(mapped + extra,
                                                                          hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError) as exc:
        pytest.skip(f"no address-space limit here ({exc}): without it a size that misses "
                    f"its pre-check could really allocate")
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _all_integer_params(fn, example):
    """Every keyword-only parameter of ``fn`` whose example value or default is an int:
    the sizes (iteration counts, ``*_iters``, cost time rather than memory and are
    left out)."""
    out = []
    for p, par in inspect.signature(fn).parameters.items():
        value = example.get(p, par.default)
        if (par.kind is par.KEYWORD_ONLY and p != "rng" and not p.endswith("_iters")
                and not isinstance(value, bool) and isinstance(value, (int, np.integer))):
            out.append(p)
    return out


def _refused_before_allocating(exc, what, param):
    """A checked error naming ``param``; a MemoryBudgetError raised by a pre-check, not
    made afterwards from NumPy's refusal (the boundary's fallback, ``from`` it)."""
    assert re.search(rf"\b{param}\b", str(exc)), f"{what}: {type(exc).__name__}: {exc}"
    assert not isinstance(exc.__cause__, (MemoryError, ValueError)), (
        f"{what}: the allocation was attempted and refused by NumPy ({exc.__cause__!r}); "
        f"it needs a pre-check against memory_budget")


HUGE = {"2**31": 2**31, "2**40": 2**40, "2**62": 2**62}
HUGE_CASES = [(name, p) for name, spec in SPECS.items()
              for p in _all_integer_params(spec.fn, spec.example)]


@pytest.mark.parametrize("size, name, param", [(size, *c) for size in HUGE
                                               for c in HUGE_CASES])
def test_huge_integer_parameters_run_or_are_refused_before_allocating(size, name, param):
    what = f"{name}({param}={size})"
    with _address_space_guard():
        try:
            out = _call(SPECS[name], **{param: HUGE[size]})
        except CHECKED as exc:        # MemoryBudgetError, or out of the parameter's range
            _refused_before_allocating(exc, what, param)
            return
    out = out[0] if isinstance(out, tuple) else out
    assert np.isfinite(out).all()


STREAMING = {name: spec for name, spec in SPECS.items() if spec.init_state is not None}
SIZES = ("batch_shape", "heads_q", "heads_kv", "d", "dv")
STATE_CASES = [(name, p) for name, spec in STREAMING.items()
               for p in SIZES + tuple(q for q in _all_integer_params(spec.init_state,
                                                                     spec.example)
                                      if q not in SIZES)]


def _state_kwargs(spec, param, value):
    kwargs = dict(spec.example)
    if spec.randomized:
        kwargs.setdefault("rng", 0)
    kwargs.update(heads_q=2, heads_kv=2, d=4, dv=4)
    kwargs[param] = (value,) if param == "batch_shape" else value
    if param == "heads_kv":
        kwargs["heads_q"] = value
    return kwargs


@pytest.mark.parametrize("name, param", STATE_CASES)
def test_huge_state_sizes_are_refused_before_allocating(name, param):
    spec = STREAMING[name]
    with _address_space_guard():     # returning under it: nothing large was allocated
        try:                          # (a state that grows with the tokens starts empty)
            spec.init_state(**_state_kwargs(spec, param, 2**40))
        except CHECKED as exc:
            _refused_before_allocating(exc, f"{name} init_state({param}=2**40)", param)


@pytest.mark.parametrize("name", STREAMING)
def test_a_state_of_d_by_dv_per_head_is_checked_against_memory_budget(name):
    """``d = dv = 2**17`` is 128 GiB per head for a matrix state, 2 MiB for a cache:
    refused or not by the state's size, with ``memory_budget=`` moving the line."""
    spec = STREAMING[name]
    kwargs = _state_kwargs(spec, "d", 2**17)
    kwargs["dv"] = 2**17
    if "memory_budget" not in inspect.signature(spec.init_state).parameters:
        pytest.skip(f"{name}'s init_state takes no memory_budget= (a state that does not "
                    f"grow with d and dv, or checked against the default budget only)")
    with _address_space_guard():
        try:
            spec.init_state(**kwargs)
        except MemoryBudgetError as exc:
            _refused_before_allocating(exc, f"{name} init_state(d=dv=2**17)",
                                       "dv" if "dv=" in str(exc) else "d")
        with pytest.raises(MemoryBudgetError, match="memory budget of 0.0 GiB"):
            spec.init_state(**dict(kwargs, d=4, dv=4, memory_budget=1))


@pytest.mark.parametrize("name", SPECS)
def test_bad_arrays_name_the_argument(name):
    spec = SPECS[name]
    grid = spec.family == "vision"
    base = np.zeros((1, 1, 4, 4, 4) if grid else (1, 2, 12, 4))
    with pytest.raises(CHECKED, match="q"):
        _call(spec, q=base[..., :3])                         # D differs from k's
    with pytest.raises(TypeError, match="q"):
        _call(spec, q=base.astype(str))
    with pytest.raises(TypeError, match="q"):
        _call(spec, q=base.astype(complex))
    bad = base.copy()
    bad.flat[3] = np.nan
    with pytest.raises(ValueError, match="q .*non-finite"):
        _call(spec, q=bad)


def _takes(spec, param):
    return param in inspect.signature(spec.fn).parameters


@pytest.mark.parametrize("name", [n for n, s in SPECS.items()
                                  if _takes(s, "causal") or s.supports_causal])
def test_unknown_causal_alignment_is_refused(name):
    with pytest.raises(CHECKED, match="causal"):
        _call(SPECS[name], causal="no")


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if _takes(s, "memory_budget")])
def test_memory_budget_must_be_a_number(name):
    with pytest.raises(TypeError, match="memory_budget"):
        _call(SPECS[name], memory_budget="lots")


@pytest.mark.parametrize("name", SPECS)
def test_overflowing_logits_give_a_finite_answer_or_a_clear_error(name):
    spec = SPECS[name]
    shape = (1, 1, 4, 4, 4) if spec.family == "vision" else (1, 2, 12, 4)
    q = np.random.default_rng(1).standard_normal(shape) * 1e155
    try:
        out = _call(spec, q=q, k=q)
    except FloatingPointError as exc:
        assert "overflow" in str(exc)
        return
    except CHECKED as exc:
        assert "overflow" in str(exc), exc
        return
    out = out[0] if isinstance(out, tuple) else out
    assert np.isfinite(out).all()
