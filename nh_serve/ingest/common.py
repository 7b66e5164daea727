"""What every reader shares: the in-memory recording, unit filters, provenance, writing.

Each format reader (``ibl``, ``allen``, ``nwb``, ``phy``, ``npz``) turns its
source into a :class:`Recording`: spikes as sorted times (float64 seconds)
with a row into a unit table, the unit ids as strings, optional per-unit
labels (``"good"``, ``"mua"``, ``"noise"``, ...) and metrics, optional
behaviour, trials, and the provenance of the source. :func:`write_recording`
then applies the unit filters once for all formats and writes the session
file through :func:`nh_serve.data.session.write_session`.

Unit filters (:class:`UnitFilter`):

* labels: where the source labels its units, only units whose label is in
  ``keep_labels`` (``("good",)`` by default) are kept;
* rate: units firing below ``min_rate`` Hz over the recording's extent
  (``end - start``) are dropped (default :data:`DEFAULT_MIN_RATE`);
* ``all_units=True`` keeps every unit, whatever its label or rate.

The kept units' labels are written as the per-unit column ``quality``; the
filter settings and how many units each filter removed go into the
provenance under ``filters``.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nh_serve.data.session import write_session
from nh_serve.errors import InputError
from nh_serve.util import package_version

DEFAULT_MIN_RATE = 0.1
"""Units firing below this rate (Hz, over the whole recording) are dropped by default."""

GOOD = "good"
"""The label of a unit that passed the source's own quality control."""


@dataclass
class Recording:
    """A recording read from some source, before unit filtering.

    ``times`` (S,) float64 seconds, sorted; ``unit_index`` (S,) int64 rows of
    ``unit_ids`` (U,) str. ``labels`` (U,) str or None where the source has no
    unit labels. ``units_extra`` maps a name to a (U,) per-unit array.
    ``behavior`` is ``(times (N,), values (N, D_b))``; ``behavior_names`` names
    the D_b columns. ``trials`` has ``start`` and ``end`` (M,) seconds plus
    any (M,) columns. ``start`` / ``end``: the recording's extent in seconds,
    or None to take it from the data. ``provenance`` holds ``source`` (format,
    path) and ``ids`` plus anything format-specific.
    """

    times: np.ndarray
    unit_index: np.ndarray
    unit_ids: np.ndarray
    labels: np.ndarray | None = None
    units_extra: dict[str, np.ndarray] = field(default_factory=dict)
    behavior: tuple[np.ndarray, np.ndarray] | None = None
    behavior_names: list[str] | None = None
    trials: dict[str, np.ndarray] | None = None
    start: float | None = None
    end: float | None = None
    provenance: dict = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        return int(len(self.unit_ids))


@dataclass(frozen=True)
class UnitFilter:
    """Which units to keep: see the module docstring."""

    min_rate: float = DEFAULT_MIN_RATE
    keep_labels: tuple[str, ...] = (GOOD,)
    all_units: bool = False

    def to_dict(self) -> dict:
        return {"min_rate_hz": self.min_rate, "keep_labels": list(self.keep_labels), "all_units": self.all_units}


# ---------------------------------------------------------------------------------------------
# unit ids and spike assembly


