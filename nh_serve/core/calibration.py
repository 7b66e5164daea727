"""A recording's calibration of the network's rates: the slow rate's floor, and how far to trust the
network's departures from the slow rate.

The network's offset, like the univariate GLM's, is ``o = log(r30 + 0.1 Hz)``
(:data:`~nh_serve.data.history.LOG_FLOOR_HZ` keeps a silent unit's log finite), and the network
adds to it what it learned on its training recordings. On a new recording two things can be off,
each once for the whole recording:

* the **floor**: for a unit whose slow rate ``r30`` falls to a fraction of a hertz (a place cell
  outside its field, a unit that drifts nearly silent) the 0.1 Hz alone sets the level of the
  prediction, and the network undoes it only in part;
* the **departures**: on a recording whose units carry little short-term structure (each unit's
  rate wanders only slowly), the network's reactions to the last seconds add noise, not signal.

So the registration fits two numbers per recording, ``beta`` and ``gamma`` in ``[0, 1]``, of the
factor applied to every bin ``t`` of horizon band ``b`` (:data:`~nh_serve.core.glm.GLM_BANDS_MS`)::

    ((r30 + FLOOR_HZ) / (r30 + 0.1)) ** beta  *  (exp(o) / m_b) ** gamma

where ``m_b`` is the band's mean predicted rate: ``beta = 1`` replaces the floor by
:data:`FLOOR_HZ` (the smallest rate any baseline predicts), ``gamma = 1`` brings each band's level
back to the slow rate (the shape within the band stays), and ``0, 0`` leaves the rates as they are.
They are the pooled Poisson maximum-likelihood weights of the features ``log(r30 + FLOOR_HZ) - o``
and ``o - log m_b`` with the model's band counts as offset (a convex problem in two variables,
solved by Newton's method on the box). As the population correction (:mod:`nh_serve.core.glm`)
they are fitted on the first 70% of the fit times and judged on the last 15%, in two folds (the
second mirrored in time), and kept only where the two held-out parts together gain at least
:data:`~nh_serve.core.glm.CORRECTION_MARGIN_NATS`; then refitted on all. The held-out parts are held
out from the calibration only: the read-outs and the population correction in its offset were refitted
on every fit time after their own held-out choices.
"""

from __future__ import annotations

import numpy as np

from nh_serve.core.glm import CORRECTION_MARGIN_NATS, band_index, band_sums, correction_split
from nh_serve.data.history import LOG_FLOOR_HZ

#: The floor the factor moves toward (Hz): the baselines' smallest predicted rate.
FLOOR_HZ = 0.01
MAX_ITER = 30


def floor_feature(r_slow: np.ndarray) -> np.ndarray:
    """``log(r + FLOOR_HZ) - log(r + LOG_FLOOR_HZ)`` of slow rates ``r`` (Hz, any shape): 0 for a busy
    unit, down to ``log(0.1)`` for a silent one."""
    r = np.maximum(np.asarray(r_slow, dtype=np.float64), 0.0)
    return np.log(r + FLOOR_HZ) - np.log(r + LOG_FLOOR_HZ)


