#!/usr/bin/env bash
# Start the nh-serve HTTP service (BentoML) on 127.0.0.1:${PORT:-3000} from .venv.
#
#   bash scripts/serve.sh                                              # the built-in checkpoint
#   NH_SERVE_CHECKPOINT=runs/model.safetensors PORT=3001 bash scripts/serve.sh
#
# It answers this machine only (127.0.0.1). To serve other machines, read docs/service.md first:
#   NH_SERVE_API_KEY=$(openssl rand -hex 16) NH_SERVE_ALLOWED_HOSTS=myhost.lab HOST=0.0.0.0 bash scripts/serve.sh
# (and put TLS in front: the key and the spikes travel in clear over plain HTTP).
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

case "$HOST" in
  127.0.0.1|localhost|::1) ;;
  *)
    if [ -z "${NH_SERVE_API_KEY:-}" ]; then
      echo "serve.sh: warning: HOST=$HOST without NH_SERVE_API_KEY: anyone who can reach port $PORT can use this server (docs/service.md)" >&2
    fi
    if [ -z "${NH_SERVE_ALLOWED_HOSTS:-}" ]; then
      case "$HOST" in
        0.0.0.0|::) echo "serve.sh: warning: set NH_SERVE_ALLOWED_HOSTS to the names clients use for this machine; other names get 403" >&2 ;;
        *) export NH_SERVE_ALLOWED_HOSTS="127.0.0.1,localhost,::1,$HOST" ;;
      esac
    fi
    ;;
esac

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

case "$HOST" in 0.0.0.0|::) URL="http://127.0.0.1:$PORT" ;; ::1) URL="http://[::1]:$PORT" ;; *) URL="http://$HOST:$PORT" ;; esac
echo "[serve] OpenAPI page: $URL/docs (spec: $URL/docs.json)   model: $URL/model   metrics: $URL/metrics"
echo "[serve] try it (another terminal):"
echo "  .venv/bin/python -c \"import numpy as np; from nh_serve.client import Client; c = Client('$URL'); t = np.sort(np.random.uniform(0, 61, 3000)); u = np.random.randint(0, 20, 3000); m = t < 60; tok = c.register(t[m], u[m], reference_window=(0, 60)); print(c.predict(tok, t[~m], u[~m], context_start=60.0).rates_hz.shape)\""
exec .venv/bin/bentoml serve service.service:NHServe --host "$HOST" --port "$PORT"
