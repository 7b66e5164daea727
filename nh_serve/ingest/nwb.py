"""NWB 2 files: the ``units`` table, trials and optionally one behaviour series.

Read with h5py directly (no pynwb), so files written by any NWB tool or
extension open, including ones whose extensions are not installed:

* units: ``/units/id`` (the unit ids), ``/units/spike_times`` with
  ``/units/spike_times_index`` (the ragged layout: ``index[k]`` is the end of
  unit ``k``'s spikes in ``spike_times``). One-dimensional per-unit columns
  (numbers or strings) are kept as metrics; ragged and reference columns
  (``electrodes``, waveforms, ...) are left out. A string column ``quality``,
  ``KSLabel``, ``group`` or ``label`` holding ``good`` / ``mua`` / ``noise``
  labels is used as the unit labels.
* trials: ``/intervals/trials`` (``start_time`` / ``stop_time`` and its
  one-dimensional columns), or another table under ``/intervals`` chosen with
  ``trials_table``.
* behaviour: a ``TimeSeries`` at ``behavior_series`` (an HDF5 path such as
  ``processing/behavior/Position/position``): its ``data`` (N,) or (N, D) with
  ``timestamps`` or ``starting_time`` + ``rate``.

Times are seconds from the file's ``session_start_time``.
"""

from __future__ import annotations

import h5py
import numpy as np

from nh_serve.errors import InputError
from nh_serve.ingest.common import Recording, source_path, spikes_from_ragged, table_columns

LABEL_COLUMNS = ("quality", "KSLabel", "group", "label")
KNOWN_LABELS = {"good", "mua", "noise", "unsorted"}


def _str(v) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return _str(v.reshape(-1)[0]) if v.size else ""
    return str(v)


def _ragged_names(group: h5py.Group) -> set[str]:
    return {k[: -len("_index")] for k in group.keys() if k.endswith("_index")}


def _plain_columns(group: h5py.Group, *, n_rows: int, skip: set[str]) -> dict[str, np.ndarray]:
    """One-dimensional, non-ragged, non-reference datasets of ``group`` with ``n_rows`` rows."""
    ragged = _ragged_names(group)
    cols = {}
    for key, ds in group.items():
        if key in skip or key in ragged or key.endswith("_index") or not isinstance(ds, h5py.Dataset):
            continue
        if ds.ndim != 1 or ds.shape[0] != n_rows or ds.dtype.kind in "OV" and h5py.check_string_dtype(ds.dtype) is None:
            continue
        if h5py.check_dtype(ref=ds.dtype) is not None:
            continue
        cols[key] = ds[()]
    return table_columns(cols, n_rows=n_rows)


def _units(f: h5py.File, path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, np.ndarray | None]:
    if "units" not in f or not isinstance(f["units"], h5py.Group):
        raise InputError(
            f"{path}: no units table (/units); this NWB file holds no spike-sorted units. "
            "Sort the recording first, or use a file that has a units table"
        )
    g = f["units"]
    for key in ("id", "spike_times", "spike_times_index"):
        if key not in g:
            raise InputError(f"{path}: the units table has no `{key}` dataset (/units/{key}); it cannot give spike times")
    ids = np.asarray(g["id"][()]).reshape(-1)
    st = g["spike_times"]
    idx = np.asarray(g["spike_times_index"][()], dtype=np.int64).reshape(-1)
    if idx.shape[0] != ids.shape[0]:
        raise InputError(f"{path}: /units/spike_times_index has {idx.shape[0]} rows for {ids.shape[0]} unit ids")
    if idx.size and (np.any(np.diff(idx) < 0) or idx[0] < 0 or idx[-1] > st.shape[0]):
        raise InputError(f"{path}: /units/spike_times_index is not a valid ragged index into {st.shape[0]} spike times")
    flat = np.asarray(st[()], dtype=np.float64).reshape(-1)
    bounds = np.concatenate([[0], idx])
    per_unit = [flat[bounds[k] : bounds[k + 1]] for k in range(len(ids))]
    times, unit_index, unit_ids = spikes_from_ragged(per_unit, ids, name=f"{path} /units")
    extra = _plain_columns(g, n_rows=len(ids), skip={"id", "spike_times", "electrodes", "obs_intervals"})
    labels = None
    for col in LABEL_COLUMNS:
        if col in extra and extra[col].dtype.kind == "U":
            vals = np.char.lower(np.char.strip(extra[col]))
            if set(vals.tolist()) <= KNOWN_LABELS:
                labels = vals
                break
    return times, unit_index, unit_ids, extra, labels


