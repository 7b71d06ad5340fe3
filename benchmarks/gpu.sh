#!/usr/bin/env bash
# Server batching and end to end with the split server's segment on CUDA.
# Self-contained and offline: uses the project's .venv (a CUDA build of torch must be installed
# there) and the datasets that ship in wheels. Prints the tables; JSON lands in
# benchmarks/results/{batching,e2e}-cuda.json. About 3 minutes. Not run on the CPU build machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"benchmarks/gpu.sh: torch {torch.__version__} sees no CUDA device")
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PYEOF
timeout 240 "$PY" -m benchmarks.bench_batching --quick --device cuda
timeout 240 "$PY" -m benchmarks.bench_e2e --quick --device cuda
