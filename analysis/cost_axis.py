"""One cost axis across families: error against the work each query costs.

:func:`plot_error_vs_work` draws, for each study (a panel), every mechanism's error
against its work per query (key-equivalents, :mod:`refattn.analysis.work`) on one
log-log plot: a marker per budget at the median error, a vertical bar from the lower to
the upper quantile (the spread over seeds, or over layers x texts x heads x seeds on
real attention), one hue per family in a shade and marker shape per mechanism,
and exact attention's cost as a dotted vertical line. Panels share both axes, so a
mechanism's position in one panel compares with another's anywhere.

:func:`summarize` reduces an error array to ``(median, low, high)`` over the spread
dimensions; :func:`cost_curves` builds the curves the plot takes from a Dataset.

>>> import numpy as np
>>> from refattn.analysis.cost_axis import summarize
>>> summarize(np.array([[1.0, 2.0, 3.0, 4.0, 5.0]]), axis=1, q=(0.25, 0.75))
(array([3.]), array([2.]), array([4.]))
"""
from __future__ import annotations

import numpy as np

__all__ = ["summarize", "cost_curves", "plot_error_vs_work"]

_MARKERS = "os^vD<>pPhX*"
_CMAPS = ("Purples", "Greens", "Blues", "Reds", "Oranges", "Greys", "YlOrBr", "PuRd")


def summarize(err, axis, q=(0.25, 0.75)):
    """Median and the ``q`` quantiles of ``err`` over ``axis`` (NaNs ignored; all-NaN
    slices give NaN)."""
    err = np.asarray(err, dtype=np.float64)
    with np.errstate(all="ignore"), _quiet():
        return (np.nanmedian(err, axis=axis), np.nanquantile(err, q[0], axis=axis),
                np.nanquantile(err, q[1], axis=axis))


class _quiet:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def cost_curves(error, work, spread_dims, q=(0.25, 0.75)):
    """``{mechanism: (family, work, median, low, high)}`` from ``error`` (an
    ``xarray.DataArray`` with dims ``mechanism``, a budget-like dim and
    ``spread_dims``, and a ``family`` coordinate) and ``work`` (``(mechanism, budget)``
    key-equivalents per query)."""
    err = error.transpose("mechanism", ..., *spread_dims)
    flat = err.values.reshape(err.shape[0], err.shape[1], -1)
    med, lo, hi = summarize(flat, axis=-1, q=q)
    fam = [str(f) for f in error["family"].values]
    return {str(m): (fam[i], np.asarray(work.sel(mechanism=m).values, dtype=float),
                     med[i], lo[i], hi[i])
            for i, m in enumerate(error["mechanism"].values)}


def plot_error_vs_work(panels, path, *, exact_work=None, ylabel="output rel. Frobenius "
                       "error (median; bars: spread)", title=None):
    """Write the figure to ``path`` (PNG). ``panels``: ``{title: curves}`` with curves
    from :func:`cost_curves`; ``exact_work``: ``{title: N}`` for the dotted line."""
    from .report import _plt, _save
    plt = _plt()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n + 2.2, 4.6), squeeze=False,
                             sharex=True, sharey=True)
    members = {}
    for curves in panels.values():
        for name, c in curves.items():
            members.setdefault(c[0], {}).setdefault(name, None)
    color, shape = {}, {}
    for k, fam in enumerate(sorted(members)):      # a hue per family, shades within
        cmap = plt.get_cmap(_CMAPS[k % len(_CMAPS)])
        names = list(members[fam])
        for i, name in enumerate(names):
            color[name] = cmap(0.95 - 0.55 * i / max(1, len(names) - 1))
            shape[name] = _MARKERS[i % len(_MARKERS)]
    handles = {}
    for ax, (ptitle, curves) in zip(axes[0], panels.items()):
        for name, (fam, work, med, lo, hi) in curves.items():
            ok = np.isfinite(med) & np.isfinite(work) & (med > 0) & (work > 0)
            if not ok.any():
                continue
            yerr = np.vstack([med[ok] - lo[ok], hi[ok] - med[ok]]).clip(min=0)
            h = ax.errorbar(work[ok], med[ok], yerr=yerr, fmt=shape[name] + "-",
                            ms=3.5, lw=0.8, elinewidth=0.6, capsize=1.5,
                            color=color[name], alpha=0.9)
            handles.setdefault(name, (h, fam))
        if exact_work and ptitle in exact_work:
            ax.axvline(exact_work[ptitle], color="k", lw=0.8, ls=":")
        ax.set(xscale="log", yscale="log", title=ptitle,
               xlabel="work per query (key-equivalents; exact = N, dotted)")
    axes[0][0].set_ylabel(ylabel)
    order = sorted(handles, key=lambda m: (handles[m][1], m))
    fig.legend([handles[m][0] for m in order],
               [f"{handles[m][1]}: {m.replace('_attention', '')}" for m in order],
               loc="center right", fontsize=6, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / (4.4 * n + 2.2), 1))
    return _save(fig, path)
