#!/usr/bin/env bash
# Regenerate the data-plane stubs from fsl/wire/dataplane.proto (needs grpcio-tools:
# `pip install -e .[dev]`). The generated files are committed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. fsl/wire/dataplane.proto
echo "regenerated fsl/wire/dataplane_pb2.py, dataplane_pb2.pyi, dataplane_pb2_grpc.py"
