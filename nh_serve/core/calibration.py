"""A recording's calibration of the network's rates: the slow rate's floor, how far to trust the network's
departures from the slow rate, and which time scale sets each unit's level.

The network's offset, like the univariate GLM's, is ``o = log(r30 + 0.1 Hz)``
(:data:`~nh_serve.data.history.LOG_FLOOR_HZ` keeps a silent unit's log finite), and the network
adds to it what it learned on its training recordings. On a new recording three things can be off,
each once for the whole recording:

* the **floor**: for a unit whose slow rate ``r30`` falls to a fraction of a hertz (a place cell
  outside its field, a unit that drifts nearly silent) the 0.1 Hz alone sets the level of the
  prediction, and the network undoes it only in part;
* the **departures**: on a recording whose units carry little short-term structure (each unit's
  rate wanders only slowly), the network's reactions to the last seconds add noise, not signal;
* the **level's time scale**: a recording whose units hold their rates for many minutes is
  forecast best by a long average (``r120``), one whose rates follow a task from trial to trial by
  a short one (``r5``); the network was trained around ``r30``.

So each fit (the registration's, and every streaming refit's) finds pooled weights per recording, each
in ``[0, 1]``, of the factor applied to
every bin ``t`` of horizon band ``b`` (:data:`~nh_serve.core.glm.GLM_BANDS_MS`)::

    ((r30 + FLOOR_HZ) / (r30 + 0.1)) ** beta  *  (exp(o) / m_b) ** gamma
        *  ((r5 + FLOOR_HZ) / (r30 + FLOOR_HZ)) ** lam_5  *  ((r120 + FLOOR_HZ) / (r30 + FLOOR_HZ)) ** lam_120

where ``m_b`` is the band's mean predicted rate: ``beta = 1`` replaces the floor by
:data:`FLOOR_HZ` (the smallest rate any baseline predicts), ``gamma = 1`` brings each band's level
back to the slow rate (the shape within the band stays), ``lam_tau`` moves the level toward the
smoothed rate of time scale ``tau`` (:data:`LEVEL_TAUS`, those the model's history holds; with
``beta = gamma = lam_120 = 1`` each band's mean rate is ``r120 + FLOOR_HZ``), and all zeros leave the
rates as they are. They are the pooled Poisson maximum-likelihood weights of the
features ``log(r30 + FLOOR_HZ) - o``, ``o - log m_b`` and ``log(r_tau + FLOOR_HZ) - log(r30 + FLOOR_HZ)`` with the model's
band counts as offset (a convex problem in a few variables, solved on the box by L-BFGS-B, which is
deterministic). As the population correction (:mod:`nh_serve.core.glm`) they are fitted on the
first 70% of the fit times and judged on the last 15%, in two folds (the second mirrored in time),
and kept only where the two held-out parts together gain at least
:data:`~nh_serve.core.glm.KEEP_MARGIN_NATS`; then refitted on all. In each fold the population correction
in the offset is that fold's own (fitted on the fold's first part only:
:meth:`~nh_serve.core.glm.PopulationGLM.log_correction` with ``fold``), so nothing in the offset was fitted
on the part that judges; the read-outs in it were refitted on every fit time after their own held-out
choices (a registration keeps them for few units, if any).

**Only where the rates are causal.** Inside a reference window every smoothed rate starts at the
window's own mean rate, which already holds the spikes the fit predicts: a long average there looks
better than it is, and a short one follows the reference's own episodes (a fit there chose ``r120`` on
unseen synthetic recordings, ``r5`` on a held-out rat CA1 recording, and both lost later). So the level
weights are fitted only where the rates come from a stream that ran before the fit's window (a
streaming refit, ``refit_every_s``: its rates are what the stream carried); the registration fits the
floor and the departures alone (``level_taus=()``).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from nh_serve.core.glm import KEEP_MARGIN_NATS, band_index, band_sums, correction_split
from nh_serve.data.history import LOG_FLOOR_HZ

#: The floor the factor moves toward (Hz): the baselines' smallest predicted rate.
FLOOR_HZ = 0.01
#: Time scales (seconds) the level may move toward, where the model's history holds them.
LEVEL_TAUS = (5.0, 120.0)
MAX_ITER = 200


def floor_feature(r_slow: np.ndarray) -> np.ndarray:
    """``log(r + FLOOR_HZ) - log(r + LOG_FLOOR_HZ)`` of slow rates ``r`` (Hz, any shape): 0 for a busy
    unit, down to ``log(0.1)`` for a silent one."""
    r = np.maximum(np.asarray(r_slow, dtype=np.float64), 0.0)
    return np.log(r + FLOOR_HZ) - np.log(r + LOG_FLOOR_HZ)


def log_rate(r: np.ndarray, floor: float = LOG_FLOOR_HZ) -> np.ndarray:
    """``log(r + floor)`` of smoothed rates ``r`` (Hz); the default floor gives the network's own log level."""
    return np.log(np.maximum(np.asarray(r, dtype=np.float64), 0.0) + floor)


