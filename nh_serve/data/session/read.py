"""Session files: one recording in the temporaldata / brainsets HDF5 layout.

A session file is what ``temporaldata.Data(...).to_hdf5(h5py.File(path, "w"))``
writes, with these members (times are seconds on the recording clock):

- ``spikes``: ``IrregularTimeSeries`` with ``timestamps`` (float64, sorted) and
  ``unit_index`` (int64 row into ``units``).
- ``units``: ``ArrayDict`` with ``id`` (string unit ids) and any per-unit columns
  (quality metrics, ground-truth parameters), all of length ``n_units``.
- ``domain``: ``Interval``; the recording extent is ``[min(start), max(end))``.
- optional ``behavior``: ``IrregularTimeSeries`` with ``values`` (N, D_b).
- optional ``image_embeddings``: ``IrregularTimeSeries`` with ``embedding`` (N, D_img),
  one row per stimulus presentation, stamped with its start time.
- optional ``trials``: ``Interval`` with ``start``, ``end`` and more columns.
- optional ``true_rates`` (synthetic recordings): ``RegularTimeSeries`` with
  ``rates`` (T, n_units) float32 in Hz; row ``k`` is the bin
  ``[t_k, t_k + 1 / sampling_rate)`` with ``t_k = domain.start + k / sampling_rate``.
- ``provenance``: a JSON string stored as a file attribute (temporaldata loads
  it back as a plain ``str`` attribute of ``Data``).

How temporaldata 0.1.6 stores it (and what this reader relies on): every group
carries an ``object`` attribute naming its class; string columns are stored as
fixed-length ASCII bytes (``S``) and listed in the group's ``_unicode_keys``
attribute; ``IrregularTimeSeries`` groups also hold a ``timestamp_indices_1s``
dataset and their own ``domain`` group; ``RegularTimeSeries`` keeps
``sampling_rate`` as an attribute. Lazy loading in temporaldata keeps
``h5py.Dataset`` handles and slices them on access, so the datasets are written
uncompressed and contiguous, which also makes our partial reads cheap.

Reading (:func:`open_session`) never loads the spike train whole. Windows are
found by binary search: at open we read every 4096th timestamp (a strided read,
a few ms for 10 M spikes); a window lookup then reads at most one block of 4096
timestamps per edge, and finally the window itself.

What is checked, and when:

- at open (always, cheap): the file exists and is HDF5; ``spikes/timestamps``,
  ``spikes/unit_index`` and ``units/id`` exist, are 1-D, numeric where they must
  be, and have matching lengths; there is at least one spike and one unit; unit
  ids are unique; per-unit columns have ``n_units`` rows; the domain is finite
  and non-empty; the sampled timestamps (every 4096th plus the last) are finite
  and non-decreasing; the optional members have the datasets and shapes above;
  if the file records the ``unit_index`` range (our writer stores ``min_value`` /
  ``max_value`` attributes on ``spikes/unit_index``) that range is checked.
- at open, for files with at most :data:`FULL_CHECK_MAX_SPIKES` spikes (or when
  ``full_check=True``): the full pass of :meth:`Session.validate`.
- :meth:`Session.validate`: a chunked pass over all spikes (finite, sorted,
  ``unit_index`` in ``[0, n_units)``).
- every :meth:`Session.spikes` call checks the slice it returns the same way.

Every problem raises :class:`~nh_serve.errors.SessionFileError` naming the file
and the field (e.g. ``spikes/timestamps``).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from nh_serve.data.spikes import check_spikes
from nh_serve.errors import InputError, SessionFileError
from nh_serve.util import atomic_path, package_version

__all__ = ["FULL_CHECK_MAX_SPIKES", "Session", "open_session", "write_session"]

#: Files with at most this many spikes get the full :meth:`Session.validate` pass at open.
FULL_CHECK_MAX_SPIKES = 2_000_000
#: Spikes between two sampled timestamps of the coarse search index.
_INDEX_STRIDE = 4096
#: Spikes read per chunk by the full validation pass.
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- reading helpers


def _decode_strings(values: np.ndarray) -> np.ndarray:
    """Turn a stored id/string column into a numpy ``str`` array."""
    if values.dtype.kind == "S":
        return np.array([v.decode("utf-8", errors="replace") for v in values.tolist()], dtype=str)
    if values.dtype.kind == "O":
        return np.array(
            [
                v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
                for v in values.tolist()
            ],
            dtype=str,
        )
    if values.dtype.kind == "U":
        return values
    return np.array([str(v) for v in values.tolist()], dtype=str)


def _read_column(ds: h5py.Dataset) -> np.ndarray:
    """Read a whole small dataset, turning byte strings into ``str``."""
    values = ds[()]
    values = np.asarray(values)
    if values.dtype.kind in "SO":
        return _decode_strings(values)
    return values


class _SortedIndex:
    """Binary search over a sorted 1-D timestamps dataset without reading it whole.

    Holds every ``stride``-th timestamp (plus the last) in memory; a lookup reads
    at most one block of ``stride`` timestamps from the file.
    """

    def __init__(self, ds: h5py.Dataset, *, stride: int = _INDEX_STRIDE):
        self.ds = ds
        self.n = int(ds.shape[0])
        self.stride = int(stride)
        if self.n:
            coarse = np.asarray(ds[:: self.stride], dtype=np.float64)  # (ceil(n / stride),)
            self.positions = np.arange(coarse.shape[0], dtype=np.int64) * self.stride
            if self.positions[-1] != self.n - 1:
                coarse = np.append(coarse, float(ds[self.n - 1]))
                self.positions = np.append(self.positions, self.n - 1)
            self.coarse = coarse
        else:
            self.positions = np.zeros(0, dtype=np.int64)
            self.coarse = np.zeros(0, dtype=np.float64)
        self._cache: tuple[int, np.ndarray] | None = None

    def coarse_ok(self) -> str | None:
        """Return a problem description if the sampled timestamps are not finite and sorted."""
        c = self.coarse
        if c.size == 0:
            return None
        if not np.all(np.isfinite(c)):
            bad = int(self.positions[np.flatnonzero(~np.isfinite(c))[0]])
            return f"timestamp #{bad} is {float(self.ds[bad])}; timestamps must be finite seconds"
        d = np.diff(c)
        if np.any(d < 0):
            k = int(np.flatnonzero(d < 0)[0])
            return (
                f"timestamps are not sorted (#{int(self.positions[k + 1])} = {c[k + 1]:.6g} s comes after "
                f"#{int(self.positions[k])} = {c[k]:.6g} s); rewrite the file with sorted timestamps"
            )
        return None

    def _block(self, lo: int, hi: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == lo and self._cache[1].shape[0] == hi - lo:
            return self._cache[1]
        block = np.asarray(self.ds[lo:hi], dtype=np.float64)
        self._cache = (lo, block)
        return block

    def find(self, t: float) -> int:
        """Index of the first timestamp ``>= t`` (``n`` if none), like ``np.searchsorted(ts, t, 'left')``."""
        if self.n == 0:
            return 0
        k = int(np.searchsorted(self.coarse, t, side="left"))
        if k == 0:
            return 0
        if k == self.coarse.shape[0]:
            return self.n
        # answer lies in (positions[k-1], positions[k]]
        lo = int(self.positions[k - 1]) + 1
        hi = int(self.positions[k])
        if hi <= lo:
            return hi
        block = self._block(lo, hi)
        return lo + int(np.searchsorted(block, t, side="left"))


def _check_window(t0, t1, what: str) -> tuple[float, float]:
    try:
        a, b = float(t0), float(t1)
    except (TypeError, ValueError):
        raise InputError(f"{what}: window bounds must be numbers in seconds, got {t0!r} and {t1!r}") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise InputError(f"{what}: window [{a}, {b}) must have finite bounds in seconds")
    if b < a:
        raise InputError(f"{what}: window end {b} s is before its start {a} s; pass t0 <= t1")
    return a, b


# --------------------------------------------------------------------------- Session


class Session:
    """A lazily read session file. Use :func:`open_session` to make one.

    Attributes: ``path`` (Path), ``unit_ids`` (``(U,)`` str), ``n_units``, ``n_spikes``,
    ``start`` / ``end`` / ``duration`` (seconds), ``behavior_dim`` and ``image_dim``
    (0 when absent), ``units_table`` (dict of ``(U, ...)`` arrays, including ``id``),
    ``trials`` (dict of arrays or None), ``provenance`` (dict).
    """

    def __init__(self, path, *, full_check: bool | None = None):
        self.path = Path(path)
        self._file: h5py.File | None = None
        p = self.path
        if not p.exists():
            raise SessionFileError(p, "file", "file not found; check the path")
        if p.is_dir():
            raise SessionFileError(p, "file", "is a folder, not a session file; pass the .h5 file inside it")
        try:
            is_h5 = h5py.is_hdf5(str(p))
        except OSError as e:
            raise SessionFileError(p, "file", f"cannot be read ({e}); check permissions") from None
        if not is_h5:
            raise SessionFileError(
                p, "file", "is not an HDF5 file; pass a session file written by nh-serve or temporaldata"
            )
        try:
            self._file = h5py.File(str(p), "r")
        except OSError as e:
            raise SessionFileError(
                p, "file", f"HDF5 file cannot be opened ({e}); it may be truncated or corrupt"
            ) from None
        try:
            try:
                self._load_structure()
            except (OSError, KeyError) as e:  # h5py-level read failures inside a damaged file
                raise SessionFileError(
                    p, "file", f"cannot be read ({e}); the file may be truncated or corrupt"
                ) from None
            if full_check is None:
                full_check = self.n_spikes <= FULL_CHECK_MAX_SPIKES
            if full_check:
                self.validate()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ structure
    def _err(self, field: str, problem: str) -> SessionFileError:
        return SessionFileError(self.path, field, problem)

    def _group(self, name: str, *, required: bool) -> h5py.Group | None:
        f = self._file
        if name not in f:
            if required:
                raise self._err(
                    name,
                    f"missing group '{name}'; this is not a session file (expected the temporaldata layout "
                    "with 'spikes', 'units' and 'domain')",
                )
            return None
        g = f[name]
        if not isinstance(g, h5py.Group):
            raise self._err(name, f"'{name}' is a dataset, expected a group in the temporaldata layout")
        return g

    def _dataset(
        self, group: h5py.Group, gname: str, key: str, *, ndim: tuple[int, ...], kinds: str
    ) -> h5py.Dataset:
        field = f"{gname}/{key}"
        if key not in group or not isinstance(group[key], h5py.Dataset):
            raise self._err(field, f"missing dataset '{field}'; rewrite the file with write_session")
        ds = group[key]
        if ds.ndim not in ndim:
            raise self._err(
                field, f"must have {' or '.join(map(str, ndim))} dimension(s), got shape {ds.shape}"
            )
        if ds.dtype.kind not in kinds:
            raise self._err(
                field, f"has dtype {ds.dtype}, expected {'numbers' if 'f' in kinds else 'integers'}"
            )
        return ds

    def _load_structure(self) -> None:
        f = self._file
        # spikes
        sp = self._group("spikes", required=True)
        self._ts = self._dataset(sp, "spikes", "timestamps", ndim=(1,), kinds="fiu")
        self._ui = self._dataset(sp, "spikes", "unit_index", ndim=(1,), kinds="iu")
        if self._ts.shape[0] != self._ui.shape[0]:
            raise self._err(
                "spikes/unit_index",
                f"mismatched lengths: {self._ts.shape[0]} timestamps but {self._ui.shape[0]} unit indices",
            )
        self.n_spikes = int(self._ts.shape[0])
        if self.n_spikes == 0:
            raise self._err("spikes/timestamps", "empty recording: there are no spikes")

        # units
        units = self._group("units", required=True)
        ids_ds = self._dataset(units, "units", "id", ndim=(1,), kinds="SOUiu")
        self.unit_ids = _decode_strings(np.asarray(ids_ds[()]))
        self.n_units = int(self.unit_ids.shape[0])
        if self.n_units == 0:
            raise self._err("units/id", "empty recording: there are zero units")
        uniq, counts = np.unique(self.unit_ids, return_counts=True)
        if uniq.shape[0] != self.n_units:
            dup = uniq[counts > 1][:5].tolist()
            raise self._err("units/id", f"duplicate unit ids {dup}; every unit needs a unique id")
        table: dict[str, np.ndarray] = {"id": self.unit_ids}
        for key, ds in units.items():
            if key == "id" or not isinstance(ds, h5py.Dataset):
                continue
            if ds.ndim == 0 or ds.shape[0] != self.n_units:
                raise self._err(
                    f"units/{key}",
                    f"mismatched lengths: {ds.shape[0] if ds.ndim else 0} rows for {self.n_units} units",
                )
            table[key] = _read_column(ds)
        self.units_table = table

        # domain
        dom = f["domain"] if "domain" in f and isinstance(f["domain"], h5py.Group) else None
        field = "domain"
        if dom is None and "domain" in sp and isinstance(sp["domain"], h5py.Group):
            dom, field = sp["domain"], "spikes/domain"
        if dom is None:
            raise self._err(
                "domain",
                "missing group 'domain' (the recording's extent); rewrite the file with write_session",
            )
        d_start = np.asarray(self._dataset(dom, field, "start", ndim=(1,), kinds="fiu")[()], dtype=np.float64)
        d_end = np.asarray(self._dataset(dom, field, "end", ndim=(1,), kinds="fiu")[()], dtype=np.float64)
        if d_start.shape != d_end.shape or d_start.size == 0:
            raise self._err(field, f"mismatched lengths: {d_start.size} starts and {d_end.size} ends")
        if not (np.all(np.isfinite(d_start)) and np.all(np.isfinite(d_end))):
            raise self._err(field, "domain bounds must be finite seconds")
        self.start = float(d_start.min())
        self.end = float(d_end.max())
        if not self.end > self.start:
            raise self._err(field, f"domain end {self.end} s is not after its start {self.start} s")
        self.duration = self.end - self.start

        # coarse timestamp index + cheap checks
        self._index = _SortedIndex(self._ts)
        problem = self._index.coarse_ok()
        if problem:
            raise self._err("spikes/timestamps", problem)
        lo_attr, hi_attr = self._ui.attrs.get("min_value"), self._ui.attrs.get("max_value")
        if lo_attr is not None and hi_attr is not None:
            if int(lo_attr) < 0 or int(hi_attr) >= self.n_units:
                raise self._err(
                    "spikes/unit_index",
                    f"unit_index range [{int(lo_attr)}, {int(hi_attr)}] is outside [0, {self.n_units}) for "
                    f"{self.n_units} units",
                )

        # optional members
        self._behavior = self._load_series("behavior", "values")
        self.behavior_dim = 0 if self._behavior is None else self._behavior[2]
        self._images = self._load_series("image_embeddings", "embedding")
        self.image_dim = 0 if self._images is None else self._images[2]
        self._rates = None
        tr = self._group("true_rates", required=False)
        if tr is not None:
            rates = self._dataset(tr, "true_rates", "rates", ndim=(2,), kinds="fiu")
            if rates.shape[1] != self.n_units:
                raise self._err(
                    "true_rates/rates",
                    f"mismatched lengths: {rates.shape[1]} columns for {self.n_units} units",
                )
            sr = tr.attrs.get("sampling_rate")
            if sr is None or not np.isfinite(float(sr)) or float(sr) <= 0:
                raise self._err("true_rates", "missing or invalid 'sampling_rate' attribute (Hz)")
            r_start = self.start
            if "domain" in tr and isinstance(tr["domain"], h5py.Group) and "start" in tr["domain"]:
                r_start = float(np.asarray(tr["domain"]["start"][()]).min())
            self._rates = (rates, float(sr), r_start)
        self.trials = None
        tg = self._group("trials", required=False)
        if tg is not None:
            cols = {}
            for key, ds in tg.items():
                if isinstance(ds, h5py.Dataset):
                    cols[key] = _read_column(ds)
            for key in ("start", "end"):
                if key not in cols:
                    raise self._err(f"trials/{key}", f"missing dataset 'trials/{key}'")
            n = cols["start"].shape[0]
            for key, v in cols.items():
                if v.ndim == 0 or v.shape[0] != n:
                    raise self._err(
                        f"trials/{key}",
                        f"mismatched lengths: {v.shape[0] if v.ndim else 0} rows for {n} trials",
                    )
            self.trials = cols

        raw = f.attrs.get("provenance")
        if raw is None:
            self.provenance = {}
        else:
            if isinstance(raw, bytes):
                raw = raw.decode("utf-8", errors="replace")
            try:
                prov = json.loads(str(raw))
                self.provenance = prov if isinstance(prov, dict) else {"value": prov}
            except json.JSONDecodeError:
                self.provenance = {"raw": str(raw)}

    def _load_series(self, name: str, key: str):
        g = self._group(name, required=False)
        if g is None:
            return None
        ts = self._dataset(g, name, "timestamps", ndim=(1,), kinds="fiu")
        vals = self._dataset(g, name, key, ndim=(1, 2), kinds="fiu")
        if ts.shape[0] != vals.shape[0]:
            raise self._err(
                f"{name}/{key}", f"mismatched lengths: {ts.shape[0]} timestamps but {vals.shape[0]} rows"
            )
        index = _SortedIndex(ts)
        problem = index.coarse_ok()
        if problem:
            raise self._err(f"{name}/timestamps", problem)
        dim = 1 if vals.ndim == 1 else int(vals.shape[1])
        return index, vals, dim

    # ------------------------------------------------------------------ validation
    def _check_slice(self, lo: int, t: np.ndarray, u: np.ndarray, prev: float | None) -> None:
        if t.size == 0:
            return
        fin = np.isfinite(t)
        if not np.all(fin):
            bad = lo + int(np.flatnonzero(~fin)[0])
            raise self._err(
                "spikes/timestamps", f"timestamp #{bad} is {t[bad - lo]}; timestamps must be finite seconds"
            )
        if prev is not None and t[0] < prev:
            raise self._err(
                "spikes/timestamps",
                f"timestamps are not sorted (#{lo} = {t[0]:.6g} s comes after {prev:.6g} s); rewrite the file with sorted timestamps",
            )
        d = np.diff(t)
        if np.any(d < 0):
            k = int(np.flatnonzero(d < 0)[0]) + 1
            raise self._err(
                "spikes/timestamps",
                f"timestamps are not sorted (#{lo + k} = {t[k]:.6g} s comes after {t[k - 1]:.6g} s); "
                "rewrite the file with sorted timestamps",
            )
        umin, umax = int(u.min()), int(u.max())
        if umin < 0 or umax >= self.n_units:
            badv = umin if umin < 0 else umax
            bad = lo + int(np.flatnonzero(u == badv)[0])
            raise self._err(
                "spikes/unit_index",
                f"unit_index {badv} at spike #{bad} is outside [0, {self.n_units}) for {self.n_units} units",
            )

    def validate(self) -> None:
        """Full chunked pass over all spikes: finite, sorted, ``unit_index`` in range.

        Raises :class:`SessionFileError` naming the first bad spike.
        """
        self._require_open()
        n = self.n_spikes
        prev = None
        starts = range(0, n, _CHUNK)
        for lo in tqdm(
            starts, desc=f"validating {self.path.name}", unit="chunk", disable=len(starts) < 32, leave=False
        ):
            hi = min(n, lo + _CHUNK)
            t, u = self._read_spikes(lo, hi)
            self._check_slice(lo, t, u, prev)
            prev = float(t[-1])

    # ------------------------------------------------------------------ data access
    def _require_open(self) -> None:
        if self._file is None:
            raise InputError(f"session {self.path} is closed; open it again with open_session")

    def _read_spikes(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            t = np.asarray(self._ts[lo:hi], dtype=np.float64)
            u = np.asarray(self._ui[lo:hi], dtype=np.int64)
        except OSError as e:
            raise self._err(
                "spikes", f"spikes {lo}..{hi} cannot be read ({e}); the file may be corrupt"
            ) from None
        return t, u

    def spikes(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
        """Spikes in the half-open window ``[t0, t1)`` seconds.

        Returns ``(times (N,) float64 seconds, unit_index (N,) int64)``; reads only
        that part of the file and checks it (finite, sorted, indices in range).
        """
        self._require_open()
        a, b = _check_window(t0, t1, "spikes")
        try:
            lo = self._index.find(a)
            hi = max(lo, self._index.find(b))
        except OSError as e:
            raise self._err("spikes/timestamps", f"cannot be read ({e}); the file may be corrupt") from None
        t, u = self._read_spikes(lo, hi)
        self._check_slice(lo, t, u, None)
        if t.size and (t[0] < a or t[-1] >= b):
            raise self._err(
                "spikes/timestamps",
                f"timestamps near {a:.6g} s are not sorted; rewrite the file with sorted timestamps",
            )
        return t, u

    def _series(self, series, name: str, t0: float, t1: float):
        self._require_open()
        a, b = _check_window(t0, t1, name)
        if series is None:
            return None
        index, vals, dim = series
        try:
            lo = index.find(a)
            hi = max(lo, index.find(b))
            t = np.asarray(index.ds[lo:hi], dtype=np.float64)
            v = np.asarray(vals[lo:hi], dtype=np.float32).reshape(hi - lo, dim)
        except OSError as e:
            raise self._err(name, f"cannot be read ({e}); the file may be corrupt") from None
        if t.size and (not np.all(np.isfinite(t)) or np.any(np.diff(t) < 0)):
            raise self._err(
                f"{name}/timestamps",
                "timestamps are not finite and sorted; rewrite the file with sorted timestamps",
            )
        return t, v

    def behavior(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Behaviour samples in ``[t0, t1)``: ``(times (N,) s, values (N, D_b) float32)``, or None if absent."""
        return self._series(self._behavior, "behavior", t0, t1)

    def image_events(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Image presentations starting in ``[t0, t1)``: ``(times (N,) s, embeddings (N, D_img) float32)``, or None."""
        return self._series(self._images, "image_embeddings", t0, t1)

    @property
    def true_rate_bin_size(self) -> float | None:
        """Bin width (seconds) of ``true_rates``, or None when the file has none."""
        return None if self._rates is None else 1.0 / self._rates[1]

    def true_rates(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Ground-truth rates of the bins whose start time lies in ``[t0, t1)``.

        Returns ``(bin_start_times (T,) s, rates_hz (T, U) float32)``, or None when
        the file has no ``true_rates`` (real recordings).
        """
        self._require_open()
        a, b = _check_window(t0, t1, "true_rates")
        if self._rates is None:
            return None
        rates, sr, r0 = self._rates
        n = rates.shape[0]
        # bin k starts at r0 + k / sr; take k with a <= start_k < b (rounding guards float noise)
        k0 = int(np.clip(math.ceil(round((a - r0) * sr, 9)), 0, n))
        k1 = int(np.clip(math.ceil(round((b - r0) * sr, 9)), k0, n))
        starts = r0 + np.arange(k0, k1, dtype=np.float64) / sr
        try:
            values = np.asarray(rates[k0:k1], dtype=np.float32)
        except OSError as e:
            raise self._err("true_rates/rates", f"cannot be read ({e}); the file may be corrupt") from None
        return starts, values

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the file handle (idempotent)."""
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        # picklable (e.g. into data-loader workers): reopen by path on the other side
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"], full_check=False)

    def __repr__(self) -> str:
        return (
            f"Session({str(self.path)!r}, n_units={self.n_units}, n_spikes={self.n_spikes}, "
            f"domain=[{self.start:.3f}, {self.end:.3f}) s)"
        )


def open_session(path, *, full_check: bool | None = None) -> Session:
    """Open a session file lazily and check its structure.

    ``full_check``: None (default) runs the full spike validation at open for files
    with at most :data:`FULL_CHECK_MAX_SPIKES` spikes; True / False force it on / off.
    Raises :class:`SessionFileError` naming the file and the field.
    """
    return Session(path, full_check=full_check)


# --------------------------------------------------------------------------- writing


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
    import temporaldata as td

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
