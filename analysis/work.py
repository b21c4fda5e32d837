r"""Work per query, counted from each mechanism's definition (not its wall time).

The common unit is **key-equivalents per query**: the multiply-adds one query costs,
key-side work amortized over the ``N`` queries of self-attention (``M = N``), divided by
``D + Dv``, the multiply-adds exact attention spends on one key (a score ``q·k`` and a
weighted value). Exact attention costs ``N``; a sparse pattern keeping ``k`` keys costs
``k``. It does not depend on how fast the NumPy reference happens to run.

How each mechanism is counted (:func:`work_per_query`):

* **mask-defined mechanisms** (``spec.mask``: sliding window, sinks, strided, fixed,
  block-sparse, BigBird, Longformer, chunks, Transformer-XL, ...): the kept pairs,
  counted on the mask materialized at ``N x N`` -- the pattern's real density, which
  differs from the nominal budget (edges, rounding, fixed patterns' summaries);
* the others from the dominant terms of their published algorithm (:data:`FORMULAS`,
  each printed in :func:`describe`), e.g. top-k: ``N·D + k·Dv`` (it scores every key,
  then aggregates ``k``); Performer: ``2m(D + Dv)`` (feature maps of ``q`` and ``k``,
  the ``m x Dv`` summary, the readout); Nyström: ``2c(D + Dv) + 4·I·c³/N``;
  ``k``-means: ``C·D·I + C·(D + Dv)`` with ``I`` Lloyd iterations;
* a mechanism with neither gives NaN (not counted), never a guess.

>>> from refattn.analysis.work import work_per_query
>>> work_per_query("attention", {}, 512, 32)
512.0
>>> work_per_query("performer_attention", {"num_features": 64}, 512, 32)
128.0
>>> work_per_query("sliding_window_attention", {"window": 2, "right": 2}, 8, 4)
4.25
"""
from __future__ import annotations

import inspect
import math

import numpy as np

__all__ = ["work_per_query", "describe", "FORMULAS"]


def _defaults(spec) -> dict:
    return {p: v.default for p, v in inspect.signature(spec.fn).parameters.items()
            if v.default is not inspect.Parameter.empty}


def _lsh(p, n, d, dv):
    h, nb = p.get("n_hashes", 1), p["n_buckets"]
    c = min(p.get("chunk_size", 64), n)
    return h * (d * nb / 2 + 2 * c * (d + dv)) / (d + dv)


def _kmeans(clusters, p, d, dv):
    """Lloyd iterations over one side (``C·D·I`` per point) as key-equivalents."""
    return clusters * d * p["n_iters"] / (d + dv)


def _nsa(p, n, d, dv):
    stride = max(1, p.get("stride", 16))
    blocks = n / stride
    selected = min(n, p.get("top_n", 16) * p.get("select_size", 64))
    window = min(n, p.get("window", 512))
    compress = n * d / n                      # mean-pooling each key once
    return blocks + selected + window + compress / (d + dv)


