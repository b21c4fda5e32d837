"""Shared test settings: hypothesis profiles (no deadlines: first calls compile).

``refattn`` (default): 60 examples per test, derandomized (the same examples on every run,
so CI fails only on a change, not on luck). ``thorough``: 1000 fresh random examples per
test, for hunting edge cases: ``REFATTN_HYPOTHESIS=thorough python -m pytest``.
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("refattn", deadline=None, max_examples=60, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=1000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("REFATTN_HYPOTHESIS", "refattn"))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def naive_attention(q, k, v, keep=None, scale=None, bias=None):
    """Attention one (query, head) at a time with explicit loops over heads and rows:
    a deliberately plain, independent form. ``q (H, N, D)``, ``k (Hkv, M, D)``,
    ``keep``/``bias`` ``(H, N, M)``. Returns ``(out, lse)``."""
    hq, n, d = q.shape
    hkv, m, _ = k.shape
    scale = 1 / np.sqrt(d) if scale is None else scale
    out = np.zeros((hq, n, v.shape[-1]))
    lse = np.full((hq, n), -np.inf)
    for h in range(hq):
        kv = h // (hq // hkv)
        for i in range(n):
            s = np.array([scale * np.dot(q[h, i], k[kv, j]) for j in range(m)])
            if bias is not None:
                s = s + bias[h, i]
            if keep is not None:
                s = np.where(keep[h, i], s, -np.inf)
            if np.isneginf(s).all():
                continue
            top = s.max()
            w = np.exp(s - top)
            out[h, i] = w @ v[kv] / w.sum()
            lse[h, i] = top + np.log(w.sum())
    return out, lse
