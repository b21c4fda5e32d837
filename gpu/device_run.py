"""Everything a GPU machine should run, in one go, within 10 minutes.

``python -m refattn.gpu.device_run --out DIR`` (``gpu/run_on_device.sh`` installs the
checkout first and calls it with ``--out $OUT``) runs, each step under a time limit and
all under one deadline:

1. the NVRTC compile check (where ``cuda.bindings`` is installed);
2. the selfcheck, every case, the paged decode and backward kernels' too
   (``selfcheck-*.json``);
3. ``pytest tests/gpu`` (``pytest-gpu.xml``, ``pytest-gpu.txt``);
4. ``compute-sanitizer`` memcheck and racecheck on a small selfcheck
   (``sanitizer-memcheck.txt``, ``sanitizer-racecheck.txt``);
5. ``benchmarks/gpu_attention.py`` (``bench-*.json``), then the paged split-KV decode
   bandwidth (``paged-bench-*.json``): bytes of K and V read per second against the
   device's copy bandwidth, then the backward against PyTorch SDPA's flash backward
   (``backward-bench-*.json``) (``python -m refattn.gpu.device_run --benchmarks``);

then writes ``device-run.json`` (each step's status, seconds and record files) and
prints a short table last. Exit status 0 only when every step that ran passed.

>>> [s.name for s in steps("OUT")][:3]
['compile_check', 'selfcheck', 'pytest_gpu']
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

__all__ = ["Step", "steps", "main"]

#: All steps together (the device allows 10 minutes a command; the install comes first).
DEADLINE_S = 570
#: A small selfcheck for the sanitizers: fast fp16/bf16 kernels with masks, GQA, tails.
SANITIZER_MATCH = (r"^(fast float16 d64 B2|fast bfloat16 d128 B2|fast bfloat16 d64 .*"
                   r"(N150 M61|window|bigbird|H6/2)|simple float16 d64 .*bigbird|"
                   r"paged bfloat16 d(64|128) H4/2 n1 bs16 L\(1, 37, 300\)|"
                   r"paged float16 d64 .*(n3|S16)|bwd simple float16 d64 B2|"
                   r"bwd fast (float16 d64 B1 H3/1|bfloat16 d64 .*longformer))")
#: Backward benchmark: (B, H, N = M, D, causal), bf16.
BACKWARD_CONFIGS = ((4, 16, 4096, 128, False), (4, 16, 4096, 128, True),
                    (8, 16, 2048, 64, False))
#: Paged decode benchmark: (B, L, Hq, Hkv, D, block_size), bf16, every sequence L long.
PAGED_CONFIGS = ((64, 4096, 32, 8, 128, 16), (8, 32768, 32, 8, 128, 16),
                 (128, 1024, 64, 8, 128, 16), (32, 8192, 32, 4, 64, 16))


@dataclass
class Step:
    name: str
    cmd: list
    limit_s: int
    log: str            # file under OUT receiving stdout + stderr
    records: str = ""   # glob of JSON records this step writes under OUT
    optional: bool = False  # a missing tool skips the step instead of failing it


def _repo() -> str:
    """The checkout root (gpu/..), where tests/ and benchmarks/ live."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def steps(out: str) -> list[Step]:
    py = sys.executable
    sc = [py, "-m", "refattn.gpu.selfcheck", "--quick", "--out",
          os.path.join(out, "sanitizer-selfcheck"), "--match", SANITIZER_MATCH]
    san = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    return [
        Step("compile_check", [py, "-m", "refattn.gpu.compile_check"], 60,
             "compile-check.txt", optional=True),
        Step("selfcheck", [py, "-m", "refattn.gpu.selfcheck", "--out", out], 170,
             "selfcheck.txt", "selfcheck-2*.json"),
        # one process, whatever the project's addopts say: the device may lack xdist
        Step("pytest_gpu", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "-o", "addopts=-ra", os.path.join(_repo(), "tests", "gpu"),
                            f"--junitxml={os.path.join(out, 'pytest-gpu.xml')}"], 80,
             "pytest-gpu.txt"),
        Step("memcheck", [san, "--tool", "memcheck", "--error-exitcode", "3",
                          "--leak-check", "no", *sc], 60, "sanitizer-memcheck.txt"),
        Step("racecheck", [san, "--tool", "racecheck", "--error-exitcode", "3",
                           "--racecheck-report", "all", *sc], 60,
             "sanitizer-racecheck.txt"),
        Step("benchmark", [py, "-m", "refattn.gpu.device_run", "--benchmarks", "--out", out,
                           "--budget-s", "{budget}"], 140, "benchmark.txt",
             "*bench-*.json"),
    ]


