#!/usr/bin/env bash
# Start the nh-serve HTTP service (BentoML) on 127.0.0.1:${PORT:-3000} from .venv.
#
#   bash scripts/serve.sh                                              # the built-in checkpoint
#   NH_SERVE_CHECKPOINT=runs/model.safetensors PORT=3001 bash scripts/serve.sh
#
# Limits and options: NH_SERVE_* environment variables (service/settings.py). Ctrl+C stops it.
# The first start exports the model to ONNX (about 20 s on 2 cores) into .cache/nh-serve, the
# cache scripts/test.sh uses too; later starts load it from there.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-3000}
HOST=${HOST:-127.0.0.1}
export BENTOML_DO_NOT_TRACK=true
export BENTOML_HOME=${BENTOML_HOME:-$PWD/.bentoml}
# Exported artifacts that backends cache (the ONNX export of the checkpoint) stay inside the clone.
export NH_SERVE_CACHE_DIR="${NH_SERVE_CACHE_DIR:-$PWD/.cache/nh-serve}"

if [ ! -x .venv/bin/bentoml ]; then
  echo "serve.sh: .venv has no bentoml; run: bash scripts/setup.sh" >&2
  exit 2
fi

# Fail here, with the reason, when there is no usable checkpoint.
.venv/bin/python - <<'PY' || exit 2
import os
import sys

from nh_serve.inference.checkpoint import read_metadata
from nh_serve.inference.model_io import resolve_checkpoint
from nh_serve.errors import CheckpointError

spec = os.environ.get("NH_SERVE_CHECKPOINT") or "default"
try:
    path = resolve_checkpoint(spec)
    meta = read_metadata(path)
except CheckpointError as e:
    sys.exit(f"serve.sh: {e}\nserve.sh: set NH_SERVE_CHECKPOINT=/path/to/model.safetensors")
print(f"[serve] model {meta['config'].get('name', '?')} ({meta['short_hash']}) from {path}")
PY

URL="http://$HOST:$PORT"
echo "[serve] OpenAPI page: $URL/docs (spec: $URL/docs.json)   model: $URL/model   metrics: $URL/metrics"
echo "[serve] try it (another terminal):"
echo "  .venv/bin/python -c \"import numpy as np; from nh_serve.client import Client; c = Client('$URL'); t = np.sort(np.random.uniform(0, 61, 3000)); u = np.random.randint(0, 20, 3000); m = t < 60; tok = c.register(t[m], u[m], reference_window=(0, 60)); print(c.predict(tok, t[~m], u[~m], context_start=60.0).rates_hz.shape)\""
exec .venv/bin/bentoml serve service.service:NHServe --host "$HOST" --port "$PORT"
