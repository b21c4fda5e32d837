r"""Parameter sweeps: error and cost of registered mechanisms against exact attention.

:func:`sweep` runs every combination of mechanism (by registered name,
:func:`refattn.mechanisms`), parameter setting, sequence length ``n``, input kind
(:mod:`refattn.analysis.inputs`) and seed, and returns an ``xarray.Dataset`` with dims
``(mechanism, parameter, n, input_kind, seed)``:

=======================  ===========================================================
variable                 meaning (against ``refattn.attention``/``attention_probs``)
=======================  ===========================================================
``output_rel_fro``       :math:`\|\tilde O - O\|_F/\|O\|_F` over all heads
``output_max_abs``       :math:`\max|\tilde O - O|`
``output_cosine``        mean over rows of the cosine of output rows
``matrix_rel_fro``       :math:`\|\tilde A - P\|_F/\|P\|_F` (mechanisms with an implied
                         matrix; NaN otherwise)
``matrix_kl``            mean over rows of :math:`\mathrm{KL}(P\|\tilde A)` (``inf`` when
                         the approximation drops a key; NaN for signed matrices)
``matrix_tv``            mean over rows of the total variation
``wall_time_s``          the fastest of ``repeats`` timed calls (after the warm-up call
                         whose output is measured, and the traced call)
``peak_memory_bytes``    peak traced allocation (tracemalloc: NumPy and Python memory,
                         not Numba's internal) of one call after the warm-up
``error``                the exception text where a cell failed (``on_error="record"``)
``setting``              ``(mechanism, parameter)``: the keyword arguments, as text
``input_entropy``        ``(n, input_kind, seed)``: mean row entropy of ``P`` (nats)
``input_stable_rank``    ``(n, input_kind, seed)``: mean stable rank of ``P``
``input_effective_rank`` ``(n, input_kind, seed)``: mean effective rank of ``P``
=======================  ===========================================================

Variables in :data:`COST_VARIABLES` measure the machine; all others are a deterministic
function of the arguments: inputs are drawn from
``SeedSequence([seed, n, crc32(input_kind)])``, and a randomized mechanism gets an
``rng`` derived from ``[seed, n, crc32(input_kind), crc32(mechanism)]`` (the same for
all its settings: common random numbers). Cells run in parallel on local processes
(``concurrent.futures.ProcessPoolExecutor``, BLAS single-threaded in each) or on a Dask
cluster (``scheduler=`` an address or a ``dask.distributed.Client``); timings of cells
that ran concurrently share the machine.

>>> from refattn.analysis.sweep import sweep
>>> ds = sweep(["sliding_window_attention"], {"sliding_window_attention": [{"window": 4}]},
...            [32], ["temperature"], [0], workers=1, progress=False)
>>> ds["output_rel_fro"].dims
('mechanism', 'parameter', 'n', 'input_kind', 'seed')
>>> bool(ds["output_rel_fro"].item() > 0), str(ds["setting"].item())
(True, 'window=4')
"""
from __future__ import annotations

import inspect
import json
import math
import time
import tracemalloc
import zlib

import numpy as np

__all__ = ["sweep", "save", "load", "COST_VARIABLES", "MEASURES"]

#: What :func:`sweep` can measure (``measure=`` is a subset).
MEASURES = ("output", "matrix", "cost", "input")

#: Variables that depend on the machine and its load, not only on the arguments.
COST_VARIABLES = ("wall_time_s", "peak_memory_bytes")

_CELL_VARS = ("output_rel_fro", "output_max_abs", "output_cosine", "matrix_rel_fro",
              "matrix_kl", "matrix_tv", "wall_time_s", "peak_memory_bytes")
_INPUT_VARS = ("input_entropy", "input_stable_rank", "input_effective_rank")
_BY_MEASURE = {"output": ("output_rel_fro", "output_max_abs", "output_cosine"),
               "matrix": ("matrix_rel_fro", "matrix_kl", "matrix_tv"),
               "cost": COST_VARIABLES, "input": _INPUT_VARS}


# --------------------------------------------------------------------------- arguments
def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def _describe(kwargs: dict) -> str:
    def one(v):
        if isinstance(v, np.ndarray):
            return f"array{v.shape}"
        return repr(v)
    return ", ".join(f"{k}={one(v)}" for k, v in kwargs.items())


