"""GPU forward attention: refattn.gpu (fast and simple kernels) against PyTorch
``scaled_dot_product_attention`` with the flash backend, in the same run on one device.

Usage: ``python benchmarks/gpu_attention.py [--out DIR] [--quick]``.

Configurations follow the FlashAttention papers: 16k tokens per batch (``B = 16384 / N``),
model width 2048 (``H = 2048 / D``), bf16, ``D`` in 64 and 128, causal and not,
``N`` in 1k, 4k, 8k. Time: CUDA events around each call after a warm-up, median of
the repeats, fresh random (non-zero) inputs larger than L2. Throughput counts
``4 B H N M D`` FLOPs, halved for causal. Error: max |out - oracle| against
:func:`refattn.attention` in float64, on batch 0, heads 0 and 1 (for our fast kernel and
for PyTorch). The simple kernel (one warp per row, no tensor cores) is timed only up to
N = 4k, with fewer repeats. Writes ``bench-<date>.json`` to ``--out`` and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np


def _events_time(fn, repeat: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` by CUDA events on the current stream."""
    import cupy
    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeat):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def configs(quick: bool):
    """Most informative first (a time budget may cut the list): N = 4k, then 1k, 8k."""
    ns = (4096, 1024) if quick else (4096, 1024, 8192)
    for n in ns:
        for d in (128, 64):
            for causal in (False, True):
                yield {"b": 16384 // n, "h": 2048 // d, "n": n, "d": d, "causal": causal}


def bench_one(cfg, repeat: int, simple: bool) -> dict:
    import cupy
    import torch
    import refattn as ra
    from refattn.gpu import host, launch

    b, h, n, d, causal = cfg["b"], cfg["h"], cfg["n"], cfg["d"], cfg["causal"]
    g = torch.Generator(device="cuda").manual_seed(n + d)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    row = {"config": f"bf16 d{d} N{n} B{b} H{h}{' causal' if causal else ''}", **cfg}
    flop = host.flops(b, h, n, n, d, causal)

    qd, kd, vd = (launch.to_device(x, "bfloat16", nm)[0] for x, nm in
                  ((q, "q"), (k, "k"), (v, "v")))
    outs = {}
    for variant in ("fast", "simple") if simple else ("fast",):
        p = host.plan(qd.shape, kd.shape, vd.shape, "bfloat16", causal=causal, variant=variant)
        out = cupy.empty(p.out_shape(), cupy.uint16)
        lse = cupy.empty(p.lse_shape(), cupy.float32)
        ms = _events_time(lambda: launch.run(p, qd, kd, vd, out, lse),
                          repeat if variant == "fast" else max(2, repeat // 5))
        row[f"{variant}_ms"] = ms
        row[f"{variant}_tflops"] = flop / ms / 1e9
        outs[variant] = torch.from_dlpack(out.view(cupy.int16)).view(torch.bfloat16)

    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ms = _events_time(lambda: sdpa(q, k, v, is_causal=causal), repeat)
            ref_out = sdpa(q, k, v, is_causal=causal)
        row["torch_ms"], row["torch_tflops"] = ms, flop / ms / 1e9
        row["ratio_fast_to_torch"] = row["fast_tflops"] / row["torch_tflops"]
    except RuntimeError as exc:   # no flash backend for this configuration
        row["torch_error"] = str(exc)[:200]
        ref_out = None

    # error against the float64 oracle on batch 0, heads 0-1
    sl = (0, slice(0, 2))
    q64, k64, v64 = (x[sl].float().cpu().numpy() for x in (q, k, v))
    oracle = ra.attention(q64, k64, v64, causal=causal)
    for name, o in (("fast", outs["fast"]), ("simple", outs.get("simple")), ("torch", ref_out)):
        if o is not None:
            row[f"{name}_err"] = float(np.abs(o[sl].float().cpu().numpy() - oracle).max())
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=170,
                    help="stop starting new configurations after this many seconds")
    args = ap.parse_args(argv)
    from refattn.gpu import device_status, missing_device
    if why := missing_device("benchmark"):
        print(why, file=sys.stderr)
        return 2
    status = device_status()
    import cupy
    import torch
    t0 = time.time()
    start_date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows, path = [], None
    for cfg in configs(args.quick):
        if time.time() - t0 > args.budget_s:
            print(f"time budget reached; skipping {cfg}", flush=True)
            continue
        try:
            row = bench_one(cfg, args.repeat, simple=cfg["n"] <= 4096)
        except Exception as exc:   # keep going; the record says what failed
            row = {"config": str(cfg), **cfg, "error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"{cfg}: {row['error']}", flush=True)
            rows.append(row)
            path = _write(args.out, rows, status, start_date)
            continue
        rows.append(row)
        print(f"{row['config']:34} fast {row.get('fast_tflops', float('nan')):7.1f} TFLOP/s  "
              f"simple {row.get('simple_tflops', float('nan')):6.2f}  "
              f"torch {row.get('torch_tflops', float('nan')):7.1f}  "
              f"ratio {row.get('ratio_fast_to_torch', float('nan')):5.2f}  "
              f"err fast {row.get('fast_err', float('nan')):.2e} "
              f"torch {row.get('torch_err', float('nan')):.2e}", flush=True)
        torch.cuda.empty_cache()
        cupy.get_default_memory_pool().free_all_blocks()
        path = _write(args.out, rows, status, start_date)   # after every row: a kill keeps them
    path = _write(args.out, rows, status, start_date)
    print(f"record {path}")
    return 0


def _write(out_dir, rows, status, date):
    import cupy
    import torch
    from refattn.gpu import kernels_spec
    rec = {"what": "refattn.gpu benchmark vs torch SDPA (flash backend)",
           "date": date, "device": status[4:], "torch": torch.__version__, "cupy": cupy.__version__,
           "kernel_sources_sha256": kernels_spec.sources_sha256(),
           "flops": "4 B H N M D, halved for causal", "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"bench-{date.replace(':', '').replace('-', '')}.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)
    return path


if __name__ == "__main__":
    sys.exit(main())
