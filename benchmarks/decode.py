"""Decode throughput at a long context: steps per second of the streaming forms, full KV
cache vs fixed-size states, after ``--context`` tokens (default 100k).

The full cache is built from a prefill of ``context`` random tokens
(``kvcache.full_cache_from``), so each timed step attends to ~100k keys and its cost
grows with the context. Fixed-size states (sliding-window ring, sinks + window, chunked,
linear attention, retention, GLA) cost the same at every position once full, so they are
stepped ``window``-many tokens to fill and then timed. Steps are functional (a new state
per step), which for ring buffers means copying the ring: that copy is part of what is
timed and is reported as the state size.

Run by hand, not by the test suite::

    python benchmarks/decode.py                       # Hq = Hkv = 8, D = 64, 100k context
    python benchmarks/decode.py --context 16384 --steps 20
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import refattn as ra
from refattn import kvcache
from refattn.chunked import chunked_init_state, chunked_step
from refattn.gla import gla_init_state, gla_step
from refattn.linear import linear_attention_init_state, linear_attention_step
from refattn.retnet import retention_init_state, retention_step

MiB = 2**20


def cases(hq, hkv, d, window):
    size = dict(heads_q=hq, heads_kv=hkv, d=d, dv=d)
    return {
        "full KV cache": None,                                  # built from the prefill
        f"sliding window ring ({window} keys)":
            (kvcache.ring_init(window=window - 1, **size), kvcache.ring_step, window),
        f"sinks 4 + window {window}":
            (kvcache.sink_init(window=window - 1, sinks=4, **size), kvcache.sink_step,
             window + 4),
        f"chunked ({window // 2} + overlap {window // 2})":
            (chunked_init_state(chunk_size=window // 2, overlap=window // 2, **size),
             chunked_step, window),
        "linear attention (elu+1)":
            (linear_attention_init_state(**size), linear_attention_step, 1),
        "retention (gamma 0.99)":
            (retention_init_state(gamma=0.99, **size), retention_step, 1),
        "gated linear attention":
            (gla_init_state(log_gates=-0.01, **size), gla_step, 1),
    }


def time_steps(step, state, tokens, steps):
    q, k, v = tokens
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        _, state = step(state, q[s], k[s], v[s])
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), state


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--heads-q", type=int, default=8)
    p.add_argument("--heads-kv", type=int, default=8)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--window", type=int, default=4096)
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    tok = lambda h, n: rng.standard_normal((n, h, a.d))          # noqa: E731
    print(f"# decode at context {a.context:,}: Hq={a.heads_q}, Hkv={a.heads_kv}, D={a.d}, "
          f"float64, median of {a.steps} steps")
    print(f"{'state':38s} {'steps/s':>9s} {'ms/step':>9s} {'state MiB':>10s}")
    rows = {}
    for name, spec in cases(a.heads_q, a.heads_kv, a.d, a.window).items():
        if spec is None:
            k = rng.standard_normal((a.heads_kv, a.context, a.d))
            state = kvcache.full_cache_from(k, rng.standard_normal(k.shape), heads_q=a.heads_q)
            del k
            step = kvcache.full_cache_step
            # one untimed step: the prefill buffer is exactly full, the first append grows it
            _, state = step(state, tok(a.heads_q, 1)[0], tok(a.heads_kv, 1)[0],
                            tok(a.heads_kv, 1)[0])
        else:
            state, step, fill = spec
            for _ in range(fill):                                # fill the fixed state
                _, state = step(state, tok(a.heads_q, 1)[0], tok(a.heads_kv, 1)[0],
                                tok(a.heads_kv, 1)[0])
        sec, state = time_steps(step, state, (tok(a.heads_q, a.steps), tok(a.heads_kv, a.steps),
                                              tok(a.heads_kv, a.steps)), a.steps)
        rows[name] = sec
        print(f"{name:38s} {1 / sec:9.1f} {sec * 1e3:9.3f} {state.nbytes / MiB:10.2f}")
    full = rows["full KV cache"]
    print("\nspeed-up over the full cache: " + ", ".join(
        f"{n.split(' (')[0]} {full / s:.0f}x" for n, s in rows.items() if n != "full KV cache"))


if __name__ == "__main__":
    main()
