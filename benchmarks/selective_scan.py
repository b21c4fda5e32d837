"""Mamba's selective scan (``refattn.ssm.selective_scan``) at a million steps: wall time,
working memory, and the time against a floor of the same number of ``exp`` calls.

Inputs are float64, shaped like a Mamba layer's: ``u``, ``delta``, ``z`` ``(batch, dim,
L)``, ``A = -exp(.)`` ``(dim, N)``, ``B``, ``C`` ``(batch, N, L)`` (input-dependent,
shared by the channels), ``D``, ``delta_bias`` ``(dim,)``, softplus on. Work is
``batch·dim·L·N`` state updates, each one ``exp(δ A)`` and two multiply-adds.

* **Time**: best of ``--repeats`` calls, after a warm-up call on a short sequence (Numba
  compiles or loads its cache there). The floor is the time NumPy takes for the same
  number of ``exp`` evaluations on one core (measured on 2**22-element slices): the
  recurrence cannot beat that on one core; with ``C`` cores the ideal is floor / C.
* **Memory**: ``tracemalloc`` (NumPy reports its buffers to it) gives the peak traced
  during one call minus what was allocated before it, i.e. the output plus the working
  memory; the inputs are allocated before and not counted. The Numba recurrence's
  per-thread scratch (3 tiles of 512 float64, 12 KiB a thread) comes from Numba's own
  allocator and is not traced. The process's RSS high-water mark (``ru_maxrss``) is
  printed too (inputs included).

Measured on the 2-core development machine (other jobs running, load ~1), float64:
``recurrent`` best 4.7 s (4.4 ns per state update, 5.2x the one-core NumPy exp floor),
traced peak 512 MiB = the output; ``--method chunkwise`` 17 s, 79 MiB working memory.

Run by hand from the repository root, not by the test suite::

    python benchmarks/selective_scan.py                      # L = 2**20, dim 64, N 16
    python benchmarks/selective_scan.py --method chunkwise --length 65536
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc

import numpy as np

from refattn._core.threads import available_cores
from refattn.ssm import selective_scan

MiB = 2**20


def make_inputs(batch, dim, length, nstate, seed=0):
    rng = np.random.default_rng(seed)
    return dict(u=rng.standard_normal((batch, dim, length)),
                delta=rng.standard_normal((batch, dim, length)) - 3.0,
                A=-np.exp(rng.uniform(-1, 2, (dim, nstate))),
                B=rng.standard_normal((batch, nstate, length)),
                C=rng.standard_normal((batch, nstate, length)),
                D=rng.standard_normal(dim), z=rng.standard_normal((batch, dim, length)),
                delta_bias=rng.uniform(-1, 0, dim), delta_softplus=True)


def exp_floor(n_exp: int) -> float:
    """Seconds NumPy takes for ``n_exp`` float64 exps on one core (2**22 at a time)."""
    x = -np.random.default_rng(1).uniform(0, 5, 2**22)
    out = np.empty_like(x)
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(8):
            np.exp(x, out=out)
        best = min(best, (time.perf_counter() - t0) / (8 * x.size))
    return best * n_exp


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2**20)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--state", type=int, default=16, help="N, the state size")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--method", default="recurrent", choices=["recurrent", "chunkwise"])
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    print("command: python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])))
    b, d, n, L = args.batch, args.dim, args.state, args.length
    print(f"selective_scan method={args.method!r}"
          + (f" chunk={args.chunk}" if args.method == "chunkwise" else "")
          + f": batch {b}, dim {d}, L {L:,}, N {n}; {available_cores()} cores")

    small = make_inputs(b, d, 1000, n)
    selective_scan(**small, method=args.method, chunk=args.chunk)      # compile / load

    inputs = make_inputs(b, d, L, n)
    in_bytes = sum(v.nbytes for v in inputs.values() if isinstance(v, np.ndarray))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = selective_scan(**inputs, method=args.method, chunk=args.chunk)
        times.append(time.perf_counter() - t0)
        del out
    best = min(times)

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    out = selective_scan(**inputs, method=args.method, chunk=args.chunk)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert np.isfinite(out).all()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    updates = b * d * L * n
    floor = exp_floor(updates)
    print(f"time: best {best:.2f} s of {args.repeats} ({', '.join(f'{t:.2f}' for t in times)}"
          f" s); {best / updates * 1e9:.2f} ns per state update")
    print(f"exp floor (one core, NumPy, {updates:.3g} exps): {floor:.2f} s; "
          f"time / floor = {best / floor:.2f}")
    print(f"memory: inputs {in_bytes / MiB:.0f} MiB; traced peak during the call "
          f"{peak / MiB:.0f} MiB (output {out.nbytes / MiB:.0f} MiB + working "
          f"{(peak - out.nbytes) / MiB:.1f} MiB); process RSS high-water "
          f"{rss / MiB:.0f} MiB")


if __name__ == "__main__":
    main()
