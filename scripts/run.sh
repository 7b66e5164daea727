#!/usr/bin/env bash
# Set up .venv/ and run nh-serve's main job on its built-in defaults: serve the
# built-in default model over HTTP (BentoML) on 127.0.0.1:${PORT:-3000}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec bash scripts/serve.sh "$@"