def format_unit_ids(ids) -> np.ndarray:
    """Unit ids as strings: integers (and integral floats) without a decimal point,
    bytes decoded, strings stripped. Returns a (U,) ``str`` array."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and np.issubdtype(arr.dtype, np.floating):
        if np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
    out = []
    for v in arr.tolist():
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        out.append(str(v).strip())
    return np.asarray(out, dtype=str)


def spikes_from_ids(spike_times, spike_unit_ids, *, name: str, unit_ids=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn one unit id per spike into ``(times, unit_index, unit_ids)``.

    ``spike_times`` (S,) seconds in any order; ``spike_unit_ids`` (S,) ints or
    strings. ``unit_ids``, if given, is the full (U,) unit table (it may list
    units without spikes); otherwise the table is the sorted distinct ids.
    Spikes are sorted by time (stable, so equal times keep their order).
    Raises :class:`InputError` naming ``name`` for mismatched lengths, or
    spikes of units missing from ``unit_ids``.
    """
    t = np.asarray(spike_times)
    c = np.asarray(spike_unit_ids)
    if t.ndim == 2 and 1 in t.shape:
        t = t.reshape(-1)
    if c.ndim == 2 and 1 in c.shape:
        c = c.reshape(-1)
    if t.ndim != 1 or c.ndim != 1:
        raise InputError(f"{name}: spike times and unit ids must be 1-D, got shapes {t.shape} and {c.shape}")
    if t.shape[0] != c.shape[0]:
        raise InputError(
            f"{name}: {t.shape[0]} spike times but {c.shape[0]} unit ids; the two arrays must have one entry per spike"
        )
    if t.size and not (np.issubdtype(t.dtype, np.floating) or np.issubdtype(t.dtype, np.integer)):
        raise InputError(f"{name}: spike times must be numbers in seconds, got dtype {t.dtype}")
    t = t.astype(np.float64)
    if unit_ids is None:
        keys, inv = np.unique(c, return_inverse=True)
        ids = format_unit_ids(keys)
        index = inv.reshape(-1).astype(np.int64)
    else:
        ids = format_unit_ids(unit_ids)
        if len(set(ids.tolist())) != len(ids):
            raise InputError(f"{name}: the unit table lists some unit id twice; unit ids must be unique")
        row = {k: i for i, k in enumerate(ids.tolist())}
        keys, inv = np.unique(c, return_inverse=True)  # format each distinct id once
        key_rows = np.asarray([row.get(k, -1) for k in format_unit_ids(keys).tolist()], dtype=np.int64)
        index = key_rows[inv.reshape(-1)] if c.size else np.zeros(0, dtype=np.int64)
        if np.any(index < 0):
            missing = format_unit_ids(keys[key_rows < 0]).tolist()
            raise InputError(
                f"{name}: {int((index < 0).sum())} spike(s) belong to unit ids missing from the unit table "
                f"(e.g. {', '.join(missing[:5])}); add those units to the table or drop their spikes"
            )
    if t.size and not np.all(np.isfinite(t)):
        bad = int(np.flatnonzero(~np.isfinite(t))[0])
        raise InputError(f"{name}: spike time #{bad} is {t[bad]}; all spike times must be finite seconds")
    if t.size > 1 and np.any(np.diff(t) < 0):
        order = np.argsort(t, kind="stable")
        t, index = t[order], index[order]
    return t, index, ids


def spikes_from_ragged(per_unit_times: list[np.ndarray], unit_ids, *, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn one spike-time array per unit into sorted ``(times, unit_index, unit_ids)``."""
    ids = format_unit_ids(unit_ids)
    if len(per_unit_times) != len(ids):
        raise InputError(f"{name}: {len(per_unit_times)} spike trains for {len(ids)} unit ids")
    counts = [int(np.asarray(x).size) for x in per_unit_times]
    times = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1) for x in per_unit_times]) if ids.size else np.zeros(0)
    index = np.repeat(np.arange(len(ids), dtype=np.int64), counts)
    order = np.argsort(times, kind="stable")
    return times[order], index[order], ids


def normalise_labels(labels) -> np.ndarray:
    """Unit labels as lower-case strings (``"good"``, ``"mua"``, ``"noise"``, ...)."""
    return np.asarray([str(x).strip().lower() for x in format_unit_ids(labels).tolist()], dtype=str)


# ---------------------------------------------------------------------------------------------
# behaviour helpers


def velocity_from_position(times, position, *, rate: float, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Velocity (position units per second) of an irregularly sampled position.

    The position is linearly interpolated onto a regular grid of ``rate`` Hz
    from the first to the last sample, then differentiated with central
    differences (one-sided at the ends). Returns ``(grid_times (N,), velocity
    (N, 1) float32)``. A position that is linear in time gives its exact slope.
    """
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    x = np.asarray(position, dtype=np.float64).reshape(-1)
    if t.shape != x.shape:
        raise InputError(f"{name}: {t.size} timestamps but {x.size} positions; they must have one entry each")
    if t.size < 2:
        raise InputError(f"{name}: needs at least 2 samples to compute a velocity, got {t.size}")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(x))):
        raise InputError(f"{name}: timestamps and positions must be finite numbers")
    if np.any(np.diff(t) < 0):
        order = np.argsort(t, kind="stable")
        t, x = t[order], x[order]
    if not t[-1] > t[0]:
        raise InputError(f"{name}: all samples are at the same time {t[0]} s; cannot compute a velocity")
    if not rate > 0:
        raise InputError(f"behaviour rate must be positive, got {rate} Hz")
    n = int(np.floor((t[-1] - t[0]) * rate)) + 1
    grid = t[0] + np.arange(n, dtype=np.float64) / rate
    pos = np.interp(grid, t, x)
    if n >= 2:
        vel = np.gradient(pos, 1.0 / rate)
    else:
        vel = np.array([(x[-1] - x[0]) / (t[-1] - t[0])])
    return grid, vel.astype(np.float32).reshape(-1, 1)


