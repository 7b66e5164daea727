#!/usr/bin/env bash
# Create/update the environments and run the whole test suite.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --allen
export BENTOML_DO_NOT_TRACK=true
exec .venv/bin/python -m pytest "$@"