def _events_ms(fn, repeat: int = 5) -> float:
    """Median milliseconds of ``fn()`` by CUDA events, after a warm-up call."""
    import cupy
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
    return sorted(times)[len(times) // 2]


def paged_bandwidth(out: str) -> dict:
    """Time the paged decode kernels (split + merge) on :data:`PAGED_CONFIGS` and a 1 GiB
    device-to-device copy; write ``paged-bench-<date>.json``. Achieved bandwidth counts
    the K and V bytes the split kernel reads (:func:`refattn.gpu.paged.kv_bytes`) over
    both launches' time; the copy counts 2 bytes moved per byte copied."""
    import datetime

    import cupy
    import numpy as np

    from . import device_status, kernels_spec, paged
    src = cupy.ones(1 << 30, cupy.uint8)
    dst = cupy.empty_like(src)
    copy_gbps = 2 * src.nbytes / _events_ms(lambda: dst.__setitem__(Ellipsis, src)) / 1e6
    src = dst = None   # free the 2 GiB before the decode pools
    rows = []
    cupy.random.seed(0)
    for b, length, hq, hkv, d, bs in PAGED_CONFIGS:
        pages = -(-length // bs)
        pool_shape = (b * pages, bs, hkv, d)
        bits = lambda shape: (cupy.random.standard_normal(shape, dtype=cupy.float32)  # noqa
                              .view(cupy.uint32) >> 16).astype(cupy.uint16)  # bf16 bits
        kc, vc, q = bits(pool_shape), bits(pool_shape), bits((b, hq, d))
        table = cupy.random.permutation(b * pages).astype(cupy.int32).reshape(b, pages)
        lens = cupy.full(b, length, cupy.int32)
        p = paged.plan(q.shape, kc.shape, vc.shape, table.shape, lens.shape, "bfloat16",
                       max_len=length)
        ms = _events_ms(lambda: paged.run(p, q, kc, vc, table, lens))
        gbps = paged.kv_bytes(p, np.full(b, length)) / ms / 1e6
        rows.append({"config": f"B{b} L{length} H{hq}/{hkv} d{d} bs{bs}",
                     "kernel": p.kernel, "num_splits": p.num_splits, "ms": round(ms, 4),
                     "kv_gbps": round(gbps, 1), "copy_gbps": round(copy_gbps, 1),
                     "fraction_of_copy": round(gbps / copy_gbps, 3)})
        print(f"paged decode {rows[-1]['config']}: S={p.num_splits}, {ms:.3f} ms, "
              f"{gbps:.0f} GB/s of K/V read = {gbps / copy_gbps:.2f} x copy "
              f"({copy_gbps:.0f} GB/s)", flush=True)
        kc = vc = q = table = None
        cupy.get_default_memory_pool().free_all_blocks()
    rec = {"what": "refattn.gpu paged decode bandwidth", "device": device_status(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds"),
           "kernel_sources_sha256": kernels_spec.sources_sha256(), "rows": rows}
    stamp = rec["date"].replace(":", "").replace("-", "")
    with open(os.path.join(out, f"paged-bench-{stamp}.json"), "w") as f:
        json.dump(rec, f, indent=1)
    return rec


def _torch_ms(fn, repeat: int = 5) -> float:
    """Median milliseconds of ``fn()`` by torch CUDA events, after a warm-up call."""
    import torch
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def backward_bench(out: str) -> dict:
    """Time the backward (:mod:`refattn.gpu.backward`, bf16, ``variant="fast"``: the
    three launches) against PyTorch SDPA's flash backend's backward on
    :data:`BACKWARD_CONFIGS`; write ``backward-bench-<date>.json``. TFLOP/s count the
    backward as ``2.5 x`` the forward's ``4 B H N M D`` (five matrix products of the
    forward's two), halved for causal; ``max_diff_*`` compare our gradients with
    PyTorch's (both bf16)."""
    import datetime

    import cupy
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from . import backward, device_status, host, kernels_spec, launch
    rows = []
    cupy.random.seed(1)
    for b, h, n, d, causal in BACKWARD_CONFIGS:
        row = {"config": f"B{b} H{h} N{n} d{d}{' causal' if causal else ''}"}
        try:
            q, k, v, do = ((cupy.random.standard_normal((b, h, n, d), dtype=cupy.float32)
                            .view(cupy.uint32) >> 16).astype(cupy.uint16)   # bf16 bits
                           for _ in range(4))
            fp = host.plan(q.shape, k.shape, v.shape, "bfloat16", causal=causal)
            o, lse = launch.run(fp, q, k, v)
            p = backward.plan(q.shape, k.shape, v.shape, "bfloat16", causal=causal)
            ms = _events_ms(lambda: backward.run(p, q, k, v, o, do, lse))
            ours = backward.run(p, q, k, v, o, do, lse)
            flop = 2.5 * host.flops(b, h, n, n, d, causal)
            tq, tk, tv, tdo = (torch.from_dlpack(x).view(torch.bfloat16)
                               for x in (q, k, v, do))
            tq, tk, tv = (x.detach().requires_grad_() for x in (tq, tk, tv))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                tout = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv,
                                                                        is_causal=causal)
            grads = lambda: torch.autograd.grad(tout, (tq, tk, tv), tdo,  # noqa: E731
                                                retain_graph=True)
            tms = _torch_ms(grads)
            for name, mine, theirs in zip(("dq", "dk", "dv"), ours, grads()):
                mine_t = torch.from_dlpack(mine).view(torch.bfloat16).float()
                row[f"max_diff_{name}"] = float((mine_t - theirs.float()).abs().max())
            row.update(kernels=f"{p.dkdv_kernel} + {p.dq_kernel}", ms=round(ms, 4),
                       tflops=round(flop / ms / 1e9, 1), torch_ms=round(tms, 4),
                       torch_tflops=round(flop / tms / 1e9, 1),
                       ratio_to_torch=round(tms / ms, 3))
            print(f"backward {row['config']}: {row['tflops']} TFLOP/s vs torch "
                  f"{row['torch_tflops']} (max |dq - torch| {row['max_diff_dq']:.3g})",
                  flush=True)
        except Exception as exc:   # report the config, go on with the others
            row["error"] = f"{type(exc).__name__}: {exc}"
            print(f"backward {row['config']} failed: {row['error']}", flush=True)
        rows.append(row)
        q = k = v = do = o = lse = ours = tq = tk = tv = tdo = tout = None
        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
    rec = {"what": "refattn.gpu backward vs torch SDPA flash backward",
           "device": device_status(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds"),
           "kernel_sources_sha256": kernels_spec.sources_sha256(), "rows": rows}
    stamp = rec["date"].replace(":", "").replace("-", "")
    with open(os.path.join(out, f"backward-bench-{stamp}.json"), "w") as f:
        json.dump(rec, f, indent=1)
    return rec


def benchmarks(out: str, budget_s: float) -> int:
    """The benchmark step: ``benchmarks/gpu_attention.py`` with all but 75 s of the
    budget, then :func:`paged_bandwidth` and :func:`backward_bench`. Exit status 1 if
    any fails."""
    cmd = [sys.executable, os.path.join(_repo(), "benchmarks", "gpu_attention.py"),
           "--out", out, "--budget-s", str(max(5, int(budget_s) - 75))]
    rc = subprocess.run(cmd, cwd=_repo()).returncode
    for name, fn in (("paged decode", paged_bandwidth), ("backward", backward_bench)):
        try:
            fn(out)
        except Exception as exc:   # report, and let the step fail
            print(f"{name} benchmark failed: {type(exc).__name__}: {exc}", flush=True)
            rc = 1
    return 1 if rc else 0


def _run(step: Step, out: str, remaining: float) -> dict:
    limit = max(5, min(step.limit_s, int(remaining)))
    # "{budget}": seconds a step may spend starting new work, leaving room to finish
    cmd = [c.replace("{budget}", str(max(5, limit - 30))) for c in step.cmd]
    if not (os.path.exists(step.cmd[0]) or shutil.which(step.cmd[0])):
        return {"status": "skipped", "why": f"{step.cmd[0]} not found", "seconds": 0}
    t0 = time.time()
    with open(os.path.join(out, step.log), "w") as log:
        # own process group: a timeout ends the step's children too (the python process
        # under compute-sanitizer, pytest's workers), not only the direct child
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=_repo(),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    secs = round(time.time() - t0, 1)
    with open(os.path.join(out, step.log)) as f:
        tail = f.read()[-1500:]
    if step.optional and rc == 2:   # the compile check says it cannot run here
        return {"status": "skipped", "why": tail.strip()[-300:], "seconds": secs}
    return {"status": "passed" if rc == 0 else ("timeout" if rc == "timeout" else "failed"),
            "returncode": rc, "seconds": secs, "limit_s": limit, "log_tail": tail,
            "records": sorted(os.path.basename(p) for p in
                              glob.glob(os.path.join(out, step.records)))
            if step.records else []}


def _summary_lines(out: str, results: dict) -> list[str]:
    lines = [f"{'step':14} {'status':8} {'seconds':>7}  detail"]
    for name, r in results.items():
        detail = r.get("why", "") if r["status"] == "skipped" else ""
        if name == "selfcheck":
            for rec in r.get("records", []):
                with open(os.path.join(out, rec)) as f:
                    data = json.load(f)
                detail = (f"{data['n_cases'] - data['n_failed']}/{data['n_cases']} cases, "
                          f"sources {data['kernel_sources_sha256'][:12]}")
        if name in ("memcheck", "racecheck") and "log_tail" in r:
            summ = [ln for ln in r["log_tail"].splitlines() if "ERROR SUMMARY" in ln
                    or "RACECHECK SUMMARY" in ln]
            detail = summ[-1].strip() if summ else ""
        if name in ("pytest_gpu", "compile_check") or (r["status"] in ("failed", "timeout")
                                                     and not detail):
            tail = r.get("log_tail", "").strip()
            detail = tail.splitlines()[-1] if tail else detail
        lines.append(f"{name:14} {r['status']:8} {r['seconds']:7}  {detail[:90]}")
    bench = sorted(glob.glob(os.path.join(out, "bench-*.json")))
    if bench:
        with open(bench[-1]) as f:
            rows = json.load(f)["rows"]
        lines.append("")
        lines.append(f"{'config':34} {'ours fast':>9} {'simple':>7} {'torch':>7} "
                     f"{'ratio':>6} {'err ours':>9} {'err torch':>9}")
        for row in rows:
            lines.append(
                f"{row['config']:34} {row.get('fast_tflops', float('nan')):9.1f} "
                f"{row.get('simple_tflops') or float('nan'):7.2f} "
                f"{row.get('torch_tflops') or float('nan'):7.1f} "
                f"{row.get('ratio_fast_to_torch') or float('nan'):6.2f} "
                f"{row.get('fast_err') or float('nan'):9.2e} "
                f"{row.get('torch_err') or float('nan'):9.2e}")
    bwd = sorted(glob.glob(os.path.join(out, "backward-bench-*.json")))
    if bwd:
        with open(bwd[-1]) as f:
            rows = json.load(f)["rows"]
        lines += ["", f"{'backward (bf16)':34} {'ours':>7} {'torch':>7} {'ratio':>6} "
                      f"{'|dq-torch|':>10}"]
        lines += [f"{r['config']:34} " + (r["error"][:50] if "error" in r else
                  f"{r['tflops']:7.1f} {r['torch_tflops']:7.1f} {r['ratio_to_torch']:6.2f} "
                  f"{r['max_diff_dq']:10.2e}") for r in rows]
    paged_recs = sorted(glob.glob(os.path.join(out, "paged-bench-*.json")))
    if paged_recs:
        with open(paged_recs[-1]) as f:
            rows = json.load(f)["rows"]
        lines += ["", f"{'paged decode (bf16)':34} {'splits':>6} {'ms':>8} {'KV GB/s':>8} "
                      f"{'copy GB/s':>9} {'fraction':>8}"]
        lines += [f"{r['config']:34} {r['num_splits']:6d} {r['ms']:8.3f} "
                  f"{r['kv_gbps']:8.0f} {r['copy_gbps']:9.0f} {r['fraction_of_copy']:8.2f}"
                  for r in rows]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m refattn.gpu.device_run",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-run"))
    ap.add_argument("--only", nargs="*", default=None, help="step names to run")
    ap.add_argument("--benchmarks", action="store_true",
                    help="only the benchmark step's work (see benchmarks())")
    ap.add_argument("--budget-s", type=float, default=140)
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if args.benchmarks:
        return benchmarks(out, args.budget_s)
    start = time.time()
    results = {}
    for step in steps(out):
        if args.only and step.name not in args.only:
            continue
        remaining = DEADLINE_S - (time.time() - start)
        if remaining < 10:
            results[step.name] = {"status": "skipped", "why": "out of time", "seconds": 0}
            continue
        results[step.name] = _run(step, out, remaining)
        print(f"[{time.time() - start:6.1f} s] {step.name}: {results[step.name]['status']}",
              flush=True)
    from . import device_status, kernels_spec
    summary = {"device": device_status(), "kernel_sources_sha256": kernels_spec.sources_sha256(),
               "seconds": round(time.time() - start, 1), "steps": results}
    with open(os.path.join(out, "device-run.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("\n".join(_summary_lines(out, results)))
    failed = [n for n, r in results.items() if r["status"] in ("failed", "timeout")]
    print(f"device: {summary['device']}; {'FAILED: ' + ', '.join(failed) if failed else 'all steps passed or skipped'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
