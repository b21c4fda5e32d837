"""The memory pre-checks of sizes set by parameters (issue #16): random features, LSH
hashes, memory slots and streaming states are checked against ``memory_budget`` before
they are allocated, with an error naming the parameter and a bound that fits."""
import re

import numpy as np
import pytest

import refattn as ra
from refattn import MemoryBudgetError
from refattn.linear import linear_attention_init_state, performer_init_state
from refattn.lsh import lsh_buckets
from refattn.memory import (compressive_init_state, random_memory,
                            transformer_xl_init_state)
from refattn.performer import draw_omega
from refattn.recurrent._common import check_state_size
from refattn.sparse.local import ring_init, sink_init

QKV = np.random.default_rng(0).standard_normal((3, 1, 2, 16, 4))


def _bound(exc, name):
    """The ``name <= X`` a refusal proposes."""
    return int(re.search(rf"{name} <= ([\d,]+)", str(exc)).group(1).replace(",", ""))


def test_performer_features_are_refused_by_name_and_the_proposed_bound_runs():
    q, k, v = QKV
    budget = 2**20
    with pytest.raises(MemoryBudgetError, match=r"num_features=100,000, d=4") as info:
        ra.performer_attention(q, k, v, num_features=100_000, rng=0, memory_budget=budget)
    m = _bound(info.value, "num_features")
    assert 100 < m < 100_000
    out = ra.performer_attention(q, k, v, num_features=m, rng=0, memory_budget=budget)
    assert np.isfinite(out).all()
    with pytest.raises(MemoryBudgetError, match="num_features"):
        ra.performer_attention(q, k, v, num_features=m + 1, rng=0, memory_budget=budget)


def test_a_huge_orthogonal_block_proposes_iid_features():
    with pytest.raises(MemoryBudgetError, match=r"d=65,536.*orthogonal=False"):
        draw_omega(4, 2**16, rng=0)
    assert draw_omega(4, 2**16, orthogonal=False, rng=0).shape == (4, 2**16)


def test_scatterbrain_and_lsh_name_their_sizes():
    q, k, v = QKV
    with pytest.raises(MemoryBudgetError, match="num_features=1,099,511,627,776"):
        ra.scatterbrain_attention(q, k, v, num_features=2**40, topk=2, rng=0)
    with pytest.raises(MemoryBudgetError, match="n_hashes=1,099,511,627,776"):
        ra.scatterbrain_attention(q, k, v, num_features=4, support="lsh", n_buckets=4,
                                  n_hashes=2**40, rng=0)
    with pytest.raises(MemoryBudgetError, match=r"n_hashes=\d.*n_buckets=2,147,483,648"):
        ra.lsh_attention(q, k, v, n_buckets=2**31, n_hashes=2, rng=0)
    with pytest.raises(MemoryBudgetError, match="n_hashes=1,000") as info:
        ra.lsh_attention(q, k, v, n_buckets=4, n_hashes=1000, rng=0, memory_budget=2**20)
    r = _bound(info.value, "n_hashes")
    assert np.isfinite(ra.lsh_attention(q, k, v, n_buckets=4, n_hashes=r, rng=0,
                                        memory_budget=2**20)).all()
    with pytest.raises(MemoryBudgetError, match="n_hashes=1,099,511,627,776"):
        lsh_buckets(q, 4, 0, n_hashes=2**40)
    with pytest.raises(MemoryBudgetError, match="fewer n_buckets"):   # rotations too big
        ra.lsh_attention(q, k, v, n_buckets=2**20, rng=0, memory_budget=2**20)
    with pytest.raises(MemoryBudgetError, match="shorter sequences"):  # one round too big
        ra.lsh_attention(q, k, v, n_buckets=4, rng=0, memory_budget=2**12)


def test_memory_slots_are_refused_by_name():
    q, k, v = QKV
    for fn in (ra.persistent_memory_attention, ra.knn_memory_attention):
        extra = {"topk": 2, "gate": 0.5} if fn is ra.knn_memory_attention else {}
        with pytest.raises(MemoryBudgetError, match="num_slots=2,147,483,648"):
            fn(q, k, v, num_slots=2**31, rng=0, **extra)
        with pytest.raises(MemoryBudgetError, match="num_slots <= "):
            fn(q, k, v, num_slots=64, rng=0, memory_budget=1000, **extra)
    with pytest.raises(MemoryBudgetError, match="num_slots=1,099,511,627,776"):
        random_memory(2**40, heads_kv=1, d=4, dv=4, rng=0)


@pytest.mark.parametrize("init, extra", [
    (linear_attention_init_state, {}),
    (performer_init_state, {"num_features": 8, "rng": 0}),
    (transformer_xl_init_state, {"segment_len": 4, "mem_len": 4}),
    (compressive_init_state, {"segment_len": 4, "mem_len": 4, "cmem_len": 2, "rate": 2})])
def test_states_are_checked_against_memory_budget(init, extra):
    sizes = dict(heads_q=2, heads_kv=2, d=4, dv=4, **extra)
    state = init(batch_shape=(4096,), **sizes)
    with pytest.raises(MemoryBudgetError, match=r"batch_shape=\(4096,\), heads_kv=2"):
        init(batch_shape=(4096,), memory_budget=state.nbytes / 4, **sizes)
    with pytest.raises(MemoryBudgetError, match=r"batch_shape=\(1099511627776,\)"):
        init(batch_shape=(2**40,), **sizes)


