r"""Performer / FAVOR+ (Choromanski et al., ICLR 2021, "Rethinking Attention with
Performers"), float64 reference: softmax attention with the kernel
:math:`\mathrm{SM}(x, y) = e^{x \cdot y}` replaced by an unbiased random-feature estimate.

**Scaling.** Softmax attention weights are :math:`e^{s\, q \cdot k}` with ``s = scale``
(default :math:`1/\sqrt{D}`). Queries and keys are mapped to :math:`x = \sqrt{|s|}\, q`
and :math:`y = \operatorname{sign}(s)\sqrt{|s|}\, k` (``D^{-1/4}`` each by default), so
:math:`x \cdot y = s\, q \cdot k` and the estimated kernel is :math:`e^{s\,q\cdot k}`.

**Random features.** With :math:`\omega_1, \dots, \omega_m \in \mathbb{R}^D`
(:func:`draw_omega`; marginally :math:`\mathcal N(0, I_D)`) and ``m = num_features``:

* ``"positive"`` (FAVOR+, Lemma 1): :math:`\phi(x) = \frac{1}{\sqrt m}
  \big(e^{\omega_f \cdot x - \|x\|^2/2}\big)_{f=1}^m`, ``F = m`` features, all positive;
* ``"hyperbolic"``: :math:`\phi(x) = \frac{1}{\sqrt{2m}} \big(e^{\omega_f \cdot x -
  \|x\|^2/2}, e^{-\omega_f \cdot x - \|x\|^2/2}\big)_f`, ``F = 2m``, all positive;
* ``"trigonometric"``: :math:`\phi(x) = \frac{e^{\|x\|^2/2}}{\sqrt m}
  \big(\sin \omega_f \cdot x, \cos \omega_f \cdot x\big)_f`, ``F = 2m``, **signed**.

Each gives :math:`\mathbb{E}[\phi(x)\cdot\phi(y)] = e^{x\cdot y}` exactly
(:func:`softmax_kernel_estimate`), with the mean squared errors of Lemma 2 for i.i.d.
:math:`\omega` (``MSE_trig = e^{\|x+y\|^2} SM^{-2} (1 - e^{-\|x-y\|^2})^2 / (2m)``,
``MSE_pos = e^{\|x+y\|^2} SM^2 (1 - e^{-\|x+y\|^2}) / m``,
``MSE_hyp = (1 - e^{-\|x+y\|^2}) MSE_pos / 2``).

**Orthogonal features** (``orthogonal=True``): :math:`\omega` is built from
``ceil(m / D)`` independent blocks, each the ``D x D`` orthogonal factor of the QR
decomposition of a Gaussian matrix, with the signs of ``diag(R)`` moved into ``Q`` so
that ``Q`` is Haar-distributed (the paper's code omits this step); the first ``m`` rows
are kept and row ``f`` rescaled to the norm of an independent ``N(0, I_D)`` vector
(chi(D)-distributed). Each row is then marginally ``N(0, I_D)`` — the estimate stays
unbiased — while rows within a block are exactly orthogonal, which lowers the MSE
(by at least ``2(m-1)/(m(D+2)) (SM - e^{-(|x|^2+|y|^2)/2})^2`` for positive features,
``m <= D``).

**Attention.** Output row :math:`i` is linear attention (:mod:`refattn.linear`) with
these features:

.. math:: o_i = \frac{\phi(x_i)^\top \sum_{j \in V_i} \phi(y_j) v_j^\top}
                     {\phi(x_i)^\top \sum_{j \in V_i} \phi(y_j)},

non-causal by the two matrix products :math:`\phi(X)(\phi(Y)^\top V)` and
:math:`\phi(X)(\phi(Y)^\top 1)`; causal (:math:`V_i = \{j \le i + M - N\}`, bottom-right)
by prefix sums over the keys (``method="recurrent"``, default; ``"chunkwise"`` and the
masked ``"quadratic"`` form compute the same). One :math:`\omega` is drawn per call and
shared by all batch elements and heads, as in the paper's implementation. A zero
denominator gives output 0 (see :mod:`refattn.linear`).

**Stabilizer** (``stabilize=True``, default). The features are computed as
:math:`\exp(h - c)` with :math:`h` the log-magnitudes above (``ω·x - ‖x‖²/2``;
``‖x‖²/2`` for the trigonometric factor), subtracting a max ``c``: per row for queries
(the max over that query's features) and, for keys, one global max per batch element
and KV head over all keys and features (NaN ignored). This is the paper's code with two
differences: ``c`` includes the ``-‖x‖²/2`` term (a per-row constant for queries, so the
same features; for keys it avoids the underflow of large-norm keys), and no epsilon is
added to the features (the reference code adds ``1e-4`` to every feature, which biases
the estimate). The shift cancels exactly in the normalized output: a query's constant
multiplies its numerator and denominator alike, the keys' constant is shared by every
key of the sum, so the output is the same function; only overflow and underflow change.
Without it ``exp`` overflows or underflows for ``‖x‖²`` beyond about 1400 (e.g. logits
of a few thousand).

**Registry.** ``performer_attention`` is registered with ``kernel="positive"``:
``row_stochastic=True`` holds for the positive and hyperbolic kernels (nonnegative
weights); the trigonometric kernel gives signed weights, so its implied matrix can have
negative entries and denominators near zero (outputs beyond ``max |v|``).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .._core.checks import check_bool, check_int, check_state_memory, resolve_scale
from .._core.problem import prepare_qkv
from ..registry import attach, register
from ..streaming import check_sizes
from ..gradients import check_cotangent
from ._common import (FeatureState, check_gradients_finite, check_method, feature_attention,
                      feature_attention_matrix, feature_attention_vjp, input_gradients,
                      read_state, step_tokens)
from .features import (KERNELS, check_kernel, draw_omega, log_features, performer_features,
                       resolve_omega, scaled_pair, softmax_kernel_estimate,
                       stabilized_features, stabilized_features_vjp)

__all__ = ["performer_attention", "performer_attention_matrix", "performer_features",
           "draw_omega", "softmax_kernel_estimate", "performer_init_state",
           "performer_step", "performer_attention_vjp", "PerformerState", "KERNELS"]


# --------------------------------------------------------------------------- features


def _performer_features(q, k, pb, *, num_features, kernel, orthogonal, rng, omega,
                        stabilize, scale, check_finite, where, memory_budget=None,
                        return_inputs=False):
    """``φ(x) (B, Hq, N, F)``, ``φ(y) (B, Hkv, M, F)`` (stabilized as asked), and with
    ``return_inputs`` also what their gradient needs: ``(x, y, omega, kernel,
    stabilize, scale)``. Their memory is checked against ``memory_budget`` first."""
    kernel = check_kernel(kernel)
    stabilize = check_bool("stabilize", stabilize)
    s = resolve_scale(scale, pb.d)
    omega = resolve_omega(omega, num_features, pb.d, orthogonal, rng, where,
                          rows=pb.batch * (pb.heads_q * pb.n + pb.heads_kv * pb.m),
                          cells=pb.batch * pb.heads_kv * (pb.dv + 1),
                          width=1 if kernel == "positive" else 2,
                          memory_budget=memory_budget)
    x, y = scaled_pair(q, k, s)
    with np.errstate(over="ignore", invalid="ignore"):
        fq = stabilized_features(x, omega, kernel, "row" if stabilize else None)
        fk = stabilized_features(y, omega, kernel, "global" if stabilize else None)
    if check_finite:
        for name, f in (("q", fq), ("k", fk)):
            if not np.isfinite(f).all():
                raise ValueError(f"the {kernel} random features of {name} overflowed "
                                 f"(exp of |x|^2/2 or ω·x beyond float64); use "
                                 f"stabilize=True or smaller inputs, or pass "
                                 f"check_finite=False to get the non-finite result")
    if return_inputs:
        return fq, fk, (x, y, omega, kernel, stabilize, s)
    return fq, fk


# --------------------------------------------------------------------------- public
@register(family="linear", exact=False, time="O((N+M)·m·(D+Dv))",
          state="O(m·Dv) per KV head", supports_causal=True, supports_mask=False,
          supports_gqa=True, position_free=True, row_stochastic=True, constant_state=True,
          example={"num_features": 16},
          budget=lambda n, b: {"num_features": b})
def performer_attention(q, k, v, *, num_features, kernel="positive", orthogonal=True,
                        causal=False, rng=None, stabilize=True, scale=None, omega=None,
                        method=None, chunk_size=64, check_finite=True, memory_budget=None):
    r"""Performer / FAVOR+ attention (Choromanski et al. 2021): softmax attention with
    :math:`e^{s\,q\cdot k}` estimated by random features.

    .. math:: o_i = \frac{\phi(x_i)^\top \sum_{j \in V_i} \phi(y_j) v_j^\top}
                         {\phi(x_i)^\top \sum_{j \in V_i} \phi(y_j)}, \qquad
              x = \sqrt{|s|}\,q,\ y = \operatorname{sign}(s)\sqrt{|s|}\,k

    (features and stabilizer in :mod:`refattn.performer`; :math:`V_i` all keys, or
    ``j <= i + M - N`` when causal).

    Parameters
    ----------
    q : array ``(..., Hq, N, D)``
    k : array ``(..., Hkv, M, D)``; ``Hq`` a multiple of ``Hkv`` (GQA).
    v : array ``(..., Hkv, M, Dv)``
    num_features : int >= 1, the number ``m`` of random projections (``F = m`` features
        for ``"positive"``, ``2m`` for ``"hyperbolic"`` and ``"trigonometric"``).
    kernel : ``"positive"`` (FAVOR+, default), ``"hyperbolic"`` or ``"trigonometric"``
        (signed weights: not row-stochastic).
    orthogonal : block-orthogonal projections (default) or i.i.d. Gaussian.
    causal : bool (bottom-right aligned when ``N != M``).
    rng : int seed or ``numpy.random.Generator``; required unless ``omega`` is given.
        One ``ω`` is shared by every batch element and head.
    stabilize : subtract the per-row (queries) and global (keys) max exponent; cancels
        exactly in the output.
    scale : float, default ``1/sqrt(D)``; the estimated kernel is ``exp(scale q·k)``.
    omega : optional ``(num_features, D)`` projection replacing the draw.
    method : causal form, ``None`` (``"recurrent"``: the prefix-sum scan),
        ``"chunkwise"``, ``"quadratic"``; non-causal ``None`` uses the two products.
    chunk_size : keys per chunk of ``method="chunkwise"``.
    check_finite : raise on non-finite inputs or overflowing features.
    memory_budget : bytes allowed for ``method="quadratic"``'s ``N x M`` matrix and for
        the random features (a :class:`refattn.MemoryBudgetError` naming
        ``num_features`` before they are drawn).

    Returns
    -------
    float64 ``(..., Hq, N, Dv)``; rows with a zero denominator give 0.

    Example
    -------
    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 6, 8)) * 0.5
    >>> out = ra.performer_attention(q, k, v, num_features=4096, rng=1)
    >>> bool(np.abs(out - ra.attention(q, k, v)).max() < 0.05)   # many features: close
    True
    >>> ra.performer_attention(q, k, v, num_features=16, rng=1, causal=True).shape
    (2, 6, 8)
    """
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    causal = check_bool("causal", causal)
    method = "recurrent" if method is None and causal else check_method(method, causal)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    fq, fk = _performer_features(q, k, pb, num_features=num_features, kernel=kernel,
                                 orthogonal=orthogonal, rng=rng, omega=omega,
                                 stabilize=stabilize, scale=scale,
                                 check_finite=check_finite, where="performer_attention",
                                 memory_budget=memory_budget)
    out = feature_attention(fq, fk, v, pb, causal=causal, method=method, chunk_size=chunk_size,
                memory_budget=memory_budget, what="performer_attention")
    return pb.unflatten(out)


def performer_attention_matrix(q, k, *, num_features, kernel="positive", orthogonal=True,
                               causal=False, rng=None, stabilize=True, scale=None,
                               omega=None, method=None, chunk_size=64, check_finite=True,
                               memory_budget=None):
    r"""The implied attention matrix of :func:`performer_attention`, float64
    ``(..., Hq, N, M)``, for the same arguments (same ``rng``, hence the same ``ω``):

    .. math:: A_{ij} = \frac{\phi(x_i)\cdot\phi(y_j)}
                            {\sum_{j' \in V_i} \phi(x_i)\cdot\phi(y_{j'})}
              \quad (j \in V_i),\qquad 0 \text{ otherwise},

    a zero row where the denominator is 0; ``performer_attention(q, k, v) == A @ v``
    (``v`` repeated over a GQA group). Nonnegative for the positive and hyperbolic
    kernels; the trigonometric kernel gives signed entries. ``method``/``chunk_size``
    are checked but do not change the matrix; ``memory_budget`` bounds it.

    >>> import numpy as np, refattn as ra
    >>> q, k = np.random.default_rng(0).standard_normal((2, 1, 4, 8))
    >>> a = ra.linear.performer_attention_matrix(q, k, num_features=32, rng=0, causal=True)
    >>> bool((a >= 0).all()), a.sum(-1).round(12)
    (True, array([[1., 1., 1., 1.]]))
    """
    q, k, _, pb = prepare_qkv(q, k, None, check_finite=check_finite, need_v=False)
    causal = check_bool("causal", causal)
    check_method(method, causal)
    check_int("chunk_size", chunk_size, minimum=1)
    fq, fk = _performer_features(q, k, pb, num_features=num_features, kernel=kernel,
                                 orthogonal=orthogonal, rng=rng, omega=omega,
                                 stabilize=stabilize, scale=scale,
                                 check_finite=check_finite,
                                 where="performer_attention_matrix",
                                 memory_budget=memory_budget)
    pb.check_matrix_memory(memory_budget, "the attention matrix of performer_attention_matrix",
                           "refattn.performer.performer_attention", copies=2)
    return pb.unflatten(feature_attention_matrix(fq, fk, pb, causal))


def performer_attention_vjp(q, k, v, grad_out, *, num_features, kernel="positive",
                            orthogonal=True, causal=False, rng=None, stabilize=True,
                            scale=None, omega=None, method=None, chunk_size=64,
                            check_finite=True, memory_budget=None):
    r"""Gradients of :func:`performer_attention` for the cotangent ``grad_out`` of its
    output, with the **random features held fixed**: the same ``ω`` as the forward (drawn
    from the same ``rng`` — pass the same int seed, since a ``Generator`` advances at
    each call — or given as ``omega``) and no gradient for ``ω``, as Performer
    implementations train (the projection is redrawn, never learned).

    The output is linear attention on :math:`\phi(x)`, :math:`\phi(y)`, so
    :func:`refattn.linear.linear_attention_vjp`'s equations give
    :math:`\overline{\phi(x_i)}` and :math:`\overline{\phi(y_j)}` and ``dv``; then, with
    :math:`P = \overline{\phi} \circ \phi` (the features as the forward computes them):

    * positive: :math:`\bar x = P\,\omega - x \sum_f P_f`;
    * hyperbolic: :math:`\bar x = (P_{+} - P_{-})\,\omega - x \sum_f P_f`;
    * trigonometric: :math:`\bar x = x \sum_f P_f + \tfrac{e^{\|x\|^2/2 - c}}{\sqrt m}
      (\bar\phi_{\sin} \circ \cos \omega x - \bar\phi_{\cos} \circ \sin \omega x)\,\omega`,

    and ``dq = sqrt|s| · x̄``, ``dk = sign(s) sqrt|s| · ȳ``. **Stabilizer.** The forward
    computes :math:`\phi\, e^{-c}` with ``c`` a max of exponents (per query row; per
    batch element and KV head over all keys). The output is exactly invariant under
    both shifts (a query's factor cancels between its numerator and denominator, the
    keys' common factor between ``S`` and ``z``), so its derivative in ``c`` is 0
    (indeed :math:`\sum_f \overline{\phi}_f \phi_f = \bar n_i \cdot n_i + \bar d_i d_i
    = 0` for every query, and likewise summed over the keys): the exact gradient of the
    stabilized forward treats ``c`` as a constant, which is what this computes. The
    forms (``method``) are those of the forward, each with its own backward (see
    :func:`refattn.linear.linear_attention_vjp`). Rows with a zero denominator get zero
    gradients (a subnormal denominator, where ``1/d_i`` overflows: ``ValueError`` with
    ``check_finite``). Returns ``{"q", "k", "v"}``, float64, each of its input's shape;
    GQA and broadcast batch dims summed.

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 5, 4))
    >>> g = np.ones((2, 5, 4))
    >>> grads = ra.vjp("performer_attention", q, k, v, g, num_features=8, rng=0,
    ...                causal=True)
    >>> sorted(grads), grads["q"].shape
    (['k', 'q', 'v'], (2, 5, 4))
    """
    shapes = {"q": np.shape(q), "k": np.shape(k), "v": np.shape(v)}
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    causal = check_bool("causal", causal)
    method = "recurrent" if method is None and causal else check_method(method, causal)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    g = check_cotangent(grad_out, "grad_out", pb.batch_shape + (pb.heads_q, pb.n, pb.dv),
                        check_finite=check_finite).reshape((pb.batch, pb.heads_q, pb.n, pb.dv))
    fq, fk, (x, y, omega, kernel, stabilize, s) = _performer_features(
        q, k, pb, num_features=num_features, kernel=kernel, orthogonal=orthogonal, rng=rng,
        omega=omega, stabilize=stabilize, scale=scale, check_finite=check_finite,
        where="performer_attention_vjp", memory_budget=memory_budget, return_inputs=True)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        dfq, dfk, dv = feature_attention_vjp(fq, fk, v, g, pb, causal=causal, method=method,
                                             chunk_size=chunk_size,
                                             memory_budget=memory_budget,
                                             what="performer_attention")
        dx = stabilized_features_vjp(x, omega, kernel, "row" if stabilize else None, dfq)
        dy = stabilized_features_vjp(y, omega, kernel, "global" if stabilize else None, dfk)
    r = math.sqrt(abs(s))
    dq = dx * r
    dk = dy * (math.copysign(r, s) if s != 0 else 0.0)
    grads = input_gradients(pb, shapes, q=dq, k=dk, v=dv)
    return check_gradients_finite(grads, "performer_attention") if check_finite else grads


# --------------------------------------------------------------------------- streaming
@dataclasses.dataclass(frozen=True)
class PerformerState(FeatureState):
    """Streaming state of :func:`performer_attention`: ``s = Σ_j φ̃(y_j) v_j^T``
    ``(*batch, Hkv, F, Dv)``, ``z = Σ_j φ̃(y_j)`` ``(*batch, Hkv, F)`` with the key
    features ``φ̃ = φ e^{-shift}`` scaled by the running max exponent ``shift``
    ``(*batch, Hkv)`` (``-inf`` before the first key), and the projection ``omega``
    ``(m, D)``; the other fields are settings."""

    shift: np.ndarray
    omega: np.ndarray
    kernel: str
    stabilize: bool
    scale: float


def performer_init_state(*, batch_shape=(), heads_q, heads_kv, d, dv, num_features,
                         kernel="positive", orthogonal=True, rng=None, stabilize=True,
                         scale=None, omega=None, check_finite=True,
                         memory_budget=None) -> PerformerState:
    """Empty streaming state for :func:`performer_step`; ``ω`` is drawn from ``rng``
    exactly as :func:`performer_attention` draws it (same ``rng`` and ``d``: same ``ω``),
    or given as ``omega``. Constant size: ``S (*batch, Hkv, F, dv)``, ``z``, the
    running key shift ``(*batch, Hkv)`` and ``ω (m, d)``; a state larger than
    ``memory_budget`` (bytes, default :data:`refattn.DEFAULT_MEMORY_BUDGET`) raises
    :class:`refattn.MemoryBudgetError` before anything is allocated.

    >>> import refattn as ra
    >>> st = ra.linear.performer_init_state(heads_q=2, heads_kv=1, d=4, dv=3,
    ...                                     num_features=8, rng=0)
    >>> st.s.shape, st.z.shape, st.omega.shape
    ((1, 8, 3), (1, 8), (8, 4))
    """
    batch_shape, heads_q, heads_kv, d, dv = check_sizes(batch_shape, heads_q, heads_kv, d, dv)
    kernel = check_kernel(kernel)
    stabilize = check_bool("stabilize", stabilize)
    omega = resolve_omega(omega, num_features, d, orthogonal, rng, "performer_init_state",
                          width=0, memory_budget=memory_budget)
    nf = omega.shape[0] * (1 if kernel == "positive" else 2)
    check_state_memory(8.0 * math.prod(batch_shape) * heads_kv * nf * (dv + 2),
                       memory_budget, "performer_init_state", batch_shape=batch_shape,
                       heads_kv=heads_kv, num_features=omega.shape[0], dv=dv)
    lead = batch_shape + (heads_kv,)
    return PerformerState(
        position=0, s=np.zeros(lead + (nf, dv)), z=np.zeros(lead + (nf,)),
        shift=np.full(lead, -np.inf if stabilize else 0.0), omega=omega, kernel=kernel,
        stabilize=stabilize, scale=resolve_scale(scale, d), check_finite=bool(check_finite),
        batch_shape=batch_shape, heads_q=heads_q, heads_kv=heads_kv, d=d, dv=dv)


def performer_step(state: PerformerState, q_t, k_t, v_t):
    r"""One token of causal Performer attention with a constant-size state:

    .. math:: c' = \max(c, \max_f h_f(y_t)), \quad
              S \leftarrow e^{c - c'} S + \phi(y_t) e^{-c'} v_t^\top, \quad
              z \leftarrow e^{c - c'} z + \phi(y_t) e^{-c'}, \quad
              o_t = \frac{\phi(x_t)^\top S}{\phi(x_t)^\top z}

    (``h`` the key's feature exponents; the running max ``c`` is the streaming form of
    the global key stabilizer and cancels like it; ``c = 0`` throughout with
    ``stabilize=False``). ``q_t (*batch, Hq, D)``, ``k_t (*batch, Hkv, D)``,
    ``v_t (*batch, Hkv, Dv)``; returns ``(o_t (*batch, Hq, Dv), new_state)``. Running it
    over a sequence equals ``ra.performer_attention(..., causal=True)`` with the same ``ω``
    (up to rounding; the running shift is never above the parallel form's global one, so
    where key exponents differ by more than about 700 the stream can keep a feature
    that the parallel form lets underflow to 0, never the reverse).

    >>> import numpy as np, refattn as ra
    >>> q, k, v = np.random.default_rng(1).standard_normal((3, 2, 5, 4))
    >>> st = ra.linear.performer_init_state(heads_q=2, heads_kv=2, d=4, dv=4,
    ...                                     num_features=8, rng=3)
    >>> outs = []
    >>> for t in range(5):
    ...     o, st = ra.linear.performer_step(st, q[:, t], k[:, t], v[:, t])
    ...     outs.append(o)
    >>> ref = ra.performer_attention(q, k, v, num_features=8, rng=3, causal=True)
    >>> bool(np.allclose(np.stack(outs, -2), ref, rtol=1e-12))
    True
    """
    q_t, k_t, v_t = step_tokens(state, PerformerState, "performer_init_state", q_t, k_t, v_t)
    x, y = scaled_pair(q_t, k_t, state.scale)
    with np.errstate(over="ignore", invalid="ignore"):
        fq = stabilized_features(x[..., None, :], state.omega, state.kernel,
                                  "row" if state.stabilize else None)[..., 0, :]
        h, g, norm = log_features(y[..., None, :], state.omega, state.kernel)
        h, g = h[..., 0, :], (None if g is None else g[..., 0, :])
        if state.stabilize:
            shift = np.maximum(state.shift, h.max(axis=-1))          # (*batch, Hkv)
            decay = np.exp(state.shift - shift)                      # 0 before any key
        else:
            shift, decay = state.shift, np.ones(state.shift.shape)
        fk = np.exp(h - shift[..., None]) * norm
        if g is not None:
            fk = fk * g
    if state.check_finite and not (np.isfinite(fq).all() and np.isfinite(fk).all()):
        raise ValueError(f"the {state.kernel} random features of q_t or k_t overflowed; "
                         f"use stabilize=True or smaller inputs")
    s = decay[..., None, None] * state.s + fk[..., :, None] * v_t[..., None, :]
    z = decay[..., None] * state.z + fk
    return read_state(fq, s, z, state), state.replace(position=state.position + 1, s=s, z=z,
                                                      shift=shift)


attach(performer_attention, implied=performer_attention_matrix,
       init_state=performer_init_state, step=performer_step, vjp=performer_attention_vjp)