def level_features(R: np.ndarray, i_slow: int, i_levels) -> np.ndarray:
    """``(..., L)`` ``log(r_tau + FLOOR_HZ) - log(r30 + FLOOR_HZ)`` for the smoothed rates ``R`` ``(..., K)`` at
    the places ``i_levels``."""
    o = log_rate(R[..., i_slow], FLOOR_HZ)
    return np.stack([log_rate(R[..., i], FLOOR_HZ) - o for i in i_levels], -1) if len(i_levels) else np.zeros((*o.shape, 0))


def _nll_grad(w: np.ndarray, F: np.ndarray, c: np.ndarray, m: np.ndarray) -> tuple[float, np.ndarray]:
    e = m * np.exp(np.clip(F @ w, -30.0, 30.0))
    return float((e - c * (F @ w)).sum()), F.T @ (e - c)


def _solve(F: np.ndarray, c: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The weights in the box ``[0, 1]^n`` that maximise the pooled likelihood of rows ``F`` ``(N, n)``,
    counts ``c`` and expected counts ``m`` ``(N,)`` (convex: L-BFGS-B finds the box's optimum)."""
    n = F.shape[1]
    scale = max(float(c.sum()), 1.0)  # objective per spike: tolerances independent of the data's size
    res = minimize(lambda w: tuple(x / scale for x in _nll_grad(w, F, c, m)), np.zeros(n), jac=True,
                   method="L-BFGS-B", bounds=[(0.0, 1.0)] * n,
                   options={"maxiter": MAX_ITER, "ftol": 1e-13, "gtol": 1e-10})
    if not res.success and _nll_grad(np.clip(res.x, 0.0, 1.0), F, c, m)[0] > _nll_grad(np.zeros(n), F, c, m)[0]:
        return np.zeros(n)  # a solve that stopped short and fits worse than no calibration: none
    return np.clip(res.x, 0.0, 1.0)


def fit_calibration(f, d, counts, expected, *, levels=None, folds=None) -> tuple[np.ndarray, dict]:
    """``(weights, info)`` from arrays in time order: ``f`` ``(P, U)`` the floor feature
    (:func:`floor_feature` of the slow rates at each fit time), ``d`` ``(P, U, B)`` each band's log
    departure of the predicted rate from the slow rate, the counts observed and expected in each band
    ``(P, U, B)``, and ``levels`` ``(P, U, L)`` the level features (:func:`level_features`, none by
    default). ``folds``: per fold of :func:`~nh_serve.core.glm.correction_split` (forward, then mirrored),
    the ``(d, expected)`` of a predictor fitted without that fold's held-out part, which that fold fits
    and judges (default: ``(d, expected)`` for both). ``weights`` is ``(beta, gamma, lam...)`` (``2 + L``),
    all 0 unless the held-out parts gain the margin."""
    f, d, c, m = (np.asarray(a, dtype=np.float64) for a in (f, d, counts, expected))
    lv = np.zeros((*f.shape, 0)) if levels is None else np.asarray(levels, dtype=np.float64)
    if not (d.shape == c.shape == m.shape and d.ndim == 3 and f.shape == d.shape[:2] and lv.shape[:2] == f.shape):
        raise ValueError(
            f"fit_calibration: need f (P, U), d, counts, expected (P, U, B) and levels (P, U, L), got {f.shape}, "
            f"{d.shape}, {c.shape}, {m.shape}, {lv.shape}"
        )
    folds = [(d, m)] * 2 if folds is None else [tuple(np.asarray(a, dtype=np.float64) for a in fd) for fd in folds]
    if len(folds) != 2 or any(fd.shape != d.shape or fm.shape != m.shape for fd, fm in folds):
        raise ValueError(f"fit_calibration: folds must be two (d, expected) pairs of shape {d.shape}")
    n = 2 + lv.shape[-1]

    def design(d: np.ndarray) -> np.ndarray:  # (P, U, B, n)
        cols = [np.broadcast_to(f[..., None], d.shape), -d]
        cols += [np.broadcast_to(lv[..., j : j + 1], d.shape) for j in range(lv.shape[-1])]
        return np.stack(cols, -1)

    P = f.shape[0]
    n_a, n_b = correction_split(P)
    gain = 0.0
    zero = np.zeros(n)
    F_all = design(d)
    for (fd, fm), (fit, judge) in zip(folds, ((slice(0, n_a), slice(n_b, P)), (slice(P - n_a, P), slice(0, P - n_b)))):
        F = F_all if fd is d else design(fd)  # a fold without its own offset reads the one
        w = _solve(F[fit].reshape(-1, n), c[fit].reshape(-1), fm[fit].reshape(-1))
        judged = (F[judge].reshape(-1, n), c[judge].reshape(-1), fm[judge].reshape(-1))
        gain += _nll_grad(zero, *judged)[0] - _nll_grad(w, *judged)[0]
    w = _solve(F_all.reshape(-1, n), c.reshape(-1), m.reshape(-1)) if gain > KEEP_MARGIN_NATS else zero
    info = {"floor_beta": round(float(w[0]), 6), "shrink_gamma": round(float(w[1]), 6),
            "calibration_judged_gain_nats": round(gain, 4)}
    return w, info


def mean_record(records: list[dict]) -> dict:
    """The mean weights of fit records (``floor_beta``, ``shrink_gamma``, ``level_lambda``) that hold a calibration;
    a level time scale missing from a record counts as 0. Empty when none holds one."""
    recs = [r for r in records if "floor_beta" in r]
    if not recs:
        return {}
    taus = sorted({t for r in recs for t in r.get("level_lambda", {})}, key=float)
    return {"floor_beta": float(np.mean([r["floor_beta"] for r in recs])),
            "shrink_gamma": float(np.mean([r["shrink_gamma"] for r in recs])),
            "level_lambda": {t: float(np.mean([r.get("level_lambda", {}).get(t, 0.0) for r in recs])) for t in taus}}


class Calibration:
    """Fitted weights (:func:`fit_calibration`) applied to predicted rates. ``i_slow``: the slow rate's place
    in the smoothed rates; ``i_levels``: the places of the level time scales (``levels``, same order) the
    weights ``lam`` move the level toward."""

    def __init__(self, *, beta: float, gamma: float, i_slow: int, n_bins: int, bin_size: float,
                 lam=(), i_levels=(), levels=()):
        self.beta, self.gamma, self.i_slow = float(beta), float(gamma), int(i_slow)
        self.lam = np.asarray(lam, dtype=np.float64).reshape(-1)
        self.i_levels, self.levels = tuple(int(i) for i in i_levels), tuple(float(t) for t in levels)
        if not (self.lam.size == len(self.i_levels) == len(self.levels)):
            raise ValueError(f"Calibration: {self.lam.size} level weights for {len(self.i_levels)} level time scales")
        self.bands = band_index(n_bins, bin_size)
        self.per_band = np.bincount(self.bands).astype(np.float64)  # bins per band

    @classmethod
    def fit(cls, *, log_expected: np.ndarray, counts: np.ndarray, R: np.ndarray, i_slow: int, bin_size: float,
            taus=None, level_taus=(), log_expected_folds=None) -> tuple[Calibration, dict]:
        """Fitted on fit times in time order (:func:`fit_calibration`): ``log_expected`` ``(P, U, T)`` the log
        counts the model expects in each bin, ``counts`` ``(P, U, T)`` the observed ones, ``R`` ``(P, U, K)``
        the smoothed rates at the context ends (the slow rate at ``i_slow``). ``taus``: the time scales of
        ``R`` (the level weights need them); ``level_taus``: those the level may move toward (where ``taus``
        holds them; none by default, :data:`LEVEL_TAUS` in a streaming refit). ``log_expected_folds``: the two
        folds' ``log_expected`` from corrections fitted without each fold's held-out part (default: the one).
        Returns it and the fit's record."""
        taus = () if taus is None else tuple(float(t) for t in taus)
        i_lv = [taus.index(float(t)) for t in level_taus if float(t) in taus]
        cal = cls(beta=0.0, gamma=0.0, i_slow=i_slow, n_bins=log_expected.shape[-1], bin_size=bin_size,
                  lam=np.zeros(len(i_lv)), i_levels=i_lv, levels=[taus[i] for i in i_lv])

        def parts(log_e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # each band's departures and expected counts
            expected = band_sums(np.exp(np.clip(log_e, -30.0, 10.0)), cal.bands)  # (P, U, B) counts
            return cal.departures(expected / bin_size, R), expected

        d, expected = parts(log_expected)
        folds = None if log_expected_folds is None else [parts(e) for e in log_expected_folds]
        w, info = fit_calibration(floor_feature(R[..., i_slow]), d, band_sums(counts, cal.bands), expected,
                                  levels=level_features(R, i_slow, i_lv) if i_lv else None, folds=folds)
        cal.beta, cal.gamma, cal.lam = float(w[0]), float(w[1]), np.asarray(w[2:], dtype=np.float64)
        info["level_lambda"] = {f"{t:g}": round(float(x), 6) for t, x in zip(cal.levels, cal.lam)}
        return cal, info

    @property
    def active(self) -> bool:
        """Whether it changes any rate (a fit that kept nothing has every weight 0)."""
        return bool(self.beta or self.gamma or np.any(self.lam))

    def departures(self, band_rates_hz: np.ndarray, R: np.ndarray) -> np.ndarray:
        """``(W, U, B)`` log of each band's mean predicted rate (from the per-band sums of the predicted rates,
        ``band_sums(rates_hz)``) over the slow rate ``log(r30 + 0.1)``."""
        o = log_rate(R[..., self.i_slow])  # (W, U)
        return np.log(np.maximum(band_rates_hz / self.per_band, 1e-30)) - o[..., None]

    def log_factor(self, log_rates_hz: np.ndarray, R: np.ndarray) -> np.ndarray:
        """``(W, U, T)`` log factor for predicted log rates ``(W, U, T)`` (Hz) and smoothed rates ``R`` ``(W, U, K)``."""
        R = np.asarray(R, dtype=np.float64)
        per_unit = self.beta * floor_feature(R[..., self.i_slow])  # (W, U)
        if np.any(self.lam):
            per_unit = per_unit + level_features(R, self.i_slow, self.i_levels) @ self.lam
        out = per_unit[..., None] * np.ones(self.bands.size)
        if self.gamma:
            sums = band_sums(np.exp(np.asarray(log_rates_hz, dtype=np.float64)), self.bands)  # (W, U, B)
            out = out - self.gamma * self.departures(sums, R)[..., self.bands]
        return out
