"""Dump an Allen Brain Observatory Neuropixels session to plain arrays.

This script runs inside the Allen SDK environment (``.venv-allen``, made by
``bash scripts/setup_allen_env.sh``), never in the main one: allensdk needs
numpy 1.x. It imports only the standard library, numpy, pandas and allensdk,
and is run by file path, so it needs no installed copy of nh-serve::

    .venv-allen/bin/python nh_serve/ingest/allen_extract.py SESSION.nwb OUT.npz [--all-units]

It reads the file with allensdk's ``EcephysSession`` over an
``EcephysNwbSessionApi`` (what ``EcephysSession.from_nwb_path`` builds, but
reading the file once) and writes ``OUT.npz``:

* ``unit_ids`` (U,) int64, ``spike_counts`` (U,) int64 and ``spike_times``
  (sum of counts,) float64 seconds, unit after unit;
* ``units_<column>`` (U,): the units table's numeric and string columns
  that are not empty (``firing_rate``, ``snr``, ``isi_violations``, ``presence_ratio``,
  ``amplitude_cutoff``, ``structure_acronym``, ``probe_id``, ...);
* ``running_start``, ``running_end``, ``running_velocity`` (cm/s);
* ``stim_start``, ``stim_stop`` and ``stim_<column>`` for the stimulus
  presentations (numbers as float64 with NaN for "null"; strings as str);
* ``meta``: a JSON string (session id, software versions, unit filters).

Units: allensdk's default filters (quality ``good``, channel valid and in the
brain, amplitude cutoff, presence ratio, ISI violations) unless
``--all-units``, which turns all of them off. Errors are printed as one line
on stderr with exit status 3.
"""

from __future__ import annotations

import json
import sys
import warnings


def _column(values):
    """A pandas column as a float64 array (NaN for null) or a str array; None if neither."""
    import numpy as np

    out = []
    for v in values:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "null", "nan", "none")):
            out.append(np.nan)
            continue
        if isinstance(v, (bool, np.bool_)):
            out.append(float(v))
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            break
    else:
        return np.asarray(out, dtype=np.float64)
    if all(isinstance(v, str) or v is None for v in values):
        return np.asarray(["" if v is None else v for v in values], dtype=str)
    return None


def extract(nwb_path: str, out_path: str, *, all_units: bool) -> None:
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import allensdk
        import pynwb
        from allensdk.brain_observatory.ecephys import get_unit_filter_value
        from allensdk.brain_observatory.ecephys.ecephys_session import EcephysSession
        from allensdk.brain_observatory.ecephys.ecephys_session_api import EcephysNwbSessionApi

        if all_units:
            api_kwargs = {
                "filter_by_validity": False,
                "filter_out_of_brain_units": False,
                "amplitude_cutoff_maximum": np.inf,
                "presence_ratio_minimum": -np.inf,
                "isi_violations_maximum": np.inf,
            }
        else:
            api_kwargs = {
                name: get_unit_filter_value(name)
                for name in ("amplitude_cutoff_maximum", "presence_ratio_minimum", "isi_violations_maximum")
            }
        # EcephysSession.from_nwb_path(path) re-reads the whole file for every table it
        # builds; reading it once and handing the NWBFile to the same API is equivalent.
        io = pynwb.NWBHDF5IO(nwb_path, "r", load_namespaces=True)
        try:
            api = EcephysNwbSessionApi.from_nwbfile(io.read(), **api_kwargs)
            session = EcephysSession(api=api)
            units = session.units
            spike_times = session.spike_times
            running = session.running_speed
            stim = session.stimulus_presentations
        finally:
            io.close()

    arrays = {}
    unit_ids = np.asarray(units.index.values, dtype=np.int64)
    trains = [np.asarray(spike_times.get(int(u), []), dtype=np.float64).reshape(-1) for u in unit_ids]
    arrays["unit_ids"] = unit_ids
    arrays["spike_counts"] = np.asarray([t.size for t in trains], dtype=np.int64)
    arrays["spike_times"] = np.concatenate(trains) if trains else np.zeros(0)
    for name in units.columns:
        col = _column(units[name].tolist())
        if col is not None and not (col.dtype.kind == "f" and col.size and np.all(np.isnan(col))):
            arrays[f"units_{name}"] = col

    arrays["running_start"] = np.asarray(running["start_time"], dtype=np.float64)
    arrays["running_end"] = np.asarray(running["end_time"], dtype=np.float64)
    arrays["running_velocity"] = np.asarray(running["velocity"], dtype=np.float64)

    arrays["stim_start"] = np.asarray(stim["start_time"], dtype=np.float64)
    arrays["stim_stop"] = np.asarray(stim["stop_time"], dtype=np.float64)
    arrays["stim_presentation_id"] = np.asarray(stim.index.values, dtype=np.int64)
    for name in stim.columns:
        if name in ("start_time", "stop_time"):
            continue
        col = _column(stim[name].tolist())
        if col is not None:
            arrays[f"stim_{name}"] = col

    meta = {
        "session_id": int(session.ecephys_session_id),
        "session_start_time": str(session.session_start_time),
        "allensdk": allensdk.__version__,
        "pynwb": pynwb.__version__,
        "numpy": np.__version__,
        "unit_filters": "none (--all-units)" if all_units else {"allensdk_defaults": True, **api_kwargs},
    }
    arrays["meta"] = np.asarray(json.dumps(meta))
    np.savez(out_path, **arrays)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    all_units = "--all-units" in argv
    args = [a for a in argv if a != "--all-units"]
    if len(args) != 2:
        print("usage: allen_extract.py SESSION.nwb OUT.npz [--all-units]", file=sys.stderr)
        return 2
    try:
        extract(args[0], args[1], all_units=all_units)
    except Exception as exc:  # noqa: BLE001 - reported as one line to the calling process
        msg = " ".join(str(exc).split())
        print(f"{type(exc).__name__}: {msg}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