def table_columns(columns: dict, *, n_rows: int, skip=()) -> dict[str, np.ndarray]:
    """Keep the 1-D columns of length ``n_rows`` that are numbers, booleans or strings.

    Used for trials and per-unit tables: ragged, multi-dimensional or object
    columns that are not strings are left out.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in columns.items():
        if key in skip:
            continue
        arr = np.asarray(value)
        if arr.ndim != 1 or arr.shape[0] != n_rows:
            continue
        if arr.dtype == bool or np.issubdtype(arr.dtype, np.number):
            out[str(key)] = arr
        elif arr.dtype.kind in "USO":
            try:
                vals = [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in arr.tolist()]
            except Exception:  # noqa: BLE001 - odd objects: skip the column
                continue
            if all(isinstance(x, str) for x in vals):
                out[str(key)] = np.asarray(vals, dtype=str)
            elif all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in vals):
                out[str(key)] = np.asarray([np.nan if x is None else x for x in vals], dtype=np.float64)
    return out


def column_name(name) -> str:
    """A table column name the session layout accepts (a Python identifier)."""
    out = re.sub(r"\W", "_", str(name).strip(), flags=re.ASCII) or "column"
    return out if not out[0].isdigit() else f"c_{out}"


def ascii_strings(values: np.ndarray) -> np.ndarray:
    """Strings with non-ASCII characters escaped (``é`` -> ``\\xe9``): the file layout stores ASCII."""
    return np.asarray([v.encode("ascii", "backslashreplace").decode("ascii") for v in values.tolist()], dtype=str)


def clean_columns(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Column names made identifiers (``id`` renamed ``id_``) and string columns made ASCII."""
    out: dict[str, np.ndarray] = {}
    for key, value in columns.items():
        name = column_name(key)
        if name == "id":
            name = "id_"
        arr = np.asarray(value)
        if arr.dtype.kind in "US":
            arr = ascii_strings(arr.astype(str))
        if name in out:
            continue
        out[name] = arr
    return out


def clean_behavior(behavior):
    """Drop behaviour samples whose time or values are not finite; None when nothing is left."""
    if behavior is None:
        return None
    t = np.asarray(behavior[0], dtype=np.float64).reshape(-1)
    v = np.asarray(behavior[1], dtype=np.float32)
    v = v.reshape(len(t), -1)
    ok = np.isfinite(t) & np.all(np.isfinite(v), axis=1)
    if not ok.any():
        return None
    t, v = t[ok], v[ok]
    if t.size > 1 and np.any(np.diff(t) < 0):
        order = np.argsort(t, kind="stable")
        t, v = t[order], v[order]
    return t, v


# ---------------------------------------------------------------------------------------------
# filtering


@dataclass
class FilterResult:
    times: np.ndarray
    unit_index: np.ndarray
    unit_ids: np.ndarray
    keep: np.ndarray  # (U_source,) bool
    summary: dict


