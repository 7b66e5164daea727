#!/usr/bin/env bash
# Set up .venv/ and run nh-serve's main job on its built-in defaults: serve the
# built-in default model over HTTP (BentoML) on 127.0.0.1:${PORT:-3000}.
# Export cache: .cache/nh-serve in the clone (NH_SERVE_CACHE_DIR), as in scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export NH_SERVE_CACHE_DIR="${NH_SERVE_CACHE_DIR:-$PWD/.cache/nh-serve}"
bash scripts/setup.sh
exec bash scripts/serve.sh "$@"
