"""``refattn report``: measure every registered mechanism and write a report.

:func:`build_report` writes ``DIR/index.md`` with PNG figures beside it and the data of
every figure and table as netCDF (``*.nc``):

1. **Error vs cost** (``pareto.*``): each approximation that registers a ``budget`` is
   swept over keys/features per query; output error against wall time, one panel per
   family, on clustered and temperature-1 Gaussian inputs.
2. **Error vs attention entropy** (``entropy.*``): sparse (top-k), low-rank (Nyström,
   Performer) and sparse + low-rank (Scatterbrain) at one budget across temperatures:
   Scatterbrain's claim that sparse wins at low entropy, low-rank at high, and the
   combination across the middle -- checked, not assumed.
3. **Spectrum of real attention** (``minilm_spectrum.*``): singular values of every
   head's attention in the pretrained MiniLM-L6 on English text (Linformer's Fig. 1 on a
   model anyone can install), with stable and effective ranks per layer.
4. **Performer kernel fidelity** (``kernel_fidelity.*``): Monte Carlo MSE of the
   trigonometric, positive and hyperbolic softmax-kernel estimators against Lemma 2.
5. **Complexity, measured** (``complexity.*``): fitted exponents of time and traced
   memory against ``N`` for every registered mechanism, and streaming state sizes.
6. **Published facts**: rank closed forms, Nyström's third-order convergence, the LSH
   collision law.

Everything but wall times and traced memory is a deterministic function of the preset
and the seed (timings depend on the machine; traced peaks vary by a few hundred bytes
from run to run); regenerating a report reproduces its numbers. The spectrum's text comes from the standard library's
docstrings, so it is fixed for a Python version.

>>> from refattn.analysis.report import PRESETS
>>> sorted(PRESETS)
['full', 'quick']
"""
from __future__ import annotations

import dataclasses
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["Preset", "PRESETS", "build_report", "ReportError"]


