#!/usr/bin/env python
"""UKMP at ratio 0.2 on LLaVA-OneVision-Qwen2-0.5B: prune -> eval -> finetune -> eval, resumable, in one process.

Extra arguments are config overrides, e.g. `python scripts/llava_onevision/ukmp_0.2.py model.device=cuda:1`.
"""

import sys
from pathlib import Path

from ukmp.cli import main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "llava_onevision" / "llava_onevision_ukmp_0.2.yaml"

if __name__ == "__main__":
    raise SystemExit(main(["run", str(CONFIG), *sys.argv[1:]]))
