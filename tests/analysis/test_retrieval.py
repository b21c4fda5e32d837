"""The docstring retrieval task (refattn.analysis.retrieval) and the real-model quality
sweep (refattn.analysis.model_quality) on a tiny text set."""
import numpy as np
import pytest

from refattn.analysis import minilm
from refattn.analysis.model_quality import EXACT, applicable, quality_sweep
from refattn.analysis.retrieval import docstring_task, retrieval_scores


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("safetensors", reason="MiniLM needs safetensors ([analysis])")
    pytest.importorskip("tokenizers", reason="MiniLM needs tokenizers ([analysis])")
    try:
        return minilm.MiniLM.load()
    except ModuleNotFoundError as e:
        pytest.skip(f"checkpoint absent: {e}")


def test_pairs_have_fixed_lengths_and_do_not_overlap(model):
    tk = model.tokenizer
    task = docstring_task(tk, 12, query_tokens=8, passage_tokens=20)
    assert task.query_ids.shape == (12, 10) and task.passage_ids.shape == (12, 22)
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    for ids in (task.query_ids, task.passage_ids):
        assert (ids[:, 0] == cls).all() and (ids[:, -1] == sep).all()
        assert (ids[:, 1:-1] != 0).all()                        # no padding inside
    for q, p in zip(task.query_ids, task.passage_ids):
        assert not tk.id_to_token(int(p[1])).startswith("##")   # a passage starts a word
    assert len(set(task.passages)) == 12 and task.chance == 1 / 12
    again = docstring_task(tk, 12, query_tokens=8, passage_tokens=20)
    assert np.array_equal(again.passage_ids, task.passage_ids)   # deterministic
    with pytest.raises(ValueError, match="only .* standard-library docstrings"):
        docstring_task(tk, 10_000, query_tokens=8, passage_tokens=20)


def test_scores_rank_the_own_passage_and_break_ties_against_it():
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    s = retrieval_scores(q, q)
    assert s.accuracy == 1.0 and s.ranks.tolist() == [1, 1, 1]
    flat = retrieval_scores(q, np.ones((3, 2)))                 # all passages tie
    assert flat.accuracy == 0.0 and flat.ranks.tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="both be"):
        retrieval_scores(q, q[:2])


def test_applicable_lists_why_a_mechanism_is_left_out():
    run, skipped = applicable(["topk_attention", "window_attention", "retention",
                               "tiled_attention"])
    assert run == ["topk_attention"]
    assert "grid" in skipped["window_attention"]
    assert "budget" in skipped["retention"] and "exact" in skipped["tiled_attention"]


@pytest.mark.slow
def test_quality_sweep_exact_row_and_full_budget_on_a_tiny_set(model):
    ds, skipped = quality_sweep(["topk_attention", "sliding_window_attention",
                                 "retention"], [2, 64], n_docs=6, query_tokens=6,
                                passage_tokens=12, workers=1)
    assert list(skipped) == ["retention"]
    exact = ds.sel(mechanism=EXACT)
    assert (exact.cosine == 1.0).all() and ds.attrs["chance"] == 1 / 6
    assert float(exact.accuracy[0]) > ds.attrs["chance"]
    full = ds.sel(mechanism="topk_attention", budget=64)        # all 14 keys: exact
    assert abs(float(full.cosine_min) - 1.0) <= 1e-10
    assert float(full.accuracy) == float(exact.accuracy[0])
    cut = ds.sel(mechanism="sliding_window_attention", budget=2)
    assert float(cut.cosine) < 0.99
    assert float(cut.work_per_query) < float(exact.work_per_query[0])
    assert (ds.error.values == "").all()
