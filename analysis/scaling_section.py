"""The report's measured-complexity section: time and memory against ``N`` for every
registered mechanism, their power-law fits judged against the stated complexity, and
streaming state sizes in the dtype a model keeps them in.

Fits (:mod:`refattn.analysis.fits`) print as numbers only when good (R² >= 0.95 over at
least a 8x span of ``N`` and 4 points) and consistent with the exponent stated in the
registry's ``time`` string (:func:`~refattn.analysis.fits.stated_exponent`, every symbol
but ``N``/``M`` held fixed). Where the registry's ``budget(N, b)`` makes a parameter
grow with ``N`` (``n_clusters = N / b``, ``stride = N / b``, ...), the stated string's
exponent does not describe the measured setting, so only the fit's quality is judged and
the table says which parameter scales. Wall times are those of the NumPy references on
this machine, not of the mechanisms.

>>> from refattn.analysis.scaling_section import scaling_parameters
>>> import refattn as ra
>>> scaling_parameters(ra.mechanisms()["strided_kv_attention"], (1024, 8192), 32)
['stride']
"""
from __future__ import annotations

import numpy as np

__all__ = ["scaling_parameters", "judge_scaling", "complexity_section",
           "state_size_section"]


def scaling_parameters(spec, ns, budget) -> list:
    """Parameters of ``spec``'s :func:`~refattn.analysis.complexity.scaling_params`
    that change between the smallest and largest ``ns`` (they grow with ``N``)."""
    from .complexity import scaling_params
    a, b = scaling_params(spec, min(ns), budget), scaling_params(spec, max(ns), budget)
    return sorted(k for k in a if k != "rng" and _differs(a[k], b.get(k)))


def _differs(x, y):
    try:
        return bool(np.any(np.asarray(x) != np.asarray(y)))
    except (ValueError, TypeError):
        return True                     # shapes differ (a layout grows with N)


def judge_scaling(ds):
    """Add fits to a :func:`~refattn.analysis.complexity.measure_scaling` Dataset:
    ``time_exponent``, ``time_ci_low``/``_high``, ``time_r2``, ``time_flag`` and the
    same for ``memory``, ``stated_exponent`` and ``scaling_params`` (text)."""
    import refattn as ra

    from .fits import fit_power_law, judge_fit, stated_exponent
    specs = ra.mechanisms()
    ns = [int(n) for n in ds.n.values]
    stated, grows = [], []
    for name in ds.mechanism.values:
        spec = specs[str(name)]
        g = scaling_parameters(spec, ns, int(ds.attrs["budget"]))
        grows.append(", ".join(g))
        stated.append(np.nan if g else stated_exponent(spec.time))
    ds["stated_exponent"] = ("mechanism", np.array(stated, dtype=float))
    ds["scaling_params"] = ("mechanism", np.array(grows, dtype=str))
    for what, var, at_most in (("time", "time_s", False), ("memory", "peak_bytes", True)):
        fits = [fit_power_law(ns, ds[var].sel(mechanism=m).values)
                for m in ds.mechanism.values]
        judged = [judge_fit(f, s, at_most=at_most) for f, s in zip(fits, stated)]
        ds[f"{what}_exponent"] = ("mechanism", np.array([f.exponent for f in fits]))
        ds[f"{what}_ci_low"] = ("mechanism", np.array([f.ci[0] for f in fits]))
        ds[f"{what}_ci_high"] = ("mechanism", np.array([f.ci[1] for f in fits]))
        ds[f"{what}_r2"] = ("mechanism", np.array([f.r2 for f in fits]))
        ds[f"{what}_flag"] = ("mechanism", np.array([j.flag for j in judged], dtype=str))
        ds[f"{what}_text"] = ("mechanism", np.array([j.text for j in judged], dtype=str))
    return ds


