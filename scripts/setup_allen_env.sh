#!/usr/bin/env bash
# Create .venv-allen/ at the repository root: a separate Python environment for
# allensdk, which pins numpy 1.23 / pandas 1.5 / scipy 1.10 and cannot live beside
# the main environment (numpy 2). `nh-serve ingest allen` runs its extractor
# (nh_serve/ingest/allen_extract.py) in it.
#
#   bash scripts/setup_allen_env.sh                      # create or update .venv-allen/
#   PYTHON=python3.11 bash scripts/setup_allen_env.sh    # pick the interpreter (3.9-3.11)
#
# It installs allensdk and what the extractor needs. It does not install torch
# or this package: the extractor runs by file path with numpy + allensdk only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ROOT}/.venv-allen"
PYTHON="${PYTHON:-python3}"

if [ ! -x "${VENV}/bin/python" ]; then
    echo "creating ${VENV} with $("${PYTHON}" --version 2>&1)"
    "${PYTHON}" -m venv "${VENV}"
fi

"${VENV}/bin/python" -m pip install --quiet --upgrade pip
# allensdk 2.16 leaves hdmf unpinned; pynwb 2.8.3 (the newest that installs beside
# numpy 1.23) does not work with hdmf>=4, so the pair is pinned here.
"${VENV}/bin/python" -m pip install --quiet \
    "allensdk==2.16.2" "pynwb==2.8.3" "hdmf==3.14.6" "pyarrow<26" h5py

# pynwb caches its type map in a pickle; drop a stale one left by another hdmf.
"${VENV}/bin/python" - <<'PY'
import importlib.util
import pathlib

spec = importlib.util.find_spec("pynwb")
(pathlib.Path(spec.origin).parent / "core_typemap.pkl").unlink(missing_ok=True)
PY

# allensdk must import and write an NWB file, and torch must not have come along.
"${VENV}/bin/python" - <<'PY'
import datetime
import importlib.util

import allensdk
import numpy
import pynwb
from allensdk.brain_observatory.ecephys.ecephys_session import EcephysSession  # noqa: F401

pynwb.NWBFile(
    session_description="check",
    identifier="check",
    session_start_time=datetime.datetime.now(datetime.timezone.utc),
)
assert importlib.util.find_spec("torch") is None, "torch must not be installed in .venv-allen"
print(f"allensdk {allensdk.__version__} (numpy {numpy.__version__}, pynwb {pynwb.__version__}) ready in .venv-allen")
PY
