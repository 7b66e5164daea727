"""Plain ``.npz`` archives: the way in for any other format.

Required arrays:

* ``spike_times``: (S,) spike times in seconds (any order; they are sorted);
* ``unit_ids``: (S,) the unit of each spike, integers or strings
  (``spike_clusters`` is accepted as another name for it).

Optional arrays:

* ``units``: (U,) the full unit table, in order (it may list units without
  spikes); default: the distinct values of ``unit_ids``, sorted;
* ``units_label``: (U,) labels such as ``good`` / ``mua`` / ``noise`` (needs
  ``units``); only ``good`` units are kept unless told otherwise;
* ``units_<name>``: (U,) per-unit metrics (needs ``units``);
* ``start``, ``end``: scalars, the recording's extent in seconds (default:
  from the first to just after the last spike, behaviour sample or trial);
* ``behavior_times`` (N,) seconds with ``behavior_values`` (N,) or (N, D),
  and optionally ``behavior_names`` (D,) strings;
* ``trials_start``, ``trials_end`` (M,) seconds and ``trials_<name>`` (M,)
  further trial columns.

Write one with ``np.savez(path, spike_times=..., unit_ids=...)``. Arrays of
Python objects are refused (the archive is loaded with ``allow_pickle=False``).
"""

from __future__ import annotations

import zipfile

import numpy as np

from nh_serve.errors import InputError
from nh_serve.ingest.common import Recording, format_unit_ids, source_path, spikes_from_ids


def _load(path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise InputError(
            f"{path}: cannot read it as a numpy .npz archive (not a zip file); save one with "
            "np.savez(path, spike_times=..., unit_ids=...)"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise InputError(
                f"{path}: holds arrays of Python objects, which are not loaded; save plain numeric or string "
                "arrays (e.g. np.asarray(ids, dtype=str))"
            ) from None
        raise InputError(f"{path}: cannot read it as a numpy .npz archive ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path}: cannot read it as a numpy .npz archive ({exc})") from None


def _scalar(arrays: dict, key: str, path) -> float | None:
    if key not in arrays:
        return None
    v = np.asarray(arrays[key])
    if v.size != 1 or v.dtype.kind not in "iuf" or not np.isfinite(v.reshape(-1)[0]):
        raise InputError(f"{path}: `{key}` must be one finite number of seconds, got shape {v.shape} dtype {v.dtype}")
    return float(v.reshape(-1)[0])


def read_npz(path) -> Recording:
    """Read an ``.npz`` archive (see the module docstring) into a :class:`Recording`."""
    p = source_path(path, what="npz file", kind="file")
    arrays = _load(p)
    ids_key = "unit_ids" if "unit_ids" in arrays else ("spike_clusters" if "spike_clusters" in arrays else None)
    if "spike_times" not in arrays or ids_key is None:
        missing = [k for k in ("spike_times", "unit_ids") if k not in arrays and not (k == "unit_ids" and ids_key)]
        raise InputError(
            f"{p}: missing array(s) {', '.join(missing)} (found: {', '.join(sorted(arrays)) or 'nothing'}); "
            "save spike_times (seconds) and unit_ids (one per spike)"
        )
    units = arrays.get("units")
    times, unit_index, unit_ids = spikes_from_ids(arrays["spike_times"], arrays[ids_key], name=f"{p}", unit_ids=units)
    n_units = len(unit_ids)

    labels = None
    extra: dict[str, np.ndarray] = {}
    for key, val in arrays.items():
        if not key.startswith("units_"):
            continue
        if units is None:
            raise InputError(f"{p}: `{key}` is a per-unit column but there is no `units` array saying which unit each row is")
        val = np.asarray(val)
        if val.ndim == 0 or val.shape[0] != n_units:
            raise InputError(f"{p}: `{key}` has {val.shape[0] if val.ndim else 0} rows for {n_units} units")
        if key == "units_label":
            labels = format_unit_ids(val)
        else:
            extra[key[len("units_"):]] = val

    behavior = None
    names = None
    if "behavior_times" in arrays or "behavior_values" in arrays:
        if not ("behavior_times" in arrays and "behavior_values" in arrays):
            raise InputError(f"{p}: pass both behavior_times and behavior_values, or neither")
        bt = np.asarray(arrays["behavior_times"], dtype=np.float64).reshape(-1)
        bv = np.asarray(arrays["behavior_values"])
        bv = bv.reshape(-1, 1) if bv.ndim == 1 else bv
        if bv.ndim != 2 or bv.shape[0] != bt.shape[0] or bv.dtype.kind not in "biuf":
            raise InputError(
                f"{p}: behavior_values must be numeric (N,) or (N, D) with N = {bt.shape[0]} behavior_times, "
                f"got shape {bv.shape} dtype {bv.dtype}"
            )
        behavior = (bt, bv)
        if "behavior_names" in arrays:
            names = format_unit_ids(arrays["behavior_names"]).tolist()
            if len(names) != bv.shape[1]:
                raise InputError(f"{p}: {len(names)} behavior_names for {bv.shape[1]} behaviour columns")

    trials = None
    if any(k.startswith("trials_") for k in arrays):
        if "trials_start" not in arrays or "trials_end" not in arrays:
            raise InputError(f"{p}: trial columns need trials_start and trials_end (seconds)")
        trials = {k[len("trials_"):]: np.asarray(v) for k, v in arrays.items() if k.startswith("trials_")}
        n = trials["start"].shape[0] if trials["start"].ndim else 0
        for k, v in trials.items():
            if v.ndim == 0 or v.shape[0] != n:
                raise InputError(f"{p}: trials_{k} has {v.shape[0] if v.ndim else 0} rows for {n} trials")

    return Recording(
        times=times,
        unit_index=unit_index,
        unit_ids=unit_ids,
        labels=labels,
        units_extra=extra,
        behavior=behavior,
        behavior_names=names,
        trials=trials,
        start=_scalar(arrays, "start", p),
        end=_scalar(arrays, "end", p),
        provenance={"source": {"format": "npz", "path": str(p)}, "ids": {"file": p.name}},
    )
