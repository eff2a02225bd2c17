#!/usr/bin/env python
"""UKMP at ratio 0.2 on Qwen2.5-VL-3B-Instruct: prune -> eval -> finetune -> eval, resumable, in one process.

Extra arguments are config overrides, e.g. `python scripts/qwen2_5_vl/ukmp_0.2.py model.device=cuda:1`; the 7B has
its own config (`ukmp run configs/qwen2_5_vl/qwen2_5_vl_7b_ukmp_0.2.yaml`).
"""

import sys
from pathlib import Path

from ukmp.cli import main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "qwen2_5_vl" / "qwen2_5_vl_3b_ukmp_0.2.yaml"

if __name__ == "__main__":
    raise SystemExit(main(["run", str(CONFIG), *sys.argv[1:]]))
