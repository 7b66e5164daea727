"""Spike-train validation and binning shared by every module.

A spike train here is always two parallel 1-D arrays: ``times`` (float64
seconds) and ``unit_index`` (integer row into a unit table of ``n_units``).
Everything that accepts spikes from a user goes through :func:`check_spikes`
so that the same mistakes get the same messages everywhere.
"""

from __future__ import annotations

import hashlib

import numpy as np

from nh_serve.errors import InputError


def check_spikes(
    times,
    unit_index,
    *,
    n_units: int,
    name: str = "spikes",
    window: tuple[float, float] | None = None,
    allow_empty: bool = True,
    require_sorted: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a spike train and return it as ``(float64 times, int64 unit_index)``.

    Raises :class:`InputError` naming ``name`` for: non-numeric dtypes,
    mismatched lengths, non-finite or negative times, unsorted times (when
    ``require_sorted``), unit indices outside ``[0, n_units)``, spikes outside
    ``window`` (half-open ``[start, end)``), zero units, or an empty train when
    ``allow_empty`` is false.
    """
    if int(n_units) <= 0:
        raise InputError(f"{name}: there are zero units; pass at least one unit")
    t = np.asarray(times)
    u = np.asarray(unit_index)
    if t.ndim != 1 or u.ndim != 1:
        raise InputError(
            f"{name}: spike times and unit indices must be 1-D arrays, got shapes {t.shape} and {u.shape}"
        )
    if t.size and not (np.issubdtype(t.dtype, np.floating) or np.issubdtype(t.dtype, np.integer)):
        raise InputError(f"{name}: spike times must be numbers in seconds, got dtype {t.dtype}")
    if u.size and not np.issubdtype(u.dtype, np.integer):
        if np.issubdtype(u.dtype, np.floating) and np.all(np.isfinite(u)) and np.all(u == np.round(u)):
            u = u.astype(np.int64)
        else:
            raise InputError(f"{name}: unit indices must be integers, got dtype {u.dtype}")
    if t.shape[0] != u.shape[0]:
        raise InputError(
            f"{name}: {t.shape[0]} spike times but {u.shape[0]} unit indices; pass one unit per spike"
        )
    t = t.astype(np.float64, copy=False)
    u = u.astype(np.int64, copy=False)
    if t.size == 0:
        if not allow_empty:
            raise InputError(f"{name}: no spikes; pass at least one spike")
        return t, u
    if not np.all(np.isfinite(t)):
        bad = int(np.flatnonzero(~np.isfinite(t))[0])
        raise InputError(f"{name}: spike time #{bad} is {t[bad]}; all times must be finite seconds")
    if t[0] < 0 or np.any(t < 0):
        bad = int(np.flatnonzero(t < 0)[0])
        raise InputError(f"{name}: spike time #{bad} is negative ({t[bad]:.6g} s); times are seconds from the recording start")
    if require_sorted and t.size > 1:
        d = np.diff(t)
        if np.any(d < 0):
            bad = int(np.flatnonzero(d < 0)[0]) + 1
            raise InputError(
                f"{name}: spike times are not sorted (#{bad} = {t[bad]:.6g} s comes after {t[bad - 1]:.6g} s); sort them by time"
            )
    lo, hi = int(u.min()), int(u.max())
    if lo < 0 or hi >= n_units:
        raise InputError(f"{name}: unit index {lo if lo < 0 else hi} is outside [0, {n_units}) for {n_units} units")
    if window is not None:
        start, end = float(window[0]), float(window[1])
        if not end > start:
            raise InputError(f"{name}: window end {end} must be after its start {start}")
        tmin, tmax = float(t.min()), float(t.max())
        if tmin < start or tmax >= end:
            off = tmin if tmin < start else tmax
            raise InputError(
                f"{name}: spike at {off:.6g} s is outside the window [{start:.6g}, {end:.6g}) s; "
                "send only spikes inside the window"
            )
    return t, u


def bin_counts(
    times: np.ndarray,
    unit_index: np.ndarray,
    *,
    n_units: int,
    start: float,
    bin_size: float,
    n_bins: int,
) -> np.ndarray:
    """Count spikes per unit in ``n_bins`` bins of ``bin_size`` seconds from ``start``.

    Returns ``(n_units, n_bins)`` float32 counts. Spikes outside
    ``[start, start + n_bins * bin_size)`` are ignored. Bins are half-open.
    """
    t = np.asarray(times, dtype=np.float64)
    u = np.asarray(unit_index, dtype=np.int64)
    b = np.floor((t - start) / bin_size).astype(np.int64)
    keep = (b >= 0) & (b < n_bins)
    flat = u[keep] * n_bins + b[keep]
    counts = np.bincount(flat, minlength=n_units * n_bins)
    return counts.reshape(n_units, n_bins).astype(np.float32)


def units_to_index(unit_ids, known_ids, *, name: str = "unit_ids") -> np.ndarray:
    """Map each entry of ``unit_ids`` to its row in ``known_ids`` (ids compared as strings).

    Vectorised (a sort and a binary search), so mapping the spikes of a
    context window costs microseconds. Raises :class:`InputError` listing ids
    that are not in ``known_ids``.
    """
    known = np.asarray(known_ids).astype(str)
    ids = np.asarray(unit_ids)
    if ids.ndim != 1:
        raise InputError(f"{name}: must be a 1-D array of unit ids, got shape {ids.shape}")
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    ids = ids.astype(str)
    order = np.argsort(known, kind="stable")
    sorted_known = known[order]
    pos = np.searchsorted(sorted_known, ids)
    pos_c = np.minimum(pos, sorted_known.size - 1)
    found = sorted_known[pos_c] == ids
    if not np.all(found):
        missing = list(dict.fromkeys(ids[~found].tolist()))
        raise InputError(
            f"{name}: {int((~found).sum())} spike(s) belong to {len(missing)} unit id(s) not in the registered "
            f"reference (e.g. {', '.join(missing[:5])}); register those units or drop their spikes"
        )
    return order[pos_c].astype(np.int64)


def prefix_counts(units: np.ndarray, positions: np.ndarray, n_units: int, weights=None) -> np.ndarray:
    """Per-unit sums over spikes ``[0, p)`` for each position ``p``: ``(len(positions), n_units)``.

    ``units`` is the unit row of each spike (time order); counts are int64 (exact), or
    float sums of ``weights``. One ``bincount`` over (segment between consecutive
    positions, unit) and a cumulative sum over segments: O(N + Q U) for N spikes and
    Q positions. Counts in ``[p_a, p_b)`` are ``prefix(p_b) - prefix(p_a)``.
    """
    n = units.shape[0]
    pos, inv = np.unique(positions, return_inverse=True)  # (Q,) sorted
    seg = np.repeat(np.arange(pos.size + 1), np.diff(np.concatenate(([0], pos, [n]))))  # (N,) segment of spike
    table = np.bincount(seg * n_units + units, weights=weights, minlength=(pos.size + 1) * n_units)
    cum = np.cumsum(table.reshape(pos.size + 1, n_units), axis=0)[: pos.size]  # row q: spikes before pos[q]
    return cum[inv.reshape(-1)]


def spikes_fingerprint(times, units) -> str:
    """A content hash of a recording's spikes (16 hex characters of sha256 over the float64 times and
    int64 unit rows): the same spikes give the same fingerprint whatever the file is called, so a
    checkpoint can say which recordings it was trained on and a scorer can tell them apart."""
    h = hashlib.sha256(b"nh-serve/spikes/v1\n")
    h.update(np.ascontiguousarray(times, dtype="<f8").tobytes())
    h.update(np.ascontiguousarray(units, dtype="<i8").tobytes())
    return h.hexdigest()[:16]
