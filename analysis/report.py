"""``refattn report``: measure every registered mechanism and write a report.

:func:`build_report` writes ``DIR/index.md`` with PNG figures beside it and the data of
every figure and table as netCDF (``*.nc``). It opens with a **summary** computed from the
data (which mechanism loses least at ``headline_budget`` keys per query on real
attention, and at what work), then:

1. **Error vs cost on one axis** (``cost_axis.png``): every family's output error
   against its work per query (key-equivalents counted from the mechanism's definition,
   :mod:`refattn.analysis.work`), synthetic regimes beside real attention, with spread.
2. **Error on real attention** (``real_attention.*``): every budgeted mechanism on
   MiniLM-L6's own Q, K, V, every layer and head, several texts
   (:mod:`refattn.analysis.real_attention`).
3. **Quality a real model loses** (``model_quality.*``): MiniLM-L6 with every layer's
   attention replaced, retrieval accuracy on standard-library docstrings and embedding
   cosine to the exact model (:mod:`refattn.analysis.model_quality`).
4. **Error vs cost per family** (``pareto.*``): the synthetic sweep in detail, with the
   NumPy references' time ratios labelled as such.
5. **Error vs attention entropy** (``entropy.*``): sparse (top-k), low-rank (Nyström,
   Performer) and sparse + low-rank (Scatterbrain) at one budget across temperatures.
6. **Spectrum of real attention** (``minilm_spectrum.*``): singular values of every
   head's attention in MiniLM-L6 on English text, stable and effective ranks per layer.
7. **Performer kernel fidelity** (``kernel_fidelity.*``): Monte Carlo MSE of the
   trigonometric, positive and hyperbolic estimators against Lemma 2.
8. **Complexity, measured** (``complexity.*``): time and traced memory against ``N``,
   fits with their interval and R², flagged where poor or contradicting the stated
   complexity (:mod:`refattn.analysis.scaling_section`).
9. **State sizes** in the dtype a model keeps them (bf16 by default), MHA/GQA/MQA/MLA
   first (:mod:`refattn.analysis.state_sizes`).
10. **Published facts**: rank closed forms, Nyström's third-order convergence, the LSH
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


#: The mechanisms the quick preset puts into MiniLM-L6 (the full preset: every one that
#: applies): masks, top-k, LSH, clustering, kernels, low rank, pooling, k-means.
QUICK_MODEL_MECHANISMS = (
    "sliding_window_attention", "longformer_attention", "block_sparse_attention",
    "topk_attention", "lsh_attention", "clustered_attention", "performer_attention",
    "nystrom_attention", "linformer_attention", "luna_attention", "pooled_attention",
    "kmeans_kv_attention")


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one report. ``n``: sequence length of the accuracy sweeps; ``budgets``:
    keys/features per query swept for the Pareto plot; ``entropy_budget`` and
    ``temperatures`` for the entropy study; ``minilm_tokens``: text length for the
    spectrum; ``kernel_ms``/``kernel_trials``: Performer features and Monte Carlo trials;
    ``complexity_ns``/``complexity_repeats``: lengths and timed calls of the scaling fits.

    Real attention (``real_*``): texts of ``real_tokens`` positions, budgets, seeds of
    randomized mechanisms. Real model (``quality_*``): retrieval documents, query and
    passage word pieces, budgets, and the mechanisms put into MiniLM-L6 (None: every one
    that applies). ``left_out``: mechanisms whose NumPy reference is too slow for this
    preset's real-attention and real-model studies (the report lists them).
    ``headline_budget``: keys per query the summary answers for."""

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
    complexity_repeats: int = 1
    real_tokens: int = 256
    real_texts: int = 2
    real_budgets: tuple = (16, 32, 64, 128)
    real_seeds: tuple = (0, 1)
    quality_docs: int = 32
    quality_query_tokens: int = 16
    quality_passage_tokens: int = 64
    quality_budgets: tuple = (8, 16, 32)
    quality_mechanisms: tuple | None = QUICK_MODEL_MECHANISMS
    left_out: tuple = ("bigbird_attention",)
    headline_budget: int = 64


