"""Writing session files (the layout: :mod:`nh_serve.data.session`): validate a recording, write it atomically."""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path

import h5py
import numpy as np

from nh_serve.data.spikes import check_spikes
from nh_serve.errors import InputError
from nh_serve.util import atomic_path, package_version


def _as_str_array(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise InputError(f"{name}: must be a 1-D array, got shape {arr.shape}")
    out = np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr.tolist()], dtype=str)
    bad = [s for s in out.tolist() if not s.isascii()]
    if bad:
        raise InputError(
            f"{name}: {bad[0]!r} has non-ASCII characters, which the temporaldata file layout cannot store; "
            "use ASCII strings"
        )
    return out


def _column(values, name: str, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 0 or arr.shape[0] != n:
        raise InputError(
            f"{name}: has {arr.shape[0] if arr.ndim else 0} rows but needs {n}; pass one value per row"
        )
    if arr.dtype.kind in "OSU":
        if arr.ndim != 1:
            raise InputError(f"{name}: string columns must be 1-D, got shape {arr.shape}")
        return _as_str_array(arr, name)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{name}: has dtype {arr.dtype}; pass numbers, booleans or strings")
    return arr


def _time_series(pair, name: str, value_name: str):
    try:
        times, values = pair
    except (TypeError, ValueError):
        raise InputError(f"{name}: pass a pair (times (N,), {value_name} (N, D))") from None
    t = np.asarray(times)
    v = np.asarray(values)
    if t.ndim != 1 or t.dtype.kind not in "iuf":
        raise InputError(f"{name}: times must be a 1-D array of seconds, got shape {t.shape} dtype {t.dtype}")
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2 or v.dtype.kind not in "biuf":
        raise InputError(
            f"{name}: {value_name} must be a numeric (N, D) array, got shape {v.shape} dtype {v.dtype}"
        )
    if v.shape[0] != t.shape[0]:
        raise InputError(
            f"{name}: {t.shape[0]} times but {v.shape[0]} rows of {value_name}; pass one row per time"
        )
    t = t.astype(np.float64)
    if not np.all(np.isfinite(t)):
        raise InputError(f"{name}: times must be finite seconds")
    if t.size > 1 and np.any(np.diff(t) < 0):
        raise InputError(f"{name}: times are not sorted; sort them (and their rows) by time")
    v = v.astype(np.float32)
    if not np.all(np.isfinite(v)):
        raise InputError(
            f"{name}: {value_name} contain NaN or infinite values; drop or interpolate those samples"
        )
    return t, v


def _check_trials(trials) -> dict[str, np.ndarray]:
    """Validate a trials dict (``start``, ``end`` seconds plus columns) and return its columns."""
    if not isinstance(trials, dict) or "start" not in trials or "end" not in trials:
        raise InputError("trials: pass a dict with at least 'start' and 'end' arrays (seconds)")
    start, end = np.asarray(trials["start"]), np.asarray(trials["end"])
    if (
        start.ndim != 1
        or end.shape != start.shape
        or start.dtype.kind not in "iuf"
        or end.dtype.kind not in "iuf"
    ):
        raise InputError("trials: 'start' and 'end' must be 1-D numeric arrays of the same length (seconds)")
    start, end = start.astype(np.float64), end.astype(np.float64)
    if not (np.all(np.isfinite(start)) and np.all(np.isfinite(end))) or np.any(end < start):
        raise InputError("trials: 'start'/'end' must be finite seconds with every end >= its start")
    cols = {"start": start, "end": end}
    for key, val in trials.items():
        if key in ("start", "end"):
            continue
        if not str(key).isidentifier():
            raise InputError(f"trials: column name {key!r} is not allowed; use a Python identifier")
        cols[str(key)] = _column(val, f"trials[{key!r}]", start.shape[0])
    return cols


def _check_true_rates(true_rates, n_units: int) -> tuple[np.ndarray, float]:
    """Validate ``(rates (T, U) Hz, bin_size s)``; returns float32 rates and the bin size."""
    try:
        rates, bin_size = true_rates
        bs = float(bin_size)
    except (TypeError, ValueError):
        raise InputError("true_rates: pass a pair (rates (T, U) Hz, bin_size seconds)") from None
    r = np.asarray(rates)
    if r.ndim != 2 or r.shape[1] != n_units or r.shape[0] == 0 or r.dtype.kind not in "iuf":
        raise InputError(
            f"true_rates: rates must be a numeric (T, {n_units}) array in Hz, got shape {r.shape}"
        )
    r = r.astype(np.float32)
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise InputError("true_rates: rates must be finite and >= 0 Hz")
    if not (math.isfinite(bs) and bs > 0):
        raise InputError(f"true_rates: bin_size must be a positive number of seconds, got {bin_size}")
    return r, bs


def write_session(
    path,
    *,
    spike_times,
    unit_index,
    unit_ids,
    start: float | None = None,
    end: float | None = None,
    units_extra: dict | None = None,
    behavior=None,
    image_embeddings=None,
    trials: dict | None = None,
    true_rates=None,
    provenance: dict | None = None,
) -> Path:
    """Validate a recording and write it atomically as a session file.

    Args:
        path: output ``.h5`` file; its folder must exist. An existing file is replaced.
        spike_times: (N,) seconds, sorted, finite, non-negative.
        unit_index: (N,) int rows into ``unit_ids``.
        unit_ids: (U,) unit ids (ints become strings), unique, ASCII.
        start, end: recording extent in seconds; default from the first spike to just
            after the last one. All spikes must lie in ``[start, end)``.
        units_extra: per-unit columns (each (U, ...)) such as quality metrics.
        behavior: ``(times (N,), values (N, D_b))``; stored as float32.
        image_embeddings: ``(presentation start times (N,), embeddings (N, D_img))``.
        trials: dict with ``start``, ``end`` (seconds) and more columns of the same length.
        true_rates: ``(rates (T, U) Hz, bin_size seconds)``; bin k starts at ``start + k * bin_size``.
        provenance: JSON-serialisable dict (source, ids, ...); the writer adds the
            package versions and the creation time under ``written_by``.

    Returns the path. The file is written to a temporary file in the same folder
    and moved into place; on any error no file is left behind.
    """
    import temporaldata as td  # only the writer needs it (the reader reads the HDF5 layout itself)

    path = Path(path)
    ids = _as_str_array(unit_ids, "unit_ids")
    n_units = int(ids.shape[0])
    if n_units == 0:
        raise InputError("unit_ids: there are zero units; pass at least one unit")
    uniq, counts = np.unique(ids, return_counts=True)
    if uniq.shape[0] != n_units:
        raise InputError(
            f"unit_ids: duplicate ids {uniq[counts > 1][:5].tolist()}; every unit needs a unique id"
        )
    t, u = check_spikes(spike_times, unit_index, n_units=n_units, name="spikes", allow_empty=False)
    s = float(t[0]) if start is None else float(start)
    e = float(np.nextafter(t[-1], np.inf)) if end is None else float(end)
    if not (math.isfinite(s) and math.isfinite(e)) or not e > s:
        raise InputError(f"start/end: the recording extent [{s}, {e}) s must be finite with end after start")
    check_spikes(t, u, n_units=n_units, name="spikes", window=(s, e))

    unit_cols = {"id": ids}
    for key, val in (units_extra or {}).items():
        key = str(key)
        if key == "id" or not key.isidentifier():
            raise InputError(
                f"units_extra: column name {key!r} is not allowed; use a Python identifier other than 'id'"
            )
        unit_cols[key] = _column(val, f"units_extra[{key!r}]", n_units)

    domain = td.Interval(start=s, end=e)
    members = {
        "spikes": td.IrregularTimeSeries(timestamps=t, unit_index=u, domain=td.Interval(start=s, end=e)),
        "units": td.ArrayDict(**unit_cols),
    }
    if behavior is not None:
        bt, bv = _time_series(behavior, "behavior", "values")
        members["behavior"] = td.IrregularTimeSeries(
            timestamps=bt, values=bv, domain=td.Interval(start=s, end=e)
        )
    if image_embeddings is not None:
        it, iv = _time_series(image_embeddings, "image_embeddings", "embeddings")
        members["image_embeddings"] = td.IrregularTimeSeries(
            timestamps=it, embedding=iv, domain=td.Interval(start=s, end=e)
        )
    if trials is not None:
        members["trials"] = td.Interval(**_check_trials(trials))
    if true_rates is not None:
        rates, bin_size = _check_true_rates(true_rates, n_units)
        members["true_rates"] = td.RegularTimeSeries(
            rates=rates, sampling_rate=1.0 / bin_size, domain_start=s
        )

    prov = dict(provenance or {})
    prov["written_by"] = {
        "package": "nh-serve",
        "version": package_version("nh-serve", "0+unknown"),
        "temporaldata": getattr(td, "__version__", package_version("temporaldata")),
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        prov_json = json.dumps(prov, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise InputError(
            f"provenance: must be JSON-serialisable (strings, numbers, lists, dicts): {err}"
        ) from None

    data = td.Data(**members, provenance=prov_json, domain=domain)

    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{path}: folder {folder} does not exist; create it first")
    try:
        with atomic_path(path) as tmp, h5py.File(str(tmp), "w") as f:
            data.to_hdf5(f)
            f["spikes/unit_index"].attrs["min_value"] = int(u.min())
            f["spikes/unit_index"].attrs["max_value"] = int(u.max())
    except OSError as err:
        raise InputError(
            f"{path}: could not write the session file ({err}); check the folder is writable and has space"
        ) from None
    return path
