"""refattn's float64 attention against PyTorch's CPU ``scaled_dot_product_attention``.

Times ``refattn.attention`` (dense), ``refattn.tiled_attention`` and
``torch.nn.functional.scaled_dot_product_attention`` on the same float64 inputs
``(1, H, N, 64)``, non-causal and causal, and prints per case the median time, the
ratio refattn/torch, the peak memory and the largest difference from torch's output.

Every (function, size, causal) case runs in a fresh subprocess of this interpreter, so
that memory is measured the same way for NumPy and torch: the growth of the RSS
high-water (``ru_maxrss``) over the RSS just before the first call (it includes the
output array). Each case is run once to warm up, then timed with ``time.perf_counter``
``--repeats`` times (``--repeats-large`` from N = 16,384; more calls while they take
under ``--min-time``); the median is reported. The share of CPU that other processes
took meanwhile is measured too, and a disturbed case is re-run (``--max-other``).

``--breakdown N`` instead times the stages (``q @ k.T``, row max, subtract, exp, row sum,
``p @ v``) of dense attention for one head of length N, and of one default-sized tile of
``tiled_attention`` on one thread, to show where refattn's time goes.

Shares its memory and load helpers with ``tiled_memory.py`` (same folder). Run by
hand, not by the test suite::

    python benchmarks/vs_torch.py                      # N = 1k, 4k (H = 4), 16k (H = 1)
    python benchmarks/vs_torch.py --sizes 2048:8 --repeats 10
    python benchmarks/vs_torch.py --breakdown 16384
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from tiled_memory import OtherLoad, current_rss, max_rss   # same folder

MiB = 2**20
FUNCS = ("torch", "attention", "tiled")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def vm_hwm() -> int:
    """This address space's RSS high-water (``VmHWM``). Unlike ``ru_maxrss`` it is not
    inherited across fork/vfork + exec from the parent, so it cross-checks it."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def inputs(n: int, h: int, d: int):
    rng = np.random.default_rng(n * 10 + h)
    return rng.standard_normal((3, 1, h, n, d))


