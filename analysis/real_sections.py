"""The report's sections on real attention and a real model, and its summary.

* :func:`real_attention_section`: error vs work on MiniLM-L6's own Q, K, V
  (:mod:`refattn.analysis.real_attention`), with the spread over layers, texts, heads and
  seeds;
* :func:`cost_axis_section`: every family on one error-vs-work figure, synthetic
  regimes beside real attention (:mod:`refattn.analysis.cost_axis`);
* :func:`model_quality_section`: the retrieval accuracy and embedding cosine MiniLM-L6
  keeps with its attention replaced (:mod:`refattn.analysis.model_quality`);
* :func:`summary`: which mechanism loses least at a budget (64 keys per query by
  default) on real attention, and at what cost -- computed from the data.

Each builder returns ``(dataset or None, markdown)``; a study that cannot run (model not
installed, no mechanism left) returns a "Skipped: ..." text instead of failing the
report.

>>> from refattn.analysis.real_sections import summary
>>> summary(None, None, 64)
'No real-attention data (the MiniLM-L6 studies were skipped).'
"""
from __future__ import annotations

import numpy as np

__all__ = ["real_attention_section", "cost_axis_section", "model_quality_section",
           "summary", "leaders", "SPREAD"]

#: Dimensions the real-attention spread is taken over.
SPREAD = ("layer", "text", "head", "seed")


def _chosen(p, only, need_budget=True):
    import refattn as ra
    specs = ra.mechanisms()
    left = [x for x in p.left_out if x in only]
    names = [n for n in only if (specs[n].budget is not None or not need_budget)
             and n not in p.left_out]
    return names, left


def real_attention_section(out, p, seed, sweep_kw, only):
    """Section: error of every budgeted mechanism on MiniLM-L6's Q, K, V."""
    from .real_attention import real_attention_sweep
    from .sweep import save
    names, left = _chosen(p, only)
    if not names:
        return None, "Skipped: none of the chosen mechanisms registers a `budget`."
    try:
        ds = real_attention_sweep(names, p.real_budgets, n_tokens=p.real_tokens,
                                  n_texts=p.real_texts, seeds=[seed + s for s in
                                                               p.real_seeds],
                                  text_seed=seed, **sweep_kw)
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        return None, f"Skipped: {exc}"
    save(ds, out / "real_attention.nc")
    from .cost_axis import summarize
    from .report import _fmt, _table
    err = ds.rel_error.stack(s=SPREAD).values
    med, lo, hi = summarize(err, axis=-1)
    rows = []
    for i, name in enumerate(ds.mechanism.values):
        cells = [f"{_fmt(med[i, j])} [{_fmt(lo[i, j], 2)}, {_fmt(hi[i, j], 2)}] @ "
                 f"{_fmt(float(ds.work_per_query[i, j]), 3)}"
                 if np.isfinite(med[i, j]) else "failed"
                 for j in range(ds.budget.size)]
        errs = [str(x) for x in ds.error.values[i] if str(x)]
        rows.append([name, str(ds.family.values[i])] + cells + [errs[0][:60] if errs
                                                                 else ""])
    n, ent = ds.attrs["tokens"], ds.entropy
    text = [f"MiniLM-L6's queries, keys and values in all {ds.layer.size} layers x "
            f"{ds.sizes['head']} heads on {ds.sizes['text']} texts of N = {n} tokens "
            f"(standard-library docstrings), randomized mechanisms over "
            f"{ds.seed.size} seed(s). Each cell: median output relative error over the "
            f"{int(np.prod([ds.sizes[d] for d in SPREAD]))} (layer, text, head, seed) "
            f"heads [25th, 75th percentile] @ work per query in key-equivalents (exact "
            f"attention: {n}). Real attention is far from the synthetic regimes: its "
            f"mean row entropy is {_fmt(float(ent.mean()), 3)} nats (layer means "
            f"{', '.join(_fmt(float(x), 2) for x in ent.mean(('text', 'head')).values)}; "
            f"uniform: ln {n} = {_fmt(np.log(n), 3)}).", ""]
    if left:
        text += [f"Left out of this preset (NumPy reference too slow for it; "
                 f"`--preset full` runs them): {', '.join(left)}.", ""]
    text.append(_table(["mechanism", "family"] + [f"budget {b}" for b in
                                                  ds.budget.values] + ["failed"], rows))
    return ds, "\n".join(text)