def _mechanism_names(mechanisms, known):
    if isinstance(mechanisms, str):
        mechanisms = [mechanisms]
    names = list(mechanisms)
    if not names:
        raise ValueError("mechanisms is empty; name at least one of refattn.mechanisms()")
    for name in names:
        if name not in known:
            raise ValueError(f"unknown mechanism {name!r}; known mechanisms: "
                             f"{', '.join(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"mechanisms has duplicates: {names}")
    return names


def _settings(params, names, known):
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict mechanism name -> list of keyword-argument "
                        f"dicts (or None for each mechanism's example), got "
                        f"{type(params).__name__}")
    extra = sorted(set(params) - set(names))
    if extra:
        raise ValueError(f"params names mechanisms not in the sweep: {extra}; sweep "
                         f"mechanisms: {names}")
    out = {}
    for name in names:
        s = params.get(name, [known[name].example])
        if isinstance(s, dict):
            s = [s]
        s = list(s)
        if not s or not all(isinstance(x, dict) for x in s):
            raise TypeError(f"params[{name!r}] must be a dict or a non-empty list of "
                            f"keyword-argument dicts, got {params.get(name)!r}")
        out[name] = s
    return out


def _input_kinds(input_kinds):
    from .inputs import DEFAULTS, GENERATORS
    if isinstance(input_kinds, str):
        input_kinds = [input_kinds]
    if isinstance(input_kinds, dict):
        items = list(input_kinds.items())
    else:
        items = [(k, k) for k in input_kinds]
    out = {}
    for label, spec in items:
        if isinstance(spec, str):
            kind, kw = spec, {}
        else:
            try:
                kind, kw = spec
            except (TypeError, ValueError):
                raise TypeError(f"input kind {label!r} must be a generator name or a pair "
                                f"(name, kwargs), got {spec!r}") from None
        if kind not in GENERATORS:
            raise ValueError(f"unknown input kind {kind!r} (for {label!r}); known kinds: "
                             f"{sorted(GENERATORS)}")
        out[str(label)] = (kind, {**DEFAULTS[kind], **dict(kw)})
    if not out:
        raise ValueError("input_kinds is empty")
    return out


def _ints(name, values, minimum):
    from refattn._core.checks import check_int
    if isinstance(values, (int, np.integer)):
        values = [values]
    vals = [check_int(name, v, minimum=minimum) for v in values]
    if not vals or len(set(vals)) != len(vals):
        raise ValueError(f"{name} must be a non-empty list of distinct integers, got "
                         f"{values!r}")
    return vals


# --------------------------------------------------------------------------- one cell
def _inputs(task):
    from .inputs import generate
    kind, kw = task["kind"]
    rng = np.random.default_rng([task["seed"], task["n"], _crc(task["label"])])
    return generate(kind, task["n"], task["d"], rng=rng, batch=task["batch"],
                    heads=task["heads"], **kw)


