"""How time and memory grow with sequence length: the complexity rows of the literature,
measured.

For each mechanism and each N it runs one float64 call (batch 1, one head, D = 64) in a
fresh subprocess and prints wall time; the call's peak memory (``tracemalloc``: NumPy
reports its buffers; a second, traced call): everything it allocates, output included,
as the report's complexity section measures it, and the working memory beyond the
output; the RSS high-water growth beyond the output (``ru_maxrss``, untraced call, fresh
process); then the exponents ``p`` of least-squares fits ``time ~ N^p``, ``peak ~ N^p``,
``working ~ N^p`` and ``inputs + peak ~ N^p`` (all the memory the run holds) over the
sizes from ``--fit-from`` on. Memory linear in N gives a peak exponent of 1 (the output
alone is linear); a working memory that stops growing (a bounded engine) gives a working
exponent that falls toward 0 and a peak exponent a little under 1; exact attention's
time grows as N².

Run by hand, not by the test suite::

    python benchmarks/scale.py                         # every case, default sizes
    python benchmarks/scale.py --cases sliding_window --sizes 4096,1048576
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

MiB, K = 2**20, 1024

#: name -> (description, call(q, k, v), default sizes)
CASES = {
    "sliding_window": (
        "causal sliding window, 512 keys per query (sliding_window_attention window=511)",
        lambda ra, q, k, v: ra.sliding_window_attention(q, k, v, window=511, causal=True),
        [4 * K, 16 * K, 64 * K, 256 * K, 1024 * K]),
    "bigbird": (
        "BigBird, blocks of 64: 1 window block each side, 2 global, 3 random (rng=0)",
        lambda ra, q, k, v: ra.bigbird_attention(q, k, v, block_size=64, window_blocks=1,
                                                 global_blocks=2, random_blocks=3, rng=0),
        [4 * K, 16 * K, 64 * K, 256 * K, 1024 * K]),
    "block_sparse": (
        "block-sparse, blocks of 64, a band of 3 blocks per block row (SciPy CSR layout)",
        lambda ra, q, k, v: ra.block_sparse_attention(
            q, k, v, block_layout=_band(q.shape[-2] // 64 + 1), block_size=64),
        [4 * K, 16 * K, 64 * K, 256 * K, 1024 * K]),
    "longformer": (
        "Longformer, window 256 each side, 16 global tokens",
        lambda ra, q, k, v: ra.longformer_attention(q, k, v, window=256,
                                                    global_tokens=np.arange(16)),
        [4 * K, 16 * K, 64 * K, 256 * K, 1024 * K]),
    "lsh": (
        "Reformer LSH, chunks of 64, buckets of ~64 keys, 1 hash round (rng=0)",
        lambda ra, q, k, v: ra.lsh_attention(q, k, v, n_buckets=max(2, q.shape[-2] // 64),
                                             chunk_size=64, rng=0),
        [4 * K, 16 * K, 64 * K, 256 * K, 1024 * K]),
    "nsa": (
        "causal NSA: mean-pooled compression blocks of 1024 (stride 1024), the top 4 "
        "selected blocks of 32, window 64, equal gates",
        lambda ra, q, k, v: ra.nsa_attention(q, k, v, block_size=1024, stride=1024,
                                             select_size=32, top_n=4, window=64,
                                             gates=(1 / 3, 1 / 3, 1 / 3), causal=True),
        [4 * K, 16 * K, 64 * K, 256 * K, 1024 * K]),
    "moba": (
        "causal MoBA: blocks of 512, top 4 blocks per query (the current one included)",
        lambda ra, q, k, v: ra.moba_attention(q, k, v, block_size=512, topk=4, causal=True),
        [4 * K, 16 * K, 64 * K, 256 * K, 1024 * K]),
    "linear_causal": (
        "causal linear attention, elu+1 features, chunked (chunk 64)",
        lambda ra, q, k, v: ra.linear_attention(q, k, v, causal=True),
        [4 * K, 16 * K, 64 * K, 256 * K, 1024 * K]),
    "performer_causal": (
        "causal Performer (FAVOR+), 64 positive orthogonal features (rng=0), prefix sums",
        lambda ra, q, k, v: ra.performer_attention(q, k, v, num_features=64, causal=True,
                                                   rng=0),
        [4 * K, 16 * K, 64 * K, 256 * K, 1024 * K]),
    "exact_causal": (
        "exact causal attention (tiled_attention), the quadratic reference",
        lambda ra, q, k, v: ra.tiled_attention(q, k, v, causal=True),
        [4 * K, 8 * K, 16 * K, 32 * K, 64 * K]),
}


def _band(blocks: int):
    """A sparse band layout: each block row keeps its block and both neighbours."""
    import scipy.sparse
    return scipy.sparse.diags_array([np.ones(blocks - abs(o), np.int8) for o in (-1, 0, 1)],
                                    offsets=[-1, 0, 1], format="csr", dtype=np.int8)


def measure(case: str, n: int, d: int) -> dict:
    """Run one case in this process (a fresh subprocess of the driver)."""
    import refattn as ra
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, n, d)) for _ in range(3))
    call = CASES[case][1]
    w = min(n, 16 * K)                                     # warm up: imports, Numba, threads
    call(ra, q[:, :w], k[:, :w], v[:, :w])
    rss0 = current_rss()
    with OtherLoad() as load:
        start = time.perf_counter()
        out = call(ra, q, k, v)
        seconds = time.perf_counter() - start
    rss_peak = max_rss() - rss0 - out.nbytes
    del out
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    out = call(ra, q, k, v)
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    return {"case": case, "n": n, "seconds": seconds, "peak_mib": peak / MiB,
            "working_mib": (peak - out.nbytes) / MiB, "rss_mib": rss_peak / MiB,
            "other": load.fraction, "inputs_mib": 3 * q.nbytes / MiB}


def fit_exponent(ns, values) -> float:
    """Least-squares slope of log(value) against log(N)."""
    return float(np.polyfit(np.log(ns), np.log(values), 1)[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--sizes", default=None, help="comma-separated N (default per case)")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--fit-from", type=int, default=16 * K,
                        help="fit the exponent on sizes >= this (default 16384)")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.d)))
        return
    print(f"float64, batch 1, one head, D={args.d}; numpy {np.__version__}; each size in a "
          f"fresh process; peak = all the call allocates (output included), working = "
          f"peak beyond the output, RSS = high-water growth beyond the output")
    for case in args.cases.split(","):
        desc, _, sizes = CASES[case]
        if args.sizes:
            sizes = [int(s) for s in args.sizes.split(",")]
        print(f"\n{case}: {desc}")
        print(f"{'N':>9} {'time s':>9} {'peak MiB':>9} {'working MiB':>12} {'RSS MiB':>9} "
              f"{'inputs MiB':>11} {'other%':>7}")
        rows = []
        for n in sizes:
            done = subprocess.run([sys.executable, __file__, "--d", str(args.d), "--one", case,
                                   str(n)], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{n:>9} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(done.stdout)
            rows.append(r)
            print(f"{n:>9} {r['seconds']:>9.3f} {r['peak_mib']:>9.1f} {r['working_mib']:>12.1f} "
                  f"{r['rss_mib']:>9.1f} {r['inputs_mib']:>11.1f} {100 * r['other']:>6.0f}%",
                  flush=True)
        fit = [r for r in rows if r["n"] >= args.fit_from]
        if len(fit) >= 2:
            ns = [r["n"] for r in fit]
            p = fit_exponent(ns, [r["seconds"] for r in fit])
            pp = fit_exponent(ns, [r["peak_mib"] for r in fit])
            pw = fit_exponent(ns, [max(r["working_mib"], 1e-3) for r in fit])
            pt = fit_exponent(ns, [r["inputs_mib"] + r["peak_mib"] for r in fit])
            print(f"fitted exponents over N = {fit[0]['n']} .. {fit[-1]['n']}: time ~ "
                  f"N^{p:.2f}, peak memory ~ N^{pp:.2f}, working memory ~ N^{pw:.2f}, "
                  f"inputs + peak ~ N^{pt:.2f}")


if __name__ == "__main__":
    main()