class ReportError(RuntimeError):
    """A report could not be written (bad preset, unwritable directory...)."""


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one report. ``n``: sequence length of the accuracy sweeps; ``budgets``:
    keys/features per query swept for the Pareto plot; ``entropy_budget`` and
    ``temperatures`` for the entropy study; ``minilm_tokens``: text length for the
    spectrum; ``kernel_ms``/``kernel_trials``: Performer features and Monte Carlo trials;
    ``complexity_ns``: lengths of the scaling fits."""

    n: int
    budgets: tuple
    seeds: tuple
    entropy_budget: int
    temperatures: tuple
    minilm_tokens: int
    kernel_ms: tuple
    kernel_trials: int
    complexity_ns: tuple
    d: int = 32


PRESETS = {
    "quick": Preset(n=512, budgets=(8, 16, 32, 64, 128), seeds=(0, 1, 2), entropy_budget=16,
                    temperatures=(0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0), minilm_tokens=512,
                    kernel_ms=(8, 32, 128, 512), kernel_trials=10000,
                    complexity_ns=(512, 1024, 2048)),
    "full": Preset(n=1024, budgets=(8, 16, 32, 64, 128, 256), seeds=(0, 1, 2, 3),
                   entropy_budget=32, temperatures=(0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0,
                                                    1.4, 2.0, 4.0, 8.0, 16.0),
                   minilm_tokens=512, kernel_ms=(4, 8, 16, 32, 64, 128, 256, 512, 1024),
                   kernel_trials=20000, complexity_ns=(1024, 2048, 4096, 8192, 16384)),
}

#: Representatives of Scatterbrain's three regimes (all at the same budget).
ENTROPY_MECHANISMS = {"topk_attention": "sparse", "nystrom_attention": "low-rank",
                      "performer_attention": "low-rank",
                      "scatterbrain_attention": "sparse + low-rank"}


def _writable(out) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=out).close()    # can a file be made there?
    except OSError as exc:
        raise ReportError(f"cannot write the report to {str(out)!r}: {exc.strerror or exc}; "
                          f"pass --out with a writable directory") from None
    return out


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-" if x is None or np.isnan(x) else ("inf" if x > 0 else "-inf")
    return f"{x:.{digits}g}"


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "svg.hashsalt": "refattn",
                         "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _save(fig, path: Path) -> str:
    fig.savefig(path, metadata={"Software": None})   # no timestamps: stable bytes
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path.name


# ------------------------------------------------------------------ 1. error vs cost
def _pareto(out, p: Preset, seed, sweep_kw, only):
    import refattn as ra

    from .sweep import save, sweep
    specs = ra.mechanisms()
    names = [n for n, s in specs.items() if s.budget is not None and n in only]
    if not names:
        return None, "Skipped: none of the chosen mechanisms registers a `budget`."
    params = {n: [specs[n].budget(p.n, b) for b in p.budgets] for n in names}
    kinds = {"clustered": ("clustered", {}), "temperature 1": ("temperature",
                                                                {"temperature": 1.0})}
    seeds = [seed + s for s in p.seeds]
    ds = sweep(names + ["attention"], dict(params, attention=[{}]), [p.n], kinds, seeds,
               measure=("output", "cost", "input"), d=p.d, on_error="record", **sweep_kw)
    ds = ds.assign_coords(budget=("parameter", list(p.budgets)))
    save(ds, out / "pareto.nc")
    plt = _plt()
    families = sorted({specs[n].family for n in names})
    cols = 3
    rows_ = -(-len(families) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 3.2 * rows_), squeeze=False)
    err = ds.output_rel_fro.sel(input_kind="clustered").mean("seed").isel(n=0)
    for ax, fam in zip(axes.flat, families):
        for name in (n for n in names if specs[n].family == fam):
            e = err.sel(mechanism=name).values
            ok = np.isfinite(e)
            ax.loglog(np.asarray(p.budgets)[ok], e[ok], "o-", ms=3,
                      label=name.replace("_attention", ""))
        ax.set(title=fam, xlabel="budget: keys / features per query",
               ylabel="output rel. Frobenius error")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    fig.suptitle(f"Error vs cost (keys or features per query; exact attention uses all "
                 f"N = {p.n}), clustered inputs, D = {p.d}")
    fig.tight_layout()
    png = _save(fig, out / "pareto.png")
    times = ds.wall_time_s.sel(input_kind="clustered").median("seed").isel(n=0)
    exact_t = float(times.sel(mechanism="attention").isel(parameter=0))
    table_rows = []
    for name in names:
        t = times.sel(mechanism=name).values
        row = [name, specs[name].family]
        for kind in ("clustered", "temperature 1"):
            e = ds.output_rel_fro.sel(mechanism=name, input_kind=kind).mean("seed")
            row.append(" / ".join(_fmt(float(x)) for x in e.isel(n=0).values))
        row.append(" / ".join(_fmt(x / exact_t, 2) for x in t))
        errs = ds["error"].sel(mechanism=name).values.ravel()
        row.append(next((str(x)[:60] for x in errs if str(x)), ""))
        table_rows.append(row)
    budgets = "/".join(str(b) for b in p.budgets)
    text = [f"![error vs cost]({png})", "",
            f"Output relative Frobenius error (mean over {len(seeds)} seeds) at budgets "
            f"{budgets} keys/features per query (the registry's `budget(n, b)`), N={p.n}:",
            "", _table(["mechanism", "family", "error, clustered", "error, temperature 1",
                        "time / exact (machine-dependent)", "failed"], table_rows), "",
            "Errors above 1 are worse than outputting zeros: with these inputs exact "
            "attention averages many values (a small output), which a few kept keys do not "
            "reproduce. Performer's positive features barely improve with m here: their "
            "variance grows like exp(|q + k|^2) / m (Lemma 2, section 4), and these inputs "
            "have |q| / D^(1/4) around 2.5."]
    return ds, "\n".join(text)


# ------------------------------------------------------------- 2. error vs entropy
def _entropy(out, p: Preset, seed, sweep_kw, only):
    import refattn as ra

    from .sweep import save, sweep
    specs = ra.mechanisms()
    names = [n for n in ENTROPY_MECHANISMS if n in specs and n in only]
    regimes = {ENTROPY_MECHANISMS[n] for n in names}
    if regimes != set(ENTROPY_MECHANISMS.values()):
        return None, (f"Skipped: needs a sparse, a low-rank and a sparse + low-rank "
                      f"mechanism among {sorted(ENTROPY_MECHANISMS)}.")
    params = {n: [specs[n].budget(p.n, p.entropy_budget)] for n in names}
    kinds = {f"T={t:g}": ("temperature", {"temperature": t}) for t in p.temperatures}
    seeds = [seed + s for s in p.seeds]
    ds = sweep(names, params, [p.n], kinds, seeds, measure=("output", "input"), d=p.d,
               **sweep_kw)
    save(ds, out / "entropy.nc")
    err = ds.output_rel_fro.isel(parameter=0, n=0).mean("seed")        # (mech, kind)
    ent = ds.input_entropy.isel(n=0).mean("seed")                       # (kind)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    style = {"sparse": "o-", "low-rank": "s--", "sparse + low-rank": "^-"}
    for name in names:
        ax.semilogy(ent.values, err.sel(mechanism=name).values,
                    style[ENTROPY_MECHANISMS[name]], ms=4,
                    label=f"{name.replace('_attention', '')} ({ENTROPY_MECHANISMS[name]})")
    ax.set(xlabel="mean attention entropy of the exact rows (nats)",
           ylabel="output rel. Frobenius error",
           title=f"Error vs entropy, budget {p.entropy_budget}, N={p.n}, D={p.d}")
    ax.axvline(np.log(p.n), color="k", lw=0.6, ls=":")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = _save(fig, out / "entropy.png")
    sparse = [n for n in names if ENTROPY_MECHANISMS[n] == "sparse"]
    low = [n for n in names if ENTROPY_MECHANISMS[n] == "low-rank"]
    both = [n for n in names if ENTROPY_MECHANISMS[n] == "sparse + low-rank"]
    rows, verdict = [], {}
    for j, kind in enumerate(kinds):
        e = {n: float(err.sel(mechanism=n, input_kind=kind)) for n in names}
        best_sparse = min(e[n] for n in sparse)
        best_low = min(e[n] for n in low)
        combo = min(e[n] for n in both)
        winner = min(e, key=e.get)
        rows.append([kind, _fmt(float(ent.sel(input_kind=kind))), _fmt(best_sparse),
                     _fmt(best_low), _fmt(combo), winner.replace("_attention", "")])
        verdict[kind] = (best_sparse, best_low, combo)
    first, last = list(kinds)[0], list(kinds)[-1]
    middle = list(kinds)[1:-1]
    claims = [
        ("sparse beats low-rank at the lowest entropy", verdict[first][0] < verdict[first][1]),
        ("low-rank beats sparse at the highest entropy", verdict[last][1] < verdict[last][0]),
        ("sparse + low-rank beats both in the middle (at every middle temperature)",
         all(v[2] < min(v[0], v[1]) for k, v in verdict.items() if k in middle)),
    ]
    text = [f"![error vs entropy]({png})", "",
            _table(["inputs", "entropy (nats)", "best sparse", "best low-rank",
                    "sparse + low-rank", "lowest error"], rows), "",
            "Scatterbrain's claim (Chen et al. 2021), as measured here:", ""]
    text += [f"- {c}: **{'holds' if ok else 'does not hold'}**" for c, ok in claims]
    text.append(f"\nThe middle comparison is not budget-neutral: Scatterbrain spends its "
                f"budget on both {p.entropy_budget // 2} keys and "
                f"{p.entropy_budget // 2} features.")
    return ds, "\n".join(text)


# ------------------------------------------------------------ 3. MiniLM spectrum
def _spectrum(out, p: Preset, seed):
    import xarray as xr

    from .minilm import MiniLM, default_text
    from .spectrum import cumulative_energy, effective_rank, singular_values, stable_rank
    try:
        model = MiniLM.load()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        return None, f"Skipped: {exc}"
    text = default_text(p.minilm_tokens, model=model, seed=seed)
    res = model.encode([text])
    attn = res.attentions[:, 0]                                  # (layers, heads, N, N)
    s = singular_values(attn)                                    # (layers, heads, N)
    energy = cumulative_energy(s)
    n = attn.shape[-1]
    ds = xr.Dataset({"singular_values": (("layer", "head", "k"), s),
                     "cumulative_energy": (("layer", "head", "k"), energy),
                     "stable_rank": (("layer", "head"), stable_rank(attn)),
                     "effective_rank": (("layer", "head"), effective_rank(s=s))},
                    coords={"layer": np.arange(1, attn.shape[0] + 1),
                            "head": np.arange(attn.shape[1]), "k": np.arange(1, n + 1)},
                    attrs={"tokens": n, "model": "all-MiniLM-L6-v2",
                           "text": "Python standard-library docstrings "
                                   f"(Python {platform.python_version()}), seed {seed}"})
    ds.to_netcdf(out / "minilm_spectrum.nc", engine="scipy")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for layer in ds.layer.values:
        ax.plot(ds.k / n, ds.cumulative_energy.sel(layer=layer).mean("head"),
                label=f"layer {layer}")
    ax.set(xlabel="k / N", ylabel="cumulative normalized energy Σσ²",
           title=f"Spectrum of MiniLM-L6 attention ({n} tokens, mean over 12 heads)",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = _save(fig, out / "minilm_spectrum.png")
    rows = []
    for layer in ds.layer.values:
        e = ds.cumulative_energy.sel(layer=layer)
        k90 = (e < 0.9).sum("k") + 1
        rows.append([layer, _fmt(float(ds.stable_rank.sel(layer=layer).mean())),
                     _fmt(float(ds.effective_rank.sel(layer=layer).mean())),
                     _fmt(float(k90.mean()))])
    body = [f"![MiniLM spectrum]({png})", "",
            f"{n} tokens of {ds.attrs['text']}. Means over the 12 heads of each layer:", "",
            _table(["layer", "stable rank", "effective rank", "k for 90% energy"], rows)]
    return ds, "\n".join(body)


# --------------------------------------------------------- 4. Performer fidelity
def _kernel(out, p: Preset, seed):
    import xarray as xr

    from .kernel_fidelity import softmax_kernel_mse, softmax_kernel_mse_theory
    KINDS = ("trig", "positive", "hyperbolic")
    d = 16
    dots = (0.5, -0.5)
    mc = np.full((len(KINDS), len(dots), len(p.kernel_ms)), np.nan)
    se, theory = np.full_like(mc, np.nan), np.full_like(mc, np.nan)
    e = np.eye(d)
    for a, kind in enumerate(KINDS):
        for b, dot in enumerate(dots):
            x = e[0]
            y = dot * e[0] + np.sqrt(1 - dot ** 2) * e[1]          # |x| = |y| = 1
            for c, m in enumerate(p.kernel_ms):
                rng = np.random.default_rng([seed, a, b, c])
                est = softmax_kernel_mse(kind, x, y, m, trials=p.kernel_trials, rng=rng)
                mc[a, b, c], se[a, b, c] = est.value, est.stderr
                theory[a, b, c] = softmax_kernel_mse_theory(kind, x, y, m)
    ds = xr.Dataset({"mse_mc": (("kind", "dot", "m"), mc),
                     "mse_stderr": (("kind", "dot", "m"), se),
                     "mse_theory": (("kind", "dot", "m"), theory)},
                    coords={"kind": list(KINDS), "dot": list(dots), "m": list(p.kernel_ms)},
                    attrs={"d": d, "trials": p.kernel_trials, "norms": "|x| = |y| = 1"})
    ds.to_netcdf(out / "kernel_fidelity.nc", engine="scipy")
    plt = _plt()
    fig, axes = plt.subplots(1, len(dots), figsize=(5 * len(dots), 3.6), squeeze=False)
    for ax, dot in zip(axes[0], dots):
        for kind in KINDS:
            sel = ds.sel(kind=kind, dot=dot)
            line = ax.loglog(sel.m, sel.mse_theory, "-", label=f"{kind} (Lemma 2)")[0]
            ax.errorbar(sel.m, sel.mse_mc, yerr=2 * sel.mse_stderr, fmt="o", ms=3,
                        color=line.get_color(), label=f"{kind} (Monte Carlo ±2 s.e.)")
        ax.set(xlabel="random features m", ylabel="MSE of the SM(x, y) estimate",
               title=f"x·y = {dot}, |x| = |y| = 1, d = {d}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    png = _save(fig, out / "kernel_fidelity.png")
    z = (ds.mse_mc - ds.mse_theory) / ds.mse_stderr
    rows = [[kind, dot, m, _fmt(float(ds.mse_theory.sel(kind=kind, dot=dot, m=m))),
             _fmt(float(ds.mse_mc.sel(kind=kind, dot=dot, m=m))),
             _fmt(float(z.sel(kind=kind, dot=dot, m=m)), 2)]
            for kind in KINDS for dot in dots for m in p.kernel_ms]
    body = [f"![kernel fidelity]({png})", "",
            f"{p.kernel_trials} trials per point. z = (MC − theory)/s.e.; the positive and "
            f"hyperbolic estimators at x·y = 0.5 are heavy-tailed, so their sample s.e. "
            f"understates the spread (the tests use exact-moment bounds there).", "",
            _table(["kind", "x·y", "m", "Lemma 2", "Monte Carlo", "z"], rows)]
    return ds, "\n".join(body)


# ------------------------------------------------------------- 5. complexity
def _complexity(out, p: Preset, seed, progress, only):
    from refattn.streaming import state_size_table

    from .complexity import measure_scaling
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(only) * len(p.complexity_ns), desc="complexity")
    try:
        ds = measure_scaling(list(only), ns=p.complexity_ns, rng=seed, repeats=1,
                             progress=(lambda name, n: bar.update()) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    states = state_size_table((1_000, 1_000_000), heads_q=8, heads_kv=8, d=64, dv=64)
    ds["state_bytes_1k"] = ("mechanism", [float(states[m][1_000]) if m in states else np.nan
                                          for m in ds.mechanism.values])
    ds["state_bytes_1m"] = ("mechanism", [float(states[m][1_000_000]) if m in states
                                          else np.nan for m in ds.mechanism.values])
    ds.to_netcdf(out / "complexity.nc", engine="scipy")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    families = sorted(set(ds.family.values))
    colors = dict(zip(families, plt.cm.tab20(np.arange(len(families)) % 20)))
    for name in ds.mechanism.values:
        sel = ds.sel(mechanism=name)
        ax.loglog(ds.n, sel.peak_bytes / 2**20, "o-", ms=2, lw=0.8,
                  color=colors[str(sel.family.values)])
    for fam in families:
        ax.plot([], [], color=colors[fam], label=fam)
    ax.set(xlabel="N", ylabel="peak traced memory (MiB)",
           title=f"Memory vs N, D={ds.attrs['d']}, budget {ds.attrs['budget']} per query")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    png = _save(fig, out / "complexity.png")
    big = ds.n.values[-1]
    rows = [[name, str(ds.family.sel(mechanism=name).values),
             str(ds.complexity.sel(mechanism=name).values),
             _fmt(float(ds.memory_exponent.sel(mechanism=name)), 2),
             _fmt(float(ds.peak_bytes.sel(mechanism=name, n=big)) / 2**20),
             _fmt(float(ds.time_exponent.sel(mechanism=name)), 2),
             _fmt(float(ds.state_bytes_1m.sel(mechanism=name)) / 2**20)]
            for name in ds.mechanism.values]
    body = [f"![memory vs N]({png})", "",
            f"Fitted exponents p of `memory ~ N^p` (traced NumPy memory, repeatable to a few "
            f"hundred bytes) and `time ~ N^p` (machine-dependent) over N = "
            f"{', '.join(map(str, ds.n.values))}; "
            f"streaming state after 1M tokens for Hq = Hkv = 8, D = 64 (the full KV cache "
            f"grows with every token, the others stay fixed):", "",
            _table(["mechanism", "family", "stated time", "memory exp.", f"MiB at N={big}",
                    "time exp.", "state MiB at 1M"], rows)]
    return ds, "\n".join(body)


# ----------------------------------------------------------------- 6. facts
def _facts(seed) -> str:
    from .facts import (convergence_order, lsh_collision_rate, lsh_collision_theory,
                        pinv_residuals)
    from .spectrum import effective_rank, stable_rank
    a = np.diag([3.0, 2.0, 1.0])
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((32, 32))
    kernel = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)   # a Nyström kernel
    res = pinv_residuals(kernel, 40)
    res = res[(res > 1e-10) & (res < 0.5)]          # above the rounding floor
    order = convergence_order(res) if res.size >= 3 else np.array([])
    rows = [["stable rank of diag(3, 2, 1)", _fmt(14 / 9, 6), _fmt(float(stable_rank(a)), 6)],
            ["effective rank of diag(3, 2, 1)", "2.7495",
             _fmt(float(effective_rank(a)), 5)],
            ["Nyström pinv iteration: convergence order", "3",
             _fmt(float(order[-1]), 3) if order.size else "-"]]
    for theta in (np.pi / 6, np.pi / 2, 2 * np.pi / 3):
        est = lsh_collision_rate(theta, 16, trials=20000, rng=rng)
        rows.append([f"2-bucket LSH collision at θ = {theta / np.pi:.3g}π",
                     _fmt(float(lsh_collision_theory(theta)), 4),
                     f"{est.value:.4f} ± {est.stderr:.4f}"])
    return _table(["fact", "published", "measured"], rows)


# ------------------------------------------------------------------ the report
def build_report(out="report", *, preset="quick", seed=0, mechanisms=None, scheduler=None,
                 workers=None, progress=False) -> Path:
    """Run every study of ``preset`` (``"quick"``, ``"full"`` or a :class:`Preset`) with
    ``seed`` and write ``out/index.md``, its PNGs and netCDF data; returns the index path.

    ``mechanisms``: registered names to restrict the sweeps and the complexity table to
    (default: all; an unknown name raises :class:`ReportError` listing the known ones).
    ``scheduler``: a Dask scheduler address for the sweeps (default: local processes,
    ``workers`` of them); ``progress``: progress bars and messages on stderr.
    Raises :class:`ReportError` for an unknown preset or an unwritable ``out``, and
    ``ConnectionError`` for an unreachable scheduler.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ReportError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        name, p = preset, PRESETS[preset]
    elif isinstance(preset, Preset):
        name, p = "custom", preset
    else:
        raise ReportError(f"preset must be a name {sorted(PRESETS)} or a Preset, got "
                          f"{preset!r}")
    import refattn
    known = refattn.mechanisms()
    only = list(known) if mechanisms is None else list(mechanisms)
    unknown = [x for x in only if x not in known]
    if unknown or not only:
        raise ReportError(f"unknown mechanism(s) {unknown}; registered: {sorted(known)}")
    out = _writable(out)
    sweep_kw = dict(scheduler=scheduler, workers=workers, progress=progress)
    start = time.perf_counter()
    sections = []

    def section(title, body):
        sections.append(f"## {title}\n\n{body}\n")

    section("1. Error vs cost", _pareto(out, p, seed, sweep_kw, only)[1])
    section("2. Error vs attention entropy", _entropy(out, p, seed, sweep_kw, only)[1])
    section("3. Spectrum of real attention (MiniLM-L6)", _spectrum(out, p, seed)[1])
    section("4. Performer softmax-kernel fidelity", _kernel(out, p, seed)[1])
    section("5. Complexity, measured", _complexity(out, p, seed, progress, only)[1])
    section("6. Published facts", _facts(seed))
    chosen = "" if mechanisms is None else f" --mechanisms {','.join(only)}"
    head = [f"# refattn report ({name} preset, seed {seed})", "",
            f"Made by `refattn report --preset {name} --seed {seed}{chosen}` with refattn "
            f"{refattn.__version__}, NumPy {np.__version__}, Python "
            f"{platform.python_version()}. Every number except wall times, traced memory "
            f"and their exponents is a deterministic function of the preset and the seed; the "
            f"data of each figure is in the `.nc` file of the same name.", ""]
    index = out / "index.md"
    index.write_text("\n".join(head + sections))
    if progress:
        print(f"report written to {index} in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    return index


def _main():   # pragma: no cover - python -m refattn.analysis.report
    from refattn.cli import main
    sys.exit(main(["report"] + sys.argv[1:]))


if __name__ == "__main__":   # pragma: no cover
    _main()
