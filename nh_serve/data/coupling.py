"""How each unit moves with the rest of its recording: population-coupling descriptors.

The 33 reference statistics (:mod:`nh_serve.data.features`) say how a unit fires on its
own; these say how it loads on what the population does, which is what binds a unit of
a recording the model never saw to the population state. From the reference window
(prediction-free: only its own spikes):

1. Every unit's smoothed rate (:func:`nh_serve.data.history.ema_rates`, started at its
   reference rate) at 0.25, 1 and 5 s, every 0.1 s (at most :data:`MAX_POSITIONS`
   times, evenly spread), as ``z = log(r + 0.1 Hz)`` standardised per unit over time
   (standard deviation floored at 0.05).
2. **Loadings**: the top ``k`` principal components (right singular vectors) of the
   1 s ``z`` (times x units), times ``sqrt(U)`` so that they are O(1) whatever the
   number of units; each component's sign makes its mean loading >= 0 (the first one
   is then usually "the whole population fires more"). Recordings with fewer units or
   times than ``k + 1`` get zeros for the missing components.
3. **Correlations** of each unit's ``z`` with the mean of the other units' ``z`` at each
   of the three time scales.

:func:`unit_descriptors` returns ``[33 statistics, k loadings, 3 correlations]`` per unit
(just the statistics for ``k = 0``), the vector a model's IDEncoder reads.
"""

from __future__ import annotations

import numpy as np

from nh_serve.data.features import N_FEATURES, reference_features
from nh_serve.data.history import LOG_FLOOR_HZ, ema_rates

N_STATS = N_FEATURES  # the 33 reference statistics
CORR_TAUS = (0.25, 1.0, 5.0)
N_COUPLINGS = len(CORR_TAUS)
STEP_S = 0.1
MAX_POSITIONS = 1200
SD_FLOOR = 0.05


def coupling_features(times, units, *, n_units: int, start: float, end: float, ref_rate_hz, components: int) -> np.ndarray:
    """``(U, components + 3)`` float64: loadings on the reference window's top principal
    components and correlations with the rest of the population (see the module docstring)."""
    U, k = int(n_units), int(components)
    out = np.zeros((U, k + N_COUPLINGS))
    lo, hi = float(start) + 1.0, float(end)
    n = int(min(np.floor((hi - lo) / STEP_S), MAX_POSITIONS)) if hi > lo else 0  # never a huge array
    pos = lo + (hi - lo) * np.arange(n) / max(n, 1) if (hi - lo) / STEP_S > MAX_POSITIONS else lo + STEP_S * np.arange(n)
    if pos.size < 10 or U < 2:
        return out
    R = ema_rates(times, units, n_units=U, t_eval=pos, start=float(start), ref_rate_hz=ref_rate_hz, taus=CORR_TAUS)
    Z = np.log(R + LOG_FLOOR_HZ)  # (P, U, 3)
    Z = (Z - Z.mean(0)) / np.maximum(Z.std(0), SD_FLOOR)
    if k:
        _, _, vt = np.linalg.svd(Z[:, :, CORR_TAUS.index(1.0)], full_matrices=False)  # (min(P, U), U)
        n = min(k, vt.shape[0] - 1)
        load = vt[:n].T * np.sqrt(U)  # (U, n)
        sign = np.where(load.mean(0) < 0, -1.0, 1.0)
        out[:, :n] = load * sign
    total = Z.sum(1, keepdims=True)  # (P, 1, 3)
    others = (total - Z) / (U - 1)  # (P, U, 3) mean of the other units
    zc, oc = Z - Z.mean(0), others - others.mean(0)
    den = np.sqrt((zc * zc).sum(0) * (oc * oc).sum(0))  # (U, 3)
    out[:, k:] = np.where(den > 0, (zc * oc).sum(0) / np.where(den > 0, den, 1.0), 0.0)
    return out


def unit_descriptors(times, units, *, n_units: int, start: float, end: float, ref_rate_hz, components: int) -> np.ndarray:
    """``(U, 33)`` reference statistics, followed (``components > 0``) by the coupling features:
    ``(U, 33 + components + 3)`` float64. ``times`` / ``units``: the reference window's spikes."""
    stats = reference_features(times, units, n_units=n_units, start=start, end=end)
    if not components:
        return stats
    coupling = coupling_features(
        times, units, n_units=n_units, start=start, end=end, ref_rate_hz=ref_rate_hz, components=components
    )
    return np.concatenate([stats, coupling], axis=1)
