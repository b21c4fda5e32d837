"""Bad input over the whole registry: every registered mechanism (a new one is fuzzed by
being registered) must answer bad shapes, dtypes, values and parameters with a
``ValueError``, ``TypeError`` or ``MemoryBudgetError`` that names the argument, never a
raw NumPy/Numba/Python exception and never a silent answer."""
import inspect
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


@pytest.mark.parametrize("name, param", CASES)
def test_huge_integer_parameters_run_or_refuse_with_memory_budget_error(name, param):
    try:
        out = _call(SPECS[name], **{param: 2**62})
    except MemoryBudgetError as exc:
        assert param in str(exc)
        return
    except CHECKED as exc:           # a value out of the parameter's range: named
        assert param in str(exc), f"{name}({param}=2**62): {exc}"
        return
    out = out[0] if isinstance(out, tuple) else out
    assert np.isfinite(out).all()


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
