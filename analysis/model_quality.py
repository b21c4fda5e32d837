r"""The quality a real model loses: MiniLM-L6 with the attention of every layer replaced
by a mechanism at a budget, scored on the standard-library docstring retrieval task.

For each registered mechanism that can replace a text encoder's attention
(:func:`applicable`; the others are listed with the reason) and each budget ``b`` (keys
per query), every layer runs ``spec.fn(q, k, v, **spec.budget(N, b))`` at each sequence
length ``N`` (:func:`refattn.analysis.minilm_swap.mechanism_attend`; where ``b > N``
and the mechanism refuses that, ``spec.budget(N, N)``:
:func:`~refattn.analysis.minilm_swap.budget_params`). Queries and passages of
:func:`refattn.analysis.retrieval.docstring_task` are embedded by the modified model
(mean-pooled, normalized) and scored:

* ``accuracy``: accuracy@1 of matching each query to its passage (chance ``1/P``);
* ``mrr``: mean reciprocal rank;
* ``cosine``: mean over all ``2P`` texts of the cosine between the modified model's
  embedding and the exact model's; ``cosine_min`` the worst text;
* ``work_per_query``: key-equivalents per query
  (:func:`refattn.analysis.work.work_per_query`), averaged over every query position
  of every sequence (so weighted by the sequences' lengths); the exact model's is the
  mean ``N``.

The exact row is the unmodified model (:func:`~refattn.analysis.minilm_swap.
exact_attend`). Randomized mechanisms draw from ``[seed, layer]``. Every number is a
deterministic function of the arguments and the Python version (the text).

>>> from refattn.analysis.model_quality import applicable
>>> run, skipped = applicable(["attention", "retention", "window_attention",
...                            "topk_attention"])
>>> run, sorted(skipped)
(['topk_attention'], ['attention', 'retention', 'window_attention'])
"""
from __future__ import annotations

import functools

import numpy as np

from .real_attention import _model      # one MiniLM-L6 per process, shared

__all__ = ["applicable", "quality_sweep", "EXACT"]

#: The mechanism label of the exact model's row.
EXACT = "exact (MiniLM-L6)"


def applicable(names):
    """Split registered ``names`` into those that can replace MiniLM's attention at a
    budget (in order) and ``{name: reason}`` for the others."""
    import refattn as ra

    from .minilm_swap import not_applicable_reason
    specs = ra.mechanisms()
    run, skipped = [], {}
    for name in names:
        if name not in specs:
            raise ValueError(f"unknown mechanism {name!r}; registered: {sorted(specs)}")
        reason = not_applicable_reason(specs[name])
        if reason:
            skipped[name] = reason
        else:
            run.append(name)
    return run, skipped


@functools.lru_cache(maxsize=2)
def _task(n_docs, query_tokens, passage_tokens):
    from .retrieval import docstring_task
    return docstring_task(_model().tokenizer, n_docs, query_tokens=query_tokens,
                          passage_tokens=passage_tokens)


def _embed(task):
    """``(query_emb, passage_emb)`` of one (mechanism, budget), or the error text."""
    from .minilm_swap import (exact_attend, forward_with, mechanism_attend,
                              sentence_embeddings)
    model = _model()
    rt = _task(task["n_docs"], task["query_tokens"], task["passage_tokens"])
    attend = (exact_attend if task["mechanism"] is None else
              mechanism_attend(task["mechanism"], budget=task["budget"], rng=task["seed"]))
    try:
        return tuple(sentence_embeddings(forward_with(model, ids, attend))
                     for ids in (rt.query_ids, rt.passage_ids))
    except Exception as exc:   # noqa: BLE001 - recorded in the Dataset
        return f"{type(exc).__name__}: {exc}"[:200]


def quality_sweep(names, budgets, *, n_docs=32, query_tokens=16, passage_tokens=64,
                  seed=0, scheduler=None, workers=None, progress=False):
    """Run the exact model and every applicable mechanism of ``names`` at ``budgets``;
    returns ``(dataset, skipped)``: an ``xarray.Dataset`` over ``(mechanism, budget)``
    with ``accuracy``, ``mrr``, ``cosine``, ``cosine_min``, ``work_per_query`` and
    ``error`` (exception text of a failed run), the exact model as mechanism
    :data:`EXACT` (its values repeated over ``budget``), and ``{name: reason}`` for the
    mechanisms that were not run."""
    import xarray as xr

    import refattn as ra

    from .minilm_swap import budget_params
    from .retrieval import retrieval_scores
    from .tasks import run_tasks
    from .work import work_per_query
    run, skipped = applicable(names)
    budgets = [int(b) for b in budgets]
    rt = _task(n_docs, query_tokens, passage_tokens)     # fails early if too few docs
    base = dict(n_docs=n_docs, query_tokens=query_tokens, passage_tokens=passage_tokens,
                seed=seed)
    tasks = [dict(base, mechanism=None, budget=0)]
    tasks += [dict(base, mechanism=n, budget=b) for n in run for b in budgets]
    results = {}
    for task, res in run_tasks(_embed, tasks, scheduler=scheduler, workers=workers,
                               progress=progress, desc="model quality"):
        results[(task["mechanism"], task["budget"])] = res
    exact = results[(None, 0)]
    if isinstance(exact, str):
        raise RuntimeError(f"the exact MiniLM-L6 failed: {exact}")
    labels = [EXACT] + run
    shape = (len(labels), len(budgets))
    out = {v: np.full(shape, np.nan) for v in ("accuracy", "mrr", "cosine", "cosine_min",
                                               "work_per_query")}
    error = np.full(shape, "", dtype=object)
    lens = [rt.query_ids.shape[1], rt.passage_ids.shape[1]]
    weights = np.array(lens, dtype=np.float64) / sum(lens)
    specs = ra.mechanisms()
    d = _model().config.head_dim
    for i, label in enumerate(labels):
        for j, b in enumerate(budgets):
            res = exact if i == 0 else results[(label, b)]
            if i == 0:
                out["work_per_query"][i, j] = float(np.dot(weights, lens))
            else:
                out["work_per_query"][i, j] = float(np.dot(weights, [
                    work_per_query(label, budget_params(label, n, b), n, d)
                    for n in lens]))
            if isinstance(res, str):
                error[i, j] = res
                continue
            s = retrieval_scores(*res)
            cos = np.concatenate([(res[0] * exact[0]).sum(1), (res[1] * exact[1]).sum(1)])
            out["accuracy"][i, j], out["mrr"][i, j] = s.accuracy, s.mrr
            out["cosine"][i, j], out["cosine_min"][i, j] = cos.mean(), cos.min()
    dims = ("mechanism", "budget")
    ds = xr.Dataset({**{v: (dims, a) for v, a in out.items()},
                     "error": (dims, error.astype(str))},
                    coords={"mechanism": np.array(labels, dtype=str),
                            "budget": np.array(budgets, dtype=np.int32),
                            "family": ("mechanism", np.array(
                                ["exact"] + [specs[x].family for x in run], dtype=str))},
                    attrs={"n_docs": rt.n_docs, "chance": rt.chance,
                           "query_positions": lens[0], "passage_positions": lens[1],
                           "seed": seed, "model": "all-MiniLM-L6-v2",
                           "task": "match each stdlib docstring's opening to the rest "
                                   "(refattn.analysis.retrieval)",
                           "skipped": "; ".join(f"{k}: {v}" for k, v in skipped.items())})
    return ds, skipped
