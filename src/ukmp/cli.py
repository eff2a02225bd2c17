"""The ``ukmp`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

DESCRIPTION = """\
ukmp prunes whole attention heads and MLP channels of BLIP-2 (ViT + Q-Former + FlanT5) and recovers what pruning
lost. Pruned models are plain transformers models that reload in one call (ukmp.io.load_pruned).

Typical use:
  ukmp inspect blip2-flan-t5-xl            structure and parameter budget of the full-size model (offline)
  ukmp inspect outputs/demo/pruned         the same for a pruned model directory
  ukmp demo                                prune a tiny random model, save, reload and generate (CPU, seconds)
"""


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ukmp.inspect import format_inspect, inspect_model

    report = inspect_model(args.model)
    print(json.dumps(report, indent=1) if args.json else format_inspect(report))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ukmp.demo import run_demo

    summary = run_demo(args.out, ratio=args.ratio, seed=args.seed)
    print(json.dumps(summary, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ukmp", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser(
        "inspect", help="unit counts per group kind, parameters per unit, prunable and total parameters",
        description="Report the prunable structure of MODEL without reading any weights (built on the meta device).",
    )
    s.add_argument("model", help="a hub id (Salesforce/blip2-flan-t5-xl), a local model directory, a pruned model "
                                 "directory, a config .json, or a shipped config: blip2-flan-t5-xl, mid, tiny")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("demo", help="the embedded default job on a tiny random model (CPU, offline)",
                       description="Build the tiny BLIP-2, prune it, save, reload in one call, and generate.")
    s.add_argument("--out", default="outputs/demo", help="output directory (default: outputs/demo)")
    s.add_argument("--ratio", type=float, default=0.5, help="fraction of prunable units to remove (default 0.5)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_demo)
    return p


COMMANDS: dict[str, Callable] = {}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"ukmp {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
