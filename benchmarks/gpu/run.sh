#!/usr/bin/env bash
# The prepared GPU check: full-size BLIP-2 FlanT5-XL scoring (with the memory options), batch-32 generation dense vs
# 50 %-pruned and one distillation step's MFU, in <= 9 minutes on one H100/H200 (benchmarks/gpu/gpu_check.py).
#   bash benchmarks/gpu/run.sh            # CUDA, full size, bf16; JSON to $OUT if set, else benchmarks/results/gpu/
#   bash benchmarks/gpu/run.sh --tiny     # the same code on the tiny config on the CPU, in seconds (the test suite)
# Other options: bash benchmarks/gpu/run.sh --help. Python: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "$py" "$root/benchmarks/gpu/gpu_check.py" "$@"
