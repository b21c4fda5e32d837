r"""The engine every compressed-attention mechanism runs on (the conventions are those
of :mod:`refattn.compression`): a :class:`Plan` per (batch element, KV head) holds the
compressed keys and values, what each query may see, the value compression map and its
transpose for gradients, and :func:`run_plans` attends every query head of the group to
them, one block of query rows at a time; :func:`attend` is a mechanism's forward or
implied matrix given its plans, :func:`attend_vjp` its gradients (:func:`run_plans_vjp`),
and :func:`selection_plans` the plans of a subset of the keys (strided, landmark).
"""
from __future__ import annotations

import numpy as np

from .._core.backward import head_summed_product
from .._core.checks import check_cotangent, resolve_scale
from .._core.problem import prepare_qkv
from .._core.softmax import normalize_rows

__all__ = ["BLOCK_ELEMENTS"]

#: Query rows are processed in blocks of about this many logits (and gathered elements).
#: :func:`run_plans` reads ``refattn.compression.BLOCK_ELEMENTS`` at each call, so
#: setting the package's constant takes effect.
BLOCK_ELEMENTS = 2**20


class Plan:
    """The compressed keys of one (batch element, KV head).

    ``kc (C, D)``, ``vc (C, Dv)`` or None, ``bias (C,)`` or None;
    ``keep(rows) -> (r, C)`` bool, the compressed rows each query of ``rows`` may see
    (None: all); ``cmap()`` the ``(C, M)`` value compression map, built only for the
    implied matrix (None: not linear in ``v``); ``local(rows) -> (cols (r, T),
    keep (r, T))``: raw keys attended uncompressed by each query (None: none);
    ``pull(dkc, dvc) -> (dk (M, D), dv (M, Dv))``: the gradients of the raw keys and
    values given those of ``kc`` and ``vc``, the transposed compression with its
    discrete choices (selections, arg-maxes, clusters) held fixed (None: no backward).
    """

    __slots__ = ("kc", "vc", "bias", "keep", "cmap", "local", "width", "pull")

    def __init__(self, kc, vc, bias=None, keep=None, cmap=None, local=None, width=0,
                 pull=None):
        self.kc, self.vc, self.bias, self.keep, self.cmap = kc, vc, bias, keep, cmap
        self.local, self.width = local, width          # width: T, raw keys per query
        self.pull = pull


def positions(pb) -> np.ndarray:
    """Bottom-right-aligned query positions ``i' = i + M - N``."""
    return np.arange(pb.n) + (pb.m - pb.n)


def seen(pb) -> str:
    """The shape of ``k`` as the caller passed it, for error messages."""
    return f"k {pb.batch_shape + (pb.heads_kv, pb.m, pb.d)}"