def run_case(fn: str, n: int, h: int, d: int, causal: bool, repeats: int, min_time: float,
             path: str, ref: str | None) -> dict:
    """One case, in its own process: warm-up + at least ``repeats`` timed calls, more
    (up to 100) until they take ``min_time`` seconds; save the output to ``path`` or
    compare it with the one saved at ``ref``."""
    res = {}
    if fn == "torch":
        import torch
        torch.set_num_threads(cores())
        q, k, v = (torch.from_numpy(x) for x in inputs(n, h, d))
        res["threads"] = torch.get_num_threads()
        res["backend"] = torch.nn.attention.SDPBackend(
            torch._fused_sdp_choice(q, k, v, is_causal=causal)).name
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def call():
            with torch.no_grad():
                return sdpa(q, k, v, is_causal=causal).numpy()
    else:
        import refattn
        f = refattn.attention if fn == "attention" else refattn.tiled_attention
        q, k, v = inputs(n, h, d)

        def call():
            return f(q, k, v, causal=causal)
    res.update(rss_before=current_rss(), hwm_before=max_rss())
    try:
        out = call()                                  # warm-up
        times = []
        with OtherLoad() as load:
            while len(times) < repeats or (sum(times) < min_time and len(times) < 100):
                del out
                t = time.perf_counter()
                out = call()
                times.append(time.perf_counter() - t)
    except MemoryError as exc:                        # includes refattn.MemoryBudgetError
        res["error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
        return res
    res.update(hwm_after=max_rss(), vmhwm_after=vm_hwm(), times=times, other=load.fraction)
    if ref is None:
        np.save(path, out)
    elif os.path.exists(ref):
        res["diff"] = float(np.abs(out - np.load(ref)).max())
    return res


def spawn_case(*case) -> dict:
    """Run :func:`run_case` in a fresh interpreter; report a crash instead of raising.
    (This process stays small: a child inherits its parent's ``ru_maxrss``.)"""
    cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        why = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip()[-200:]
        return {"error": f"rc {proc.returncode}: {why}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(args) -> None:
    from importlib.metadata import version
    print(f"float64, batch 1, D={args.d}; numpy {np.__version__}, torch {version('torch')}, "
          f"refattn {version('refattn')}; {cores()} cores available")
    print(f"each case in a fresh process; 1 warm-up + median of >= {args.repeats} calls "
          f"({args.repeats_large} from N=16384; more until {args.min_time} s); peak = RSS "
          f"high-water minus RSS before the first call (includes the 1-copy output); "
          f"other% = CPU share used by other processes while timing (max of the three; "
          f"cases above {args.max_other:.0%} are re-run up to {args.retries} times, keeping "
          f"the least disturbed run)")
    head = (f"{'N':>6} {'H':>2} {'causal':>6} | {'torch s':>8} {'attn s':>8} {'tiled s':>8} |"
            f" {'attn/t':>6} {'tiled/t':>7} | {'torch MiB':>9} {'attn MiB':>8} {'tiled MiB':>9}"
            f" | {'|attn-t|':>8} {'|tiled-t|':>9} | {'other%':>6}")
    rows, info = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for n, h in args.sizes:
            for causal in (False, True):
                reps = args.repeats if n < 16384 else args.repeats_large
                path = os.path.join(tmp, f"torch-{n}-{h}-{causal}.npy")
                r = {}
                for fn in FUNCS:     # re-run a case that other processes disturbed
                    for _ in range(1 + args.retries):
                        res = spawn_case(fn, n, h, args.d, causal, reps, args.min_time, path,
                                         None if fn == "torch" else path)
                        if fn not in r or res.get("other", 1) < r[fn].get("other", 1):
                            r[fn] = res
                        if "error" in res or r[fn].get("other", 0) <= args.max_other:
                            break
                info = info or (r["torch"] if "threads" in r["torch"] else None)
                rows.append((n, h, causal, r))
                print_row(n, h, causal, r, head if len(rows) == 1 else None, info)
    errors = [(n, h, c, fn, r[fn]["error"]) for n, h, c, r in rows for fn in FUNCS
              if "error" in r[fn]]
    for n, h, c, fn, e in errors:
        print(f"N={n} H={h} causal={c} {fn}: {e}")
    gap = [abs(r[fn]["hwm_after"] - r[fn]["vmhwm_after"]) for _, _, _, r in rows
           for fn in FUNCS if "times" in r[fn]]
    print(f"cross-check: ru_maxrss and /proc VmHWM high-waters differ by at most "
          f"{max(gap, default=0) / MiB:.1f} MiB over all cases")


def print_row(n, h, causal, r, head, info) -> None:
    if head:
        if info:
            print(f"torch: {info['threads']} threads (torch.set_num_threads), SDPA backend "
                  f"{info['backend']}; refattn: NumPy/OpenBLAS, tiled_attention "
                  f"{cores()} worker threads")
        print(head)
        print("-" * len(head))
    med = {fn: statistics.median(r[fn]["times"]) if "times" in r[fn] else None
           for fn in FUNCS}
    mem = {fn: (r[fn]["hwm_after"] - r[fn]["rss_before"]) / MiB if "times" in r[fn] else None
           for fn in FUNCS}

    def f(x, fmt, w):
        return f"{'err':>{w}}" if x is None else f"{x:{w}{fmt}}"

    ratio = {fn: (med[fn] / med["torch"] if med[fn] and med["torch"] else None)
             for fn in FUNCS[1:]}
    other = max((r[fn]["other"] for fn in FUNCS if "other" in r[fn]), default=None)
    print(f"{n:>6} {h:>2} {str(causal):>6} | {f(med['torch'], '.4f', 8)} "
          f"{f(med['attention'], '.4f', 8)} {f(med['tiled'], '.4f', 8)} | "
          f"{f(ratio['attention'], '.2f', 6)} {f(ratio['tiled'], '.2f', 7)} | "
          f"{f(mem['torch'], '.1f', 9)} {f(mem['attention'], '.1f', 8)} "
          f"{f(mem['tiled'], '.1f', 9)} | {f(r['attention'].get('diff'), '.1e', 8)} "
          f"{f(r['tiled'].get('diff'), '.1e', 9)} | "
          f"{f(other, '.0%', 6)}", flush=True)


def best_time(f, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls of ``f`` after one warm-up."""
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def _stages(q, k, v, repeats: int) -> dict:
    """Seconds of each stage refattn runs on ``s = q @ k.T`` (one head, 2-D arrays)."""
    t = {"q @ k.T (GEMM)": best_time(lambda: q @ k.T, repeats)}
    s = q @ k.T
    mx = s.max(axis=-1)
    s0 = s - mx[:, None]
    t["row max"] = best_time(lambda: s.max(axis=-1), repeats)
    t["s -= max"] = best_time(lambda: np.subtract(s, mx[:, None], out=s), repeats)
    t["exp"] = (best_time(lambda: (np.copyto(s, s0), np.exp(s, out=s)), repeats)
                - best_time(lambda: np.copyto(s, s0), repeats))    # minus the reset of s
    np.exp(s0, out=s)
    t["row sum"] = best_time(lambda: s.sum(axis=-1), repeats)
    t["p @ v (GEMM)"] = best_time(lambda: s @ v, repeats)
    return t


def _show(title: str, t: dict, logits: int, measured: float) -> None:
    total = sum(t.values())
    print(title)
    for name, x in t.items():
        print(f"  {name:16s} {x * 1e3:9.2f} ms  {x / logits * 1e9:5.2f} ns/logit  "
              f"{100 * x / total:5.1f} %")
    print(f"  {'sum of stages':16s} {total * 1e3:9.2f} ms; the real call: {measured * 1e3:.2f} ms")


def breakdown(n: int, d: int, repeats: int) -> None:
    """Per-stage times of dense attention (one head, N x N) and of one tile of tiled
    attention, next to the whole calls and torch."""
    from threadpoolctl import threadpool_limits
    import refattn
    from refattn import tiled
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, n, d))
    q *= d ** -0.5
    with OtherLoad() as load:
        whole = best_time(lambda: refattn.attention(q[None], k[None], v[None]), repeats)
        _show(f"dense refattn.attention, one head, N=M={n}, D={d} (GEMMs on {cores()} BLAS "
              f"threads, NumPy ufuncs on 1 thread; ns per logit of wall time):",
              _stages(q, k, v, repeats), n * n, whole)
        causal = best_time(lambda: refattn.attention(q[None], k[None], v[None], causal=True),
                       repeats)
        print(f"dense causal=True call: {causal * 1e3:.2f} ms, {causal - whole:+.3f} s over "
              f"non-causal (the causal mask is evaluated over all N x M logits)")

        bk = min(n, tiled.DEFAULT_BLOCK_K)
        bq = min(n, tiled.TILE_ELEMENTS // bk)
        with threadpool_limits(limits=1, user_api="blas"):
            t = _stages(q[:bq].copy(), k[:bk].copy(), v[:bk].copy(), repeats)
            acc, rsum, alpha = np.zeros((bq, d)), np.zeros(bq), np.ones(bq)
            t["rescale acc/sum"] = best_time(lambda: (np.multiply(rsum, alpha, out=rsum),
                                                  np.multiply(acc, alpha[:, None], out=acc)),
                                         repeats)
        whole = best_time(lambda: refattn.tiled_attention(q[None], k[None], v[None]), repeats)
        tiles = -(-n // bq) * -(-n // bk)
        _show(f"one tiled_attention tile, {bq} x {bk}, alone on 1 thread (ns per logit "
              f"per thread; 'real call' = whole call x {cores()} threads / {tiles} tiles):",
              t, bq * bk, whole * cores() / tiles)
        print(f"whole tiled_attention call: {whole:.3f} s = "
              f"{whole / n**2 * 1e9 * cores():.2f} ns per logit per thread")
        import torch
        torch.set_num_threads(cores())
        tq, tk, tv = (torch.from_numpy(x[None, None]) for x in (q, k, v))
        tt = best_time(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv),
                   repeats)
        print(f"torch SDPA ({cores()} threads), same problem: {tt:.3f} s = "
              f"{tt / n**2 * 1e9 * cores():.2f} ns per logit per thread")
    print(f"other processes used {load.fraction:.0%} of the CPU meanwhile (re-run if high)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1024:4,4096:4,16384:1",
                   help="comma-separated N:H pairs (default 1024:4,4096:4,16384:1)")
    p.add_argument("--d", type=int, default=64, help="head dim (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls below N=16384")
    p.add_argument("--repeats-large", type=int, default=3, help="timed calls from N=16384")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="keep timing small cases until they took this many seconds")
    p.add_argument("--max-other", type=float, default=0.1,
                   help="re-run a case if other processes used more than this share of "
                        "the CPU while it was timed (default 0.1)")
    p.add_argument("--retries", type=int, default=2, help="re-runs allowed per case")
    p.add_argument("--breakdown", type=int, metavar="N",
                   help="print a per-stage time breakdown at length N instead")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(*json.loads(args.case))))
    elif args.breakdown:
        breakdown(args.breakdown, args.d, args.repeats)
    else:
        args.sizes = [tuple(int(x) for x in s.split(":")) for s in args.sizes.split(",")]
        compare(args)


if __name__ == "__main__":
    main()