def test_the_recurrent_state_check():
    check_state_size("gla", None, (1,), 2, 2**10, 2**10)        # 32 MiB: fine
    with pytest.raises(MemoryBudgetError, match=r"gla: .*heads_q=4, d=131,072, dv=4,096"):
        check_state_size("gla", None, (2,), 4, 2**17, 2**12, heads_name="heads_q")
    with pytest.raises(MemoryBudgetError, match="smaller batch_shape, heads_kv, d, dv"):
        check_state_size("gla", 2**20, (), 1, 2**9, 2**9)            # 2 MiB


@pytest.mark.parametrize("init, extra", [
    (ra.recurrent.gla_init_state, {}), (ra.recurrent.ssd_init_state, {}),
    (sink_init, {"window": 3, "sinks": 4})])
def test_recurrent_and_sink_states_are_checked_against_memory_budget(init, extra):
    test_states_are_checked_against_memory_budget(init, extra)


def test_retention_names_its_query_heads_and_their_kv_heads():
    sizes = dict(batch_shape=(2,), heads_q=4, heads_kv=2, d=8, dv=8, gamma=0.9)
    ra.recurrent.retention_init_state(**sizes)
    with pytest.raises(MemoryBudgetError, match=r"heads_kv=2\).*batch_shape=\(2,\), "
                                                r"heads_q=4, d=8, dv=8"):
        ra.recurrent.retention_init_state(memory_budget=1000, **sizes)


def test_a_ring_of_many_heads_keeps_one_dilation_not_one_per_head():
    state = ring_init(heads_q=2**40, heads_kv=2**40, d=4, dv=4, window=3,
                                dilation=2)
    assert state.dilation.shape == (2**40,) and state.dilation.strides == (0,)
    assert ring_init(heads_q=2, heads_kv=1, d=4, dv=4, window=3).dilation is None


def _same(a, b):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("fn, kw, huge, exact", [
    (ra.bigbird_attention, {"block_size": 2, "rng": 0}, "window_blocks", 8),
    (ra.bigbird_attention, {"block_size": 2, "rng": 0}, "random_blocks", 8),
    (ra.sparse.moba_attention, {"block_size": 2, "causal": True}, "topk", 8),
    (ra.sparse.moba_attention, {"topk": 2, "causal": True}, "block_size", 16),
    (ra.sparse.dsa_attention, {"causal": True}, "topk", 16),
    (ra.sparse.nsa_attention, {"gates": (0.3, 0.3, 0.4), "block_size": 2, "stride": 2,
                               "select_size": 2, "window": 2, "causal": True},
     "top_n", 8),
    (ra.sparse.nsa_attention, {"gates": (0.3, 0.3, 0.4), "block_size": 2, "stride": 2,
                               "top_n": 3, "window": 2, "causal": True},
     "select_size", 16)])
def test_a_size_past_the_blocks_is_all_of_them(fn, kw, huge, exact):
    """``exact``: the value that already covers all 16 keys (8 blocks of 2)."""
    q, k, v = QKV
    _same(fn(q, k, v, **kw, **{huge: 2**40}), fn(q, k, v, **kw, **{huge: exact}))


@pytest.mark.parametrize("fn, kw, name, blocks", [
    (ra.sparse.moba_attention, {"block_size": 2}, "topk", 8),
    (ra.sparse.dsa_attention, {}, "topk", 16),
    (ra.sparse.nsa_attention, {"gates": (0.3, 0.3, 0.4), "block_size": 2, "stride": 2,
                               "select_size": 2, "window": 2}, "top_n", 8)])
def test_the_selection_keeps_its_width_and_a_huge_one_is_refused(fn, kw, name, blocks):
    q, k, v = QKV
    _, sel = fn(q, k, v, return_selection=True, **kw, **{name: blocks + 3})
    assert sel.shape[-1] == blocks + 3 and (sel[..., blocks:] == -1).all()
    assert (sel[..., :blocks] >= 0).all()                 # non-causal: every block kept
    with pytest.raises(MemoryBudgetError, match=rf"{name}=1,099,511,627,776.* "
                                                rf"{name} <= {blocks}"):
        fn(q, k, v, return_selection=True, **kw, **{name: 2**40})


def test_ssd_chunks_longer_than_the_keys_are_one_chunk():
    q, k, v = QKV
    log_a = -np.random.default_rng(1).uniform(0, 1, (1, 2, 16))
    _same(ra.ssd(q, k, v, log_a=log_a, chunk_size=2**40),
          ra.ssd(q, k, v, log_a=log_a, chunk_size=16))


def test_pinv_iters_has_an_upper_bound():
    q, k, v = QKV
    with pytest.raises(ValueError, match=r"pinv_iters=2,147,483,648 .*at most 10,000"):
        ra.nystrom_attention(q, k, v, num_landmarks=4, pinv_iters=2**31)
    with pytest.raises(ValueError, match=r"iters=10,001 "):
        ra.lowrank.iterative_pinv(np.eye(2), 10_001)
    ra.nystrom_attention(q, k, v, num_landmarks=4, pinv_iters=10_000)