def _row_blocks(pb, plan):
    """Blocks of query rows ``(r0, rows)`` of about ``BLOCK_ELEMENTS`` logits."""
    from . import BLOCK_ELEMENTS as block  # the package's constant, as set there
    c, t = plan.kc.shape[0], plan.width
    per_row = pb.group * (c + t) + t * (pb.d + pb.dv + 2)
    step = max(1, block // max(per_row, 1))
    for r0 in range(0, pb.n, step):
        yield r0, np.arange(r0, min(r0 + step, pb.n))


def _probabilities(plan, qb, kb, rows):
    """The ``(G, r, C + T)`` probabilities of the query block ``qb`` (scaled) over the
    compressed rows then the local raw keys, and the local ``cols (r, T)`` (or None)."""
    s = qb @ plan.kc.T                                      # (G, r, C)
    if plan.bias is not None:
        s += plan.bias
    keep = None if plan.keep is None else plan.keep(rows)
    if keep is not None:
        s[:, ~keep] = -np.inf
    cols = None
    if plan.local is not None:
        cols, lkeep = plan.local(rows)                      # (r, T)
        sl = np.einsum("grd,rtd->grt", qb, kb[cols])
        sl[:, ~lkeep] = -np.inf
        s = np.concatenate([s, sl], axis=-1)
    normalize_rows(s)                                       # probabilities
    return s, cols


def run_plans(q, k, v, pb, scale, plans, *, implied: bool, memory_budget, name):
    """Attend every query head to its KV head's plan, one block of query rows at a
    time. Returns ``out (B, Hq, N, Dv)`` or, with ``implied``, the ``(B, Hq, N, M)``
    implied matrix."""
    if implied:
        pb.check_matrix_memory(memory_budget, f"the implied matrix of {name}",
                               f"refattn.compression.{name}", copies=2)
        result = np.full((pb.batch, pb.heads_q, pb.n, pb.m), np.nan)
    else:
        result = np.full((pb.batch, pb.heads_q, pb.n, pb.dv), np.nan)
    qs = q * scale
    for b, hk, hs in pb.kv_groups():
        plan = plans(b, hk)
        if implied and plan.cmap is None:
            raise ValueError(f"{name}: this compression is not linear in v, so there "
                             f"is no implied matrix (use pool='mean')")
        cmap = plan.cmap() if implied else None
        c = plan.kc.shape[0]
        for r0, rows in _row_blocks(pb, plan):
            s, cols = _probabilities(plan, qs[b, hs, r0:r0 + len(rows)], k[b, hk], rows)
            pc, pl = s[..., :c], s[..., c:]
            if implied:
                a = pc @ cmap
                if plan.local is not None:
                    g = np.arange(pb.group)[:, None, None]
                    np.add.at(a, (g, np.arange(len(rows))[None, :, None], cols[None]), pl)
                result[b, hs, r0:r0 + len(rows)] = a
            else:
                o = pc @ plan.vc
                if plan.local is not None:
                    o += np.einsum("grt,rtd->grd", pl, v[b, hk][cols])
                result[b, hs, r0:r0 + len(rows)] = o
    return result


def attend(make_plans, q, k, v, *, implied, name, scale, check_finite, memory_budget,
           **options):
    """A mechanism's forward (``implied=False``) or implied matrix (``implied=True``,
    ``v`` None): validate ``q``, ``k``, ``v``, build the plans with
    ``make_plans(k, v, pb, **options)`` and run them. Returns ``(..., Hq, N, Dv)`` or
    ``(..., Hq, N, M)`` with the caller's batch dimensions."""
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite, need_v=v is not None)
    s = resolve_scale(scale, pb.d)
    plans = make_plans(k, v, pb, **options)
    return pb.unflatten(run_plans(q, k, v, pb, s, plans, implied=implied,
                                  memory_budget=memory_budget, name=name))


# ================================================================== gradients
def _head_sum(a, b):
    """``head_summed_product(a, b)``, also for an empty last axis (no kept keys)."""
    if a.shape[-1] == 0 or b.shape[-1] == 0:
        return np.zeros((a.shape[-1], b.shape[-1]))
    return head_summed_product(a, b)


