"""refattn's tiled backward (FlashAttention-2's algorithm, float64) against PyTorch's CPU
``scaled_dot_product_attention`` backward in the same run, and its peak memory.

Speed (default): for each N and causal/non-causal, one head, D = 64, float64, it times
torch's forward and its backward (``torch.autograd.grad``), refattn's
``tiled_attention`` forward and ``refattn.vjp("tiled_attention", ...)`` given the forward's
``out`` and ``lse`` (as torch's autograd and a kernel save them; "+ fwd": without them,
recomputing), each the best of ``--repeats`` calls after a warm-up, and prints the ratios
refattn backward / torch backward and refattn backward / refattn forward, and the largest
gradient difference. "floor": the time of the backward's five tile products alone
(``S = QKᵀ``, ``dP = dO Vᵀ``, ``dV += PᵀdO``, ``dK += dSᵀQ``, ``dQ += dS K``) on the tiles
it visits, spread over the cores, each product timed on one tile with one BLAS thread as
the backward runs them: no backward built from NumPy products can be faster.

Memory (``--memory N``): the peak of NumPy allocations traced (``tracemalloc``) during
one tiled backward at length N, and that peak beyond the gradients it returns: the
recomputed forward output and lse, ``D`` and the tiles.

Run by hand, not by the test suite::

    python benchmarks/tiled_backward.py --sizes 4096 8192 16384
    python benchmarks/tiled_backward.py --memory 65536
"""
from __future__ import annotations

import argparse
import os
import time
import tracemalloc

import numpy as np

from vs_torch import best_time   # same folder

MiB = 2**20


def tile_product_floor(n: int, d: int, causal: bool, repeats: int) -> float:
    """Seconds of the five products of FlashAttention-2's backward over the ``(block_q,
    block_k)`` tiles ``refattn.vjp("tiled_attention")`` visits at length ``n`` (one head),
    on all cores, each product timed single-threaded on one tile."""
    from refattn._core.threads import available_cores, blas_controller
    from refattn.exact.tiled import default_blocks

    class Shapes:           # what default_blocks reads of a problem
        group, m = 1, n
    Shapes.n = n
    bq, bk = default_blocks(Shapes, causal)
    rng = np.random.default_rng(0)
    q, do = rng.standard_normal((2, bq, d))
    k, v = rng.standard_normal((2, bk, d))
    p, ds = rng.standard_normal((2, bq, bk))
    with blas_controller().limit(limits=1, user_api="blas"):
        one = best_time(lambda: (q @ k.T, do @ v.T, p.T @ do, ds.T @ q, ds @ k), repeats)
    nq, nk = -(-n // bq), -(-n // bk)
    tiles = sum(1 for i in range(nq) for j in range(nk)
                if not causal or j * bk <= min(n, (i + 1) * bq) - 1)
    return one * tiles / available_cores()


def speed(sizes, repeats: int, d: int = 64) -> None:
    # torch's OpenMP workers otherwise spin after each op, taking a core from whichever
    # call is timed next (refattn's, or the floor's); set before torch starts them.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import refattn
    print(f"float64, batch 1, one head, D={d}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), refattn {refattn.__version__}; best of "
          f"{repeats} after a warm-up; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    head = (f"{'N':>6} {'causal':>6} | {'torch fwd':>9} {'torch bwd':>9} | {'ra fwd':>8} "
            f"{'ra bwd':>8} {'+ fwd':>8} {'floor':>7} | {'bwd/torch':>9} "
            f"{'floor/torch':>11} {'bwd/fwd':>7} | "
            f"{'max |dx - torch|':>16}")
    print(head)
    print("-" * len(head))
    for n in sizes:
        rng = np.random.default_rng(n)
        q, k, v, do = rng.standard_normal((4, 1, 1, n, d))
        for causal in (False, True):
            tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
            tdo = torch.tensor(do)
            sdpa = torch.nn.functional.scaled_dot_product_attention

            def torch_fwd():
                with torch.no_grad():
                    return sdpa(tq, tk, tv, is_causal=causal)
            out = sdpa(tq, tk, tv, is_causal=causal)

            def torch_bwd():
                return torch.autograd.grad(out, (tq, tk, tv), tdo, retain_graph=True)
            t_tf, t_tb = best_time(torch_fwd, repeats), best_time(torch_bwd, repeats)
            t_rf = best_time(lambda: refattn.tiled_attention(q, k, v, causal=causal),
                             repeats)
            o, lse = refattn.tiled_attention(q, k, v, causal=causal, return_lse=True)
            t_rb = best_time(lambda: refattn.vjp("tiled_attention", q, k, v, do, out=o,
                                                 lse=lse, causal=causal), repeats)
            t_rr = best_time(lambda: refattn.vjp("tiled_attention", q, k, v, do,
                                                 causal=causal), repeats)
            floor = tile_product_floor(n, d, causal, max(repeats, 3))
            mine = refattn.vjp("tiled_attention", q, k, v, do, causal=causal)
            ref = torch_bwd()
            diff = max(float(np.abs(mine[x] - r.numpy()).max()) for x, r in zip("qkv", ref))
            print(f"{n:>6} {str(causal):>6} | {t_tf:>9.3f} {t_tb:>9.3f} | {t_rf:>8.3f} "
                  f"{t_rb:>8.3f} {t_rr:>8.3f} {floor:>7.3f} | {t_rb / t_tb:>9.2f} "
                  f"{floor / t_tb:>11.2f} {t_rb / t_rf:>7.2f} | "
                  f"{diff:>16.1e}", flush=True)


def memory(n: int, d: int = 64) -> None:
    import refattn
    rng = np.random.default_rng(0)
    q, k, v, do = rng.standard_normal((4, 1, 1, n, d))
    refattn.vjp("tiled_attention", q[..., :256, :], k[..., :256, :], v[..., :256, :],
                do[..., :256, :])                      # compile and warm up first
    tracemalloc.start()
    t = time.perf_counter()
    grads = refattn.vjp("tiled_attention", q, k, v, do)
    seconds = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    grads_bytes = sum(g.nbytes for g in grads.values())
    print(f"tiled backward, N = M = {n}, D = {d}, one head, float64: {seconds:.1f} s; "
          f"traced peak {peak / MiB:.0f} MiB; beyond the {grads_bytes / MiB:.0f} MiB of "
          f"gradients: {(peak - grads_bytes) / MiB:.0f} MiB (the recomputed output "
          f"{q.nbytes / MiB:.0f} MiB, lse, D and the tiles)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--memory", type=int, default=None, metavar="N")
    args = ap.parse_args(argv)
    if args.memory:
        memory(args.memory)
    else:
        speed(args.sizes, args.repeats)


if __name__ == "__main__":
    main()