def _mechanism_rng(task) -> int:
    ss = np.random.SeedSequence([task["seed"], task["n"], _crc(task["label"]),
                                 _crc(task["mechanism"])])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def _accepted(fn, kwargs):
    """The keyword arguments ``fn`` takes (all of them if it has ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {a: b for a, b in kwargs.items() if a in params}


def _call(fn, q, k, v, kwargs):
    return fn(q, k, v, **kwargs)


def _cell(task):
    """Measure one mechanism (all its settings) on one input; returns a list of
    ``(param_index, {variable: value})``."""
    import refattn as ra
    from refattn._core.threads import blas_controller

    from .metrics import (cosine_similarity, kl_divergence, max_abs_error,
                          relative_frobenius, total_variation)
    with blas_controller().limit(limits=1, user_api="blas"):
        q, k, v = _inputs(task)
        spec = ra.mechanisms()[task["mechanism"]]
        measure = task["measure"]
        exact = ra.attention(q, k, v) if "output" in measure else None
        probs = None
        results = []
        for index, kwargs in task["settings"]:
            kw = dict(kwargs)
            if spec.randomized and "rng" not in kw:
                kw["rng"] = _mechanism_rng(task)
            rec = {}
            try:
                out = _call(spec.fn, q, k, v, kw)     # warm-up (JIT, caches); measured
                if "cost" in measure:
                    tracemalloc.start()
                    try:
                        _call(spec.fn, q, k, v, kw)
                        rec["peak_memory_bytes"] = float(tracemalloc.get_traced_memory()[1])
                    finally:
                        tracemalloc.stop()
                    best = math.inf
                    for _ in range(task["repeats"]):
                        t0 = time.perf_counter()
                        _call(spec.fn, q, k, v, kw)
                        best = min(best, time.perf_counter() - t0)
                    rec["wall_time_s"] = best
                if "output" in measure:
                    rec["output_rel_fro"] = relative_frobenius(out, exact)
                    rec["output_max_abs"] = max_abs_error(out, exact)
                    rec["output_cosine"] = float(cosine_similarity(out, exact).mean())
                if "matrix" in measure and spec.implied_matrix is not None:
                    if probs is None:
                        probs = ra.attention_probs(q, k)
                    mat = spec.implied_matrix(q, k, **_accepted(spec.implied_matrix, kw))
                    rec["matrix_rel_fro"] = relative_frobenius(mat, probs)
                    rec["matrix_tv"] = float(total_variation(probs, mat).mean())
                    rec["matrix_kl"] = (float(kl_divergence(probs, mat).mean())
                                        if (mat >= 0).all() else math.nan)
            except Exception as exc:   # noqa: BLE001 - reported or re-raised below
                if task["on_error"] == "raise":
                    raise RuntimeError(f"{task['mechanism']}({_describe(kwargs)}) failed "
                                       f"on {task['label']} inputs, n={task['n']}, "
                                       f"seed={task['seed']}: {type(exc).__name__}: "
                                       f"{exc}") from exc
                rec = {"error": f"{type(exc).__name__}: {exc}"}
            results.append((index, rec))
        return results


def _input_cell(task):
    """Properties of the exact attention matrix of one input."""
    import refattn as ra
    from refattn._core.threads import blas_controller

    from .metrics import attention_entropy
    from .spectrum import effective_rank, stable_rank
    with blas_controller().limit(limits=1, user_api="blas"):
        q, k, _ = _inputs(task)
        p = ra.attention_probs(q, k)
        return [(None, {"input_entropy": float(attention_entropy(p).mean()),
                        "input_stable_rank": float(np.mean(stable_rank(p))),
                        "input_effective_rank": float(np.mean(effective_rank(p)))})]


def _result(task):
    return _input_cell(task) if task["mechanism"] is None else _cell(task)


def _execute(tasks, scheduler, workers, progress, connect_timeout):
    """``(task, result)`` of every task as it finishes: :func:`refattn.analysis.tasks.
    run_tasks` (local processes with single-threaded BLAS, or the Dask cluster)."""
    from .tasks import run_tasks
    yield from run_tasks(_result, tasks, scheduler=scheduler, workers=workers,
                         progress=progress, desc="sweep", connect_timeout=connect_timeout)


# --------------------------------------------------------------------------- sweep
def sweep(mechanisms, params=None, ns=(256,), input_kinds=("temperature",), seeds=(0,), *,
          measure=MEASURES, d=32, heads=1, batch=1, repeats=1, scheduler=None,
          workers=None, progress=True, on_error="raise", connect_timeout=10):
    """Measure ``mechanisms`` against exact attention over a grid; returns an
    ``xarray.Dataset`` (see the module docstring for its variables).

    Parameters
    ----------
    mechanisms : registered names (``refattn.mechanisms()``); an unknown name raises
        ``ValueError`` listing the known ones.
    params : ``{name: [kwargs, ...]}``; setting ``i`` of a mechanism is coordinate
        ``parameter = i`` (mechanisms with fewer settings have NaN beyond). A mechanism
        left out, or ``params=None``, runs its registered ``example`` kwargs. A
        randomized mechanism gets ``rng`` unless the kwargs give one.
    ns : sequence lengths ``N = M`` (self-attention).
    input_kinds : generator names (``"temperature"``, ``"clustered"``, ``"low_rank"``,
        with :data:`refattn.analysis.inputs.DEFAULTS`) or ``{label: (name, kwargs)}``,
        e.g. ``{"cold": ("temperature", {"temperature": 0.1})}``.
    seeds : integer seeds (inputs and mechanism randomness, see above).
    measure : subset of :data:`MEASURES` (``"output"``, ``"matrix"``, ``"cost"``,
        ``"input"``).
    d, heads, batch : input head dimension, heads and batch size (``q (batch, heads, n,
        d)``).
    repeats : timed calls per setting (the minimum is kept), after the warm-up call.
    scheduler : ``None`` (local processes) or a Dask scheduler address
        (``"tcp://host:8786"``) or ``dask.distributed.Client``; an unreachable address
        raises ``ConnectionError`` after ``connect_timeout`` seconds.
    workers : local processes (default: available cores; 1 runs in this process).
    progress : tqdm progress bar (stderr).
    on_error : ``"raise"`` (default: a failing cell raises ``RuntimeError`` naming the
        mechanism, setting and input) or ``"record"`` (its text goes to ``error``, the
        measures stay NaN).

    Save with :func:`save` (``Dataset.to_netcdf``, netCDF3-safe types).

    >>> from refattn.analysis.sweep import sweep
    >>> ds = sweep(["attention"], None, [16], ["low_rank"], [0, 1],
    ...            measure=("output",), workers=1, progress=False)
    >>> float(ds["output_rel_fro"].max()) < 1e-14          # exact attention vs itself
    True
    """
    import xarray as xr

    import refattn as ra

    known = ra.mechanisms()
    names = _mechanism_names(mechanisms, known)
    settings = _settings(params, names, known)
    kinds = _input_kinds(input_kinds)
    ns = _ints("ns", ns, 1)
    seeds = _ints("seeds", seeds, 0)
    if isinstance(measure, str):
        measure = (measure,)
    measure = tuple(measure)
    bad = [m for m in measure if m not in MEASURES]
    if bad or not measure:
        raise ValueError(f"measure must be a non-empty subset of {MEASURES}, got {measure}")
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    from refattn._core.checks import check_int
    d, heads, batch = (check_int(a, b, minimum=1) for a, b in
                       (("d", d), ("heads", heads), ("batch", batch)))
    repeats = check_int("repeats", repeats, minimum=1)

    base = dict(d=d, heads=heads, batch=batch, measure=measure, repeats=repeats,
                on_error=on_error)
    tasks = []
    for n in ns:
        for label, kind in kinds.items():
            for seed in seeds:
                cell = dict(base, n=n, label=label, kind=kind, seed=seed)
                if "input" in measure:
                    tasks.append(dict(cell, mechanism=None, settings=None))
                if set(measure) - {"input"}:
                    for name in names:
                        tasks.append(dict(cell, mechanism=name,
                                          settings=list(enumerate(settings[name]))))

    n_par = max(len(s) for s in settings.values())
    shape = (len(names), n_par, len(ns), len(kinds), len(seeds))
    wanted = [v for m in measure if m != "input" for v in _BY_MEASURE[m]]
    cells = {v: np.full(shape, np.nan) for v in wanted}
    errors = np.full(shape, "", dtype=object)
    inputs_ = {v: np.full(shape[2:], np.nan) for v in _INPUT_VARS} if "input" in measure \
        else {}
    index = ({x: i for i, x in enumerate(names)}, {x: i for i, x in enumerate(ns)},
             {x: i for i, x in enumerate(kinds)}, {x: i for i, x in enumerate(seeds)})
    for task, results in _execute(tasks, scheduler, workers, progress, connect_timeout):
        where = (index[1][task["n"]], index[2][task["label"]], index[3][task["seed"]])
        for p, rec in results:
            if task["mechanism"] is None:
                for var, val in rec.items():
                    inputs_[var][where] = val
                continue
            at = (index[0][task["mechanism"]], p) + where
            for var, val in rec.items():
                if var == "error":
                    errors[at] = val
                elif var in cells:
                    cells[var][at] = val

    dims = ("mechanism", "parameter", "n", "input_kind", "seed")
    data = {v: (dims, a) for v, a in cells.items()}
    if on_error == "record":
        data["error"] = (dims, errors.astype(str))
    data.update({v: (dims[2:], a) for v, a in inputs_.items()})
    setting = np.array([[_describe(settings[name][i]) if i < len(settings[name]) else ""
                         for i in range(n_par)] for name in names], dtype=str)
    data["setting"] = (("mechanism", "parameter"), setting)
    coords = {"mechanism": np.array(names, dtype=str),
              "parameter": np.arange(n_par, dtype=np.int32),
              "n": np.array(ns, dtype=np.int32),
              "input_kind": np.array(list(kinds), dtype=str),
              "seed": np.array(seeds, dtype=np.int32),
              "family": ("mechanism", np.array([known[x].family for x in names], dtype=str)),
              "exact": ("mechanism", np.array([int(known[x].exact) for x in names],
                                              dtype=np.int8))}
    attrs = {"d": d, "heads": heads, "batch": batch, "repeats": repeats,
             "measure": " ".join(measure),
             "input_kinds": json.dumps({k: [a, b] for k, (a, b) in kinds.items()},
                                       default=repr),
             "reference": "refattn.attention (exact softmax attention, scale 1/sqrt(d))",
             "refattn_version": ra.__version__}
    return xr.Dataset(data, coords=coords, attrs=attrs)


def save(ds, path):
    """Write a sweep Dataset to netCDF (``Dataset.to_netcdf``; the netCDF4/h5netcdf
    engine when installed, else SciPy's netCDF3, for which every variable here is
    already a netCDF3 type: float64, int32, int8, text).

    >>> import os, tempfile
    >>> from refattn.analysis.sweep import sweep, save, load
    >>> ds = sweep(["attention"], None, [8], ["temperature"], [0], measure=("output",),
    ...            workers=1, progress=False)
    >>> path = os.path.join(tempfile.mkdtemp(), "sweep.nc")
    >>> save(ds, path)
    >>> bool(load(path)["output_rel_fro"].equals(ds["output_rel_fro"]))
    True
    """
    ds.to_netcdf(path, engine=_engine())


def load(path):
    """Read a Dataset written by :func:`save` (loaded into memory, file closed)."""
    import xarray as xr
    with xr.open_dataset(path, engine=_engine()) as ds:
        return ds.load()


def _engine():
    for mod, engine in (("netCDF4", "netcdf4"), ("h5netcdf", "h5netcdf")):
        try:
            __import__(mod)
            return engine
        except ImportError:
            continue
    return "scipy"
