r"""Singular values and rank measures of attention matrices.

For ``A (..., N, M)`` (batched over the leading axes), with singular values
:math:`\sigma_1 \ge \sigma_2 \ge \dots \ge 0`:

* :func:`singular_values` — exact (LAPACK, ``numpy.linalg.svd``) when
  ``min(N, M) <= MAX_EXACT`` (4096), else the top ``k`` by a randomized range finder with
  power iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1) or by Lanczos
  bidiagonalization (``scipy.sparse.linalg.svds``);
* :func:`cumulative_energy` — :math:`E_k = \sum_{i\le k}\sigma_i^2 / \sum_i\sigma_i^2`,
  the fraction of :math:`\|A\|_F^2` captured by the best rank-``k`` approximation;
* :func:`stable_rank` — :math:`\|A\|_F^2 / \|A\|_2^2 = \sum\sigma_i^2/\sigma_1^2`;
* :func:`effective_rank` — :math:`\exp(-\sum_k p_k \ln p_k)`,
  :math:`p_k = \sigma_k/\sum_i \sigma_i` (Roy & Vetterli, EUSIPCO 2007);
* :func:`numerical_rank` — :math:`\#\{k : \sigma_k > \mathrm{tol}\}`.

>>> import numpy as np
>>> from refattn.analysis.spectrum import stable_rank, effective_rank
>>> a = np.diag([3.0, 2.0, 1.0])
>>> float(stable_rank(a)), round(float(effective_rank(a)), 4)     # 14/9, 2.7495
(1.5555555555555556, 2.7495)
"""
from __future__ import annotations

import numpy as np

from refattn._core.checks import check_int, resolve_rng
from refattn.boundary import to_float64

__all__ = ["MAX_EXACT", "singular_values", "randomized_svdvals", "lanczos_svdvals",
           "cumulative_energy", "stable_rank", "effective_rank", "numerical_rank"]

#: Largest ``min(N, M)`` for which ``method="auto"`` runs the exact SVD.
MAX_EXACT = 4096


#: Up to this ``min(N, M)`` the SVDs run with single-threaded BLAS: for small matrices
#: threads cost more than they save (and much more on a loaded machine).
SERIAL_BLAS_MAX = 1024


def _blas_for(a):
    """A context limiting BLAS to one thread for small matrices (refattn's controller)."""
    import contextlib
    if min(a.shape[-2:]) > SERIAL_BLAS_MAX:
        return contextlib.nullcontext()
    from refattn._core.threads import blas_controller
    return blas_controller().limit(limits=1, user_api="blas")


def _matrix(a, name="a") -> np.ndarray:
    a = to_float64(a, name)
    if a.ndim < 2:
        raise ValueError(f"{name} must be a matrix or a batch of matrices (..., N, M), "
                         f"got shape {a.shape}")
    return a


def _svdvals(a):
    with _blas_for(a):
        return np.linalg.svd(a, compute_uv=False)


def randomized_svdvals(a, k, *, rng, oversample=10, power_iters=4) -> np.ndarray:
    r"""Top-``k`` singular values of ``a (..., N, M)`` by the randomized range finder
    (Halko, Martinsson & Tropp 2011): :math:`Y = (AA^\top)^q A\Omega` with Gaussian
    :math:`\Omega` ``(M, k + oversample)``, re-orthonormalized by QR after every
    multiplication (Alg. 4.4), then the exact SVD of :math:`Q^\top A` (Alg. 5.1).
    Returns ``(..., k)`` descending. The error of :math:`\sigma_j` decays like
    :math:`(\sigma_{k+p+1}/\sigma_j)^{2q+1}` with ``q = power_iters``.

    >>> import numpy as np
    >>> from refattn.analysis.spectrum import randomized_svdvals
    >>> a = np.diag([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    >>> randomized_svdvals(a, 2, rng=0, oversample=2).round(10).tolist()
    [5.0, 4.0]
    """
    a = _matrix(a)
    n, m = a.shape[-2:]
    k = check_int("k", k, minimum=1, context=f" for a {a.shape} matrix")
    if k > min(n, m):
        raise ValueError(f"k must be <= min(N, M) = {min(n, m)} for a of shape {a.shape}, "
                         f"got k={k}")
    p = check_int("oversample", oversample, minimum=0)
    q = check_int("power_iters", power_iters, minimum=0)
    gen = resolve_rng(rng, "randomized_svdvals")
    ell = min(k + p, min(n, m))
    at = np.swapaxes(a, -1, -2)
    omega = gen.standard_normal(a.shape[:-2] + (m, ell))
    with _blas_for(a):
        y, _ = np.linalg.qr(a @ omega)
        for _ in range(q):
            z, _ = np.linalg.qr(at @ y)
            y, _ = np.linalg.qr(a @ z)
        b = np.swapaxes(y, -1, -2) @ a                               # (..., ell, M)
        return np.linalg.svd(b, compute_uv=False)[..., :k]


