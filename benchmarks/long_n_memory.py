"""Every registered mechanism at a long length (default N = M = 2^21, D = 64, one head,
float64) with its registry ``budget(N, 64)`` parameters (its example where it has none):
does it run in working memory a small multiple of its inputs, or refuse with
``MemoryBudgetError`` before allocating?

Each mechanism runs in a fresh subprocess. A thread makes the call while the main thread
samples the traced NumPy allocations (``tracemalloc``) every 0.2 s for ``--seconds``; the
row reports the peak beyond the inputs (as a multiple of the inputs), and whether the call
finished, refused (the exception) or was still running when time ran out (quadratic
mechanisms at 2^21 take hours: what matters is that their memory stays bounded while they
run). Run by hand, not by the test suite::

    python benchmarks/long_n_memory.py                     # every mechanism, 2^21, 20 s
    python benchmarks/long_n_memory.py --n 65536 --seconds 5 --mechanisms attention,lsh_attention
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np

MiB = 2**20


def one(name: str, n: int, d: int, seconds: float) -> dict:
    """Run mechanism ``name`` at length ``n`` in this process; the measured row."""
    import refattn as ra
    spec = ra.mechanisms()[name]
    from refattn.analysis.complexity import scaling_params   # no test-sized tiles
    kwargs = scaling_params(spec, n, 64)
    rng = np.random.default_rng(0)
    if spec.family == "vision":          # a square grid of about n tokens
        side = int(np.sqrt(n))
        shape = (1, 1, side, side, d)
        for key in ("kernel_size", "window", "ratio"):
            if key in kwargs:
                args_tail = (kwargs.pop(key),)
                break
        else:
            args_tail = ()
    else:
        shape, args_tail = (1, 1, n, d), ()
    q, k, v = (rng.standard_normal(shape) for _ in range(3))
    inputs = 3 * q.nbytes
    result = {}

    def call():
        try:
            spec.fn(q, k, v, *args_tail, **kwargs)
            result["status"] = "finished"
        except Exception as exc:          # reported, not raised: the row says what it was
            result["status"] = f"{type(exc).__name__}: {str(exc)[:120]}"

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    worker = threading.Thread(target=call, daemon=True)
    start = time.perf_counter()
    worker.start()
    while worker.is_alive() and time.perf_counter() - start < seconds:
        worker.join(0.2)
    peak = tracemalloc.get_traced_memory()[1] - base
    return {"name": name, "n": n, "inputs_mib": inputs / MiB, "peak_mib": peak / MiB,
            "multiple": peak / inputs, "seconds": time.perf_counter() - start,
            "status": result.get("status", "running (time up)")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2**21)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--mechanisms", default=None, help="comma-separated (default: all)")
    ap.add_argument("--limit-gib", type=float, default=16.0,
                    help="address-space limit of each run (default 16 GiB)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        import resource            # a ceiling, so a runaway allocation fails in this process
        limit = int(args.limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(one(args.one, args.n, args.d, args.seconds)), flush=True)
        os._exit(0)                      # do not wait for a call that is still running
    import refattn as ra
    names = args.mechanisms.split(",") if args.mechanisms else list(ra.mechanisms())
    print(f"N = M = {args.n:,}, D = {args.d}, one head, float64; registry budget(N, 64) "
          f"parameters; {args.seconds:g} s per mechanism; peak = traced NumPy memory beyond "
          f"the inputs")
    print(f"{'mechanism':<30} {'inputs MiB':>10} {'peak MiB':>10} {'x inputs':>9}  status")
    for name in names:
        done = subprocess.run([sys.executable, __file__, "--one", name, "--n", str(args.n),
                               "--d", str(args.d), "--seconds", str(args.seconds),
                               "--limit-gib", str(args.limit_gib)],
                              capture_output=True, text=True)
        if done.returncode != 0 or not done.stdout.strip():
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{name:<30} {'':>10} {'':>10} {'':>9}  crashed: {tail[:100]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:<30} {r['inputs_mib']:>10.0f} {r['peak_mib']:>10.0f} "
              f"{r['multiple']:>9.2f}  {r['status']}", flush=True)


if __name__ == "__main__":
    main()