def recording_extent(rec: Recording) -> tuple[float, float]:
    """``(start, end)`` seconds: the recording's own extent where given, otherwise
    from the first to just past the last spike, behaviour sample or trial."""
    lo, hi = [], []
    if rec.times.size:
        lo.append(float(rec.times[0]))
        hi.append(float(rec.times[-1]))
    if rec.behavior is not None and len(rec.behavior[0]):
        lo.append(float(np.min(rec.behavior[0])))
        hi.append(float(np.max(rec.behavior[0])))
    if rec.trials is not None and len(rec.trials.get("start", ())):
        lo.append(float(np.nanmin(rec.trials["start"])))
        hi.append(float(np.nanmax(rec.trials["end"])))
    start = rec.start if rec.start is not None else (min(lo) if lo else 0.0)
    if rec.end is not None:
        end = float(rec.end)
    else:
        last = max(hi) if hi else start
        end = float(np.nextafter(last, np.inf))  # half-open domain: the last event lies inside
        if not end > start:
            end = start + 1.0
    start = float(start)
    src = rec.provenance.get("source", {}).get("path", "recording")
    if lo and min(lo) < start:
        raise InputError(f"{src}: data starts at {min(lo):.6g} s, before the recording start {start:.6g} s")
    if rec.times.size and float(rec.times[-1]) >= end:
        raise InputError(f"{src}: a spike at {float(rec.times[-1]):.6g} s is at or after the recording end {end:.6g} s")
    return start, end


def filter_units(rec: Recording, flt: UnitFilter, *, start: float, end: float) -> FilterResult:
    """Apply ``flt`` to ``rec``; returns the kept spikes re-indexed into the kept units.

    Raises :class:`InputError` when no unit is left, saying which filter removed them.
    """
    n = rec.n_units
    counts = np.bincount(rec.unit_index, minlength=n) if n else np.zeros(0, dtype=np.int64)
    duration = float(end - start)
    rates = counts / duration if duration > 0 else counts.astype(np.float64)
    keep = np.ones(n, dtype=bool)
    label_ok = np.ones(n, dtype=bool)
    rate_ok = np.ones(n, dtype=bool)
    if not flt.all_units:
        if rec.labels is not None:
            wanted = {x.lower() for x in flt.keep_labels}
            label_ok = np.asarray([lab in wanted for lab in normalise_labels(rec.labels).tolist()], dtype=bool)
        rate_ok = rates >= float(flt.min_rate)
        keep = label_ok & rate_ok
    summary = {
        **flt.to_dict(),
        "labels_used": rec.labels is not None and not flt.all_units,
        "n_units_source": int(n),
        "n_units_kept": int(keep.sum()),
        "n_units_dropped_by_label": int((~label_ok).sum()),
        "n_units_dropped_by_rate": int((label_ok & ~rate_ok).sum()),
        "n_spikes_source": int(rec.times.size),
    }
    if not keep.any():
        src = rec.provenance.get("source", {}).get("path", "the source")
        why = []
        if summary["n_units_dropped_by_label"]:
            why.append(f"{summary['n_units_dropped_by_label']} not labelled {'/'.join(flt.keep_labels)}")
        if summary["n_units_dropped_by_rate"]:
            why.append(f"{summary['n_units_dropped_by_rate']} below --min-rate {flt.min_rate:g} Hz")
        raise InputError(
            f"{src}: no units left after filtering {n} unit(s)"
            + (f" ({', '.join(why)})" if why else "")
            + "; lower --min-rate, include more labels, or pass --all-units"
        )
    new_index = np.full(n, -1, dtype=np.int64)
    new_index[keep] = np.arange(int(keep.sum()), dtype=np.int64)
    spike_keep = keep[rec.unit_index] if rec.times.size else np.zeros(0, dtype=bool)
    times = rec.times[spike_keep]
    unit_index = new_index[rec.unit_index[spike_keep]]
    summary["n_spikes_kept"] = int(times.size)
    return FilterResult(times=times, unit_index=unit_index, unit_ids=rec.unit_ids[keep], keep=keep, summary=summary)