def lanczos_svdvals(a, k, *, rng) -> np.ndarray:
    """Top-``k`` singular values of ``a (..., N, M)`` by ``scipy.sparse.linalg.svds``
    (ARPACK Lanczos), one matrix at a time; ``k < min(N, M)`` required. ``rng`` seeds
    the starting vector. Returns ``(..., k)`` descending.

    >>> import numpy as np
    >>> from refattn.analysis.spectrum import lanczos_svdvals
    >>> lanczos_svdvals(np.diag([5.0, 4.0, 3.0, 2.0]), 2, rng=0).round(10).tolist()
    [5.0, 4.0]
    """
    from scipy.sparse.linalg import svds
    a = _matrix(a)
    n, m = a.shape[-2:]
    k = check_int("k", k, minimum=1, context=f" for a {a.shape} matrix")
    if k >= min(n, m):
        raise ValueError(f"Lanczos needs k < min(N, M) = {min(n, m)} for a of shape "
                         f"{a.shape}, got k={k}; use the exact SVD")
    gen = resolve_rng(rng, "lanczos_svdvals")
    flat = a.reshape((-1, n, m))
    out = np.empty((flat.shape[0], k))
    with _blas_for(a):
        for i, mat in enumerate(flat):
            v0 = gen.standard_normal(min(n, m))
            s = svds(mat, k=k, v0=v0, return_singular_vectors=False, tol=0)
            out[i] = np.sort(s)[::-1]
    return out.reshape(a.shape[:-2] + (k,))


def singular_values(a, *, k=None, method="auto", rng=None, power_iters=4,
                    oversample=10) -> np.ndarray:
    """Singular values of ``a (..., N, M)``, descending, ``(..., min(N, M))`` or
    ``(..., k)``.

    ``method``: ``"exact"`` (``numpy.linalg.svd``), ``"randomized"``
    (:func:`randomized_svdvals`), ``"lanczos"`` (:func:`lanczos_svdvals`) or ``"auto"``:
    exact when ``min(N, M) <= MAX_EXACT`` (then truncated to ``k`` if given), else
    randomized top-``k`` (``k`` and ``rng`` required then: beyond 4096 the full spectrum
    costs ``O(N^3)`` per matrix).

    >>> import numpy as np
    >>> from refattn.analysis.spectrum import singular_values
    >>> singular_values(np.diag([1.0, 3.0, 2.0])).tolist()
    [3.0, 2.0, 1.0]
    """
    a = _matrix(a)
    small = min(a.shape[-2:])
    if method == "auto":
        if small <= MAX_EXACT:
            method = "exact"
        elif k is None or rng is None:
            raise ValueError(f"a of shape {a.shape} is beyond the exact-SVD limit "
                             f"min(N, M) <= {MAX_EXACT}; pass k= (the number of top "
                             f"singular values) and rng= for the randomized SVD")
        else:
            method = "randomized"
    if method == "exact":
        s = _svdvals(a)
        return s if k is None else s[..., :check_int("k", k, minimum=1)]
    if k is None:
        raise ValueError(f"method={method!r} computes the top k singular values; pass k=")
    if method == "randomized":
        return randomized_svdvals(a, k, rng=rng, oversample=oversample,
                                  power_iters=power_iters)
    if method == "lanczos":
        return lanczos_svdvals(a, k, rng=rng)
    raise ValueError(f"method must be 'auto', 'exact', 'randomized' or 'lanczos', got "
                     f"{method!r}")