def _trials(f: h5py.File, path, table: str | None) -> tuple[dict | None, str | None]:
    name = table or "trials"
    if "intervals" not in f or name not in f["intervals"]:
        if table is None:
            return None, None
        have = sorted(f["intervals"].keys()) if "intervals" in f else []
        raise InputError(
            f"{path}: no interval table /intervals/{table} (tables here: {', '.join(have) or 'none'}); "
            "pick one of them with --trials-table"
        )
    g = f["intervals"][name]
    if "start_time" not in g or "stop_time" not in g:
        raise InputError(f"{path}: /intervals/{name} has no start_time / stop_time columns")
    start = np.asarray(g["start_time"][()], dtype=np.float64).reshape(-1)
    end = np.asarray(g["stop_time"][()], dtype=np.float64).reshape(-1)
    if start.shape != end.shape:
        raise InputError(f"{path}: /intervals/{name} has {start.size} start times but {end.size} stop times")
    cols = _plain_columns(g, n_rows=start.shape[0], skip={"id", "start_time", "stop_time", "tags", "timeseries"})
    return {"start": start, "end": end, **cols}, f"intervals/{name}"


def _behavior(f: h5py.File, path, series: str) -> tuple[np.ndarray, np.ndarray]:
    key = series.strip("/")
    if key not in f or not isinstance(f[key], h5py.Group) or "data" not in f[key]:
        raise InputError(f"{path}: no TimeSeries with a `data` dataset at /{key}; check --behavior-series")
    g = f[key]
    data = np.asarray(g["data"][()])
    if data.dtype.kind not in "biuf" or data.ndim not in (1, 2):
        raise InputError(f"{path}: /{key}/data must be numeric (N,) or (N, D), got shape {data.shape} dtype {data.dtype}")
    conv = float(g["data"].attrs.get("conversion", 1.0))
    offset = float(g["data"].attrs.get("offset", 0.0))
    values = data.astype(np.float64) * conv + offset
    if "timestamps" in g:
        times = np.asarray(g["timestamps"][()], dtype=np.float64).reshape(-1)
    elif "starting_time" in g:
        rate = g["starting_time"].attrs.get("rate")
        if rate is None or not float(rate) > 0:
            raise InputError(f"{path}: /{key}/starting_time has no positive `rate` attribute")
        times = float(g["starting_time"][()]) + np.arange(values.shape[0]) / float(rate)
    else:
        raise InputError(f"{path}: /{key} has neither timestamps nor starting_time; cannot place its samples in time")
    if times.shape[0] != values.shape[0]:
        raise InputError(f"{path}: /{key} has {times.shape[0]} timestamps for {values.shape[0]} samples")
    return times, values


def read_nwb(path, *, trials_table: str | None = None, behavior_series: str | None = None) -> Recording:
    """Read an NWB 2 file's units table (and trials, behaviour) into a :class:`Recording`."""
    p = source_path(path, what="NWB file", kind="file")
    if not h5py.is_hdf5(str(p)):
        raise InputError(f"{p}: not an HDF5 file; NWB 2 files are HDF5 (Zarr-backed NWB is not supported)")
    try:
        f = h5py.File(str(p), "r")
    except OSError as exc:
        raise InputError(f"{p}: cannot open the HDF5 file ({exc}); it may be truncated") from None
    with f:
        if "nwb_version" not in f.attrs and _str(f.attrs.get("neurodata_type", "")) != "NWBFile":
            raise InputError(f"{p}: an HDF5 file but not an NWB file (no nwb_version attribute)")
        times, unit_index, unit_ids, extra, labels = _units(f, p)
        trials, trials_from = _trials(f, p, trials_table)
        behavior = _behavior(f, p, behavior_series) if behavior_series else None
        ids = {"identifier": _str(f["identifier"][()]) if "identifier" in f else None}
        for key, where in (("session_id", "general/session_id"), ("subject_id", "general/subject/subject_id")):
            if where in f:
                ids[key] = _str(f[where][()])
        session_start = _str(f["session_start_time"][()]) if "session_start_time" in f else None
        nwb_version = _str(f.attrs.get("nwb_version", ""))
    return Recording(
        times=times,
        unit_index=unit_index,
        unit_ids=unit_ids,
        labels=labels,
        units_extra=extra,
        behavior=behavior,
        behavior_names=[behavior_series] if behavior is not None else None,
        trials=trials,
        provenance={
            "source": {"format": "nwb", "path": str(p), "nwb_version": nwb_version, "session_start_time": session_start},
            "ids": ids,
            "trials_from": trials_from,
        },
    )