def describe_filter(summary: dict) -> str:
    """One line: how many units the filters kept and why the others were dropped.

    ``summary`` is the ``filters`` entry of a session's provenance (:func:`filter_units`),
    e.g. ``units: kept 18 of 20; dropped 2 firing below 0.1 Hz over the recording (--min-rate)``.
    """
    n, kept = int(summary.get("n_units_source", 0)), int(summary.get("n_units_kept", 0))
    if summary.get("all_units"):
        return f"units: kept all {n} (--all-units: no filter)"
    rate = f"firing below {float(summary.get('min_rate_hz', 0.0)):g} Hz over the recording (--min-rate)"
    labels = "/".join(summary.get("keep_labels") or [])
    if kept == n:
        why = f"every unit fires at least {float(summary.get('min_rate_hz', 0.0)):g} Hz over the recording"
        if summary.get("labels_used"):
            why += f" and is labelled {labels}"
        return f"units: kept all {n} ({why})"
    parts = []
    by_rate, by_label = int(summary.get("n_units_dropped_by_rate", 0)), int(summary.get("n_units_dropped_by_label", 0))
    if by_rate:
        parts.append(f"{by_rate} {rate}")
    if by_label:
        parts.append(f"{by_label} not labelled {labels}")
    return f"units: kept {kept} of {n}; dropped {', '.join(parts)}"


# ---------------------------------------------------------------------------------------------
# provenance and writing


def software_versions(*names: str) -> dict[str, str]:
    """Versions of the named distributions that are installed (the reader's libraries).

    ``write_session`` adds nh-serve's own version, numpy, h5py and the creation time.
    """
    out = {"python": platform.python_version()}
    for name in names:
        v = package_version(name, None)
        if v is not None:
            out[name] = v
    return out


def check_output_path(out, *, overwrite: bool) -> Path:
    """Check ``--out`` before any work: a file path in an existing folder, and not an
    existing file unless ``overwrite``."""
    if out is None or str(out) == "":
        raise InputError("--out: pass the session file to write, e.g. --out session.h5")
    path = Path(out).expanduser()
    if path.is_dir():
        raise InputError(f"--out {path}: is a folder; pass a file path such as {path / 'session.h5'}")
    if not path.parent.exists():
        raise InputError(f"--out {path}: folder {path.parent} does not exist; create it first")
    if path.exists() and not overwrite:
        raise InputError(f"--out {path}: file exists; pass --overwrite to replace it")
    return path


def source_path(path, *, what: str, kind: str = "file") -> Path:
    """Resolve an input path, raising :class:`InputError` when it is missing or of the wrong kind."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{what} {p}: not found; check the path")
    if kind == "file" and not p.is_file():
        raise InputError(f"{what} {p}: is not a file")
    if kind == "dir" and not p.is_dir():
        raise InputError(f"{what} {p}: is not a folder")
    return p.resolve()


def write_recording(rec: Recording, out, *, flt: UnitFilter, software: dict[str, str] | None = None) -> Path:
    """Filter ``rec``'s units and write it as a session file at ``out``.

    Provenance gets ``source``/``ids`` from the reader, the ``filters`` applied
    with their counts and the reader's ``software`` versions (``write_session``
    adds nh-serve's version and the creation time under ``written_by``).
    Behaviour samples that are not finite are dropped. The write is atomic
    (``write_session``): on error no file is left.
    Returns the written path.
    """
    start, end = recording_extent(rec)
    res = filter_units(rec, flt, start=start, end=end)
    units_extra = clean_columns({k: np.asarray(v)[res.keep] for k, v in rec.units_extra.items()})
    if rec.labels is not None:
        units_extra["quality"] = normalise_labels(rec.labels)[res.keep]
    prov = dict(rec.provenance)
    prov["filters"] = res.summary
    prov["software"] = {**software_versions(), **(software or {}), **prov.get("software", {})}
    if rec.behavior_names:
        prov["behavior_columns"] = list(rec.behavior_names)
    behavior = clean_behavior(rec.behavior)
    return write_session(
        out,
        spike_times=res.times,
        unit_index=res.unit_index,
        unit_ids=res.unit_ids,
        start=start,
        end=end,
        units_extra=units_extra or None,
        behavior=behavior,
        trials=clean_columns(rec.trials) if rec.trials is not None else None,
        provenance=prov,
    )
