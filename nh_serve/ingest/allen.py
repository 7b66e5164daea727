"""Allen Brain Observatory Neuropixels (Visual Coding) sessions through allensdk.

allensdk 2.16 needs numpy 1.x and cannot be installed beside nh-serve, so it
lives in its own environment, ``.venv-allen`` at the repository root::

    bash scripts/setup_allen_env.sh

:func:`read_allen` runs :mod:`nh_serve.ingest.allen_extract` in that
environment (a subprocess, by file path), which reads the session NWB file
with ``EcephysSession.from_nwb_path`` and dumps plain arrays to a temporary
``.npz``; this side turns them into a :class:`Recording`, so the session file
is written by the same code as for every other format.

What is kept:

* units and spike times; by default only the units that pass allensdk's own
  quality filters (quality ``good``, on a valid channel in the brain,
  amplitude cutoff, presence ratio and ISI-violation limits), ``all_units``
  keeps every unit in the file. Unit ids are the Allen unit ids. The units
  table's metrics (``firing_rate``, ``snr``, ``structure_acronym``,
  ``probe_id``, CCF coordinates, ...) are kept per unit;
* behaviour: running speed (cm/s), one sample per running-speed epoch at the
  epoch's midpoint;
* trials: the stimulus presentations (``start``/``end`` and their columns:
  ``stimulus_name``, ``frame``, ``orientation``, ... with NaN where a column
  does not apply), ready to be used by ``nh-serve embed-images``.

The environment's Python is ``.venv-allen/bin/python`` next to this package's
source tree; set ``NH_SERVE_ALLEN_PYTHON`` (or pass ``python``) to use another.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import h5py
import numpy as np

from nh_serve.errors import InputError
from nh_serve.ingest.common import Recording, source_path, spikes_from_ragged

SETUP_COMMAND = "bash scripts/setup_allen_env.sh"
EXTRACTOR = Path(__file__).resolve().with_name("allen_extract.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


def allen_python(python=None) -> Path:
    """The Allen environment's interpreter: ``python``, ``$NH_SERVE_ALLEN_PYTHON`` or ``.venv-allen/bin/python``.

    Raises :class:`InputError` saying how to create the environment when it is missing.
    """
    cand = python or os.environ.get("NH_SERVE_ALLEN_PYTHON") or (REPO_ROOT / ".venv-allen" / "bin" / "python")
    path = Path(cand).expanduser()
    if not path.exists():
        raise InputError(
            f"the Allen SDK environment is missing ({path} not found); create it from the repository root with "
            f"`{SETUP_COMMAND}` (about a minute, 1.1 GB), or point NH_SERVE_ALLEN_PYTHON at its python"
        )
    return path


def _n_units_in_file(path: Path) -> int | None:
    try:
        with h5py.File(str(path), "r") as f:
            return int(f["units/id"].shape[0]) if "units/id" in f else None
    except OSError:
        return None


def extract(nwb: Path, *, all_units: bool, python=None) -> dict[str, np.ndarray]:
    """Run the extractor in the Allen environment; returns its arrays (see :mod:`allen_extract`)."""
    exe = allen_python(python)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    with tempfile.TemporaryDirectory(prefix="nh-allen-") as tmp:
        out = Path(tmp) / "allen.npz"
        cmd = [str(exe), str(EXTRACTOR), str(nwb), str(out)] + (["--all-units"] if all_units else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        except OSError as exc:
            raise InputError(f"cannot run the Allen SDK environment's python {exe} ({exc}); re-create it with `{SETUP_COMMAND}`") from None
        if proc.returncode != 0 or not out.is_file():
            lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit status {proc.returncode}"
            if "ModuleNotFoundError" in last or "ImportError" in last:
                raise InputError(f"the Allen SDK environment at {exe} is incomplete ({last}); re-run `{SETUP_COMMAND}`")
            raise InputError(
                f"{nwb}: allensdk cannot read it as an Allen Brain Observatory Neuropixels session file ({last}); "
                "for other NWB files use `nh-serve ingest nwb`"
            )
        with np.load(out, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def read_allen(nwb, *, all_units: bool = False, python=None) -> Recording:
    """Read an Allen Brain Observatory Neuropixels session NWB file into a :class:`Recording`.

    ``all_units=False`` keeps the units that pass allensdk's default quality
    filters; the rate filter is applied later, as for every format.
    """
    path = source_path(nwb, what="Allen session NWB file", kind="file")
    a = extract(path, all_units=all_units, python=python)
    meta = json.loads(str(a["meta"]))
    counts = a["spike_counts"].astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    trains = [a["spike_times"][bounds[k] : bounds[k + 1]] for k in range(len(counts))]
    times, unit_index, unit_ids = spikes_from_ragged(trains, a["unit_ids"], name=f"{path} units")
    extra = {k[len("units_"):]: v for k, v in a.items() if k.startswith("units_")}

    behavior = None
    if a["running_start"].size:
        mid = 0.5 * (a["running_start"] + a["running_end"])
        behavior = (mid, a["running_velocity"].reshape(-1, 1))

    trials = None
    if a["stim_start"].size:
        trials = {"start": a["stim_start"], "end": a["stim_stop"]}
        trials.update({k[len("stim_"):]: v for k, v in a.items() if k.startswith("stim_") and k not in ("stim_start", "stim_stop")})

    # Allen times are seconds from the session start: the recording starts at 0
    # unless something (unusually) comes before it; it ends after the last event.
    first = [x.min() for x in (times, a["running_start"], a["stim_start"]) if x.size]
    last = [x.max() for x in (times, a["running_end"], a["stim_stop"]) if x.size]
    start = 0.0 if first and min(first) >= 0 else None
    end = float(np.nextafter(max(last), np.inf)) if last else None
    return Recording(
        times=times,
        unit_index=unit_index,
        unit_ids=unit_ids,
        units_extra=extra,
        start=start,
        end=end,
        behavior=behavior,
        behavior_names=["running_speed_cm_per_s"] if behavior is not None else None,
        trials=trials,
        provenance={
            "source": {"format": "allen", "path": str(path), "session_start_time": meta.get("session_start_time")},
            "ids": {"ecephys_session_id": meta.get("session_id")},
            "allen_unit_filters": meta.get("unit_filters"),
            "n_units_in_file": _n_units_in_file(path),
            "trials_are": "stimulus presentations",
            "software": {k: meta[k] for k in ("allensdk", "pynwb") if k in meta} | {"numpy (allen env)": meta.get("numpy")},
        },
    )
