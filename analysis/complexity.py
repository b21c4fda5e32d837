r"""The literature's complexity tables, measured: how time and memory grow with the
sequence length for every registered mechanism.

For each mechanism and each ``N`` in ``ns`` it runs one self-attention call (batch 1, one
head, ``D`` = ``d``) on seeded Gaussian inputs, with the registry's ``budget(N, budget)``
parameters where the mechanism has them (a fixed number of keys, features or landmarks
per query, so a sub-quadratic mechanism should scale like ``N``) and its ``example``
parameters otherwise. After one untimed warm-up call per mechanism (Numba compilation
would otherwise land in the smallest ``N``'s time), it records the best wall time of
``repeats`` calls and the peak traced memory of one more call (``tracemalloc``: NumPy's
buffers; memory that Numba's compiled code allocates itself is not traced), then fits
exponents ``p`` of
``time ~ N^p`` and ``memory ~ N^p`` by least squares in log-log space.

Times depend on the machine and its load; the memory figures and exponents depend only
on the code, so they reproduce.

>>> from refattn.analysis.complexity import fit_exponent
>>> round(fit_exponent([256, 512, 1024], [1.0, 4.0, 16.0]), 6)
2.0
"""
from __future__ import annotations

import time
import tracemalloc

import numpy as np

from refattn._core.checks import MemoryBudgetError, check_int, resolve_rng

__all__ = ["fit_exponent", "measure_scaling", "scaling_params"]


def fit_exponent(ns, values) -> float:
    """Least-squares slope of ``log(values)`` against ``log(ns)``: the ``p`` of
    ``values ~ ns^p`` (NaN when fewer than two positive values)."""
    ns, values = np.asarray(ns, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if ns.shape != values.shape:
        raise ValueError(f"ns and values must have the same shape, got {ns.shape} and "
                         f"{values.shape}")
    ok = (ns > 0) & (values > 0) & np.isfinite(values)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(ns[ok]), np.log(values[ok]), 1)[0])


#: Example options that size the computation for tests (tiny tiles), not the mechanism.
TEST_SIZING = frozenset({"block_q", "block_k", "method", "workers"})


def scaling_params(spec, n: int, budget: int) -> dict:
    """Keyword arguments of ``spec`` for a call at length ``n``: ``spec.budget(n, budget)``
    where registered, none for exact mechanisms (their defaults are tuned for speed; the
    examples, e.g. tiny tiles, are sized for tests), else ``spec.example`` without its
    :data:`TEST_SIZING` options; ``rng=0`` for randomized mechanisms.

    >>> import refattn as ra
    >>> scaling_params(ra.mechanisms()["sigmoid_attention"], 2048, 32)   # not 3 x 5 tiles
    {}
    """
    if spec.budget:
        params = dict(spec.budget(n, budget))
    else:
        params = {} if spec.exact else {k: v for k, v in spec.example.items()
                                        if k not in TEST_SIZING}
    if spec.randomized:
        params["rng"] = 0
    return params


def measure_scaling(names=None, ns=(256, 512, 1024, 2048), *, d=32, budget=32, rng,
                    repeats=2, progress=None):
    """Time and peak traced memory of each mechanism at each length; returns an
    ``xarray.Dataset`` with variables ``time_s`` and ``peak_bytes`` over
    ``(mechanism, n)``, ``time_exponent`` and ``memory_exponent`` over ``mechanism``, and
    the registry's stated ``complexity`` and ``family`` per mechanism.

    names : registered mechanism names (default: all); unknown names raise ValueError.
    ns : sequence lengths (at least two for the fits).
    budget : keys/features per query handed to ``spec.budget``.
    A call refused by refattn's memory budget (:class:`refattn.MemoryBudgetError`) is
    recorded as NaN.
    progress : optional callable ``progress(name, n)`` called before each measurement.

    >>> from refattn.analysis.complexity import measure_scaling
    >>> ds = measure_scaling(["attention"], ns=(64, 128), d=8, rng=0, repeats=1)
    >>> peaks = ds.peak_bytes.sel(mechanism="attention").values   # N x N logits
    >>> bool(peaks[1] > 3 * peaks[0]), float(ds.memory_exponent.sel(mechanism="attention")) > 1.5
    (True, True)
    """
    import xarray as xr

    from refattn import mechanisms

    specs = mechanisms()
    names = list(specs) if names is None else list(names)
    unknown = [x for x in names if x not in specs]
    if unknown:
        raise ValueError(f"unknown mechanism(s) {unknown}; registered: {sorted(specs)}")
    ns = [check_int("ns entries", n, minimum=2) for n in ns]
    repeats = check_int("repeats", repeats, minimum=1)
    gen = resolve_rng(rng, "measure_scaling")
    inputs = {n: gen.standard_normal((3, 1, 1, n, check_int("d", d, minimum=1))) for n in ns}
    times = np.full((len(names), len(ns)), np.nan)
    peaks = np.full((len(names), len(ns)), np.nan)
    for a, name in enumerate(names):
        spec = specs[name]
        try:          # untimed warm-up at the smallest N: Numba compiles, caches fill
            spec.fn(*inputs[ns[0]], **scaling_params(spec, ns[0], budget))
        except MemoryBudgetError:
            pass
        for b, n in enumerate(ns):
            if progress is not None:
                progress(name, n)
            q, k, v = inputs[n]
            params = scaling_params(spec, n, budget)
            best = np.inf
            try:
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    spec.fn(q, k, v, **params)
                    best = min(best, time.perf_counter() - t0)
            except MemoryBudgetError:       # refused up front: recorded as missing (NaN)
                continue
            times[a, b] = best
            tracemalloc.start()
            try:
                spec.fn(q, k, v, **params)
                peaks[a, b] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    return xr.Dataset(
        {"time_s": (("mechanism", "n"), times, {"note": "best of repeats; machine-dependent"}),
         "peak_bytes": (("mechanism", "n"), peaks,
                        {"note": "tracemalloc peak of one call (NumPy buffers)"}),
         "time_exponent": ("mechanism", [fit_exponent(ns, t) for t in times]),
         "memory_exponent": ("mechanism", [fit_exponent(ns, p) for p in peaks]),
         "complexity": ("mechanism", [specs[x].time for x in names]),
         "family": ("mechanism", [specs[x].family for x in names])},
        coords={"mechanism": names, "n": ns},
        attrs={"d": d, "budget": budget, "repeats": repeats})