#: name -> (formula text, f(params, n, d, dv) -> key-equivalents per query). ``params``
#: are the call's keyword arguments over the function's defaults.
FORMULAS = {
    "attention": ("N", lambda p, n, d, dv: n),
    "tiled_attention": ("N", lambda p, n, d, dv: n),
    "topk_attention": ("(N·D + k·Dv)/(D+Dv)",
                       lambda p, n, d, dv: (n * d + min(p["topk"], n) * dv) / (d + dv)),
    "dsa_attention": ("(N·D (indexer on q, k) + k·(D+Dv))/(D+Dv)",
                      lambda p, n, d, dv: n * d / (d + dv) + min(p["topk"], n)),
    "routing_attention": ("2·C·D·I/(D+Dv) + N/C  (k-means on queries and keys, "
                          "attention within a cluster)",
                          lambda p, n, d, dv: 2 * _kmeans(p["n_clusters"], p, d, dv)
                          + n / p["n_clusters"]),
    "clustered_attention": ("C·D·I/(D+Dv) + C  (k-means on queries, centroid attention)",
                            lambda p, n, d, dv: _kmeans(p["n_clusters"], p, d, dv)
                            + p["n_clusters"]),
    "improved_clustered_attention": (
        "C·D·I/(D+Dv) + C + k  (+ each query's top-k keys)",
        lambda p, n, d, dv: _kmeans(p["n_clusters"], p, d, dv) + p["n_clusters"]
        + min(p["topk"], n)),
    "lsh_attention": ("h·(D·n_buckets/2 + 2·chunk·(D+Dv))/(D+Dv)", _lsh),
    "performer_attention": ("2m  (features of q and k, m x Dv summary, readout)",
                            lambda p, n, d, dv: 2 * p["num_features"]),
    "scatterbrain_attention": (
        "2m + (N·D + k·(D+m+Dv))/(D+Dv)  (Performer + top-k correction)",
        lambda p, n, d, dv: 2 * p["num_features"] + (
            n * d + min(p["topk"] or 0, n) * (d + p["num_features"] + dv)) / (d + dv)),
    "linformer_attention": ("2r  (project K and V to r rows, attend to them)",
                            lambda p, n, d, dv: 2 * p["rank"]),
    "nystrom_attention": ("2c + 4·I·c³/(N·(D+Dv))  (three kernels, iterative pinv)",
                          lambda p, n, d, dv: 2 * p["num_landmarks"]
                          + 4 * p["pinv_iters"] * p["num_landmarks"] ** 3 / (n * (d + dv))),
    "luna_attention": ("2l  (pack, unpack)", lambda p, n, d, dv: 2 * p["packed"]),
    "pooled_attention": ("N/s + s·[local] + 1  (pooled keys, local window, pooling)",
                         lambda p, n, d, dv: n / p["stride"]
                         + (p["stride"] if p.get("local") else 0) + 1),
    "strided_kv_attention": ("N/s", lambda p, n, d, dv: n / p["stride"]),
    "landmark_attention": ("L + D/(D+Dv)  (landmarks, selection by norm)",
                           lambda p, n, d, dv: (p["num_landmarks"] or n)
                           + d / (d + dv)),
    "kmeans_kv_attention": ("C·D·I/(D+Dv) + C  (k-means on keys, centroid attention)",
                            lambda p, n, d, dv: _kmeans(p["n_centroids"], p, d, dv)
                            + p["n_centroids"]),
    "compressive_attention": ("S + mem + cmem  (segment, memory, compressed memory)",
                              lambda p, n, d, dv: min(n, p["segment_len"] + p["mem_len"]
                                                      + p["cmem_len"])),
    "nsa_attention": ("N/stride + top_n·select + window (+ pooling)", _nsa),
    "moba_attention": ("N/B·D/(D+Dv) + k·B  (block gate, kept blocks)",
                       lambda p, n, d, dv: n / p["block_size"] * d / (d + dv)
                       + min(n, p["topk"] * p["block_size"])),
}


def describe(name) -> str:
    """How ``name``'s work is counted, as text ('kept pairs of its mask', a formula, or
    'not counted')."""
    import refattn as ra
    spec = ra.mechanisms().get(name)
    if name in FORMULAS:
        return FORMULAS[name][0]
    if spec is not None and spec.mask is not None:
        return "kept pairs of its mask"
    return "not counted"


def work_per_query(name, params, n, d, dv=None) -> float:
    """Key-equivalents per query of registered mechanism ``name`` called with
    ``params`` on self-attention of length ``n`` with head dims ``d``, ``dv``
    (default ``d``); NaN when the mechanism has neither a formula nor a mask."""
    import refattn as ra
    dv = d if dv is None else dv
    specs = ra.mechanisms()
    if name not in specs:
        raise ValueError(f"unknown mechanism {name!r}; registered: {sorted(specs)}")
    spec = specs[name]
    p = {**_defaults(spec), **dict(params)}
    if name in FORMULAS:
        try:
            return float(FORMULAS[name][1](p, n, d, dv))
        except (KeyError, TypeError):    # a parameter renamed since: not counted
            return math.nan
    if spec.mask is not None:
        takes = inspect.signature(spec.mask).parameters
        kw = {a: b for a, b in params.items() if a in takes}
        if spec.randomized and "rng" in takes:
            kw.setdefault("rng", 0)
        try:
            kept = spec.mask(**kw).materialize(n, n)
        except (TypeError, ValueError):
            return math.nan
        return float(np.count_nonzero(kept)) / n
    return math.nan