def run_plans_vjp(q, k, v, do, pb, scale, plans):
    r"""The flat gradients ``(dq, dk, dv)`` of :func:`run_plans`'s output for the
    cotangent ``do (B, Hq, N, Dv)``, one block of query rows at a time.

    Per block, with ``P = [P_c, P_l]`` the probabilities over the compressed rows and the
    local raw keys, ``O = P_c V̂ + P_l V_loc``:

    .. math::

        D_i = \textstyle\sum_d dO_{id} O_{id}, \quad
        dS = P \circ (dO\,[\hat V; V_{loc}]^\top - D), \quad
        dQ = s\, dS\, [\hat K; K_{loc}], \\
        d\hat K = dS_c^\top (sQ), \quad d\hat V = P_c^\top dO, \quad
        dK_{loc} \mathrel{+}= dS_l^\top (sQ), \quad dV_{loc} \mathrel{+}= P_l^\top dO,

    summed over the query heads of the group (GQA); then ``plan.pull`` sends ``dK̂``,
    ``dV̂`` back through the compression. The log-count bias and the visibility are
    constants. Rows that see nothing get zero gradients.
    """
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    qs = q * scale
    for b, hk, hs in pb.kv_groups():
        plan = plans(b, hk)
        kb, vb = k[b, hk], v[b, hk]
        c = plan.kc.shape[0]
        dkc, dvc = np.zeros(plan.kc.shape), np.zeros(plan.vc.shape)
        for r0, rows in _row_blocks(pb, plan):
            r = slice(r0, r0 + len(rows))
            qb, dob = qs[b, hs, r], do[b, hs, r]
            p, cols = _probabilities(plan, qb, kb, rows)
            pc, pl = p[..., :c], p[..., c:]
            dpc = dob @ plan.vc.T                               # dP over compressed rows
            out = pc @ plan.vc
            if cols is not None:
                vl = vb[cols]                                   # (r, T, Dv)
                out += np.einsum("grt,rtd->grd", pl, vl)
                dpl = np.einsum("grd,rtd->grt", dob, vl)
            delta = np.einsum("grd,grd->gr", dob, out)[..., None]
            dsc = pc * (dpc - delta)
            dq[b, hs, r] = dsc @ plan.kc
            dkc += _head_sum(dsc, qb)
            dvc += _head_sum(pc, dob)
            if cols is not None:
                dsl = pl * (dpl - delta)
                dq[b, hs, r] += np.einsum("grt,rtd->grd", dsl, kb[cols])
                np.add.at(dk[b, hk], cols, np.einsum("grt,grd->rtd", dsl, qb))
                np.add.at(dv[b, hk], cols, np.einsum("grt,grd->rtd", pl, dob))
        pk, pv = plan.pull(dkc, dvc)
        dk[b, hk] += pk
        dv[b, hk] += pv
    dq *= scale
    return dq, dk, dv


def attend_vjp(make_plans, q, k, v, grad_out, *, scale, check_finite, **options) -> dict:
    """A mechanism's gradients ``{"q", "k", "v"}`` in the caller's shapes: validate
    ``q``, ``k``, ``v`` and the options as :func:`attend` does, then ``grad_out``
    (``(..., Hq, N, Dv)``), and run :func:`run_plans_vjp`."""
    shapes = tuple(np.shape(x) for x in (q, k, v))
    q, k, v, pb = prepare_qkv(q, k, v, check_finite=check_finite)
    s = resolve_scale(scale, pb.d)
    plans = make_plans(k, v, pb, **options)
    do = check_cotangent(grad_out, "grad_out", pb.batch_shape + (pb.heads_q, pb.n, pb.dv),
                         check_finite=check_finite)
    flat = run_plans_vjp(q, k, v, do.reshape(pb.batch, pb.heads_q, pb.n, pb.dv), pb, s,
                         plans)
    return {name: pb.input_gradient(g, shape)
            for name, g, shape in zip("qkv", flat, shapes)}


# ================================================================== selections
def selection_map(idx: np.ndarray, m: int) -> np.ndarray:
    """``(len(idx), M)`` one-hot rows: the compression map of a key selection."""
    w = np.zeros((len(idx), m))
    w[np.arange(len(idx)), idx] = 1.0
    return w


def selection_pull(idx: np.ndarray, m: int):
    """The ``pull`` of a selection of the distinct positions ``idx``: a selected row's
    gradient goes to its position, the others get 0."""
    def pull(dkc, dvc):
        dk, dv = np.zeros((m, dkc.shape[1])), np.zeros((m, dvc.shape[1]))
        dk[idx], dv[idx] = dkc, dvc
        return dk, dv
    return pull


def selected(k, v, b, hk, idx, keep, m) -> Plan:
    """The plan that keeps the keys and values at positions ``idx`` of batch element
    ``b`` and KV head ``hk`` (``keep`` as :class:`Plan`'s)."""
    return Plan(k[b, hk, idx], None if v is None else v[b, hk, idx], None, keep,
                lambda: selection_map(idx, m), pull=selection_pull(idx, m))


def selection_plans(k, v, pb, idx, causal: bool):
    """Plans keeping the keys at positions ``idx`` (the same for every batch element and
    KV head); causal: each query sees those ``<= i'``."""
    pos = positions(pb)
    keep = (lambda rows: idx[None, :] <= pos[rows, None]) if causal else None

    def plans(b, hk):
        return selected(k, v, b, hk, idx, keep, pb.m)
    return plans
