r"""Error on real attention: every budgeted mechanism run on MiniLM-L6's own queries,
keys and values (every layer, every head, several texts), against exact attention on
the same inputs.

The inputs (:func:`harvest`) are the per-head projections ``Q, K, V`` that the
pretrained MiniLM-L6 (:mod:`refattn.analysis.minilm`) computes in each of its 6 layers
on ``n_texts`` pieces of English (Python standard-library docstrings,
:func:`~refattn.analysis.minilm.default_text` with seeds ``text_seed + t``), each cut to
exactly ``n_tokens`` positions (``[CLS]``, ``n_tokens - 2`` word pieces, ``[SEP]``) so
that no padding or mask is involved. Each mechanism gets one layer at a time, shaped
``(texts, 12, N, 32)``, with its registry budget ``spec.budget(N, b)``; the error of
head ``h`` of text ``t`` in layer ``l`` is

.. math::
    e = \|\tilde O_{lth} - O_{lth}\|_F / \|O_{lth}\|_F,\qquad
    O_{lth} = \mathrm{softmax}(Q K^\top/\sqrt{32})\,V

(:func:`refattn.attention`). Randomized mechanisms run once per seed (``rng`` from
``[seed, layer]``); deterministic ones once, their errors repeated over ``seed``. The
spread over layers x texts x heads x seeds is the spread the report shows. The work per
query is :func:`refattn.analysis.work.work_per_query` at ``N``.

>>> from refattn.analysis.real_attention import VARIABLES
>>> VARIABLES["rel_error"]
('mechanism', 'budget', 'layer', 'text', 'head', 'seed')
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["harvest", "real_attention_sweep", "VARIABLES"]

#: Variables of :func:`real_attention_sweep`'s Dataset and their dimensions.
VARIABLES = {"rel_error": ("mechanism", "budget", "layer", "text", "head", "seed"),
             "work_per_query": ("mechanism", "budget"),
             "error": ("mechanism", "budget"),
             "entropy": ("layer", "text", "head")}


@functools.lru_cache(maxsize=1)
def _model():
    from .minilm import MiniLM
    return MiniLM.load()


def _text_ids(model, n_tokens, n_texts, text_seed):
    from .minilm import default_text
    tk = model.tokenizer
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    rows = []
    for t in range(n_texts):
        text = default_text(n_chars=8 * n_tokens + 256, seed=text_seed + t)
        ids = tk.encode(text, add_special_tokens=False).ids[:n_tokens - 2]
        if len(ids) < n_tokens - 2:
            raise ValueError(f"text {t} has only {len(ids)} word pieces; n_tokens="
                             f"{n_tokens} needs {n_tokens - 2}")
        rows.append([cls] + list(ids) + [sep])
    return np.array(rows, dtype=np.int64)


@functools.lru_cache(maxsize=2)
def harvest(n_tokens, n_texts, text_seed=0):
    """``(q, k, v, exact)`` of MiniLM-L6 on ``n_texts`` texts of ``n_tokens`` positions:
    arrays ``(layers, texts, 12, N, 32)``; ``exact`` is :func:`refattn.attention` of each
    layer (the context the model itself computes). Cached per process."""
    import refattn as ra
    from refattn._core.checks import check_int
    n_tokens = check_int("n_tokens", n_tokens, minimum=3)
    n_texts = check_int("n_texts", n_texts, minimum=1)
    model = _model()
    if n_tokens > model.config.max_position_embeddings:
        raise ValueError(f"n_tokens={n_tokens} exceeds MiniLM's "
                         f"{model.config.max_position_embeddings} positions")
    out = model.forward(_text_ids(model, n_tokens, n_texts, text_seed), attentions=False)
    q, k, v = out.queries, out.keys, out.values
    exact = np.stack([ra.attention(q[i], k[i], v[i]) for i in range(q.shape[0])])
    for a in (q, k, v, exact):
        a.setflags(write=False)
    return q, k, v, exact


def _head_errors(approx, exact):
    """Relative Frobenius error of each ``(N, Dv)`` head: ``(texts, heads)``."""
    num = np.sqrt(((approx - exact) ** 2).sum(axis=(-2, -1)))
    return num / np.sqrt((exact ** 2).sum(axis=(-2, -1)))


def _cell(task):
    """All budgets and seeds of one mechanism: ``{(b, s): (layers, texts, heads)}``
    errors and ``{b: text}`` failures."""
    import refattn as ra

    from .minilm_swap import budget_params
    q, k, v, exact = harvest(task["n_tokens"], task["n_texts"], task["text_seed"])
    spec = ra.mechanisms()[task["mechanism"]]
    n = q.shape[-2]
    errors, failures = {}, {}
    for b in task["budgets"]:
        params = budget_params(task["mechanism"], n, b)
        for s in (task["seeds"] if spec.randomized else task["seeds"][:1]):
            e = np.empty(q.shape[:3])
            try:
                for layer in range(q.shape[0]):
                    kw = dict(params)
                    if spec.randomized:
                        kw["rng"] = np.random.default_rng([s, layer])
                    e[layer] = _head_errors(spec.fn(q[layer], k[layer], v[layer], **kw),
                                            exact[layer])
            except Exception as exc:   # noqa: BLE001 - recorded in the Dataset
                failures[b] = f"{type(exc).__name__}: {exc}"[:200]
                break
            errors[(b, s)] = e
    return errors, failures


def real_attention_sweep(names, budgets, *, n_tokens=256, n_texts=2, seeds=(0,),
                         text_seed=0, scheduler=None, workers=None, progress=False):
    """Measure ``names`` (registered mechanisms with a ``budget``) at ``budgets`` keys per
    query on MiniLM-L6's attention inputs; returns an ``xarray.Dataset`` with
    :data:`VARIABLES` (``entropy``: nats of each exact attention row, averaged over the
    row's queries). A mechanism that fails at a budget has NaN errors there and the
    exception text in ``error``. Raises ``ValueError`` for a name without a budget."""
    import xarray as xr

    import refattn as ra

    from .metrics import attention_entropy
    from .minilm_swap import budget_params
    from .tasks import run_tasks
    from .work import work_per_query
    specs = ra.mechanisms()
    names = list(names)
    for name in names:
        if name not in specs or specs[name].budget is None:
            raise ValueError(f"{name!r} is not a registered mechanism with a budget")
    budgets, seeds = [int(b) for b in budgets], [int(s) for s in seeds]
    q, k, v, _ = harvest(n_tokens, n_texts, text_seed)
    L, T, H, N, D = q.shape
    err = np.full((len(names), len(budgets), L, T, H, len(seeds)), np.nan)
    failed = np.full((len(names), len(budgets)), "", dtype=object)
    tasks = [dict(mechanism=n, budgets=budgets, seeds=seeds, n_tokens=n_tokens,
                  n_texts=n_texts, text_seed=text_seed) for n in names]
    for task, (errors, failures) in run_tasks(_cell, tasks, scheduler=scheduler,
                                              workers=workers, progress=progress,
                                              desc="real attention"):
        a = names.index(task["mechanism"])
        for (b, s), e in errors.items():
            j = budgets.index(b)
            if specs[task["mechanism"]].randomized:
                err[a, j, ..., seeds.index(s)] = e
            else:
                err[a, j] = e[..., None]
        for b, text in failures.items():
            failed[a, budgets.index(b)] = text
    work = np.array([[work_per_query(x, budget_params(x, N, b), N, D)
                      for b in budgets] for x in names])
    ent = np.stack([attention_entropy(ra.attention_probs(q[i], k[i])).mean(-1)
                    for i in range(L)])
    return xr.Dataset(
        {"rel_error": (VARIABLES["rel_error"], err),
         "work_per_query": (VARIABLES["work_per_query"], work),
         "error": (VARIABLES["error"], failed.astype(str)),
         "entropy": (VARIABLES["entropy"], ent)},
        coords={"mechanism": np.array(names, dtype=str),
                "budget": np.array(budgets, dtype=np.int32),
                "layer": np.arange(1, L + 1, dtype=np.int32),
                "text": np.arange(T, dtype=np.int32), "head": np.arange(H, dtype=np.int32),
                "seed": np.array(seeds, dtype=np.int32),
                "family": ("mechanism", np.array([specs[x].family for x in names],
                                                 dtype=str))},
        attrs={"model": "all-MiniLM-L6-v2", "tokens": N, "texts": T, "head_dim": D,
               "text_seed": text_seed,
               "reference": "refattn.attention on the same Q, K, V (scale 1/sqrt(32))",
               "work_unit": "key-equivalents per query (multiply-adds / (D + Dv))"})
