"""The engine every compressed-attention mechanism runs on (the conventions are those
of :mod:`refattn.compression`): a :class:`Plan` per (batch element, KV head) holds the
compressed keys and values, what each query may see and the value compression map, and
:func:`run_plans` attends every query head of the group to them, one block of query rows
at a time; :func:`attend` is a mechanism's forward or implied matrix given its plans, and
:func:`selection_plans` the plans of a subset of the keys (strided, landmark).
"""
from __future__ import annotations

import numpy as np

from .._core.checks import resolve_scale
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
    keep (r, T))``: raw keys attended uncompressed by each query (None: none).
    """

    __slots__ = ("kc", "vc", "bias", "keep", "cmap", "local", "width")

    def __init__(self, kc, vc, bias=None, keep=None, cmap=None, local=None, width=0):
        self.kc, self.vc, self.bias, self.keep, self.cmap = kc, vc, bias, keep, cmap
        self.local, self.width = local, width          # width: T, raw keys per query


def positions(pb) -> np.ndarray:
    """Bottom-right-aligned query positions ``i' = i + M - N``."""
    return np.arange(pb.n) + (pb.m - pb.n)


def seen(pb) -> str:
    """The shape of ``k`` as the caller passed it, for error messages."""
    return f"k {pb.batch_shape + (pb.heads_kv, pb.m, pb.d)}"


def run_plans(q, k, v, pb, scale, plans, *, implied: bool, memory_budget, name):
    """Attend every query head to its KV head's plan, one block of query rows at a
    time. Returns ``out (B, Hq, N, Dv)`` or, with ``implied``, the ``(B, Hq, N, M)``
    implied matrix."""
    from . import BLOCK_ELEMENTS as block  # the package's constant, as set there
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
        c, t = plan.kc.shape[0], plan.width
        per_row = pb.group * (c + t) + t * (pb.d + pb.dv + 2)
        step = max(1, block // max(per_row, 1))
        for r0 in range(0, pb.n, step):
            rows = np.arange(r0, min(r0 + step, pb.n))
            qb = qs[b, hs, r0:rows[-1] + 1] if len(rows) else qs[b, hs, :0]
            s = qb @ plan.kc.T                                  # (G, r, C)
            if plan.bias is not None:
                s += plan.bias
            keep = None if plan.keep is None else plan.keep(rows)
            if keep is not None:
                s[:, ~keep] = -np.inf
            if plan.local is not None:
                cols, lkeep = plan.local(rows)                  # (r, T)
                sl = np.einsum("grd,rtd->grt", qb, k[b, hk][cols])
                sl[:, ~lkeep] = -np.inf
                s = np.concatenate([s, sl], axis=-1)
            normalize_rows(s)                                  # probabilities
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


def selection_map(idx: np.ndarray, m: int) -> np.ndarray:
    """``(len(idx), M)`` one-hot rows: the compression map of a key selection."""
    w = np.zeros((len(idx), m))
    w[np.arange(len(idx)), idx] = 1.0
    return w


def selected(k, v, b, hk, idx, keep, m) -> Plan:
    """The plan that keeps the keys and values at positions ``idx`` of batch element
    ``b`` and KV head ``hk`` (``keep`` as :class:`Plan`'s)."""
    return Plan(k[b, hk, idx], None if v is None else v[b, hk, idx], None, keep,
                lambda: selection_map(idx, m))


def selection_plans(k, v, pb, idx, causal: bool):
    """Plans keeping the keys at positions ``idx`` (the same for every batch element and
    KV head); causal: each query sees those ``<= i'``."""
    pos = positions(pb)
    keep = (lambda rows: idx[None, :] <= pos[rows, None]) if causal else None

    def plans(b, hk):
        return selected(k, v, b, hk, idx, keep, pb.m)
    return plans
