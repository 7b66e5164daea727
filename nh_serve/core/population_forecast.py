"""The population forecast: a few numbers per horizon band, shared by every unit, that say where the
population's recent trajectory is heading.

The population GLM's components (:mod:`nh_serve.core.glm`) are smoothed rates *now*; a latent
oscillation or a chaotic orbit is only forecast from its phase, which needs where the population was a
moment ago as well. The forecast reads both:

1. **Delay embedding.** Each unit's spike counts in the last :data:`FORECAST_LAG_S` seconds of its
   context, in the context's equal bins (:func:`nh_serve.data.tokens.context_counts`, the bins the model's
   tokenizer makes), as relative log rates shrunk toward its slow rate (:func:`lag_features`); per bin,
   the top principal components of the population's (the fit window's, z-scored per unit).
2. **Reduced-rank regression.** Those lagged components beside the population GLM's components now
   (``pcs``), standardised, predict the population's next-band activity (each unit's square-root count
   per bin, z-scored) by a ridge regression pooled over every unit (penalty :data:`FORECAST_RIDGE` per fit
   time: strong, so a 60 s reference cannot overfit hundreds of outputs); the :data:`FORECAST_RANK`
   leading directions of its fitted values are the band's forecast features.

Each unit's GLM then reads the forecast of its band (a few weights) instead of every component at every
scale: fewer weights per unit, fitted on the same reference window. Everything is fitted on that window's
fit times only (deterministic: eigendecompositions and linear solves).
"""

from __future__ import annotations

import numpy as np

from nh_serve.data.history import LOG_FLOOR_HZ

#: The forecast reads the context's bins of the last this many seconds (at most all of them).
FORECAST_LAG_S = 0.6
FORECAST_RANK = 8
#: Ridge penalty of the pooled regression, per fit time, on standardised features.
FORECAST_RIDGE = 20.0
#: Shrinkage of a bin's count toward the unit's slow rate: pseudo-bins of its expected count.
BIN_PRIOR = 1.0
CLIP_SD = 5.0


def top_right_singular_vectors(A: np.ndarray, k: int) -> np.ndarray:
    """``(n, m)`` -> ``(m, k)``: the right singular vectors of the ``k`` largest singular values, from the
    eigenvectors of the smaller Gram matrix (quicker than an SVD for the wide matrices of a registration).
    Each vector's largest entry is positive; directions with no variance are left 0."""
    n, m = A.shape
    lam, vec = np.linalg.eigh(A @ A.T if n < m else A.T @ A)  # ascending
    lam, vec = lam[::-1][:k], vec[:, ::-1][:, :k]
    s = np.sqrt(np.maximum(lam, 0.0))  # singular values
    ok = s > 1e-9 * (float(s[0]) if s.size else 0.0)
    V = np.zeros((m, k))
    V[:, : s.size][:, ok] = (A.T @ vec[:, ok]) / s[ok] if n < m else vec[:, ok]
    big = np.abs(V).argmax(0)
    V *= np.where(V[big, np.arange(k)] < 0, -1.0, 1.0)
    return V


def n_lags(bin_s: float, n_bins: int) -> int:
    """How many of the context's last bins (``bin_s`` seconds each, ``n_bins`` in all) the forecast reads."""
    return max(1, min(int(n_bins), int(round(FORECAST_LAG_S / float(bin_s)))))


def lag_features(bins: np.ndarray, r_slow: np.ndarray, bin_s: float, n_lag: int) -> np.ndarray:
    """``(P, U, nb)`` context counts (oldest bin first) and slow rates ``(P, U)`` Hz -> ``(P, U, n_lag)``
    relative log rates of the last ``n_lag`` bins, the most recent first:
    ``log((c + a r bin) / (bin (1 + a)) + 0.1) - log(r + 0.1)`` with ``a`` = :data:`BIN_PRIOR`."""
    c = np.asarray(bins, dtype=np.float64)[..., ::-1][..., :n_lag]
    r = np.maximum(np.asarray(r_slow, dtype=np.float64), 0.0)[..., None]
    rate = (c + BIN_PRIOR * r * bin_s) / (bin_s * (1.0 + BIN_PRIOR))
    return np.log(rate + LOG_FLOOR_HZ) - np.log(r + LOG_FLOOR_HZ)


