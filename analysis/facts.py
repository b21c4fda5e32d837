r"""Measurements behind two of DESIGN.md's facts that are not about the softmax kernel.

* **Nyströmformer's pseudoinverse iteration** (Xiong et al., AAAI 2021, after Razavi et
  al. 2014), :func:`refattn.lowrank.iterative_pinv`:
  :math:`Z_{j+1} = \tfrac14 Z_j(13I - AZ_j(15I - AZ_j(7I - AZ_j)))`,
  :math:`Z_0 = A^\top/(\|A\|_1\|A\|_\infty)`. The residual :math:`E_j = I - AZ_j`
  satisfies :math:`E_{j+1} = \tfrac34 E_j^3 + \tfrac14 E_j^4`; with this :math:`Z_0` every
  :math:`E_j` is a polynomial in the symmetric :math:`AA^\top`, so in the spectral norm
  :math:`e_{j+1} = \tfrac34 e_j^3 + \tfrac14 e_j^4` exactly and
  :math:`e_{j+1}/e_j^3 = \tfrac34 + \tfrac14 e_j \to \tfrac34`: third-order convergence.
  :func:`pinv_residuals` measures :math:`e_j`, :func:`convergence_order` the order.
* **Reformer's angular LSH** (Kitaev et al., ICLR 2020), :func:`refattn.lsh.lsh_buckets`:
  with 2 buckets, vectors at angle :math:`\theta` collide with probability
  :math:`1 - \theta/\pi` (:func:`lsh_collision_rate`).

>>> import numpy as np
>>> from refattn.analysis.facts import pinv_residuals
>>> e = pinv_residuals(np.array([[2.0, 1.0], [1.0, 3.0]]), 4)
>>> bool(np.allclose(e[1:3], 0.75 * e[:2] ** 3 + 0.25 * e[:2] ** 4, rtol=1e-9))
True
"""
from __future__ import annotations

import math

import numpy as np

from refattn._core.checks import check_int, resolve_rng
from refattn.boundary import to_float64
from refattn.lowrank import iterative_pinv
from refattn.lsh import lsh_buckets

from .kernel_fidelity import MCEstimate

__all__ = ["pinv_residuals", "convergence_order", "lsh_collision_rate",
           "lsh_collision_theory"]


def pinv_residuals(a, iters) -> np.ndarray:
    r"""Spectral norms :math:`e_j = \|I - AZ_j\|_2`, ``j = 0..iters``, of the iterates of
    :func:`refattn.lowrank.iterative_pinv` for a square nonsingular ``a (c, c)``
    (each :math:`Z_j` from ``iterative_pinv(a, j)``). Returns ``(iters + 1,)``.

    >>> import numpy as np
    >>> from refattn.analysis.facts import pinv_residuals
    >>> pinv_residuals(np.eye(3), 2).tolist()         # Z_0 = I already
    [0.0, 0.0, 0.0]
    """
    a = to_float64(a, "a")
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"pinv_residuals needs one square matrix (c, c), got shape {a.shape}")
    iters = check_int("iters", iters, minimum=0)
    eye = np.eye(a.shape[0])
    return np.array([np.linalg.norm(eye - a @ iterative_pinv(a, j), 2)
                     for j in range(iters + 1)])


def convergence_order(errors) -> np.ndarray:
    r"""Estimated order :math:`p_j = \ln(e_{j+2}/e_{j+1}) / \ln(e_{j+1}/e_j)` of a
    sequence of errors ``(J,)`` -> ``(J - 2,)`` (tends to ``p`` when
    :math:`e_{j+1} \approx C e_j^p`). Use only errors above the rounding floor.

    >>> import numpy as np
    >>> from refattn.analysis.facts import convergence_order
    >>> convergence_order(np.array([1e-1, 1e-3, 1e-9])).round(12).tolist()
    [3.0]
    """
    e = to_float64(errors, "errors")
    if e.ndim != 1 or e.size < 3 or (e <= 0).any():
        raise ValueError(f"errors must be a positive sequence of length >= 3, got shape "
                         f"{e.shape}")
    le = np.log(e)
    return (le[2:] - le[1:-1]) / (le[1:-1] - le[:-2])


def lsh_collision_theory(theta) -> np.ndarray:
    r"""Collision probability :math:`1 - \theta/\pi` of 2-bucket angular LSH for
    vectors at angle ``theta`` in ``[0, pi]``.

    >>> from refattn.analysis.facts import lsh_collision_theory
    >>> float(lsh_collision_theory(3.141592653589793 / 2))
    0.5
    """
    t = np.asarray(theta, dtype=np.float64)
    if ((t < 0) | (t > math.pi)).any():
        raise ValueError(f"theta must lie in [0, pi], got {theta!r}")
    out = 1.0 - t / math.pi
    return out if out.ndim else float(out)


def lsh_collision_rate(theta, d, *, trials, rng) -> MCEstimate:
    r"""Monte Carlo collision rate of two unit vectors at angle ``theta`` in
    :math:`\mathbb R^d` (``d >= 2``) under ``trials`` independent 2-bucket hashes
    :math:`h(x) = \arg\max[xR; -xR]` (:func:`refattn.lsh.lsh_buckets`), with its
    binomial standard error :math:`\sqrt{\hat p(1-\hat p)/T}` (sample sd).

    >>> from refattn.analysis.facts import lsh_collision_rate
    >>> r = lsh_collision_rate(1.0, 4, trials=4000, rng=0)
    >>> bool(abs(r.z(1 - 1.0 / 3.141592653589793)) < 5)
    True
    """
    d = check_int("d", d, minimum=2)
    trials = check_int("trials", trials, minimum=2)
    theta = float(theta)
    if not 0 <= theta <= math.pi:
        raise ValueError(f"theta must lie in [0, pi], got {theta!r}")
    gen = resolve_rng(rng, "lsh_collision_rate")
    x = np.zeros((2, d))
    x[0, 0] = 1.0
    x[1, 0], x[1, 1] = math.cos(theta), math.sin(theta)
    h = lsh_buckets(x, 2, gen, n_hashes=trials)                  # (trials, 2)
    hits = (h[:, 0] == h[:, 1]).astype(np.float64)
    return MCEstimate(float(hits.mean()), float(hits.std(ddof=1)) / math.sqrt(trials),
                      trials)