PRESETS = {
    "quick": Preset(n=512, budgets=(8, 16, 32, 64, 128), seeds=(0, 1), entropy_budget=16,
                    temperatures=(0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0), minilm_tokens=512,
                    kernel_ms=(8, 32, 128, 512), kernel_trials=10000,
                    complexity_ns=(256, 512, 1024, 2048), real_seeds=(0,),
                    quality_passage_tokens=48),
    "full": Preset(n=1024, budgets=(8, 16, 32, 64, 128, 256), seeds=(0, 1, 2, 3),
                   entropy_budget=32, temperatures=(0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0,
                                                    1.4, 2.0, 4.0, 8.0, 16.0),
                   minilm_tokens=512, kernel_ms=(4, 8, 16, 32, 64, 128, 256, 512, 1024),
                   kernel_trials=20000, complexity_ns=(256, 512, 1024, 2048, 4096, 8192,
                                                       16384),
                   complexity_repeats=3, real_tokens=512, real_texts=4,
                   real_budgets=(8, 16, 32, 64, 128, 256), real_seeds=(0, 1, 2),
                   quality_docs=150, quality_passage_tokens=128,
                   quality_budgets=(8, 16, 32, 64), quality_mechanisms=None, left_out=()),
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
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |"
              for r in rows]
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
    from .work import work_per_query
    work = {x: np.array([work_per_query(x, params[x][j], p.n, p.d)
                         for j in range(len(p.budgets))]) for x in names}
    plt = _plt()
    families = sorted({specs[n].family for n in names})
    cols = 3
    rows_ = -(-len(families) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 3.2 * rows_), squeeze=False)
    for ax, fam in zip(axes.flat, families):
        members = [n for n in names if specs[n].family == fam]
        colors = plt.cm.tab20(np.arange(len(members)) % 20)
        for name, color in zip(members, colors):
            for kind, style in (("clustered", "o-"), ("temperature 1", "s--")):
                e = ds.output_rel_fro.sel(mechanism=name, input_kind=kind).isel(n=0)
                med, lo, hi = (e.median("seed").values, e.min("seed").values,
                               e.max("seed").values)
                ok = np.isfinite(med) & (med > 0) & np.isfinite(work[name])
                if not ok.any():
                    continue
                ax.errorbar(work[name][ok], med[ok], yerr=np.vstack(
                    [med[ok] - lo[ok], hi[ok] - med[ok]]), fmt=style, ms=3, lw=0.8,
                    capsize=1.5, color=color, label=name.replace("_attention", "")
                    if kind == "clustered" else None)
        ax.set(xscale="log", yscale="log", title=fam,
               xlabel="work per query (key-equivalents)",
               ylabel="output rel. Frobenius error")
        ax.axvline(p.n, color="k", lw=0.6, ls=":")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    fig.suptitle(f"Per family: error vs work per query (exact = N = {p.n}, dotted); solid: "
                 f"clustered, dashed: temperature 1; median and min-max over "
                 f"{len(seeds)} seeds, D = {p.d}")
    fig.tight_layout()
    png = _save(fig, out / "pareto.png")
    times = ds.wall_time_s.sel(input_kind="clustered").median("seed").isel(n=0)
    exact_t = float(times.sel(mechanism="attention").isel(parameter=0))
    table_rows = []
    for name in names:
        t = times.sel(mechanism=name).values
        row = [name, specs[name].family, " / ".join(_fmt(w, 3) for w in work[name])]
        for kind in ("clustered", "temperature 1"):
            e = ds.output_rel_fro.sel(mechanism=name, input_kind=kind).mean("seed")
            row.append(" / ".join(_fmt(float(x)) for x in e.isel(n=0).values))
        row.append(" / ".join(_fmt(x / exact_t, 2) for x in t))
        errs = ds["error"].sel(mechanism=name).values.ravel()
        row.append(next((str(x)[:60] for x in errs if str(x)), ""))
        table_rows.append(row)
    budgets = "/".join(str(b) for b in p.budgets)
    text = [f"![error vs cost per family]({png})", "",
            f"Output relative Frobenius error (mean over {len(seeds)} seeds) at budgets "
            f"{budgets} keys/features per query (the registry's `budget(n, b)`), N={p.n}, "
            f"with the work per query those settings really cost (key-equivalents, "
            f"`refattn.analysis.work`):", "",
            _table(["mechanism", "family", "work / query", "error, clustered",
                    "error, temperature 1",
                    "NumPy reference time / exact reference time (this machine)",
                    "failed"], table_rows), "",
            "The time ratio compares the NumPy references' wall times: it says how fast "
            "this oracle runs, not how fast the mechanism is. Errors above 1 are worse "
            "than outputting zeros: with these inputs exact attention averages many "
            "values (a small output), which a few kept keys do not reproduce. "
            "Performer's positive features barely improve with m here: their variance "
            "grows like exp(|q + k|^2) / m (Lemma 2, section 4), and these inputs have "
            "|q| / D^(1/4) around 2.5."]
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
                 workers=None, progress=False, state_dtype="bf16") -> Path:
    """Run every study of ``preset`` (``"quick"``, ``"full"`` or a :class:`Preset`) with
    ``seed`` and write ``out/index.md``, its PNGs and netCDF data; returns the index path.

    ``mechanisms``: registered names to restrict the sweeps and the complexity table to
    (default: all; an unknown name raises :class:`ReportError` listing the known ones).
    ``scheduler``: a Dask scheduler address for the sweeps (default: local processes,
    ``workers`` of them); ``progress``: progress bars and messages on stderr;
    ``state_dtype``: the dtype state sizes are given in (``"bf16"``, ``"fp8"``,
    ``"f32"``, ...: :data:`refattn.analysis.state_sizes.DTYPE_BYTES`).
    Raises :class:`ReportError` for an unknown preset, state dtype or an unwritable
    ``out``, and
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
    from .state_sizes import DTYPE_BYTES
    if state_dtype not in DTYPE_BYTES:
        raise ReportError(f"unknown state dtype {state_dtype!r}; choose one of "
                          f"{sorted(DTYPE_BYTES)}")
    out = _writable(out)
    sweep_kw = dict(scheduler=scheduler, workers=workers, progress=progress)
    start = time.perf_counter()
    from .real_sections import (cost_axis_section, leaders, model_quality_section,
                                real_attention_section, summary)
    from .scaling_section import complexity_section, state_size_section
    pareto, pareto_text = _pareto(out, p, seed, sweep_kw, only)
    real, real_text = real_attention_section(out, p, seed, sweep_kw, only)
    quality, quality_text = model_quality_section(         # + the summary's leaders
        out, p, seed, sweep_kw, only, also=leaders(real, p.headline_budget))
    sections = [
        ("Summary", summary(real, quality, p.headline_budget)),
        ("1. Error vs cost: every family on one axis, synthetic and real attention",
         cost_axis_section(out, pareto, real)),
        ("2. Error on real attention (MiniLM-L6's Q, K, V)", real_text),
        ("3. Quality a real model loses (MiniLM-L6, attention replaced in every layer)",
         quality_text),
        ("4. Error vs cost per family, synthetic inputs (detail)", pareto_text),
        ("5. Error vs attention entropy", _entropy(out, p, seed, sweep_kw, only)[1]),
        ("6. Spectrum of real attention (MiniLM-L6)", _spectrum(out, p, seed)[1]),
        ("7. Performer softmax-kernel fidelity", _kernel(out, p, seed)[1]),
        ("8. Complexity, measured", complexity_section(out, p, seed, progress, only)[1]),
        (f"9. Streaming state sizes in {state_dtype}", state_size_section(state_dtype)),
        ("10. Published facts", _facts(seed)),
    ]
    chosen = "" if mechanisms is None else f" --mechanisms {','.join(only)}"
    chosen += "" if state_dtype == "bf16" else f" --state-dtype {state_dtype}"
    head = [f"# refattn report ({name} preset, seed {seed})", "",
            f"Made by `refattn report --preset {name} --seed {seed}{chosen}` with refattn "
            f"{refattn.__version__}, NumPy {np.__version__}, Python "
            f"{platform.python_version()}. Every number except wall times, traced memory "
            f"and their exponents is a deterministic function of the preset and the seed; the "
            f"data of each figure is in the `.nc` file of the same name.", ""]
    body = [f"## {title}\n\n{text}\n" for title, text in sections]
    index = out / "index.md"
    index.write_text("\n".join(head + body))
    if progress:
        print(f"report written to {index} in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    return index


def _main():   # pragma: no cover - python -m refattn.analysis.report
    from refattn.cli import main
    sys.exit(main(["report"] + sys.argv[1:]))


if __name__ == "__main__":   # pragma: no cover
    _main()
