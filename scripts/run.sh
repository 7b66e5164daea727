#!/usr/bin/env bash
# Set up .venv/ and run nh-serve's main job on its built-in defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export BENTOML_DO_NOT_TRACK=true
exec .venv/bin/nh-serve demo "$@"
