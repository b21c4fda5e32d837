"""Running independent pieces of a reference on the available cores.

NumPy's ufuncs and BLAS release the GIL, so Python threads working on disjoint blocks run
in parallel; while they do, the BLAS library is limited to one thread each (threadpoolctl)
so the cores are not oversubscribed.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import ThreadpoolController

#: Below this much work (elements touched), threads cost more than they save.
PARALLEL_MIN_WORK = 2**22


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def blas_controller() -> ThreadpoolController:
    """The BLAS thread-pool controller (built once: inspecting the loaded libraries
    costs ~1 ms, limiting through it ~15 us)."""
    return ThreadpoolController()


def run_items(run, items, workers=None, work: float = float("inf")) -> None:
    """Call ``run(item)`` for every item, with BLAS single-threaded: on ``workers``
    threads (default: the available cores), or serially when ``work`` is below
    ``PARALLEL_MIN_WORK`` (small products run faster on one BLAS thread too)."""
    workers = workers or available_cores()
    with blas_controller().limit(limits=1, user_api="blas"):
        if workers == 1 or len(items) <= 1 or work < PARALLEL_MIN_WORK:
            for item in items:
                run(item)
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run, items))          # re-raises the first worker exception
