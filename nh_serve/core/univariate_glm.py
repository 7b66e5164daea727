"""The univariate GLM baseline: six weights per horizon band shared by every unit of every recording
(:mod:`nh_serve.core.glm` describes it beside the population GLM), fitted once across recordings by
``nh-serve fit-baselines`` and applied zero-shot."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nh_serve.core.glm import GLM_BANDS_MS, _band_targets, _expand, band_index
from nh_serve.core.poisson import fit_poisson
from nh_serve.data.history import HISTORY_TAUS, LOG_FLOOR_HZ, SLOW_TAU, ema_rates, log_history
from nh_serve.data.windows import target_counts
from nh_serve.errors import InputError

UNI_L2 = 1e-3  # tiny ridge so the 36 weights are unique even for degenerate data



@dataclass
class UnivariateGLM:
    """Weights ``(n_bands, n_features + 1)`` of the univariate GLM (see the module docstring)."""

    weights: np.ndarray
    taus: tuple[float, ...] = HISTORY_TAUS
    bands_ms: tuple[tuple[float, float], ...] = GLM_BANDS_MS
    fitted_on: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "weights": np.asarray(self.weights, dtype=np.float64).round(8).tolist(),
            "taus": list(self.taus),
            "bands_ms": [list(b) for b in self.bands_ms],
            "fitted_on": list(self.fitted_on),
            "feature_order": [f"log(r_{t:g}s + {LOG_FLOOR_HZ:g}) - log(r_{SLOW_TAU:g}s + {LOG_FLOOR_HZ:g})" for t in self.taus if t != SLOW_TAU] + ["1"],
        }

    @classmethod
    def from_dict(cls, d: dict) -> UnivariateGLM:
        try:
            w = np.asarray(d["weights"], dtype=np.float64)
            taus = tuple(float(t) for t in d.get("taus", HISTORY_TAUS))
            bands = tuple((float(a), float(b)) for a, b in d.get("bands_ms", GLM_BANDS_MS))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"univariate GLM weights: not a valid weights record ({e}); refit with `nh-serve fit-baselines`") from None
        if SLOW_TAU not in taus or w.shape != (len(bands), len(taus)) or not np.all(np.isfinite(w)):
            raise InputError(
                f"univariate GLM weights: expected a finite ({len(bands)}, {len(taus)}) array for time scales "
                f"{taus} including {SLOW_TAU:g} s, got shape {w.shape}; refit with `nh-serve fit-baselines`"
            )
        return cls(weights=w, taus=taus, bands_ms=bands, fitted_on=tuple(d.get("fitted_on", ())))

    def features(self, rates_hz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Smoothed rates ``(..., K)`` at ``taus`` -> design ``(..., F)`` (with the 1) and offset ``(...)`` (log Hz)."""
        rel, slow = log_history(rates_hz, self.taus)
        return np.concatenate([rel, np.ones(rel.shape[:-1] + (1,))], axis=-1), slow

    def predict(self, rates_hz: np.ndarray, *, n_bins: int, bin_size: float) -> np.ndarray:
        """``(W, U, T)`` float32 expected counts per bin from smoothed rates ``(W, U, K)``."""
        X, slow = self.features(rates_hz)
        eta = slow[..., None] + X @ self.weights.T  # (W, U, n_bands) log Hz
        return _expand(np.exp(np.clip(eta, -20.0, 10.0)), band_index(n_bins, bin_size, self.bands_ms), bin_size)

    @classmethod
    def fit(cls, recordings, *, n_bins: int = 50, bin_size: float = 0.02, step_s: float = 0.5, progress: bool = False,
            taus=HISTORY_TAUS) -> UnivariateGLM:
        """Fit on recordings: an iterable of :class:`GLMRecording` (each weighs the same in total);
        ``taus``: the smoothed rates' time constants (default :data:`HISTORY_TAUS`; must hold the slow rate's)."""
        taus = tuple(float(t) for t in taus)
        from tqdm.auto import tqdm

        rows_X, rows_y, rows_e, rows_o, names = [], [], [], [], []
        bands = band_index(n_bins, bin_size)
        n_bands = len(GLM_BANDS_MS)
        for rec in tqdm(list(recordings), desc="univariate GLM data", unit="recording", disable=not progress, leave=False):
            span = n_bins * bin_size
            pos = np.arange(rec.reference[1], rec.end - span + 1e-9, step_s)
            if pos.size == 0:
                continue
            R = ema_rates(rec.times, rec.units, n_units=rec.n_units, t_eval=pos, start=rec.start,
                          ref_rate_hz=rec.ref_rate_hz, taus=taus)  # (P, U, K)
            glm = cls(weights=np.zeros((n_bands, len(taus))), taus=taus)
            X, off = glm.features(R)  # (P, U, F), (P, U)
            counts = target_counts(rec.times, rec.units, pos, n_units=rec.n_units, bin_size=bin_size, n_bins=n_bins)
            per, nb = _band_targets(counts, bands, n_bands)  # (n_bands, P, U), (n_bands,)
            weight = rec.weight / (pos.size * rec.n_units)  # every recording weighs `weight` in total
            rows_X.append(X.reshape(-1, X.shape[-1]))
            rows_o.append(off.reshape(-1) + math.log(bin_size))
            rows_y.append(per.reshape(n_bands, -1) * weight)
            rows_e.append(np.full(per.shape[1] * per.shape[2], weight))
            names.append(rec.name)
        if not rows_X:
            raise InputError("fit-baselines: no recording is long enough for one prediction window after its reference")
        X = np.concatenate(rows_X)
        o = np.concatenate(rows_o)
        y = np.concatenate(rows_y, axis=1)  # (n_bands, rows)
        e = np.concatenate(rows_e)
        F = X.shape[1]
        W = np.zeros((n_bands, F))
        for b in range(n_bands):
            W[b] = fit_poisson(X, y[b : b + 1], exposure=(e * nb[b])[None], offset=o[None], l2=UNI_L2, max_iter=50)[0]
        return cls(weights=W, taus=taus, fitted_on=tuple(names))


@dataclass
class GLMRecording:
    """What fitting the univariate GLM needs from one recording (times in seconds)."""

    name: str
    times: np.ndarray
    units: np.ndarray
    n_units: int
    start: float
    end: float
    reference: tuple[float, float]
    ref_rate_hz: np.ndarray
    weight: float = 1.0
