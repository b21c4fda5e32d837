"""The ``refattn`` command.

``refattn report`` measures every registered mechanism and writes a Markdown report with
figures and netCDF data (:mod:`refattn.analysis.report`); ``refattn list`` prints the
registry of mechanisms as a table; ``refattn mask EXPR`` draws a mask to a PNG;
``refattn state-sizes`` tabulates streaming state sizes.
"""
from __future__ import annotations

import argparse
import sys

from .registry import QKV, mechanisms


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def registry_table() -> list[list[str]]:
    """Rows of ``refattn list``: a header, then one row per registered mechanism (a ``*``
    after the name: its inputs are not ``q, k, v``; see :func:`other_inputs`)."""
    rows = [["name", "family", "kind", "time", "state", "causal", "masks", "GQA",
             "streaming"]]
    for spec in mechanisms(all_inputs=True).values():
        rows.append([spec.name + ("" if spec.inputs == QKV else "*"), spec.family, "exact" if spec.exact else "approximate",
                     spec.time, spec.state, _yes(spec.supports_causal),
                     _yes(spec.supports_mask), _yes(spec.supports_gqa),
                     _yes(spec.supports_streaming)])
    return rows


def other_inputs() -> list[str]:
    """Footnotes of ``refattn list``: the mechanisms whose inputs are not ``q, k, v``."""
    return [f"* {spec.name}({', '.join(spec.inputs)}): outside the registry's q, k, v "
            f"property tests and the report's sweeps; checked by its own tests"
            for spec in mechanisms(all_inputs=True).values() if spec.inputs != QKV]


def _format(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="refattn", description="Reference implementations of efficient attention.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.add_parser("list", help="print the registered attention mechanisms as a table")
    draw = sub.add_parser("mask", help="draw a mask to a PNG",
                          description="Draw a mask built from refattn.masks' factories, "
                          "e.g. refattn mask \"causal() & sliding_window(16) | sinks(2)\"")
    draw.add_argument("expression", help="mask expression over refattn.masks factories")
    draw.add_argument("--n", type=int, default=64, help="queries (default 64)")
    draw.add_argument("--m", type=int, default=None, help="keys (default: n)")
    draw.add_argument("--block", type=int, default=None,
                      help="also shade the tile classification for this tile size")
    draw.add_argument("--head", type=int, default=0, help="query head to draw")
    draw.add_argument("-o", "--out", default="mask.png", help="PNG to write (mask.png)")
    sizes = sub.add_parser("state-sizes", help="state bytes of every streaming mechanism "
                           "after 1k, 16k, 256k and 1M tokens")
    sizes.add_argument("--heads-q", type=int, default=32)
    sizes.add_argument("--heads-kv", type=int, default=8)
    sizes.add_argument("--d", type=int, default=128)
    report = sub.add_parser(
        "report", help="measure every registered mechanism; write DIR/index.md, PNGs, "
        "netCDF", description="Error vs cost, error vs attention entropy, the spectrum of "
        "real MiniLM attention, Performer kernel fidelity and measured complexity of every "
        "registered mechanism, written as Markdown with PNG figures and netCDF data.")
    report.add_argument("--preset", default="quick", help="quick (default, a few minutes "
                        "on 2 cores) or full")
    report.add_argument("--out", default="report", help="directory to write (report/)")
    report.add_argument("--seed", type=int, default=0, help="seed of every random draw (0)")
    report.add_argument("--mechanisms", default=None, help="comma-separated registered "
                        "names to restrict the report to (default: all; see refattn list)")
    report.add_argument("--scheduler", default=None, help="Dask scheduler address for the "
                        "sweeps (default: local processes)")
    report.add_argument("--workers", type=int, default=None,
                        help="local processes for the sweeps (default: all cores)")
    report.add_argument("--state-dtype", default="bf16", help="dtype the state sizes are "
                        "given in: bf16 (default, as models keep their caches), fp8, fp16, "
                        "f32, f64")
    report.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    if args.command == "report":
        from refattn.analysis.report import ReportError, build_report
        try:
            chosen = None if args.mechanisms is None else [
                x.strip() for x in args.mechanisms.split(",") if x.strip()]
            index = build_report(args.out, preset=args.preset, seed=args.seed,
                                 mechanisms=chosen, scheduler=args.scheduler,
                                 workers=args.workers, state_dtype=args.state_dtype,
                                 progress=not args.quiet)
        except (ReportError, ConnectionError) as exc:
            print(f"refattn report: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {index}")
        return 0
    if args.command == "state-sizes":
        from .streaming import state_size_table
        table = state_size_table(heads_q=args.heads_q, heads_kv=args.heads_kv, d=args.d,
                                 dv=args.d)
        ns = next(iter(table.values())).keys()
        rows = [["mechanism"] + [f"N={n:,}" for n in ns]]
        rows += [[name] + [f"{b / 2**20:,.2f} MiB" for b in sizes.values()]
                 for name, sizes in table.items()]
        print(f"float64 state, Hq={args.heads_q}, Hkv={args.heads_kv}, D=Dv={args.d}, "
              f"batch 1; the registry's budget for 4096 keys per query (counted non-causally: "
              f"the sliding window keeps 2048 back), else its example parameters; "
              f"linear_rnn and selective_scan (state 16) over Hq*D channels; attention_mha / "
              f"attention_mqa: the full cache with Hkv = Hq / 1; mla_attention: DeepSeek-V2's "
              f"latent cache, 512 + 64 numbers per token")
        print(_format(rows))
        return 0
    if args.command == "list":
        print(_format(registry_table()))
        print("\n".join([""] + other_inputs()))
        print(f"\n{len(mechanisms(all_inputs=True))} mechanisms registered.")
        return 0
    if args.command == "mask":
        from .masks.drawing import draw_mask, parse_mask
        try:
            mask = parse_mask(args.expression)
            draw_mask(mask, args.n, args.m, args.out, block=args.block, head=args.head)
        except ValueError as exc:
            print(f"refattn mask: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}: {mask.name}, N={args.n}, M={args.m or args.n}")
        return 0
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