def _plot(ds, path):
    from .report import _plt, _save
    plt = _plt()
    families = list(dict.fromkeys(str(f) for f in ds.family.values))
    cols = 4                                       # two families per row: time | memory
    rows = -(-len(families) // 2)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.7 * rows), squeeze=False)
    n = ds.n.values
    for k, fam in enumerate(families):
        ax_t, ax_m = axes[k // 2, 2 * (k % 2)], axes[k // 2, 2 * (k % 2) + 1]
        names = [str(m) for m, f in zip(ds.mechanism.values, ds.family.values) if f == fam]
        colors = plt.cm.tab20(np.arange(len(names)) % 20)
        for name, c in zip(names, colors):
            sel = ds.sel(mechanism=name)
            label = name.replace("_attention", "")
            ax_t.loglog(n, sel.time_s, "o-", ms=2.5, lw=1, color=c, label=label)
            ax_m.loglog(n, sel.peak_bytes / 2**20, "s--", ms=2.5, lw=1, color=c)
        for ax, what in ((ax_t, "NumPy reference time (s)"),
                         (ax_m, "peak traced memory (MiB)")):
            ax.set(title=f"{fam}: {what.split(' (')[0].replace('NumPy ', '')}",
                   xlabel="N", ylabel=what)
            ax.set_xticks(n, [str(int(x)) for x in n], fontsize=6)
            ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        ax_t.legend(fontsize=5.5, ncol=2)
    for ax in list(axes.flat)[2 * len(families):]:
        ax.axis("off")
    fig.suptitle(f"Time (NumPy references on this machine) and traced memory vs N, "
                 f"D = {ds.attrs['d']}, budget {ds.attrs['budget']} keys per query")
    fig.tight_layout()
    return _save(fig, path)


def complexity_section(out, p, seed, progress, only):
    """Section: fitted exponents with their quality and flags; time and memory plots."""
    from .complexity import measure_scaling
    from .report import _fmt, _table
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(only) * len(p.complexity_ns), desc="complexity")
    from refattn._core.threads import blas_controller
    try:       # one BLAS thread, as in the sweeps: no thread hand-offs in the timings
        with blas_controller().limit(limits=1, user_api="blas"):
            ds = measure_scaling(list(only), ns=p.complexity_ns, rng=seed,
                                 repeats=p.complexity_repeats,
                                 progress=(lambda name, n: bar.update()) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    ds = judge_scaling(ds)
    ds.to_netcdf(out / "complexity.nc", engine="scipy")
    png = _plot(ds, out / "complexity.png")
    big = int(ds.n.values[-1])
    rows = []
    for name in ds.mechanism.values:
        r = ds.sel(mechanism=name)
        stated = float(r.stated_exponent)
        grows = str(r.scaling_params.values)
        rows.append([str(name), str(r.family.values), str(r.complexity.values),
                     _fmt(stated, 2) if np.isfinite(stated) else
                     (f"- ({grows} grows with N)" if grows else "- (not in N)"),
                     str(r.time_text.values), str(r.memory_text.values),
                     _fmt(float(r.time_s.sel(n=big)), 2),
                     _fmt(float(r.peak_bytes.sel(n=big)) / 2**20)])
    flagged = int(sum(bool(str(f)) for f in ds.time_flag.values))
    body = [f"![time and memory vs N]({png})", "",
            f"Power-law fits `y ~ N^p` over N = {', '.join(map(str, ds.n.values))} "
            f"({ds.n.values[-1] // ds.n.values[0]}x), best of {ds.attrs['repeats']} "
            f"call(s), BLAS on one thread: p ± half the 95% interval (R²). A fit is printed only when R² >= "
            f"0.95 and its interval (± 0.25) contains the exponent of N in the stated "
            f"time (other symbols fixed; memory may not exceed it); otherwise ⚠ says why "
            f"({flagged} time fits flagged). Times are the NumPy references' on this "
            f"machine, under its load -- not the mechanisms' speed; traced memory "
            f"(tracemalloc) repeats to a few hundred bytes.", "",
            _table(["mechanism", "family", "stated time", "stated exp. in N",
                    "time exp.", "memory exp.", f"reference s at N={big}",
                    f"MiB at N={big}"], rows)]
    return ds, "\n".join(body)


def state_size_section(dtype="bf16", *, heads_q=32, heads_kv=8, d=128):
    """Section text: state bytes after 1k and 1M tokens in ``dtype``, the full caches
    (MHA, GQA, MQA, MLA) first."""
    from .report import _fmt, _table
    from .state_sizes import DTYPE_BYTES, KV_ROWS, state_sizes
    ns = (1_000, 1_000_000)
    table = state_sizes(ns, dtype=dtype, heads_q=heads_q, heads_kv=heads_kv, d=d)
    label = {"attention_mha": f"MHA full KV cache (Hkv = {heads_q})",
             "attention": f"GQA full KV cache (Hkv = {heads_kv})",
             "attention_mqa": "MQA full KV cache (Hkv = 1)",
             "mla_attention": "MLA latent cache (512 + 64 per token)"}
    order = [r for r in KV_ROWS if r in table] + [r for r in table if r not in KV_ROWS]
    rows = [[label.get(r, r), _fmt(table[r][ns[0]] / 2**20),
             _fmt(table[r][ns[1]] / 2**20)] for r in order]
    return "\n".join([
        f"Streaming state of one layer, batch 1, Hq = {heads_q}, Hkv = {heads_kv}, "
        f"D = Dv = {d} (a Llama-style layer), stored in **{dtype}** "
        f"(`refattn.analysis.state_sizes`; refattn's references hold float64, "
        f"{8 // DTYPE_BYTES[dtype]}x these numbers). Bounded mechanisms use the "
        f"registry's budget for 4096 keys per query; `linear_rnn` and `selective_scan` "
        f"are recurrences over Hq·D channels for comparison.", "",
        _table(["state", "MiB after 1k tokens", "MiB after 1M tokens"], rows)])
