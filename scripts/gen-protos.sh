#!/usr/bin/env bash
# Regenerate the Python code and type stubs for protos/ into a directory
# (default: services/, so modules land in services/dtx/v1/). The generated code
# is committed; tests/unit/test_protos_fresh.py fails when it is stale.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-"$root/services"}
mkdir -p "$out/dtx/v1"
PATH="$root/.venv/bin:$PATH" "${PYTHON:-$root/.venv/bin/python}" -m grpc_tools.protoc -I "$root/protos" \
  --python_out="$out" --mypy_out="$out" \
  --grpc_python_out="$out" --mypy_grpc_out="$out" \
  "$root"/protos/dtx/v1/*.proto
for d in "$out/dtx" "$out/dtx/v1"; do
  [ -f "$d/__init__.py" ] || printf '"""Generated from protos/: the dtx v1 API."""\n' > "$d/__init__.py"
done
touch "$out/dtx/py.typed"
