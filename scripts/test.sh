#!/usr/bin/env bash
# Create/update the environments and run the whole test suite.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --allen
export BENTOML_DO_NOT_TRACK=true
# Exported artifacts that backends cache (e.g. the ONNX export of a checkpoint) stay inside the clone,
# in the same place scripts/run.sh and scripts/serve.sh use.
export NH_SERVE_CACHE_DIR="${NH_SERVE_CACHE_DIR:-$PWD/.cache/nh-serve}"
exec .venv/bin/python -m pytest "$@"
