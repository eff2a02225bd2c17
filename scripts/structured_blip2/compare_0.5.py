#!/usr/bin/env python
"""UKMP against every baseline at one ratio (default 0.5): prune, evaluate, one table + one chart.

    python scripts/structured_blip2/compare_0.5.py [--ratio 0.2] [--recover] [--methods ukmp,flap] [key=value ...]

Options and key=value overrides may come in any order.

Writes outputs/<name>_compare_<ratio>/comparison.{md,json,png}; every method's run is cached and resumable.
"""

import sys
from pathlib import Path

from ukmp.cli import main

ROOT = Path(__file__).resolve().parents[2]

if __name__ == "__main__":
    raise SystemExit(main(["compare", str(ROOT / "configs" / "base.yaml"), "--ratio", "0.5",
                           "--methods-dir", str(ROOT / "configs" / "methods"), *sys.argv[1:]]))
