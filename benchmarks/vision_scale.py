"""2-D neighborhood attention (NATTEN) at scale: time and memory against the number of
tokens N = X * Y and the kernel k, showing the O(N k^2) cost.

Each case runs ``refattn.vision.neighborhood_attention`` once on float64
``q, k, v (1, 1, X, Y, D)`` (batch 1, one head, D = 32 by default) in a fresh
subprocess, after a warm-up call on the same inputs (imports, Numba compilation,
threads). It prints the best wall time of ``--repeats`` untraced calls (and, for
``--method auto``, the path the sparse engine chose: tiles or gather); the peak working
memory beyond inputs and output of a further, traced call (``tracemalloc``: NumPy
reports its buffers to it); the RSS high-water growth of the untraced calls
(``ru_maxrss``); the kept pairs N k^2 and what dense attention's N x N float64 score
matrix would need. Then the
exponents ``p`` of least-squares fits ``time ~ N^p`` and ``memory ~ N^p`` over the grid
sizes, and ``~ k^p`` over the kernels.

Run by hand from the repository root, not by the test suite::

    python benchmarks/vision_scale.py                     # 64², 128², 256²; k sweep at 128²
    python benchmarks/vision_scale.py --sides 256 --kernels 7 --d 32
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiled_memory import OtherLoad, current_rss, max_rss  # noqa: E402

MiB = 2**20


def measure(side: int, kernel: int, d: int, method: str, repeats: int) -> dict:
    """One case, in this process (a fresh subprocess of the driver)."""
    from refattn.vision import neighborhood_attention
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, side, side, d)) for _ in range(3))
    neighborhood_attention(q, k, v, (kernel, kernel), method=method)    # warm-up
    rss0 = current_rss()
    times = []
    with OtherLoad() as load:
        for _ in range(repeats):
            start = time.perf_counter()
            out = neighborhood_attention(q, k, v, (kernel, kernel), method=method)
            times.append(time.perf_counter() - start)
            if len(times) < repeats:
                del out
    rss_peak = max_rss() - rss0 - out.nbytes
    del out
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    out = neighborhood_attention(q, k, v, (kernel, kernel), method=method)
    traced = tracemalloc.get_traced_memory()[1] - before - out.nbytes
    tracemalloc.stop()
    n = side * side
    path = method
    if method == "auto":   # what the engine's chooser picks (a private helper)
        from refattn.sparse.engine import SPARSE_BLOCK, choose_method
        from refattn.vision import neighborhood_mask
        path = choose_method(neighborhood_mask((side, side), kernel), n, n, SPARSE_BLOCK)
    return {"side": side, "n": n, "kernel": kernel, "seconds": min(times), "path": path,
            "traced_mib": traced / MiB, "rss_mib": rss_peak / MiB, "other": load.fraction,
            "inputs_mib": 3 * q.nbytes / MiB, "pairs": n * kernel**2,
            "dense_mib": n * n * 8 / MiB}


def fit(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x)."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def run_case(side, kernel, d, method, repeats):
    done = subprocess.run([sys.executable, __file__, "--d", str(d), "--method", method,
                           "--repeats", str(repeats),
                           "--one", str(side), str(kernel)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{side}x{side} k={kernel} failed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(done.stdout)


def table(rows_in, label, repeats):
    print(f"{'grid':>9} {'N':>7} {'k':>3} {'pairs N·k²':>11} {'time s':>8} {'traced MiB':>11} "
          f"{'RSS MiB':>8} {'inputs MiB':>11} {'dense S MiB':>12} {'other%':>7} {'path':>7}")
    rows = []
    for side, kernel, d, method in rows_in:
        r = run_case(side, kernel, d, method, repeats)
        if r is None:
            continue
        rows.append(r)
        print(f"{str(side) + 'x' + str(side):>9} {r['n']:>7} {kernel:>3} {r['pairs']:>11} "
              f"{r['seconds']:>8.3f} {r['traced_mib']:>11.1f} {r['rss_mib']:>8.1f} "
              f"{r['inputs_mib']:>11.1f} {r['dense_mib']:>12.0f} {100 * r['other']:>6.0f}% "
              f"{r['path']:>7}",
              flush=True)
    if len(rows) >= 2:
        xs = [r[label] for r in rows]
        name = "N" if label == "n" else "k"
        print(f"fitted exponents over {name} = {xs[0]} .. {xs[-1]}: time ~ {name}^"
              f"{fit(xs, [r['seconds'] for r in rows]):.2f}, traced memory ~ {name}^"
              f"{fit(xs, [max(r['traced_mib'], 1e-3) for r in rows]):.2f}, kept pairs ~ "
              f"{name}^{fit(xs, [r['pairs'] for r in rows]):.2f}")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sides", default="64,128,256", help="grid sides X = Y")
    parser.add_argument("--kernel", type=int, default=7, help="kernel for the N sweep")
    parser.add_argument("--kernels", default="3,7,11,15", help="kernels for the k sweep")
    parser.add_argument("--kernel-side", type=int, default=128, help="grid side of the k sweep")
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--method", default="auto", choices=["auto", "tiles", "gather"])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (best kept)")
    parser.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.d, args.method,
                                 args.repeats)))
        return
    print(f"neighborhood_attention, 2-D, float64, batch 1, one head, D={args.d}, "
          f"method={args.method}; numpy {np.__version__}; each case in a fresh process; "
          f"traced/RSS = working memory beyond inputs and output")
    sides = [int(s) for s in args.sides.split(",") if s]
    if sides:
        print(f"\nN sweep, k = {args.kernel}")
        table([(s, args.kernel, args.d, args.method) for s in sides], "n", args.repeats)
    kernels = [int(k) for k in args.kernels.split(",") if k]
    if kernels:
        print(f"\nk sweep, grid {args.kernel_side}x{args.kernel_side}")
        table([(args.kernel_side, k, args.d, args.method) for k in kernels], "kernel",
              args.repeats)


if __name__ == "__main__":
    main()
