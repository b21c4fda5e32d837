"""The ``refattn`` command.

``refattn list`` prints the registry of mechanisms as a table.
"""
from __future__ import annotations

import argparse
import sys

from .registry import mechanisms


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def registry_table() -> list[list[str]]:
    """Rows of ``refattn list``: a header, then one row per registered mechanism."""
    rows = [["name", "family", "kind", "time", "state", "causal", "masks", "GQA",
             "streaming"]]
    for spec in mechanisms().values():
        rows.append([spec.name, spec.family, "exact" if spec.exact else "approximate",
                     spec.time, spec.state, _yes(spec.supports_causal),
                     _yes(spec.supports_mask), _yes(spec.supports_gqa),
                     _yes(spec.supports_streaming)])
    return rows


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
    args = parser.parse_args(argv)
    if args.command == "list":
        print(_format(registry_table()))
        print(f"\n{len(mechanisms())} mechanisms registered.")
        return 0
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
