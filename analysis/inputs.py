r"""Seeded synthetic attention inputs for the analysis.

Each generator returns ``(q, k, v)``, float64 arrays of shape ``(B, H, N, D)``
(``B = batch``, ``H = heads``, self-attention so ``M = N``), drawn from ``rng`` (an int
seed or a ``numpy.random.Generator``; required, the same ``rng`` gives bit-identical
arrays). With refattn's default scale ``1/sqrt(D)`` the logits
:math:`s_{ij} = q_i\cdot k_j/\sqrt D` are, for each kind:

* :func:`temperature` — i.i.d. Gaussian ``q``, ``k`` scaled by
  :math:`T^{-1/2}` each, so :math:`s_{ij} = g_{ij}/T` with :math:`g_{ij}` of unit
  variance: low temperature gives peaked (low-entropy) rows, high temperature flat
  (high-entropy) rows — the knob of Scatterbrain's Fig. 1 (Chen et al., NeurIPS 2021).
* :func:`clustered` — queries and keys scattered around ``clusters`` shared centres
  (Scatterbrain's / Reformer's clustered model): attention concentrates on the keys of a
  query's own cluster, a block (sparse + low-rank) structure.
* :func:`low_rank` — queries and keys in a common ``rank``-dimensional subspace, so the
  logit matrix :math:`QK^\top` has rank ``rank`` (the attention matrix
  :math:`\exp(S)` row-normalized is then numerically low rank when the logits are
  small).

``v`` is i.i.d. standard normal in every kind.

>>> from refattn.analysis.inputs import temperature
>>> q, k, v = temperature(16, 8, temperature=0.5, rng=0)
>>> q.shape, k.shape, v.shape, q.dtype
((1, 1, 16, 8), (1, 1, 16, 8), (1, 1, 16, 8), dtype('float64'))
"""
from __future__ import annotations

import math

import numpy as np

from refattn._core.checks import check_int, check_positive, resolve_rng

__all__ = ["temperature", "clustered", "low_rank", "GENERATORS", "generate"]


def _positive(name: str, value, where: str) -> float:
    return check_positive(f"{where}: {name}", value)


def _sizes(n, d, batch, heads, where):
    return (check_int("batch", batch, minimum=1, context=f" in {where}"),
            check_int("heads", heads, minimum=1, context=f" in {where}"),
            check_int("n", n, minimum=1, context=f" in {where}"),
            check_int("d", d, minimum=1, context=f" in {where}"))


def temperature(n, d, *, temperature, rng, batch=1, heads=1):
    r"""Gaussian queries and keys at a softmax temperature ``T``.

    :math:`q, k = T^{-1/2} g` with ``g`` i.i.d. :math:`\mathcal N(0, 1)`, so the default
    logits :math:`q\cdot k/\sqrt D` have variance :math:`1/T^2`. ``T -> 0``: each row of
    the attention matrix approaches one-hot (entropy -> 0); ``T -> inf``: uniform rows
    (entropy -> ``ln N``). Returns ``q, k, v`` ``(batch, heads, n, d)`` float64.

    >>> import numpy as np, refattn as ra
    >>> from refattn.analysis.inputs import temperature
    >>> from refattn.analysis.metrics import attention_entropy
    >>> cold = ra.attention_probs(*temperature(64, 16, temperature=0.1, rng=0)[:2])
    >>> hot = ra.attention_probs(*temperature(64, 16, temperature=10.0, rng=0)[:2])
    >>> bool(attention_entropy(cold).mean() < 1.0 < np.log(64) - 0.01
    ...      < attention_entropy(hot).mean() + 0.05)
    True
    """
    where = "temperature"
    b, h, n, d = _sizes(n, d, batch, heads, where)
    t = _positive("temperature", temperature, where)
    gen = resolve_rng(rng, where)
    q, k, v = gen.standard_normal((3, b, h, n, d))
    s = t ** -0.5
    return q * s, k * s, v