def cost_axis_section(out, pareto, real):
    """Section: all families on one error-vs-work figure (synthetic and real panels)."""
    from .cost_axis import cost_curves, plot_error_vs_work
    from .work import work_per_query
    panels, exact = {}, {}
    if pareto is not None:
        import refattn as ra
        specs = ra.mechanisms()
        n, d = int(pareto.n.values[0]), int(pareto.attrs["d"])
        names = [str(m) for m in pareto.mechanism.values if m != "attention"]
        ds = pareto.sel(mechanism=names).isel(n=0)
        budgets = [int(b) for b in ds.budget.values]
        work = ds.output_rel_fro.isel(input_kind=0, seed=0).copy(data=np.array([
            [work_per_query(x, specs[x].budget(n, b), n, d) for b in budgets]
            for x in names]))
        for kind in ds.input_kind.values:
            title = f"synthetic, {kind} (N = {n}, D = {d})"
            panels[title] = cost_curves(ds.output_rel_fro.sel(input_kind=kind), work,
                                        ("seed",), q=(0.0, 1.0))
            exact[title] = n
    if real is not None:
        title = f"MiniLM-L6 Q, K, V (N = {real.attrs['tokens']}, D = 32)"
        panels[title] = cost_curves(real.rel_error, real.work_per_query, SPREAD)
        exact[title] = real.attrs["tokens"]
    if not panels:
        return "Skipped: no error-vs-cost data."
    png = plot_error_vs_work(panels, out / "cost_axis.png", exact_work=exact,
                             title="Error vs work per query, every family on one axis")
    return (f"![error vs work]({png})\n\nEvery mechanism that registers a budget, each "
            f"family in its colour, on the same log-log axes in every panel. x: work per "
            f"query counted from the mechanism's definition (`refattn.analysis.work`: "
            f"multiply-adds per query / (D + Dv), so exact attention costs N -- not the "
            f"NumPy reference's wall time); y: output relative Frobenius error, median; "
            f"bars: min-max over seeds (synthetic) or the 25th-75th percentile over "
            f"layers x texts x heads x seeds (real). Errors above 1 are worse than "
            f"outputting zeros.")


def model_quality_section(out, p, seed, sweep_kw, only, also=()):
    """Section: the real model's retrieval accuracy and embedding cosine per mechanism
    and budget; ``also``: mechanisms to add to the preset's list (the summary's
    leaders, so that the summary can say what the real model keeps with them)."""
    from .model_quality import EXACT, quality_sweep
    from .report import _fmt, _table
    from .sweep import save
    from .model_quality import applicable
    fits, skipped = applicable(only)
    listed = list(p.quality_mechanisms or only)
    listed += [n for n in also if n not in listed]
    wanted = [n for n in listed if n in fits and n not in p.left_out]
    if not wanted:
        return None, "Skipped: none of the chosen mechanisms is in this preset's list."
    try:
        ds, _ = quality_sweep(wanted, p.quality_budgets, n_docs=p.quality_docs,
                                    query_tokens=p.quality_query_tokens,
                                    passage_tokens=p.quality_passage_tokens, seed=seed,
                                    **sweep_kw)
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        return None, f"Skipped: {exc}"
    save(ds, out / "model_quality.nc")
    rows = []
    for name in ds.mechanism.values:
        budgets = ds.budget.values[:1] if name == EXACT else ds.budget.values
        for b in budgets:
            r = ds.sel(mechanism=name, budget=b)
            err = str(r.error.values)
            rows.append([name.replace("_attention", ""), "all" if name == EXACT else b,
                         "failed" if err else f"{100 * float(r.accuracy):.1f}%",
                         "-" if err else _fmt(float(r.mrr), 3),
                         "-" if err else f"{float(r.cosine):.4f} (min "
                                         f"{float(r.cosine_min):.3f})",
                         _fmt(float(r.work_per_query), 3), err[:60]])
    a = ds.attrs
    left = [x for x in p.left_out if x in fits]
    not_run = [n for n in fits if n not in wanted + left]
    text = [f"MiniLM-L6 with the attention of **every layer** replaced by the mechanism "
            f"at the budget (`spec.budget(N, b)` at each sequence length N; "
            f"`spec.budget(N, N)` where a budget above N is refused), on "
            f"the docstring retrieval task (`refattn.analysis.retrieval`): {a['n_docs']} "
            f"standard-library docstrings; the query is a docstring's first "
            f"{a['query_positions'] - 2} word pieces, its passage the next "
            f"{a['passage_positions'] - 2} (from the next whole word), each in "
            f"[CLS] ... [SEP]; every query is matched against all {a['n_docs']} passages "
            f"by the cosine of mean-pooled embeddings. **Chance accuracy: "
            f"{100 * a['chance']:.1f}%;** one query is {100 / a['n_docs']:.1f} points of "
            f"accuracy, so the cosine is the finer measure. Cosine to exact: mean (and worst) over all "
            f"{2 * a['n_docs']} texts of the cosine between the modified and the exact "
            f"model's embeddings. Work: key-equivalents per query position (multiply-adds "
            f"/ (D + Dv)), counted from the mechanism's definition and averaged over "
            f"queries ({a['query_positions']} positions) and passages "
            f"({a['passage_positions']}); randomized mechanisms use seed {a['seed']}.",
            "", _table(["mechanism", "budget", "retrieval accuracy", "MRR",
                        "cosine to exact", "work / query", "failed"], rows)]
    if skipped:
        text += ["", "Not applicable: " + "; ".join(f"{k} ({v})"
                                                    for k, v in skipped.items()) + "."]
    if left:
        text += ["", f"Left out of this preset (NumPy reference too slow for it): "
                 f"{', '.join(left)}."]
    if not_run:
        text += ["", f"Run by `--preset full` only: {', '.join(not_run)}."]
    return ds, "\n".join(text)


