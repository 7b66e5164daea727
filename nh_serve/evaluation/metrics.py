"""Prediction metrics: the one implementation every part of nh-serve uses.

Conventions
-----------
* ``rates`` are **expected spike counts per bin** (rate in Hz times the bin size
  in seconds), never Hz. ``counts`` are the observed spike counts in the same bins.
* Arrays are shaped ``(windows, units, bins)``: one prediction window (one
  ``t_now``), every unit, every horizon bin. 2-D ``(units, bins)`` arrays are
  treated as one window. The unit axis is therefore ``-2`` by default;
  :func:`bits_per_spike` accepts ``unit_axis=-1`` for arrays laid out like
  the Neural Latents Benchmark's ``(trials, time, neurons)``.
* Zero rates are replaced by ``1e-9`` before taking logs (as nlb_tools does);
  negative or NaN rates, negative counts and shape mismatches raise
  :class:`~nh_serve.errors.InputError`. Inputs are never modified.
* NaN counts mark missing bins: :func:`bits_per_spike` and :func:`poisson_nll`
  mask them (the rate there may be NaN too), as nlb_tools does; the other
  functions reject them (drop those windows first).

Definitions
-----------
Poisson NLL per element: ``r - n log r (+ log n!)``.

Bits per spike (identical to ``nlb_tools.evaluation.bits_per_spike``): the null
model predicts each unit's mean count over all evaluated windows and bins;
``bps = (NLL_null - NLL_model) / total_spikes / ln 2``. NaN counts are masked
out of everything (NLL sums, null means and the spike total), as nlb_tools does.
Breakdowns (per unit, per horizon bin, per band) keep that same per-unit null
and divide the log-likelihood gain summed over the subset by the spikes in the
subset, so the pooled value is the spike-weighted mean of the breakdowns.
Where a subset holds no spikes, its bits/spike is defined as 0.0 (its
``n_spikes`` entry is 0, so callers can leave it out); this includes the pooled
value of data without any spike, where nlb_tools would return NaN or inf.

Pearson correlation between rates and counts, ``0.0`` when either side is
constant (zero variance). ``R^2 = 1 - SS_res / SS_tot`` of counts predicted by
rates, with ``SS_tot`` about the mean count of the subset; when the counts are
constant it is ``1.0`` for an exact prediction and ``0.0`` otherwise (the
``force_finite`` convention of scikit-learn). "Pooled" correlation and R^2
flatten every window, unit and bin together, so they include differences in
rate *between* units; the per-unit values (and their means
``corr_unit_mean`` / ``r2_unit_mean`` over units whose counts vary) measure
how well each unit's fluctuations are tracked.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln

from nh_serve.errors import InputError

ZERO_RATE = 1e-9  # replaces zero rates before logs (nlb_tools convention)
DEFAULT_BANDS_MS = ((0.0, 250.0), (250.0, 500.0), (500.0, 1000.0))
LN2 = math.log(2.0)
_REL_TOL = 1e-20  # a sum of squared deviations below this fraction of the sum of squares counts as zero


def _as_pair(rates, counts, *, allow_nan_counts: bool, min_ndim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return float64 copies-or-views (never written to)."""
    try:
        r = np.asarray(rates, dtype=np.float64)
        c = np.asarray(counts, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(
            "metrics: rates and counts must be numeric arrays of expected / observed counts per bin"
        ) from None
    if r.shape != c.shape:
        raise InputError(
            f"metrics: rates have shape {r.shape} but counts have shape {c.shape}; pass arrays of the same "
            "(windows, units, bins) shape"
        )
    if r.ndim < min_ndim:
        raise InputError(
            f"metrics: arrays must be at least {min_ndim}-D (units, bins) or (windows, units, bins), got {r.shape}"
        )
    if r.size == 0:
        raise InputError(
            f"metrics: arrays of shape {r.shape} are empty; pass at least one window, unit and bin"
        )
    nan_c = np.isnan(c)
    if nan_c.any() and not allow_nan_counts:
        raise InputError(
            "metrics: counts contain NaN; drop those windows (only bits_per_spike/poisson_nll mask NaN counts)"
        )
    if np.any(np.isinf(c)) or np.any(c[~nan_c] < 0):
        raise InputError("metrics: counts must be finite and non-negative spike counts per bin")
    bad_r = np.isnan(r) & ~nan_c
    if bad_r.any() or np.any(np.isinf(r)):
        raise InputError(
            "metrics: rates contain NaN or inf; predictions must be finite expected counts per bin"
        )
    if np.any(r[~np.isnan(r)] < 0):
        raise InputError(
            "metrics: rates contain negative values; predictions are expected counts per bin (>= 0)"
        )
    return r, c


def _move_units(a: np.ndarray, unit_axis: int) -> np.ndarray:
    """Return a view with the unit axis at -2 (the module convention)."""
    ax = unit_axis % a.ndim
    return np.moveaxis(a, ax, -2) if ax != a.ndim - 2 else a


def _nll_elements(r: np.ndarray, c: np.ndarray, include_const: bool) -> np.ndarray:
    """Elementwise Poisson NLL; NaN counts give 0 (masked). Works on copies."""
    mask = np.isnan(c)
    r = np.where(r == 0, ZERO_RATE, r)
    r = np.where(mask, 1.0, r)
    cc = np.where(mask, 0.0, c)
    out = r - cc * np.log(r)
    if include_const:
        out = out + gammaln(cc + 1.0)
    return np.where(mask, 0.0, out)


def poisson_nll(rates, counts, *, include_const: bool = False) -> float:
    """Mean Poisson negative log-likelihood per element, in nats.

    ``r - n log r`` averaged over all (non-NaN-count) elements; with
    ``include_const=True`` the ``log n!`` term is added, giving the exact
    Poisson NLL (the term does not depend on the prediction, so it does not
    change comparisons between models). Any shape; zero rates count as 1e-9.
    """
    r, c = _as_pair(rates, counts, allow_nan_counts=True, min_ndim=1)
    valid = int((~np.isnan(c)).sum())
    if valid == 0:
        raise InputError("metrics: every count is NaN; there is nothing to evaluate")
    return float(_nll_elements(r, c, include_const).sum() / valid)


def _gain(r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise log-likelihood gain over the per-unit mean-count null, nats.

    ``r``/``c`` have the unit axis at -2. Returns (gain, counts with NaN -> 0).
    """
    axes = tuple(i for i in range(c.ndim) if i != c.ndim - 2)
    mask = np.isnan(c)
    n_valid = (~mask).sum(axis=axes, keepdims=True)
    c0 = np.where(mask, 0.0, c)
    null = c0.sum(axis=axes, keepdims=True) / np.maximum(n_valid, 1)  # per-unit mean count
    null = np.broadcast_to(null, c.shape)
    gain = _nll_elements(null, c, False) - _nll_elements(r, c, False)
    return gain, c0


def bits_per_spike(rates, counts, *, unit_axis: int = -2) -> float:
    """Bits per spike exactly as ``nlb_tools.evaluation.bits_per_spike``.

    Args:
        rates: expected counts per bin, ``(windows, units, bins)`` or ``(units, bins)``.
        counts: observed counts, same shape; NaN entries are masked out.
        unit_axis: axis of the units; ``-1`` for nlb's ``(trials, time, neurons)`` layout.

    Returns the pooled value; ``0.0`` if the evaluated data hold no spikes
    (nlb_tools would return NaN/inf there).
    """
    r, c = _as_pair(rates, counts, allow_nan_counts=True)
    r, c = _move_units(r, unit_axis), _move_units(c, unit_axis)
    gain, c0 = _gain(r, c)
    total = float(c0.sum())
    return float(gain.sum() / total / LN2) if total > 0 else 0.0


def _bps_over(gain: np.ndarray, c0: np.ndarray, axes) -> np.ndarray:
    g = gain.sum(axis=axes)
    n = c0.sum(axis=axes)
    return np.where(n > 0, g / np.where(n > 0, n, 1.0) / LN2, 0.0)


def _pearson(x: np.ndarray, y: np.ndarray, axes) -> np.ndarray:
    xm = x - x.mean(axis=axes, keepdims=True)
    ym = y - y.mean(axis=axes, keepdims=True)
    sxy = (xm * ym).sum(axis=axes)
    sxx = (xm * xm).sum(axis=axes)
    syy = (ym * ym).sum(axis=axes)
    den = np.sqrt(sxx * syy)
    # Zero variance on either side (up to round-off of the mean) -> 0.
    const = (sxx <= _REL_TOL * (x * x).sum(axis=axes)) | (syy <= _REL_TOL * (y * y).sum(axis=axes))
    return np.where(const, 0.0, sxy / np.where(const, 1.0, den)).clip(-1.0, 1.0)


def _r2(pred: np.ndarray, true: np.ndarray, axes) -> np.ndarray:
    ss_res = ((true - pred) ** 2).sum(axis=axes)
    ss_tot = ((true - true.mean(axis=axes, keepdims=True)) ** 2).sum(axis=axes)
    scale = _REL_TOL * (true * true).sum(axis=axes)
    ok = ss_tot > scale
    return np.where(ok, 1.0 - ss_res / np.where(ok, ss_tot, 1.0), np.where(ss_res <= scale, 1.0, 0.0))


def rate_correlation(rates, counts) -> float:
    """Pooled Pearson correlation between predicted rates and counts over all elements (0.0 if either is constant)."""
    r, c = _as_pair(rates, counts, allow_nan_counts=False, min_ndim=1)
    return float(_pearson(r.ravel(), c.ravel(), 0))


def r2(rates, counts) -> float:
    """Pooled R^2 of counts predicted by rates over all elements (finite for constant counts, see module doc)."""
    r, c = _as_pair(rates, counts, allow_nan_counts=False, min_ndim=1)
    return float(_r2(r.ravel(), c.ravel(), 0))


def _as3(rates, counts) -> tuple[np.ndarray, np.ndarray]:
    r, c = _as_pair(rates, counts, allow_nan_counts=False)
    if r.ndim == 2:
        r, c = r[None], c[None]
    if r.ndim != 3:
        raise InputError(
            f"metrics: arrays must be (units, bins) or (windows, units, bins), got shape {r.shape}"
        )
    return r, c


def _breakdown(r: np.ndarray, c: np.ndarray, gain: np.ndarray, axes) -> dict[str, np.ndarray]:
    """Metrics reduced over ``axes`` of (W, U, B) arrays."""
    n_el = np.prod([r.shape[a] for a in axes])
    nll = _nll_elements(r, c, False).sum(axis=axes) / n_el
    return {
        "bits_per_spike": _bps_over(gain, c, axes),
        "correlation": _pearson(r, c, axes),
        "r2": _r2(r, c, axes),
        "nll": nll,
        "n_spikes": c.sum(axis=axes),
        "mean_rate": r.mean(axis=axes),
        "mean_count": c.mean(axis=axes),
    }


def per_unit(rates, counts) -> dict[str, np.ndarray]:
    """Metrics of every unit over all windows and bins.

    Returns a dict of ``(units,)`` float64 arrays: ``bits_per_spike`` (against
    the pooled per-unit null, 0.0 for units without spikes), ``correlation``,
    ``r2``, ``nll`` (mean per element, no ``log n!``), ``n_spikes``,
    ``mean_rate`` and ``mean_count`` (expected / observed counts per bin).
    """
    r, c = _as3(rates, counts)
    gain, c0 = _gain(r, c)
    return _breakdown(r, c0, gain, (0, 2))


def per_bin(rates, counts) -> dict[str, np.ndarray]:
    """Metrics of every horizon bin over all windows and units: dict of ``(bins,)`` arrays (keys as :func:`per_unit`)."""
    r, c = _as3(rates, counts)
    gain, c0 = _gain(r, c)
    return _breakdown(r, c0, gain, (0, 1))


def _band_bins(n_bins: int, bin_size: float, bands_ms) -> list[tuple[str, np.ndarray]]:
    try:
        bs = float(bin_size)
    except (TypeError, ValueError):
        raise InputError(f"metrics: bin_size must be a number of seconds, got {bin_size!r}") from None
    if not (math.isfinite(bs) and bs > 0):
        raise InputError(f"metrics: bin_size must be a positive number of seconds, got {bin_size!r}")
    centres_ms = (np.arange(n_bins) + 0.5) * bs * 1e3
    out = []
    for band in bands_ms:
        try:
            lo, hi = (float(x) for x in band)
        except (TypeError, ValueError):
            raise InputError(f"metrics: each band must be a (start_ms, end_ms) pair, got {band!r}") from None
        if not hi > lo:
            raise InputError(f"metrics: band ({lo:g}, {hi:g}) ms must end after it starts")
        out.append((f"{lo:g}-{hi:g}ms", np.flatnonzero((centres_ms >= lo) & (centres_ms < hi))))
    return out


def per_band(rates, counts, *, bin_size: float, bands_ms=DEFAULT_BANDS_MS) -> dict[str, dict[str, float]]:
    """Pooled metrics over horizon bands.

    A bin ``k`` (covering ``[k, k+1) * bin_size`` seconds after the prediction
    time) belongs to band ``(lo_ms, hi_ms)`` when its centre
    ``(k + 0.5) * bin_size`` lies in ``[lo_ms, hi_ms)``. With 20 ms bins the
    default bands hold bins 0-11, 12-24 and 25-49. Returns
    ``{"0-250ms": {"bits_per_spike", "correlation", "r2", "nll", "n_spikes", "n_bins"}, ...}``
    (floats); bits/spike uses the per-unit null of all bins; an empty band has
    all metrics 0.0.
    """
    r, c = _as3(rates, counts)
    gain, c0 = _gain(r, c)
    out = {}
    for name, idx in _band_bins(r.shape[2], bin_size, bands_ms):
        if idx.size == 0:
            out[name] = {
                "bits_per_spike": 0.0,
                "correlation": 0.0,
                "r2": 0.0,
                "nll": 0.0,
                "n_spikes": 0.0,
                "n_bins": 0,
            }
            continue
        rb, cb, gb = r[..., idx].ravel(), c0[..., idx].ravel(), gain[..., idx].ravel()
        m = _breakdown(rb, cb, gb, (0,))
        out[name] = {k: float(m[k]) for k in ("bits_per_spike", "correlation", "r2", "nll", "n_spikes")}
        out[name]["n_bins"] = int(idx.size)
    return out


def evaluate(rates, counts, *, bin_size: float, bands_ms=DEFAULT_BANDS_MS) -> dict:
    """All metrics of a set of predictions.

    Args:
        rates: ``(windows, units, bins)`` (or ``(units, bins)``) expected counts per bin.
        counts: observed spike counts, same shape.
        bin_size: bin width in seconds (for the bands).
        bands_ms: horizon bands in milliseconds after the prediction time.

    Returns a dict with pooled floats ``bits_per_spike``, ``correlation``,
    ``r2``, ``nll`` (mean per element, no ``log n!``), ``n_spikes``,
    ``corr_unit_mean`` and ``r2_unit_mean`` (means over units whose counts are
    not constant; 0.0 if none), plus ``per_unit`` (dict of ``(units,)``
    arrays), ``per_bin`` (dict of ``(bins,)`` arrays) and ``per_band`` (dict of
    dicts), see :func:`per_unit`, :func:`per_bin`, :func:`per_band`.
    """
    r, c = _as3(rates, counts)
    gain, c0 = _gain(r, c)
    pu = _breakdown(r, c0, gain, (0, 2))
    pb = _breakdown(r, c0, gain, (0, 1))
    varying = c0.max(axis=(0, 2)) != c0.min(axis=(0, 2))  # (U,)
    total = float(c0.sum())
    return {
        "bits_per_spike": float(gain.sum() / total / LN2) if total > 0 else 0.0,
        "correlation": float(_pearson(r.ravel(), c0.ravel(), 0)),
        "r2": float(_r2(r.ravel(), c0.ravel(), 0)),
        "nll": float(_nll_elements(r, c0, False).mean()),
        "n_spikes": total,
        "corr_unit_mean": float(pu["correlation"][varying].mean()) if varying.any() else 0.0,
        "r2_unit_mean": float(pu["r2"][varying].mean()) if varying.any() else 0.0,
        "per_unit": pu,
        "per_bin": pb,
        "per_band": per_band(r, c0, bin_size=bin_size, bands_ms=bands_ms),
    }


# ================================================================================================
# Paired uncertainty: is predictor A better than predictor B on these windows?
# ================================================================================================

BOOT_BLOCK = 10  # consecutive windows resampled together (neighbouring windows are correlated)
BOOT_RESAMPLES = 1000
BOOT_SEED = 0


def window_nll(rates, counts) -> np.ndarray:
    """``(W,)`` Poisson NLL (without ``log n!``) of each window, summed over units and bins.

    ``rates`` / ``counts`` ``(W, U, T)``; zero rates count as :data:`ZERO_RATE`. The
    difference of two predictors' sums over the same windows, divided by the spikes and
    ``ln 2``, is their difference in bits/spike (the null model cancels).
    """
    r, c = _as_pair(rates, counts, allow_nan_counts=False, min_ndim=3)
    return _nll_elements(r, c, False).sum(axis=tuple(range(1, r.ndim)))


def paired_bps_interval(
    nll_a,
    nll_b,
    spikes,
    *,
    block: int = BOOT_BLOCK,
    n_boot: int = BOOT_RESAMPLES,
    seed: int = BOOT_SEED,
    level: float = 0.95,
) -> dict[str, float]:
    """Bits/spike of A minus B, with a block-bootstrap interval over windows.

    ``nll_a``, ``nll_b``: per-window NLL sums of two predictors on the same windows
    (:func:`window_nll`); ``spikes``: the spikes of each window. Pass lists of such arrays
    (one per recording) to get the mean over recordings of the per-recording differences,
    each recording resampled on its own. The difference is
    ``sum(nll_b - nll_a) / sum(spikes) / ln 2``; each of ``n_boot`` resamples draws blocks
    of ``block`` consecutive windows with replacement (circular blocks, which wrap around the
    last window, so that every window is drawn equally often; as many windows as there are),
    with a fixed ``seed``, and the interval is the central ``level`` quantile range.

    Returns ``{"diff", "lo", "hi", "n_windows"}``; a claim that A beats B needs ``lo > 0``.
    """
    recs_a = nll_a if isinstance(nll_a, (list, tuple)) else [nll_a]
    recs_b = nll_b if isinstance(nll_b, (list, tuple)) else [nll_b]
    recs_s = spikes if isinstance(spikes, (list, tuple)) else [spikes]
    if not (len(recs_a) == len(recs_b) == len(recs_s)) or not recs_a:
        raise InputError("paired interval: pass the same number (>= 1) of per-window arrays for A, B and the spikes")
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    diffs, boots, n_win = [], [], 0
    for a, b, s in zip(recs_a, recs_b, recs_s):
        d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)  # (W,) gain of A over B, nats
        s = np.asarray(s, dtype=np.float64)
        if d.shape != s.shape or d.ndim != 1 or d.size == 0:
            raise InputError("paired interval: per-window arrays must be 1-D, non-empty and of one length")
        W = d.size
        n_win += W
        total = max(s.sum(), 1.0)
        diffs.append(d.sum() / total / LN2)
        k = max(1, min(int(block), W))
        n_blocks = int(np.ceil(W / k))
        # circular blocks (they wrap around the end), so every window is drawn equally often
        pick = rng.integers(0, W, size=(int(n_boot), n_blocks))  # (n_boot, n_blocks) block starts
        idx = ((pick[:, :, None] + np.arange(k)) % W).reshape(int(n_boot), -1)[:, :W]  # (n_boot, W)
        boots.append(d[idx].sum(1) / np.maximum(s[idx].sum(1), 1.0) / LN2)
    boot = np.mean(boots, axis=0)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return {"diff": float(np.mean(diffs)), "lo": float(lo), "hi": float(hi), "n_windows": int(n_win)}