def clustered(n, d, *, clusters, spread, rng, batch=1, heads=1):
    r"""Queries and keys around ``clusters`` shared centres (Scatterbrain's model).

    Centres :math:`c_1..c_C \sim \mathcal N(0, I_D)` (per batch element and head);
    every query and key picks a centre uniformly at random (independently) and adds
    ``spread`` times standard normal noise: :math:`x = c_{z} + \text{spread}\cdot g`.
    With the default scale, same-cluster logits are about
    :math:`\|c\|^2/\sqrt D \approx \sqrt D` and cross-cluster logits about
    :math:`\mathcal N(0, 1)`, so each query attends mostly to its own cluster's keys;
    ``spread`` large blurs the clusters. Returns ``q, k, v`` ``(batch, heads, n, d)``.

    >>> import numpy as np
    >>> from refattn.analysis.inputs import clustered
    >>> q, k, v = clustered(32, 8, clusters=4, spread=0.0, rng=1)
    >>> len(np.unique(q.round(12), axis=2)[0, 0])      # spread 0: only the centres
    4
    """
    where = "clustered"
    b, h, n, d = _sizes(n, d, batch, heads, where)
    c = check_int("clusters", clusters, minimum=1, context=f" in {where}")
    try:
        spread = float(spread)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: spread must be a number >= 0, got {spread!r}") from None
    if not (math.isfinite(spread) and spread >= 0):
        raise ValueError(f"{where}: spread must be a finite number >= 0, got {spread!r}")
    gen = resolve_rng(rng, where)
    centres = gen.standard_normal((b, h, c, d))
    labels = gen.integers(0, c, size=(2, b, h, n))
    noise = gen.standard_normal((2, b, h, n, d))
    bi = np.arange(b)[:, None, None]
    hi = np.arange(h)[None, :, None]
    q = centres[bi, hi, labels[0]] + spread * noise[0]
    k = centres[bi, hi, labels[1]] + spread * noise[1]
    v = gen.standard_normal((b, h, n, d))
    return q, k, v


def low_rank(n, d, *, rank, rng, batch=1, heads=1):
    r"""Queries and keys in a shared ``rank``-dimensional subspace.

    :math:`Q = G_q U^\top`, :math:`K = G_k U^\top` with ``U (D, rank)`` orthonormal
    (Haar, per batch element and head) and :math:`G` i.i.d. :math:`\mathcal N(0, D/r)`
    entries, so rows have the same expected norm as a standard Gaussian ``D``-vector
    and the logits keep unit variance; :math:`QK^\top` has rank exactly
    ``min(rank, n)``. ``rank <= d`` is required. Returns ``q, k, v``
    ``(batch, heads, n, d)``.

    >>> import numpy as np
    >>> from refattn.analysis.inputs import low_rank
    >>> q, k, v = low_rank(20, 8, rank=3, rng=0)
    >>> int(np.linalg.matrix_rank(q[0, 0] @ k[0, 0].T))
    3
    """
    where = "low_rank"
    b, h, n, d = _sizes(n, d, batch, heads, where)
    r = check_int("rank", rank, minimum=1, context=f" in {where}")
    if r > d:
        raise ValueError(f"{where}: rank must be <= d; got rank={r}, d={d}")
    gen = resolve_rng(rng, where)
    basis, rr = np.linalg.qr(gen.standard_normal((b, h, d, r)))
    signs = np.sign(np.diagonal(rr, axis1=-2, axis2=-1))
    signs[signs == 0] = 1.0
    basis = basis * signs[..., None, :]
    coeff = gen.standard_normal((2, b, h, n, r)) * math.sqrt(d / r)
    ut = np.swapaxes(basis, -1, -2)
    q, k = coeff[0] @ ut, coeff[1] @ ut
    v = gen.standard_normal((b, h, n, d))
    return q, k, v


#: Generator name -> function; :func:`generate` dispatches on it.
GENERATORS = {"temperature": temperature, "clustered": clustered, "low_rank": low_rank}

#: Keyword arguments used when a kind is named without any (``generate(kind, ...)``).
DEFAULTS = {"temperature": {"temperature": 1.0},
            "clustered": {"clusters": 8, "spread": 0.5},
            "low_rank": {"rank": 4}}


def generate(kind, n, d, *, rng, batch=1, heads=1, **kwargs):
    """``GENERATORS[kind](n, d, rng=rng, batch=batch, heads=heads, **kwargs)``, with
    :data:`DEFAULTS` filled in for keyword arguments not given.

    >>> from refattn.analysis.inputs import generate
    >>> generate("low_rank", 8, 4, rng=0)[0].shape
    (1, 1, 8, 4)
    """
    if kind not in GENERATORS:
        raise ValueError(f"unknown input kind {kind!r}; known kinds: {sorted(GENERATORS)}")
    kw = {**DEFAULTS[kind], **kwargs}
    return GENERATORS[kind](n, d, rng=rng, batch=batch, heads=heads, **kw)
