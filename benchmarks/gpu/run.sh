#!/usr/bin/env bash
# The prepared GPU check: full-size BLIP-2 FlanT5-XL scoring (with the memory options), batch-32 generation dense vs
# 50 %-pruned and one distillation step's MFU, in <= 9 minutes on one H100/H200 (benchmarks/gpu/gpu_check.py).
#   bash benchmarks/gpu/run.sh            # CUDA, full size, bf16; JSON to $OUT if set, else benchmarks/results/gpu/
#   bash benchmarks/gpu/run.sh --tiny     # the same code on the tiny config on the CPU, in seconds (the test suite)
# Other options: bash benchmarks/gpu/run.sh --help. Python: $PYTHON, else .venv/bin/python, else python3.
# Wheels in <repo>/.whl/ (packages the machine lacks, e.g. omegaconf: benchmarks/README.md) are installed first into
# a fresh temporary folder put on PYTHONPATH; nothing else is installed or written outside the results.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G "$root/.whl/*.whl" > /dev/null; then
  site="$(mktemp -d "${TMPDIR:-/tmp}/ukmp-gpu-site.XXXXXX")"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$root"/.whl/*.whl
  export PYTHONPATH="$root/src:$site:$PYTHONPATH"
  echo "run.sh: installed $(ls "$root"/.whl/*.whl | wc -l) wheel(s) from .whl/ into $site"
fi
missing="$("$py" - <<'PY'
import importlib.util
print(" ".join(m for m in ("torch", "transformers", "omegaconf", "safetensors", "PIL", "numpy", "tokenizers")
               if importlib.util.find_spec(m) is None))
PY
)"
if [ -n "$missing" ]; then
  echo "run.sh: $py lacks: $missing (carry them as wheels in .whl/, see benchmarks/README.md)" >&2
  exit 2
fi
exec "$py" "$root/benchmarks/gpu/gpu_check.py" "$@"