def _features(f: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``(P, U)`` floor feature and ``(P, U, B)`` departures -> ``(P, U, B, 2)`` design."""
    return np.stack([np.broadcast_to(f[..., None], d.shape), -d], -1)


def _nll(w: np.ndarray, F: np.ndarray, c: np.ndarray, m: np.ndarray) -> float:
    eta = F @ w
    return float((m * np.exp(eta) - c * eta).sum())


def _newton(F: np.ndarray, c: np.ndarray, m: np.ndarray, fixed: dict[int, float]) -> np.ndarray:
    """The unconstrained optimum over the weights not in ``fixed`` (damped Newton on a convex NLL)."""
    w = np.zeros(2)
    for j, v in fixed.items():
        w[j] = v
    free = [j for j in range(2) if j not in fixed]
    Fr, cr, mr = F.reshape(-1, 2), c.reshape(-1), m.reshape(-1)
    cur = _nll(w, Fr, cr, mr)
    for _ in range(MAX_ITER):
        e = mr * np.exp(Fr @ w)
        g = Fr.T @ (e - cr)
        H = (Fr * e[:, None]).T @ Fr
        Hf = H[np.ix_(free, free)] + 1e-9 * np.eye(len(free))
        step = np.zeros(2)
        step[free] = np.linalg.solve(Hf, g[free])
        t = 1.0
        while t > 1e-4:  # halve the step until the likelihood does not get worse
            new = _nll(w - t * step, Fr, cr, mr)
            if new <= cur:
                break
            t *= 0.5
        else:
            break
        w, cur = w - t * step, new
        if np.max(np.abs(t * step)) < 1e-9:
            break
    return w


def _solve(F: np.ndarray, c: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``(beta, gamma)`` in the box ``[0, 1]^2`` that maximises the pooled likelihood: the unconstrained
    optimum if it lies inside; else the best of the optima on the edges whose bound that optimum breaks,
    each clipped to the box (the likelihood is concave, so a bound that holds at the unconstrained optimum
    is active at the box's optimum only at a corner, which clipping on the other edge reaches)."""
    w = _newton(F, c, m, {})
    broken = [(j, v) for j in range(2) for v in (0.0, 1.0) if (w[j] < 0.0 if v == 0.0 else w[j] > 1.0)]
    if not broken:
        return w
    edges = [np.clip(_newton(F, c, m, {j: v}), 0.0, 1.0) for j, v in broken]
    return min(edges, key=lambda e: _nll(e, F.reshape(-1, 2), c.reshape(-1), m.reshape(-1)))


def fit_calibration(f, d, counts, expected) -> tuple[float, float, dict]:
    """``(beta, gamma, info)`` from arrays in time order: ``f`` ``(P, U)`` the floor feature
    (:func:`floor_feature` of the slow rates at each fit time), ``d`` ``(P, U, B)`` each band's log
    departure of the predicted rate from the slow rate, and the counts observed and expected in each band
    ``(P, U, B)``. ``(0, 0)`` unless the held-out parts gain the margin."""
    f, d, c, m = (np.asarray(a, dtype=np.float64) for a in (f, d, counts, expected))
    if not (d.shape == c.shape == m.shape and d.ndim == 3 and f.shape == d.shape[:2]):
        raise ValueError(
            f"fit_calibration: need f (P, U) and d, counts, expected (P, U, B), got {f.shape}, {d.shape}, {c.shape}, {m.shape}"
        )
    F = _features(f, d)
    P = F.shape[0]
    n_a, n_b = correction_split(P)
    gain = 0.0
    zero = np.zeros(2)
    for fit, judge in ((slice(0, n_a), slice(n_b, P)), (slice(P - n_a, P), slice(0, P - n_b))):
        w = _solve(F[fit], c[fit], m[fit])
        Fj, cj, mj = F[judge].reshape(-1, 2), c[judge].reshape(-1), m[judge].reshape(-1)
        gain += _nll(zero, Fj, cj, mj) - _nll(w, Fj, cj, mj)
    w = _solve(F, c, m) if gain > CORRECTION_MARGIN_NATS else zero
    beta, gamma = (float(x) for x in w)
    return beta, gamma, {"floor_beta": round(beta, 6), "shrink_gamma": round(gamma, 6),
                         "calibration_judged_gain_nats": round(gain, 4)}


class Calibration:
    """A fitted ``(beta, gamma)`` (:func:`fit_calibration`) applied to predicted rates."""

    def __init__(self, *, beta: float, gamma: float, i_slow: int, n_bins: int, bin_size: float):
        self.beta, self.gamma, self.i_slow = float(beta), float(gamma), int(i_slow)
        self.bands = band_index(n_bins, bin_size)
        self.per_band = np.bincount(self.bands).astype(np.float64)  # bins per band

    @classmethod
    def fit(cls, *, log_expected: np.ndarray, counts: np.ndarray, R: np.ndarray, i_slow: int,
            bin_size: float) -> tuple[Calibration, dict]:
        """Fitted on fit times in time order (:func:`fit_calibration`): ``log_expected`` ``(P, U, T)`` the log
        counts the model expects in each bin, ``counts`` ``(P, U, T)`` the observed ones, ``R`` ``(P, U, K)``
        the smoothed rates at the context ends (the slow rate at ``i_slow``). Returns it and the fit's record."""
        cal = cls(beta=0.0, gamma=0.0, i_slow=i_slow, n_bins=log_expected.shape[-1], bin_size=bin_size)
        expected = band_sums(np.exp(np.clip(log_expected, -30.0, 10.0)), cal.bands)  # (P, U, B) counts
        d = cal.departures(expected / bin_size, R)
        cal.beta, cal.gamma, info = fit_calibration(floor_feature(R[..., i_slow]), d, band_sums(counts, cal.bands), expected)
        return cal, info

    @property
    def active(self) -> bool:
        """Whether it changes any rate (a fit that kept nothing has both weights 0)."""
        return bool(self.beta or self.gamma)

    def departures(self, band_rates_hz: np.ndarray, R: np.ndarray) -> np.ndarray:
        """``(W, U, B)`` log of each band's mean predicted rate (from the per-band sums of the predicted rates,
        ``band_sums(rates_hz)``) over the slow rate ``log(r30 + 0.1)``."""
        o = np.log(np.maximum(R[..., self.i_slow], 0.0) + LOG_FLOOR_HZ)  # (W, U)
        return np.log(np.maximum(band_rates_hz / self.per_band, 1e-30)) - o[..., None]

    def log_factor(self, log_rates_hz: np.ndarray, R: np.ndarray) -> np.ndarray:
        """``(W, U, T)`` log factor for predicted log rates ``(W, U, T)`` (Hz) and smoothed rates ``R`` ``(W, U, K)``."""
        R = np.asarray(R, dtype=np.float64)
        out = (self.beta * floor_feature(R[..., self.i_slow]))[..., None] * np.ones(self.bands.size)
        if self.gamma:
            sums = band_sums(np.exp(np.asarray(log_rates_hz, dtype=np.float64)), self.bands)  # (W, U, B)
            out = out - self.gamma * self.departures(sums, R)[..., self.bands]
        return out
