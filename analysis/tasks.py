"""Run independent analysis tasks in parallel: local processes or a Dask cluster.

:func:`run_tasks` maps a module-level function over task dicts and yields
``(task, result)`` as they finish (any order). Locally it uses a
``ProcessPoolExecutor`` with BLAS limited to one thread in each worker (so ``workers``
processes use ``workers`` cores; ``workers=1`` runs in this process, BLAS
single-threaded as well); with ``scheduler=`` (an address or a
``dask.distributed.Client``) the tasks go to the cluster, as
:func:`refattn.analysis.sweep.sweep` does.

>>> from refattn.analysis.tasks import run_tasks
>>> sorted(r for _, r in run_tasks(abs, [-2, 1], workers=1))
[1, 2]
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, as_completed

__all__ = ["run_tasks"]


def _single_threaded(fn, task):
    from refattn._core.threads import blas_controller
    with blas_controller().limit(limits=1, user_api="blas"):
        return fn(task)


def _client(scheduler, connect_timeout):
    try:
        from dask.distributed import Client
    except ImportError as exc:
        raise ImportError("scheduler= needs dask[distributed] (pip install "
                          "'refattn[analysis]'); run without scheduler= to use local "
                          "processes") from exc
    if isinstance(scheduler, Client):
        return scheduler, False
    try:
        return Client(scheduler, timeout=connect_timeout), True
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(
            f"could not reach the Dask scheduler at {scheduler!r} within "
            f"{connect_timeout} s ({type(exc).__name__}: {exc}); start it (dask scheduler "
            f"+ dask worker) or check the address, or run without scheduler= to use "
            f"local processes") from exc


def run_tasks(fn, tasks, *, scheduler=None, workers=None, progress=False, desc="tasks",
              connect_timeout=10):
    """Yield ``(task, fn(task))`` for every task, as each finishes.

    ``fn`` must be picklable (defined at module level); ``workers``: local processes
    (default: available cores); ``progress``: a tqdm bar on stderr labelled ``desc``.
    Raises ``ConnectionError`` for an unreachable scheduler and ``ValueError`` for
    ``workers < 1``.
    """
    from tqdm.auto import tqdm
    tasks = list(tasks)
    bar = tqdm(total=len(tasks), desc=desc, disable=not progress)
    try:
        if scheduler is not None:
            from dask.distributed import as_completed as dask_completed
            client, owned = _client(scheduler, connect_timeout)
            try:
                futures = {client.submit(_single_threaded, fn, t, pure=False): t
                           for t in tasks}
                for fut in dask_completed(list(futures)):
                    yield futures[fut], fut.result()
                    bar.update()
            finally:
                if owned:
                    client.close()
            return
        from refattn._core.threads import available_cores
        workers = available_cores() if workers is None else int(workers)
        if workers < 1:
            raise ValueError(f"workers must be >= 1 or None, got {workers}")
        if workers == 1 or len(tasks) <= 1:
            for t in tasks:
                yield t, _single_threaded(fn, t)
                bar.update()
            return
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            futures = {pool.submit(_single_threaded, fn, t): t for t in tasks}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
                bar.update()
    finally:
        bar.close()
