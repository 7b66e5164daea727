#!/usr/bin/env bash
# Create or update the project's environment in .venv/ at the repository root.
#
#   bash scripts/setup.sh          # core + every extra + test tools
#   bash scripts/setup.sh --allen  # also the separate Allen SDK environment (.venv-allen/)
#
# Idempotent: a stamp of pyproject.toml and this script skips the pip work when
# nothing changed. Works offline against the package registries only.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WANT_ALLEN=0
for arg in "$@"; do
  case "$arg" in
    --allen) WANT_ALLEN=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

# torch and torchvision are pinned as a pair: open_clip needs a torchvision that
# imports beside torch, and this pair also brings triton for the kernels.
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")

stamp_of() { cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16; }

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp="$(stamp_of)"
if [ "$(cat .venv/.nh-setup-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "[setup] installing nh-serve and its dependencies into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "${TORCH_PINS[@]}"
  .venv/bin/python -m pip install -q -e ".[all]" "${TORCH_PINS[@]}"
  # nlb_tools (the Neural Latents Benchmark's reference metrics, used by the
  # tests) cannot build with new setuptools; its runtime needs are already here.
  .venv/bin/python -m pip install -q "setuptools>=77,<81"
  .venv/bin/python -m pip install -q --no-build-isolation --no-deps nlb_tools
  echo "$stamp" > .venv/.nh-setup-stamp
else
  echo "[setup] .venv is up to date"
fi

if [ "$WANT_ALLEN" = 1 ]; then
  bash scripts/setup_allen_env.sh
fi
