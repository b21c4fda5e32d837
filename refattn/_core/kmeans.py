"""Deterministic k-means (k-means++ initialisation, Lloyd iterations), shared by the
clustered attentions and k-means KV compression.
"""
from __future__ import annotations

import numpy as np

__all__ = ["kmeans"]


def kmeans(x: np.ndarray, n_clusters: int, n_iters: int, gen: np.random.Generator, *,
            spherical: bool):
    """Lloyd's k-means with k-means++ init on the rows of ``x`` ``(P, D)``.

    Returns ``(centroids (C, D), assign (P,))`` with ``C = min(n_clusters, P)`` and
    ``assign`` the nearest centroid of each point (largest ``x·c`` if ``spherical``,
    else smallest ``|x - c|^2``; ties to the lower index). Independent of the order of
    the rows of ``x`` (it runs on their lexicographic order). Empty clusters keep their
    previous centroid (and, with spherical k-means, so do clusters whose points sum to
    zero).
    """
    p, d = x.shape
    c = min(n_clusters, p)
    u = gen.random(c)                  # the only draws: a fixed number per call
    if p == 0:
        return np.zeros((0, d)), np.zeros(0, np.int64)
    order = np.lexsort(x.T[::-1]) if d > 0 else np.arange(p)
    xs = x[order]

    # k-means++: the first centre uniformly, then each with probability ~ distance^2.
    chosen = [min(int(u[0] * p), p - 1)]
    d2 = ((xs - xs[chosen[0]]) ** 2).sum(axis=1)
    for t in range(1, c):
        cum = np.cumsum(d2)
        if not cum[-1] > 0:            # every point sits on a centre: the rest duplicate
            chosen += [chosen[-1]] * (c - t)   # it and stay empty (ties -> lower index)
            break
        j = min(int(np.searchsorted(cum, u[t] * cum[-1], side="right")), p - 1)
        chosen.append(j)
        np.minimum(d2, ((xs - xs[j]) ** 2).sum(axis=1), out=d2)
    centroids = xs[chosen].copy()

    def nearest(cent):
        score = xs @ cent.T if spherical else 2.0 * (xs @ cent.T) - (cent ** 2).sum(axis=1)
        return score.argmax(axis=1)

    def update(assign, cent):
        sums = np.zeros_like(cent)
        np.add.at(sums, assign, xs)    # sequential in the canonical order: deterministic
        new = cent.copy()
        if spherical:
            norm = np.sqrt((sums ** 2).sum(axis=1))
            ok = norm > 0
            new[ok] = sums[ok] / norm[ok, None]
        else:
            counts = np.bincount(assign, minlength=len(cent))
            ok = counts > 0
            new[ok] = sums[ok] / counts[ok, None]
        return new

    assign = nearest(centroids)
    for _ in range(n_iters):
        centroids = update(assign, centroids)
        new = nearest(centroids)
        if np.array_equal(new, assign):
            break
        assign = new
    if not spherical:                  # Vyas et al.: a centroid is the mean of its queries
        centroids = update(assign, centroids)
    out = np.empty(p, np.int64)
    out[order] = assign
    return centroids, out
