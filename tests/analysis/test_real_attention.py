"""Error on real attention (refattn.analysis.real_attention) on MiniLM-L6's Q, K, V of a
tiny text, and the report's summary computed from such data (real_sections.summary)."""
import numpy as np
import pytest
import xarray as xr

from refattn.analysis.real_sections import leaders, summary


@pytest.fixture(scope="module")
def available():
    pytest.importorskip("safetensors", reason="MiniLM needs safetensors ([analysis])")
    pytest.importorskip("tokenizers", reason="MiniLM needs tokenizers ([analysis])")
    from refattn.analysis import minilm
    try:
        minilm.model_dir()
    except ModuleNotFoundError as e:
        pytest.skip(f"checkpoint absent: {e}")


def test_harvest_is_the_models_own_attention(available):
    import refattn as ra
    from refattn.analysis.real_attention import harvest
    q, k, v, exact = harvest(12, 2, 0)
    assert q.shape == k.shape == v.shape == exact.shape == (6, 2, 12, 12, 32)
    np.testing.assert_array_equal(exact[3], ra.attention(q[3], k[3], v[3]))
    assert not q.flags.writeable


@pytest.mark.slow
def test_sweep_errors_vanish_at_full_budget_and_spread_over_heads(available):
    from refattn.analysis.real_attention import VARIABLES, real_attention_sweep
    ds = real_attention_sweep(["topk_attention", "performer_attention",
                               "linformer_attention"], [2, 16], n_tokens=12, n_texts=1,
                              seeds=(0, 1), workers=1)
    for var, dims in VARIABLES.items():
        assert ds[var].dims == dims
    full = ds.rel_error.sel(mechanism="topk_attention", budget=16)
    assert float(full.max()) <= 1e-12                             # top-16 of 12 keys
    cut = ds.rel_error.sel(mechanism="topk_attention", budget=2)
    assert float(cut.min()) > 0 and float(cut.std()) > 0.01
    # deterministic: repeated over seeds; randomized: differs between seeds
    np.testing.assert_array_equal(cut.isel(seed=0), cut.isel(seed=1))
    perf = ds.rel_error.sel(mechanism="performer_attention", budget=2)
    assert not np.array_equal(perf.isel(seed=0), perf.isel(seed=1))
    # Linformer at 16 > N: capped at N (rank 12), not failed
    assert str(ds.error.sel(mechanism="linformer_attention", budget=16).values) == ""
    assert float(ds.work_per_query.sel(mechanism="linformer_attention", budget=16)) == 24
    assert ((ds.entropy > 0) & (ds.entropy < np.log(12))).all()
    with pytest.raises(ValueError, match="with a budget"):
        real_attention_sweep(["retention"], [2], n_tokens=12, n_texts=1)


def _fake(errors, work):
    """A real-attention Dataset with the given median errors (mechanism, budget)."""
    names = list(errors)
    med = np.array([errors[n] for n in names])
    spread = np.array([0.9, 1.0, 1.1])                       # median = the value
    err = med[:, :, None, None, None, None] * spread[None, None, None, None, :, None]
    return xr.Dataset(
        {"rel_error": (("mechanism", "budget", "layer", "text", "head", "seed"), err),
         "work_per_query": (("mechanism", "budget"), np.array([work[n] for n in names]))},
        coords={"mechanism": names, "budget": [32, 64], "layer": [1], "text": [0],
                "head": [0, 1, 2], "seed": [0],
                "family": ("mechanism", ["sparse", "lowrank", "linear"])},
        attrs={"tokens": 256})


def test_the_summary_is_computed_from_the_data_not_written_in():
    work = {"a_attention": [40.0, 70.0], "b_attention": [70.0, 140.0],
            "c_attention": [260.0, 280.0]}
    text = summary(_fake({"a_attention": [0.5, 0.3], "b_attention": [0.4, 0.2],
                          "c_attention": [0.3, 0.1]}, work), None, 64)
    first, second = text.splitlines()
    assert "**c_attention**" in first and "budget 64" in first and "280" in first
    assert "Next: b_attention (0.2)" in first
    # within 64 key-equivalents of work (+10%): a at 64 (0.3, work 70) beats b at 32
    # (0.4, work 70) and a at 32; c (all keys scored) is out
    assert "**a_attention**" in second and "budget 64" in second
    assert leaders(_fake({"a_attention": [0.5, 0.3], "b_attention": [0.4, 0.2],
                          "c_attention": [0.3, 0.1]}, work), 64) == ["c_attention",
                                                                      "a_attention"]
    text = summary(_fake({"a_attention": [0.5, 0.05], "b_attention": [0.4, 0.2],
                          "c_attention": [0.3, 0.1]}, work), None, 64)
    assert "**a_attention**" in text.splitlines()[0]
    assert summary(None, None, 64).startswith("No real-attention data")
    assert "No mechanism ran" in summary(_fake({k: [np.nan] * 2 for k in work}, work),
                                         None, 64)
