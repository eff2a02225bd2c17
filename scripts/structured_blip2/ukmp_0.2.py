#!/usr/bin/env python
"""UKMP at ratio 0.2: prune -> eval -> finetune -> eval, resumable (the reference's ukmp_0.2.py, in one process).

Extra arguments are `ukmp run` options and config overrides in any order, e.g.
`python scripts/structured_blip2/ukmp_0.2.py --force prune model.device=cuda:1`.
"""

import sys
from pathlib import Path

from ukmp.cli import main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ukmp_0.2.yaml"

if __name__ == "__main__":
    raise SystemExit(main(["run", str(CONFIG), *sys.argv[1:]]))
