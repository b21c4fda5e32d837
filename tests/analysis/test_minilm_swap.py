"""MiniLM-L6 with its attention replaced (refattn.analysis.minilm_swap): exact attention
swapped for itself reproduces MiniLM.forward bit for bit, a mechanism at full budget
reproduces it to 1e-10, and mechanisms that cannot apply are refused with the reason."""
import numpy as np
import pytest

from refattn.analysis import minilm
from refattn.analysis.minilm_swap import (NotApplicable, exact_attend, forward_with,
                                          mechanism_attend, not_applicable_reason,
                                          sentence_embeddings)


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("safetensors", reason="MiniLM needs safetensors ([analysis])")
    pytest.importorskip("tokenizers", reason="MiniLM needs tokenizers ([analysis])")
    try:
        return minilm.MiniLM.load()
    except ModuleNotFoundError as e:
        pytest.skip(f"checkpoint absent: {e}")


TEXTS = ["Return the number of items in a container.",
         "Attention is all you need, they said, and then came the efficient variants."]


def test_exact_attention_swapped_for_itself_is_the_model_bit_for_bit(model):
    ids, mask, _ = model.tokenize(TEXTS)                 # padded: the mask is used
    assert not mask.all()
    ref = model.forward(ids, mask, attentions=False).hidden_states
    got = forward_with(model, ids, exact_attend, mask, all_layers=True)
    assert got.shape == ref.shape
    assert np.array_equal(got, ref)                      # every layer, every bit
    last = forward_with(model, ids[:1, :mask[0].sum()], exact_attend)
    assert np.array_equal(last, model.forward(ids[:1, :mask[0].sum()],
                                              attentions=False).hidden_states[-1])


@pytest.mark.parametrize("name", ["sliding_window_attention", "topk_attention",
                                  "strided_kv_attention", "chunked_attention"])
def test_a_mechanism_at_full_budget_reproduces_the_model(model, name):
    budget = 64                    # windows of 32 each side, top-64, stride 1, chunks of 32
    ids, mask, _ = model.tokenize(TEXTS[1])              # one text, 18 positions: no pad
    n = ids.shape[1]
    assert mask.all() and n <= budget // 2
    ref = model.forward(ids, attentions=False).hidden_states[-1]
    got = forward_with(model, ids, mechanism_attend(name, budget=budget))
    assert np.abs(got - ref).max() <= 1e-10
    # and at a budget well below N it does change the model (the swap is real)
    small = forward_with(model, ids, mechanism_attend(name, budget=4))
    assert np.abs(small - ref).max() > 1e-3


def test_mechanisms_that_cannot_apply_are_refused_with_the_reason(model):
    import refattn as ra
    specs = ra.mechanisms()
    with pytest.raises(NotApplicable, match="2-D token grid"):
        mechanism_attend("window_attention", budget=8)
    with pytest.raises(NotApplicable, match="registers no budget"):
        mechanism_attend("retention", budget=8)
    assert "exact" in not_applicable_reason(specs["attention"])
    assert not_applicable_reason(specs["lsh_attention"]) == ""    # N == M in an encoder
    ids, mask, _ = model.tokenize(TEXTS)
    with pytest.raises(NotApplicable, match="no key mask"):
        forward_with(model, ids, mechanism_attend("performer_attention", budget=8), mask)
    with pytest.raises(ValueError, match="attend returned shape"):
        forward_with(model, ids[:1], lambda q, k, v, **kw: q[..., :3])


def test_sentence_embeddings_are_normalized_means_over_real_tokens():
    h = np.arange(24, dtype=float).reshape(2, 3, 4)
    m = np.array([[1, 1, 0], [1, 0, 0]], bool)
    e = sentence_embeddings(h, m)
    want = np.stack([h[0, :2].mean(0), h[1, 0]])
    np.testing.assert_allclose(e, want / np.linalg.norm(want, axis=1, keepdims=True))
    with pytest.raises(ValueError, match="does not match"):
        sentence_embeddings(h, m[:, :2])
