"""Peak memory and speed of ``refattn.tiled_attention`` at long sequence length.

Runs ``tiled_attention`` on one float64 problem (default N = M = 65,536, D = 64, one head)
and prints

* its peak working memory beyond inputs and output, two ways: the ``tracemalloc`` peak
  (NumPy reports its buffers to tracemalloc) during a traced call, and the process
  RSS high-water (``ru_maxrss``) growth during an untraced call. The calls run in a
  fresh subprocess whose earlier peak is below the call's, so the high-water is the
  call's own (this parent stays small too: a child started by fork/vfork + exec
  inherits the parent's ``ru_maxrss``);
* its wall time (untraced call) against the *matmul floor*: its FLOPs
  (``2·N·M·(D + Dv)`` per head, i.e. ``4·N·M·D``, halved for causal) divided by this
  machine's float64 GEMM rate, measured in the same run (best of a few square NumPy
  matmuls, all cores, in subprocesses before and after), and the CPU share other
  processes took meanwhile (``/proc/stat``; re-run if it is high);
* that dense ``refattn.attention`` at this size raises ``refattn.MemoryBudgetError`` at
  once instead of allocating the ``N x M`` matrix.

Run by hand, not by the test suite::

    python benchmarks/tiled_memory.py                  # N = M = 65,536, D = 64
    python benchmarks/tiled_memory.py --n 16384 --causal
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np

GiB, MiB = 2**30, 2**20


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss() -> int:
    """RSS high-water of this process so far, in bytes (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class OtherLoad:
    """CPU time used by processes other than this one and its children while the
    ``with`` block ran, as a fraction of the machine (``/proc/stat``, Linux): a check
    that nothing else disturbed the timings."""

    @staticmethod
    def _now():
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(
                int, f.readline().split()[1:9])
        own = sum(getattr(resource.getrusage(who), a) for who in (
            resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for a in ("ru_utime", "ru_stime"))
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        return time.perf_counter(), busy, own

    def __enter__(self):
        self.start = self._now()
        return self

    def __exit__(self, *exc):
        (t0, b0, o0), (t1, b1, o1) = self.start, self._now()
        ncpu = os.cpu_count() or 1
        slack = 2 / os.sysconf("SC_CLK_TCK")    # /proc/stat counts in clock ticks
        self.fraction = max(0.0, (b1 - b0) - (o1 - o0) - slack) / max(t1 - t0, 1e-9) / ncpu


def gemm_rate(size: int, repeats: int) -> float:
    """Best float64 ``size x size @ size x size`` NumPy matmul rate, FLOP/s."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, size, size))
    c = np.empty((size, size))
    np.matmul(a, b, out=c)                   # warm-up
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


def worker(args) -> dict:
    """The measurement proper, run in a fresh process; returns its figures."""
    import refattn
    rng = np.random.default_rng(0)
    q = rng.standard_normal((args.heads, args.n, args.d))
    k = rng.standard_normal((args.heads, args.m, args.d))
    v = rng.standard_normal((args.heads, args.m, args.dv))
    res = {"inputs": q.nbytes + k.nbytes + v.nbytes}

    # 1. Untraced call: wall time and RSS high-water growth.
    rss0, hwm0 = current_rss(), max_rss()
    with OtherLoad() as load:
        t = time.perf_counter()
        out = refattn.tiled_attention(q, k, v, causal=args.causal)
        res["time"] = time.perf_counter() - t
    res["other"] = load.fraction
    res.update(rss_before=rss0, hwm_before=hwm0, hwm_after=max_rss(), output=out.nbytes)
    del out

    # 2. Dense attention must refuse before allocating.
    tracemalloc.start()
    t = time.perf_counter()
    try:
        refattn.attention(q, k, v, causal=args.causal)
        res["dense"] = "returned normally (within the memory budget at this size)"
    except refattn.MemoryBudgetError as exc:
        res["dense"] = f"MemoryBudgetError: {exc}"
    res["dense_time"] = time.perf_counter() - t
    res["dense_traced_peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    # 3. Traced call: tracemalloc peak (tracing slows allocation, so it is not timed).
    if not args.no_trace:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        t = time.perf_counter()
        out = refattn.tiled_attention(q, k, v, causal=args.causal)
        res["traced_time"] = time.perf_counter() - t
        res["traced_peak"] = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.stop()
        del out
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=65536, help="queries N (default 65536)")
    p.add_argument("--m", type=int, default=None, help="keys M (default N)")
    p.add_argument("--d", type=int, default=64, help="head dim D (default 64)")
    p.add_argument("--dv", type=int, default=None, help="value dim Dv (default D)")
    p.add_argument("--heads", type=int, default=1, help="heads H (default 1)")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--gemm-size", type=int, default=4096, help="GEMM rate probe size")
    p.add_argument("--gemm-repeats", type=int, default=3)
    p.add_argument("--no-trace", action="store_true", help="skip the tracemalloc call")
    p.add_argument("--worker", choices=["tiled", "gemm"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.m = args.n if args.m is None else args.m
    args.dv = args.d if args.dv is None else args.dv

    if args.worker:
        res = (worker(args) if args.worker == "tiled"
               else {"rate": gemm_rate(args.gemm_size, args.gemm_repeats)})
        print(json.dumps(res))
        return

    import refattn
    from refattn._core.threads import available_cores
    print(f"refattn.tiled_attention: H={args.heads} N={args.n} M={args.m} D={args.d} "
          f"Dv={args.dv} causal={args.causal} float64; numpy {np.__version__}, "
          f"{available_cores()} cores, dense memory budget "
          f"{refattn.DEFAULT_MEMORY_BUDGET / GiB:.0f} GiB")

    def run_self(mode):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode]
        proc = subprocess.run(cmd + list(sys.argv[1:] if argv is None else argv),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{mode} subprocess failed (rc {proc.returncode}):\n{proc.stderr}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    rates = [run_self("gemm")["rate"]]
    r = run_self("tiled")
    rates.append(run_self("gemm")["rate"])
    rate = max(rates)
    print(f"float64 GEMM rate ({args.gemm_size}^3 NumPy matmul, all cores, best of "
          f"{args.gemm_repeats} before and after): "
          f"{' / '.join(f'{x / 1e9:.1f}' for x in rates)} GFLOP/s; floor uses {rate / 1e9:.1f}")
    print(f"inputs q, k, v: {r['inputs'] / MiB:.1f} MiB; output: {r['output'] / MiB:.1f} MiB")
    print("peak memory beyond inputs and output:")
    if "traced_peak" in r:
        work = r["traced_peak"] - r["output"]
        print(f"  tracemalloc: {work / MiB:8.1f} MiB  (traced peak {r['traced_peak'] / MiB:.1f}"
              f" MiB minus output; traced call took {r['traced_time']:.1f} s)")
    grow = r["hwm_after"] - r["rss_before"]
    note = ("" if r["hwm_before"] - r["rss_before"] < grow / 10 else
            f"; WARNING: high-water before the call was already "
            f"{(r['hwm_before'] - r['rss_before']) / MiB:.0f} MiB above RSS")
    print(f"  RSS high-water: {(grow - r['output']) / MiB:8.1f} MiB  (ru_maxrss growth "
          f"{grow / MiB:.1f} MiB minus output, fresh process{note})")
    flops = 2.0 * args.heads * args.n * args.m * (args.d + args.dv) * (0.5 if args.causal else 1)
    floor = flops / rate
    print(f"time: {r['time']:.2f} s (other processes used {100 * r['other']:.0f}% of the "
          f"machine's CPU meanwhile); matmul floor {flops / 1e12:.3f} TFLOP / "
          f"{rate / 1e9:.1f} GFLOP/s = {floor:.2f} s; time/floor = {r['time'] / floor:.2f}")
    worst = max(r.get("traced_peak", 0), grow) - r["output"]
    print(f"requirement: peak < 1 GiB: {'PASS' if worst < GiB else 'FAIL'} "
          f"({worst / MiB:.0f} MiB); time within 2x of floor: "
          f"{'PASS' if r['time'] <= 2 * floor else 'FAIL'} ({r['time'] / floor:.2f}x)")
    refused = r["dense"].startswith("MemoryBudgetError") and r["dense_time"] < 1.0
    print(f"dense refattn.attention at this size: {r['dense'].split(';')[0]}, after "
          f"{r['dense_time'] * 1e3:.1f} ms with a traced peak of "
          f"{r['dense_traced_peak'] / MiB:.1f} MiB: "
          f"{'PASS (refused before allocating)' if refused else 'no refusal'}")


if __name__ == "__main__":
    main()