class PopulationForecast:
    """Per horizon band, :data:`FORECAST_RANK` features shared by every unit (see the module docstring)."""

    def __init__(self, *, components: int, bin_s: float, n_bins: int, rank: int = FORECAST_RANK,
                 ridge: float = FORECAST_RIDGE):
        if not (bin_s > 0 and n_bins >= 1 and components >= 1 and rank >= 1 and ridge > 0):
            raise ValueError(
                f"PopulationForecast: needs bin_s > 0, n_bins, components and rank >= 1 and ridge > 0; got "
                f"bin_s={bin_s}, n_bins={n_bins}, components={components}, rank={rank}, ridge={ridge}"
            )
        self.components, self.rank, self.ridge = int(components), int(rank), float(ridge)
        self.bin_s, self.n_bins = float(bin_s), int(n_bins)
        self.n_lag = n_lags(bin_s, n_bins)

    def lags(self, bins: np.ndarray, r_slow: np.ndarray) -> np.ndarray:
        """``(P, U, n_lag)``: :func:`lag_features` of context counts ``bins`` ``(P, U, nb)`` and slow rates
        ``r_slow`` ``(P, U)`` Hz, what :meth:`fit` and :meth:`features` read."""
        if bins.shape[-1] != self.n_bins:
            raise ValueError(f"PopulationForecast: fitted on {self.n_bins} context bins, given {bins.shape[-1]}")
        return lag_features(bins, r_slow, self.bin_s, self.n_lag)

    def _shared(self, pcs: np.ndarray, X: np.ndarray) -> np.ndarray:
        """``(P, F)`` the regression's inputs, before standardising: the components now, then each lag's."""
        lagged = [((X[..., j] - self.mu[:, j]) / self.sd[:, j]) @ self.V[j] for j in range(self.n_lag)]
        return np.concatenate([pcs, *lagged], axis=1)

    def fit(self, pcs: np.ndarray, X: np.ndarray, per_band: np.ndarray, bins_per_band: np.ndarray) -> PopulationForecast:
        """Fit on the fit times' components now ``pcs`` ``(P, F0)``, lag features ``X`` ``(P, U, n_lag)``
        (:meth:`lags`), and the counts of each band after them ``per_band`` ``(n_bands, P, U)`` over
        ``bins_per_band`` ``(n_bands,)`` bins."""
        P, U = X.shape[:2]
        self.mu, self.sd = X.mean(0), X.std(0) + 0.05  # (U, n_lag)
        k = max(1, min(self.components, U - 1, P - 1))
        self.V = []
        for j in range(self.n_lag):
            V = np.zeros((U, self.components))
            Z = (X[..., j] - self.mu[:, j]) / self.sd[:, j]
            V[:, :k] = top_right_singular_vectors(Z - Z.mean(0), k)
            self.V.append(V)
        S = self._shared(pcs, X)
        self.s_mu, self.s_sd = S.mean(0), S.std(0) + 1e-6
        S = (S - self.s_mu) / self.s_sd  # (P, F), centred
        _, Rq = np.linalg.qr(S)  # S = Q Rq: the fitted values S B share their right singular vectors with Rq B
        S = np.concatenate([S, np.ones((P, 1))], axis=1)  # (P, F + 1)
        G = S.T @ S + self.ridge * P * np.diag(np.r_[np.ones(S.shape[1] - 1), 0.0])  # no penalty on the 1
        r = max(1, min(self.rank, U, P - 1))
        self.M, self.f_sd = [], []
        for b in range(per_band.shape[0]):
            Y = np.sqrt(per_band[b] / max(float(bins_per_band[b]), 1.0))  # (P, U) square-root count per bin
            Y = (Y - Y.mean(0)) / (Y.std(0) + 0.05)
            B = np.linalg.solve(G, S.T @ Y)  # (F + 1, U)
            M = np.zeros((S.shape[1], self.rank))
            # the centred fitted values are S[:, :F] B[:F] = Q (Rq B[:F]): top directions from an (F, U) matrix
            M[:, :r] = B @ top_right_singular_vectors(Rq @ B[:-1], r)  # (F + 1, rank)
            self.M.append(M)
            self.f_sd.append((S @ M).std(0) + 1e-6)
        return self

    def features(self, pcs: np.ndarray, X: np.ndarray) -> np.ndarray:
        """``(n_bands, P, rank)`` each band's forecast features (standardised on the fit times, clipped to
        +-:data:`CLIP_SD`) at the times of ``pcs`` ``(P, F0)`` and lag features ``X`` ``(P, U, n_lag)``."""
        S = (self._shared(pcs, X) - self.s_mu) / self.s_sd
        S = np.concatenate([S, np.ones((S.shape[0], 1))], axis=1)
        return np.stack([np.clip((S @ M) / sd, -CLIP_SD, CLIP_SD) for M, sd in zip(self.M, self.f_sd)])