def cumulative_energy(s) -> np.ndarray:
    r"""Cumulative normalized energy :math:`E_k = \sum_{i\le k} \sigma_i^2 /
    \sum_i \sigma_i^2` of singular values ``s (..., K)`` (descending); an all-zero
    spectrum gives 0. :math:`1 - E_k` is the squared relative Frobenius error of the
    best rank-``k`` approximation (Eckart-Young), when ``s`` is the full spectrum.

    >>> from refattn.analysis.spectrum import cumulative_energy
    >>> cumulative_energy([2.0, 1.0, 1.0]).round(4).tolist()
    [0.6667, 0.8333, 1.0]
    """
    s = to_float64(s, "s")
    if s.ndim < 1:
        raise ValueError(f"s must be singular values (..., K), got shape {s.shape}")
    e = np.cumsum(s * s, axis=-1)
    total = e[..., -1:] if s.shape[-1] else e
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def stable_rank(a, *, rng=None) -> np.ndarray:
    r"""Stable rank :math:`\|A\|_F^2/\|A\|_2^2` of ``a (..., N, M)`` -> ``(...)``
    (float; 0 for a zero matrix). Always ``<= rank(A)``. :math:`\|A\|_2` is exact up to
    ``MAX_EXACT``, beyond by Lanczos (``rng`` then required).

    >>> import numpy as np
    >>> from refattn.analysis.spectrum import stable_rank
    >>> float(stable_rank(np.ones((4, 4))))                  # rank one
    1.0
    """
    a = _matrix(a)
    fro2 = (a * a).sum(axis=(-2, -1))
    if min(a.shape[-2:]) <= MAX_EXACT:
        s1 = _svdvals(a)[..., 0] if a.size else np.zeros(a.shape[:-2])
    else:
        if rng is None:
            raise ValueError(f"stable_rank of a {a.shape} matrix (beyond {MAX_EXACT}) "
                             f"estimates ||A||_2 by Lanczos; pass rng=")
        s1 = lanczos_svdvals(a, 1, rng=rng)[..., 0]
    s12 = s1 * s1
    out = np.divide(fro2, s12, out=np.zeros_like(fro2), where=s12 > 0)
    return out if out.ndim else float(out)


def effective_rank(a=None, *, s=None) -> np.ndarray:
    r"""Effective rank (Roy & Vetterli 2007): :math:`\exp(H(p))`, :math:`H(p) =
    -\sum_k p_k\ln p_k`, :math:`p_k = \sigma_k / \sum_i\sigma_i` (``0 ln 0 = 0``), of
    ``a (..., N, M)`` (exact SVD, ``min(N, M) <= MAX_EXACT``) or of given singular
    values ``s (..., K)``. Between 1 (rank one) and ``rank(A)`` (equal singular values);
    0 for a zero matrix.

    >>> import numpy as np
    >>> from refattn.analysis.spectrum import effective_rank
    >>> round(float(effective_rank(np.eye(5))), 12)
    5.0
    """
    if (a is None) == (s is None):
        raise ValueError("effective_rank needs exactly one of a (matrix) or s= "
                         "(singular values)")
    if s is None:
        a = _matrix(a)
        if min(a.shape[-2:]) > MAX_EXACT:
            raise ValueError(f"effective_rank needs the full spectrum; a of shape {a.shape} "
                             f"is beyond the exact-SVD limit {MAX_EXACT}; pass s= (e.g. a "
                             f"top-k spectrum from singular_values, giving the effective "
                             f"rank of that truncation)")
        s = _svdvals(a)
    else:
        s = to_float64(s, "s")
        if s.ndim < 1 or (s < 0).any():
            raise ValueError(f"s must be nonnegative singular values (..., K), got shape "
                             f"{s.shape}")
    total = s.sum(axis=-1, keepdims=True)
    p = np.divide(s, total, out=np.zeros_like(s), where=total > 0)
    h = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)
    out = np.where(total[..., 0] > 0, np.exp(h), 0.0)
    return out if out.ndim else float(out)


def numerical_rank(a, tol=None) -> np.ndarray:
    r"""Number of singular values of ``a (..., N, M)`` above ``tol`` -> int ``(...)``.
    ``tol=None``: :math:`\sigma_1 \max(N, M)\,\varepsilon` (NumPy's ``matrix_rank``
    default); otherwise an absolute threshold ``>= 0``. Exact SVD.

    >>> import numpy as np
    >>> from refattn.analysis.spectrum import numerical_rank
    >>> a = np.diag([1.0, 1e-3, 1e-9])
    >>> numerical_rank(a), numerical_rank(a, tol=1e-6)
    (3, 2)
    """
    a = _matrix(a)
    s = _svdvals(a)
    if tol is None:
        t = s[..., :1] * max(a.shape[-2:]) * np.finfo(np.float64).eps
    else:
        t = float(tol)
        if not t >= 0:
            raise ValueError(f"tol must be a number >= 0 or None, got {tol!r}")
    r = (s > t).sum(axis=-1)
    return r if r.ndim else int(r)
