r"""A small retrieval task built from text that ships with Python: match the opening of
each standard-library docstring to the rest of it.

**Construction** (:func:`docstring_task`). The documents are the docstrings of the
modules listed in :data:`MODULES` and of the public classes and functions each defines
(their own, not inherited), with doctest and shell lines dropped and whitespace
collapsed. Each is split into word pieces by the MiniLM tokenizer. A document with at
least ``query_tokens + passage_tokens`` pieces gives one pair:

* the **query**: its first ``query_tokens`` pieces (its opening -- about its first
  sentence);
* the **passage**: the ``passage_tokens`` pieces that follow, starting at the next
  whole word (a word cut by the query's end is not continued in the passage, so no
  split word piece joins the two).

Both are wrapped in ``[CLS] … [SEP]``, so every query has ``query_tokens + 2`` positions
and every passage ``passage_tokens + 2``: batches need no padding, hence no key mask,
and any mechanism can run on them. Pairs whose passage repeats another's are dropped;
the first ``n_docs`` pairs in the order of ``crc32(passage)`` (spreading the documents
over the modules) are kept. The text depends on the Python version only.

**Task** (:func:`retrieval_scores`): embed every query and passage (mean-pooled,
normalized last hidden states), rank the passages by cosine similarity for each query;
accuracy@1 is the fraction of queries whose own passage ranks first (chance ``1 /
n_docs``); the mean reciprocal rank is reported too.

>>> import numpy as np
>>> from refattn.analysis.retrieval import retrieval_scores
>>> q = np.eye(3)
>>> p = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])   # passages 1, 2 swapped
>>> s = retrieval_scores(q, p)
>>> round(s.accuracy, 4), round(s.mrr, 4), round(s.chance, 4)
(0.3333, 0.5556, 0.3333)
"""
from __future__ import annotations

import dataclasses
import importlib
import re
import warnings
import zlib

import numpy as np

__all__ = ["MODULES", "RetrievalTask", "RetrievalScores", "docstring_task",
           "retrieval_scores"]

#: Standard-library modules whose docstrings make the documents (fixed order).
MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "doctest", "email.message",
    "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib",
    "importlib.abc", "importlib.metadata", "inspect", "io", "ipaddress", "json",
    "locale", "logging", "logging.handlers", "lzma", "mailbox", "mimetypes",
    "multiprocessing.pool", "numbers", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "queue", "quopri", "random", "re", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "ssl",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing",
    "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid",
    "warnings", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
)


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
    """``query_ids (P, query_tokens + 2)``, ``passage_ids (P, passage_tokens + 2)``
    int64 (``[CLS] … [SEP]``, no padding); ``queries``, ``passages``: their text (word
    pieces joined); ``sources``: ``module.object`` each pair came from."""

    query_ids: np.ndarray
    passage_ids: np.ndarray
    queries: tuple
    passages: tuple
    sources: tuple

    @property
    def n_docs(self) -> int:
        return len(self.sources)

    @property
    def chance(self) -> float:
        """Accuracy@1 of a random ranking, ``1 / n_docs``."""
        return 1.0 / self.n_docs


@dataclasses.dataclass(frozen=True)
class RetrievalScores:
    """``accuracy`` (@1), ``mrr`` (mean reciprocal rank), ``chance`` (1 / passages)
    and ``ranks`` (int ``(P,)``, 1 = the right passage first)."""

    accuracy: float
    mrr: float
    chance: float
    ranks: np.ndarray


def _documents():
    """``(source, text)`` of every docstring of :data:`MODULES`, cleaned."""
    import inspect
    out = []
    for name in MODULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                mod = importlib.import_module(name)
            except ImportError:            # a stripped-down Python: skip the module
                continue
            objs = [(name, mod)] + [
                (f"{name}.{attr}", obj) for attr, obj in sorted(vars(mod).items())
                if not attr.startswith("_") and (inspect.isclass(obj)
                                                 or inspect.isfunction(obj))
                and getattr(obj, "__module__", None) == name]
            for source, obj in objs:
                doc = obj.__doc__ if isinstance(obj.__doc__, str) else None
                if not doc:
                    continue
                paras = []
                for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
                    lines = [ln.strip() for ln in para.splitlines()]
                    if any(ln.startswith((">>>", "...", "$ ", "%")) for ln in lines):
                        continue
                    paras.append(" ".join(" ".join(lines).split()))
                text = " ".join(p for p in paras if p)
                if text:
                    out.append((source, text))
    return out