def _best(real, budget, tolerance):
    """``(median, low, high, (i, j) at budget or None, (i, j) within work or None)``."""
    from .cost_axis import summarize
    med, lo, hi = summarize(real.rel_error.stack(s=SPREAD).values, axis=-1)
    budgets = [int(b) for b in real.budget.values]
    nominal = within = None
    if budget in budgets:
        j = budgets.index(budget)
        col = np.where(np.isfinite(med[:, j]), med[:, j], np.inf)
        if np.isfinite(col).any():
            nominal = (int(np.argmin(col)), j)
    work = real.work_per_query.values
    cheap = np.where(np.isfinite(med) & (work <= budget * (1 + tolerance)), med, np.inf)
    if np.isfinite(cheap).any():
        within = tuple(int(x) for x in np.unravel_index(int(np.argmin(cheap)),
                                                         cheap.shape))
    return med, lo, hi, nominal, within


def leaders(real, budget, tolerance=0.1) -> list:
    """The mechanisms :func:`summary` names (lowest error at ``budget``, and within
    ``budget`` key-equivalents of work), in that order, without repeats."""
    if real is None:
        return []
    *_, nominal, within = _best(real, budget, tolerance)
    names = [str(real.mechanism.values[ij[0]]) for ij in (nominal, within) if ij]
    return list(dict.fromkeys(names))


def summary(real, quality, budget, tolerance=0.1) -> str:
    """The summary paragraph: the mechanism with the lowest median error on real
    attention at ``budget`` keys per query (nominal), the lowest among those whose
    counted work is at most ``budget`` key-equivalents (at any budget), their spread and
    work, and what the real model keeps with it (the closest budget in ``quality``)."""
    from .report import _fmt
    if real is None:
        return "No real-attention data (the MiniLM-L6 studies were skipped)."
    med, lo, hi, nominal, within = _best(real, budget, tolerance)
    names = [str(m) for m in real.mechanism.values]
    budgets = [int(b) for b in real.budget.values]
    n = real.attrs["tokens"]
    work = real.work_per_query.values
    lines = []

    def describe(i, j):
        return (f"**{names[i]}** ({real.family.values[i]}, budget {budgets[j]}): median "
                f"output error {_fmt(med[i, j])} [25th-75th percentile {_fmt(lo[i, j])}, "
                f"{_fmt(hi[i, j])}] over layers x texts x heads x seeds, work "
                f"{_fmt(work[i, j], 3)} key-equivalents per query (exact: {n})"
                + _model_note(quality, names[i], budgets[j]))

    if nominal:
        i, j = nominal
        col = np.where(np.isfinite(med[:, j]), med[:, j], np.inf)
        order = np.argsort(col, kind="stable")
        runner = (f" Next: {names[order[1]]} ({_fmt(col[order[1]])})."
                  if len(order) > 1 and np.isfinite(col[order[1]]) else "")
        lines.append(f"- At a nominal {budget} keys per query on real attention "
                     f"(MiniLM-L6, N = {n}), the lowest error is {describe(i, j)}."
                     f"{runner}")
    if within:
        lines.append(f"- Among settings whose counted work is at most {budget} "
                     f"key-equivalents per query (+{int(100 * tolerance)}%), the lowest "
                     f"error is {describe(*within)}.")
    if not lines:
        return f"No mechanism ran at budget {budget} on real attention."
    return "\n".join(lines)


def _model_note(quality, name, budget):
    from .model_quality import EXACT
    if quality is None or name not in quality.mechanism.values:
        return "; not in the real-model table of this preset"
    bs = [int(b) for b in quality.budget.values]
    b = min(bs, key=lambda x: (abs(np.log(x / budget)), -x))
    r, e = quality.sel(mechanism=name, budget=b), quality.sel(mechanism=EXACT, budget=b)
    if str(r.error.values):
        return f"; in MiniLM-L6 at budget {b} it failed"
    return (f"; MiniLM-L6 with it in every layer at budget {b} retrieves "
            f"{100 * float(r.accuracy):.1f}% (exact model "
            f"{100 * float(e.accuracy):.1f}%, chance "
            f"{100 * quality.attrs['chance']:.1f}%), "
            f"embedding cosine to exact {float(r.cosine):.3f}")
