"""The 33 per-unit reference features that the IDEncoder turns into unit embeddings.

Every feature is computed from the spikes of one unit inside a reference window
``[start, end)`` of the same recording (callers default to the first
:data:`DEFAULT_REFERENCE_S` = 60 s; the window must be at least
:data:`MIN_REFERENCE_S` = 10 s long). ``T = end - start`` is the window length in
seconds, ``n`` a unit's spike count in the window. ISIs are the differences
between consecutive spikes of the same unit that both lie in the window.

Feature vector layout, ``(n_units, 33)`` float32, names in :data:`FEATURE_NAMES`:

``[0]`` ``log1p_rate_hz``
    ``log(1 + n / T)``: the mean firing rate in Hz, log1p-transformed so that
    rates from 0.01 Hz to 100 Hz span a range a network can use (0 Hz -> 0).
``[1]`` ``isi_cv``
    Coefficient of variation of the ISIs: ``std(ISI) / mean(ISI)`` (population
    std, ``ddof=0``). 0 for a perfectly regular train, about 1 for a Poisson
    train, above 1 for bursty trains.
``[2:22]`` ``isi_hist_*``
    Histogram of the ISIs over 20 log-spaced bins with edges
    ``geomspace(1 ms, 10 s, 21)`` (5 bins per decade, each bin's upper edge is
    ``10**0.2 = 1.585`` times its lower edge; bins are half-open ``[lo, hi)``).
    ISIs below 1 ms are counted in the first bin, ISIs of 10 s or more in the
    last one. Normalised to sum to 1 (a probability over the 20 bins).
``[22:32]`` ``acorr_*``
    Normalised spike autocorrelogram at 10 log-spaced lag bins with edges
    ``geomspace(1 ms, 100 ms, 11)`` (1, 1.58, 2.51, 3.98, 6.31, 10, 15.8, 25.1,
    39.8, 63.1, 100 ms): lag bin ``j`` counts the ordered pairs of spikes of the
    unit (earlier spike first) whose time difference lies in ``[lo_j, hi_j)``:
    ``c_j``. Under a homogeneous Poisson process with ``n`` spikes in the
    window the expected count is
    ``E_j = n (n - 1) / T * w_j * (1 - m_j / T)`` (``w_j`` the lag-bin width,
    ``m_j`` its midpoint; the last factor corrects for the window edge). The
    feature is ``log((c_j + 1) / (E_j + 1))``: 0 for Poisson firing, negative
    where the unit is refractory or rhythmically silent, positive for bursts
    (short lags) and oscillations (lag at the period: 10-100 ms covers gamma
    and beta rhythms). The +1 pseudo-pair keeps the log finite and shrinks
    low-count bins toward 0.
``[32]`` ``fano_1s``
    Fano factor of the spike counts in consecutive 1 s windows starting at
    ``start`` (``floor(T / 1 s)`` full windows, the incomplete tail is dropped):
    ``var(counts, ddof=1) / mean(counts)``. About 1 for Poisson firing, near 0
    for clock-like firing, above 1 when the rate drifts over seconds.

Near-silent units: a unit with fewer than :data:`MIN_SPIKES` = 3 spikes in the
window (0, 1 or 2 spikes) has no usable ISI statistics. It gets its exact
``log1p_rate_hz`` and the values of an uninformative Poisson unit for the
rest: ``isi_cv = 1``, all 20 ``isi_hist_*`` = 0, all 10 ``acorr_*`` = 0,
``fano_1s = 1`` (see :data:`SILENT_DEFAULTS`). Output is always finite.

Everything is vectorised over units: spikes are stably sorted by unit once,
ISIs come from one ``np.diff``, histograms and sums from ``np.bincount`` on
flattened ``unit * n_bins + bin`` indices, and the autocorrelogram from a loop
over the ``k``-th next spike (a few iterations: it stops once no unit has
``k`` spikes within 100 ms of a spike), never over units. The Fano factor counts only the
(unit, 1 s window) pairs that hold a spike, so a long window costs no units x seconds array.

:class:`FeatureNorm` z-scores features with statistics of training sessions and
travels inside checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nh_serve.data.spikes import check_spikes
from nh_serve.errors import InputError

MIN_REFERENCE_S = 10.0  # shortest reference window accepted, seconds
DEFAULT_REFERENCE_S = 60.0  # reference window length callers use by default, seconds
MIN_SPIKES = 3  # units with fewer spikes in the window get SILENT_DEFAULTS for the shape features

N_FEATURES = 33
ISI_EDGES_S = np.geomspace(1e-3, 10.0, 21)  # (21,) seconds, log-ISI histogram edges
ACORR_EDGES_S = np.geomspace(1e-3, 0.1, 11)  # (11,) seconds, autocorrelogram lag-bin edges
FANO_WINDOW_S = 1.0  # counting window of the Fano factor, seconds
STD_FLOOR = 1e-2  # FeatureNorm never divides by a std below this

SL_RATE = slice(0, 1)
SL_CV = slice(1, 2)
SL_ISI_HIST = slice(2, 22)
SL_ACORR = slice(22, 32)
SL_FANO = slice(32, 33)


def _fmt(x: float) -> str:
    return f"{x * 1e3:.3g}ms" if x < 1.0 else f"{x:.3g}s"


FEATURE_NAMES: list[str] = (
    ["log1p_rate_hz", "isi_cv"]
    + [f"isi_hist_{_fmt(lo)}-{_fmt(hi)}" for lo, hi in zip(ISI_EDGES_S[:-1], ISI_EDGES_S[1:])]
    + [f"acorr_{_fmt(lo)}-{_fmt(hi)}" for lo, hi in zip(ACORR_EDGES_S[:-1], ACORR_EDGES_S[1:])]
    + ["fano_1s"]
)
assert len(FEATURE_NAMES) == N_FEATURES

# Values of the shape features (everything but the rate) for units with < MIN_SPIKES spikes.
SILENT_DEFAULTS = np.zeros(N_FEATURES, dtype=np.float32)
SILENT_DEFAULTS[SL_CV] = 1.0
SILENT_DEFAULTS[SL_FANO] = 1.0
SILENT_DEFAULTS.flags.writeable = False


def _check_window(start, end) -> tuple[float, float]:
    try:
        s, e = float(start), float(end)
    except (TypeError, ValueError):
        raise InputError(
            f"reference window start/end must be numbers in seconds, got {start!r}, {end!r}"
        ) from None
    if not (math.isfinite(s) and math.isfinite(e)):
        raise InputError(f"reference window [{s}, {e}) must have finite start and end in seconds")
    if e - s < MIN_REFERENCE_S:
        raise InputError(
            f"reference window [{s:.6g}, {e:.6g}) s is {e - s:.3g} s long; it must be at least "
            f"{MIN_REFERENCE_S:g} s (default {DEFAULT_REFERENCE_S:g} s): pass a longer window"
        )
    return s, e


def auto_reference_s(duration_s: float, reference_s: float = DEFAULT_REFERENCE_S) -> float:
    """Reference-window length (s): ``reference_s``, or a quarter of a short recording, at least 10 s."""
    return float(min(reference_s, max(MIN_REFERENCE_S, duration_s / 4.0)))


def reference_rate_hz(times, unit_index, *, n_units: int, start: float, end: float) -> np.ndarray:
    """Mean firing rate of every unit over the reference window ``[start, end)``.

    ``times`` (seconds) and ``unit_index`` must lie inside the window (validated
    like :func:`reference_features`). Returns ``(n_units,)`` float64 Hz.
    """
    s, e = _check_window(start, end)
    _, u = check_spikes(times, unit_index, n_units=n_units, name="reference spikes", window=(s, e))
    return np.bincount(u, minlength=int(n_units)).astype(np.float64) / (e - s)


def reference_features(times, unit_index, *, n_units: int, start: float, end: float) -> np.ndarray:
    """Compute the 33 reference features of every unit (definitions in the module docstring).

    Args:
        times: (N,) spike times in seconds, sorted, all inside ``[start, end)``.
        unit_index: (N,) integer unit of each spike, in ``[0, n_units)``.
        n_units: number of units (rows of the result; units without spikes are silent).
        start, end: the reference window in seconds; ``end - start >= MIN_REFERENCE_S``.

    Returns:
        (n_units, 33) float32 features, always finite.

    Raises:
        InputError: window shorter than 10 s, or spikes that fail
            :func:`nh_serve.data.spikes.check_spikes` (unsorted, outside the window, ...).
    """
    s, e = _check_window(start, end)
    n_units = int(n_units)
    t, u = check_spikes(times, unit_index, n_units=n_units, name="reference spikes", window=(s, e))
    T = e - s
    out = np.empty((n_units, N_FEATURES), dtype=np.float64)

    n = np.bincount(u, minlength=n_units).astype(np.float64)  # (U,) spikes per unit
    out[:, 0] = np.log1p(n / T)

    # Sort by unit, keeping time order inside each unit (times are sorted already).
    # 16-bit keys let numpy use its O(N) radix sort.
    key = u.astype(np.int16) if n_units <= np.iinfo(np.int16).max else u
    order = np.argsort(key, kind="stable")
    ts, us = t[order], u[order]  # (N,)
    d1 = ts[1:] - ts[:-1]  # (N-1,) seconds
    same = us[1:] == us[:-1]  # (N-1,) consecutive spikes of one unit
    isi = d1[same]  # (N_isi,) seconds
    isi_u = us[1:][same]  # (N_isi,)

    # ISI coefficient of variation (two-pass for accuracy on near-regular trains).
    n_isi = np.bincount(isi_u, minlength=n_units).astype(np.float64)
    safe_n_isi = np.maximum(n_isi, 1.0)
    mean_isi = np.bincount(isi_u, weights=isi, minlength=n_units) / safe_n_isi
    var_isi = np.bincount(isi_u, weights=(isi - mean_isi[isi_u]) ** 2, minlength=n_units) / safe_n_isi
    out[:, 1] = np.sqrt(var_isi) / np.where(mean_isi > 0, mean_isi, 1.0)

    # Log-ISI histogram, normalised per unit.
    nb = ISI_EDGES_S.size - 1
    b = np.clip(np.searchsorted(ISI_EDGES_S, isi, side="right") - 1, 0, nb - 1)
    hist = np.bincount(isi_u * nb + b, minlength=n_units * nb).reshape(n_units, nb)
    out[:, SL_ISI_HIST] = hist / safe_n_isi[:, None]

    # Autocorrelogram: pairs (i, i+k) of the same unit closer than the largest lag,
    # k = 1, 2, ... until no such pair is left.
    nl = ACORR_EDGES_S.size - 1
    max_lag = ACORR_EDGES_S[-1]
    pair_counts = np.zeros(n_units * nl, dtype=np.float64)
    idx = np.flatnonzero(same & (d1 < max_lag))  # first spikes of the k = 1 pairs
    d = d1[idx]
    k = 1
    while idx.size:
        lag_bin = np.searchsorted(ACORR_EDGES_S, d, side="right") - 1  # -1 below 1 ms
        ok = lag_bin >= 0
        pair_counts += np.bincount(us[idx[ok]] * nl + lag_bin[ok], minlength=n_units * nl)
        k += 1
        idx = idx[idx + k < ts.size]
        j = idx + k
        d = ts[j] - ts[idx]
        alive = (us[j] == us[idx]) & (d < max_lag)
        idx, d = idx[alive], d[alive]
    widths = np.diff(ACORR_EDGES_S)  # (10,)
    mids = 0.5 * (ACORR_EDGES_S[1:] + ACORR_EDGES_S[:-1])
    expected = (n * (n - 1.0) / T)[:, None] * (widths * (1.0 - mids / T))[None, :]  # (U, 10)
    out[:, SL_ACORR] = np.log((pair_counts.reshape(n_units, nl) + 1.0) / (expected + 1.0))

    # Fano factor of counts in 1 s windows.
    out[:, 32] = _fano(ts, us, n_units=n_units, start=s, n_win=int(math.floor(T / FANO_WINDOW_S + 1e-9)))

    few = n < MIN_SPIKES
    out[few, 1:] = SILENT_DEFAULTS[1:]
    return out.astype(np.float32)


def _fano(ts: np.ndarray, us: np.ndarray, *, n_units: int, start: float, n_win: int) -> np.ndarray:
    """``var(counts, ddof=1) / mean(counts)`` per unit over ``n_win`` windows of FANO_WINDOW_S from ``start``.

    ``ts`` / ``us``: spikes sorted by unit, in time order inside each unit. Only the (unit, window)
    pairs that hold a spike are counted: O(N) time and memory whatever the window length (a dense
    units x windows array of a 1e7 s window would take gigabytes). The sum of squared deviations
    is the dense two-pass one: occupied windows contribute ``(c - mean)^2``, each empty window ``mean^2``.
    Returns ``(n_units,)`` float64; 1 for units with no spike in the full windows.
    """
    kf = np.floor((ts - start) / FANO_WINDOW_S)  # (N,) window of each spike, float: no int overflow
    keep = kf < n_win  # the incomplete tail window is dropped
    kf, uk = kf[keep], us[keep]
    if kf.size == 0:
        return np.ones(n_units, dtype=np.float64)
    run_start = np.flatnonzero(np.concatenate(([True], (uk[1:] != uk[:-1]) | (kf[1:] != kf[:-1]))))
    c = np.diff(np.append(run_start, kf.size)).astype(np.float64)  # (R,) spikes in each occupied window
    run_u = uk[run_start]  # (R,) its unit
    mean = np.bincount(run_u, weights=c, minlength=n_units) / n_win  # (U,)
    occupied = np.bincount(run_u, minlength=n_units).astype(np.float64)  # (U,)
    ss = np.bincount(run_u, weights=(c - mean[run_u]) ** 2, minlength=n_units) + (n_win - occupied) * mean**2
    var = ss / (n_win - 1) if n_win > 1 else np.full(n_units, np.nan)
    return np.where(mean > 0, var / np.where(mean > 0, mean, 1.0), 1.0)


@dataclass(eq=False)
class FeatureNorm:
    """Z-scoring of per-unit descriptors: ``(x - mean) / std`` per feature.

    ``mean`` and ``std`` are ``(F,)`` float64 arrays (F = 33 reference statistics, or
    more when the model also describes units by their population coupling,
    :mod:`nh_serve.data.coupling`); ``std`` is at least :data:`STD_FLOOR` after
    :meth:`fit`. Serialises to plain JSON lists.
    """

    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,)

    def __post_init__(self):
        self.mean = _check_vec(self.mean, "mean")
        self.std = _check_vec(self.std, "std", self.mean.shape[0])
        if np.any(self.std <= 0):
            raise InputError("feature norm: every std must be > 0; refit the norm with FeatureNorm.fit")

    @property
    def width(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, features_list, *, width: int = N_FEATURES) -> FeatureNorm:
        """Fit mean/std over all units of all training sessions.

        ``features_list``: a list of (n_units_i, width) arrays (one per session).
        The std of each feature is floored at :data:`STD_FLOOR`.
        """
        if isinstance(features_list, np.ndarray):
            features_list = [features_list]
        arrays = []
        for i, f in enumerate(features_list):
            a = np.asarray(f, dtype=np.float64)
            if a.ndim != 2 or a.shape[1] != width:
                raise InputError(
                    f"feature norm: features #{i} has shape {a.shape}; each must be (n_units, {width}) "
                    "from reference_features"
                )
            if not np.all(np.isfinite(a)):
                raise InputError(
                    f"feature norm: features #{i} contains NaN or inf; recompute with reference_features"
                )
            arrays.append(a)
        allf = np.concatenate(arrays, axis=0) if arrays else np.empty((0, width))
        if allf.shape[0] == 0:
            raise InputError(
                f"feature norm: no units to fit on; pass at least one (n_units, {width}) array with units"
            )
        return cls(mean=allf.mean(axis=0), std=np.maximum(allf.std(axis=0), STD_FLOOR))

    @classmethod
    def identity(cls, width: int = N_FEATURES) -> FeatureNorm:
        """A norm that leaves features unchanged (mean 0, std 1)."""
        return cls(mean=np.zeros(width), std=np.ones(width))

    def apply(self, x) -> np.ndarray:
        """Z-score features ``x`` of shape (..., F); returns float32 of the same shape."""
        a = np.asarray(x, dtype=np.float64)
        if a.ndim < 1 or a.shape[-1] != self.width:
            raise InputError(
                f"feature norm: features have shape {a.shape}; the last axis must be {self.width}"
            )
        return ((a - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict:
        """``{"mean": [F floats], "std": [F floats]}`` (JSON-serialisable)."""
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, d) -> FeatureNorm:
        """Inverse of :meth:`to_dict`; raises InputError on missing keys, wrong lengths or non-finite values."""
        if not isinstance(d, dict) or "mean" not in d or "std" not in d:
            raise InputError(
                "feature norm: expected a dict with 'mean' and 'std' lists (from FeatureNorm.to_dict)"
            )
        return cls(mean=d["mean"], std=d["std"])


def _check_vec(v, name: str, width: int | None = None) -> np.ndarray:
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"feature norm: {name} must be a list of numbers, one per feature") from None
    if a.ndim != 1 or a.shape[0] < N_FEATURES or (width is not None and a.shape[0] != width):
        want = width if width is not None else f"at least {N_FEATURES}"
        raise InputError(
            f"feature norm: {name} has shape {a.shape}; it must hold exactly {want} numbers"
        )
    if not np.all(np.isfinite(a)):
        raise InputError(f"feature norm: {name} contains NaN or inf; refit the norm with FeatureNorm.fit")
    return a