def docstring_task(tokenizer, n_docs, *, query_tokens=24, passage_tokens=96):
    """Build the task (module docstring) with ``tokenizer`` (a :class:`tokenizers.
    Tokenizer`, e.g. ``MiniLM.load().tokenizer``). Raises ``ValueError`` when fewer than
    ``n_docs`` documents are long enough, saying how many are.

    >>> from refattn.analysis.minilm import MiniLM                   # doctest: +SKIP
    >>> task = docstring_task(MiniLM.load().tokenizer, 64)           # doctest: +SKIP
    >>> task.query_ids.shape, task.passage_ids.shape                 # doctest: +SKIP
    ((64, 26), (64, 98))
    """
    from refattn._core.checks import check_int
    n_docs = check_int("n_docs", n_docs, minimum=2)
    query_tokens = check_int("query_tokens", query_tokens, minimum=1)
    passage_tokens = check_int("passage_tokens", passage_tokens, minimum=1)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise ValueError("tokenizer has no [CLS]/[SEP] tokens; pass MiniLM's tokenizer")
    pairs, seen = [], set()
    for source, text in _documents():
        enc = tokenizer.encode(text, add_special_tokens=False)
        ids, words = list(enc.ids), list(enc.word_ids)
        start = query_tokens
        while start < len(ids) and words[start] == words[start - 1]:
            start += 1                       # skip the rest of a word cut by the query
        if start + passage_tokens > len(ids):
            continue
        passage = ids[start:start + passage_tokens]
        key = tuple(passage)
        if key in seen:
            continue
        seen.add(key)
        pairs.append((zlib.crc32(np.asarray(passage, np.int64).tobytes()), source,
                      ids[:query_tokens], passage))
    if len(pairs) < n_docs:
        raise ValueError(f"only {len(pairs)} standard-library docstrings have "
                         f"{query_tokens} + {passage_tokens} word pieces; n_docs={n_docs} "
                         f"needs shorter query_tokens/passage_tokens or fewer documents")
    pairs.sort(key=lambda t: (t[0], t[1]))
    pairs = pairs[:n_docs]

    def wrap(rows):
        return np.array([[cls] + list(r) + [sep] for r in rows], dtype=np.int64)

    q_ids, p_ids = wrap([p[2] for p in pairs]), wrap([p[3] for p in pairs])
    return RetrievalTask(query_ids=q_ids, passage_ids=p_ids,
                         queries=tuple(tokenizer.decode(list(r[1:-1])) for r in q_ids),
                         passages=tuple(tokenizer.decode(list(r[1:-1])) for r in p_ids),
                         sources=tuple(p[1] for p in pairs))


def retrieval_scores(query_emb, passage_emb) -> RetrievalScores:
    """Rank ``passage_emb (P, C)`` by cosine similarity for each of ``query_emb (P, C)``
    (query ``i`` belongs with passage ``i``). Ties rank the right passage last (a
    degenerate model does not score by luck)."""
    q = np.asarray(query_emb, dtype=np.float64)
    p = np.asarray(passage_emb, dtype=np.float64)
    if q.ndim != 2 or q.shape != p.shape:
        raise ValueError(f"query_emb and passage_emb must both be (P, C); got {q.shape} "
                         f"and {p.shape}")
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)
    pn = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-300)
    sim = qn @ pn.T
    own = np.diagonal(sim)[:, None]
    ranks = (sim >= own).sum(axis=1)                  # passages scoring >= own, own incl.
    ranks[~np.isfinite(own[:, 0])] = q.shape[0]       # a NaN embedding ranks last
    return RetrievalScores(accuracy=float(np.mean(ranks == 1)),
                           mrr=float(np.mean(1.0 / ranks)), chance=1.0 / q.shape[0],
                           ranks=ranks.astype(np.int64))
