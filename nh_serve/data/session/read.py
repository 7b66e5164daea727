"""Reading session files (the layout: :mod:`nh_serve.data.session`).

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

import json
import math
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from nh_serve.data.session.hdf5 import SortedIndex, check_window, decode_strings, read_column
from nh_serve.errors import InputError, SessionFileError

__all__ = ["FULL_CHECK_MAX_SPIKES", "Session", "open_session"]

#: Files with at most this many spikes get the full :meth:`Session.validate` pass at open.
FULL_CHECK_MAX_SPIKES = 2_000_000
#: Spikes read per chunk by the full validation pass.
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- Session


def _refuse_other_files(f: h5py.File, path: Path) -> None:
    """Raise SessionFileError if the file reaches into other files: an external link, a dataset whose
    bytes live in external files, or a virtual dataset. The walk visits links without following them."""
    problems: list[tuple[str, str]] = []

    def visit(name: str) -> None:
        link = f.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            problems.append((name, f"is an HDF5 external link to {link.filename!r}"))
        elif isinstance(link, h5py.HardLink):
            obj = f.get(name)
            if isinstance(obj, h5py.Dataset) and (obj.external or obj.is_virtual):
                problems.append((name, "is a dataset whose data lies in other files (external or virtual)"))

    f.visit_links(visit)
    if problems:
        name, problem = problems[0]
        raise SessionFileError(
            path,
            name,
            f"{problem}; session files are read only from themselves (links to other files are not "
            "followed): rewrite the file with write_session, or copy the data in (h5repack, h5copy)",
        )



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
                _refuse_other_files(self._file, p)
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
        self.unit_ids = decode_strings(np.asarray(ids_ds[()]))
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
            table[key] = read_column(ds)
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
        self._index = SortedIndex(self._ts)
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
                    cols[key] = read_column(ds)
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
        index = SortedIndex(ts)
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
        a, b = check_window(t0, t1, "spikes")
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
        a, b = check_window(t0, t1, name)
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
        a, b = check_window(t0, t1, "true_rates")
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
