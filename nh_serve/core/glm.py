"""The Poisson-GLM baselines: a univariate GLM fitted once across recordings
(:mod:`nh_serve.core.univariate_glm`), and population GLMs fitted on each recording's own reference window.

Both predict a rate per horizon *band* (:data:`GLM_BANDS_MS`: 0-40, 40-100, 100-200,
200-400, 400-700 and 700-1000 ms after the prediction time; every bin of a band gets
its band's rate) from each unit's smoothed-rate history (:mod:`nh_serve.data.history`),
with ``log(r_30s + 0.1 Hz)`` as the offset::

    log rate_u(band b) = log(r30_u + 0.1) + w_b . x_u

``univariate_glm``
    ``x_u`` = the unit's own ``log(r_tau + 0.1) - log(r30 + 0.1)`` at tau = 50 ms,
    250 ms, 1 s, 5 s and 120 s, plus 1: six weights per band shared by every unit of
    every recording (36 numbers), fitted by Poisson maximum likelihood on training
    recordings (:meth:`nh_serve.core.univariate_glm.UnivariateGLM.fit`, ``nh-serve fit-baselines``) and applied
    zero-shot. A checkpoint carries the weights fitted on its own training recordings
    (``metadata["baselines"]["univariate_glm"]``).
``population_glm``
    Per unit and band, ``x_u`` = the unit's own relative log rates at 50 ms, 250 ms,
    1 s and 5 s, the top ``K`` = 8 principal components of the population's z-scored
    log rates at the same four scales (32 numbers shared by all units), and 1. The
    principal components, their scales and every unit's GLM are fitted on the
    recording's reference window only (prediction times every 0.1 s inside it, each
    with its next second as target); the L2 penalty of each unit is chosen from
    :data:`POP_L2_GRID` by the Poisson likelihood of the last 20% of those times after
    fitting on the first 80%, then the GLM is refitted on all of them. At prediction
    time the features are clipped to their range in the reference window (own rates)
    or to +-5 standard deviations (components), so a drifting recording cannot push
    the linear predictor far outside what was fitted. ``population_glm_recent`` is
    the same model refitted every 30 s on the last 120 s before the prediction time.
``population_glm_forecast``
    The same, with ``context_bins``: in place of the 32 components each unit reads the 8 numbers
    of its band's population forecast (:mod:`nh_serve.core.population_forecast`: these components
    now, beside the top components of the units' relative log rates in each 100 ms bin of the last
    0.6 s, reduced by a pooled ridge regression), so
    ``x_u`` has 4 + 8 + 1 entries. The forecast is fitted on the same times as the weights it is
    judged with, then on all of them.

The population GLM also *corrects* another predictor (``fit(..., offset=...)``, the
registration's correction of the network, :mod:`nh_serve.inference.reference_fit`, reading the
forecast of the model's own context bins): its rates times ``exp(w_b . x_u)``. A correction is chosen on fit times it was not fitted on
(:data:`CORRECTION_SPLIT`): per unit and band, then whether to correct at all, for the whole recording
(:attr:`PopulationGLM.corrected`).

Every solve is :func:`nh_serve.core.poisson.fit_poisson` (Newton's method over all
units at once; checked against scikit-learn's ``PoissonRegressor`` in the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from nh_serve.core.poisson import fit_poisson
from nh_serve.core.population_forecast import PopulationForecast
from nh_serve.core.population_forecast import top_right_singular_vectors as _top_right_singular_vectors
from nh_serve.data.history import HISTORY_TAUS, LOG_FLOOR_HZ, SLOW_TAU, ema_rates
from nh_serve.data.tokens import context_counts
from nh_serve.data.windows import target_counts
from nh_serve.errors import InputError

GLM_BANDS_MS = ((0.0, 40.0), (40.0, 100.0), (100.0, 200.0), (200.0, 400.0), (400.0, 700.0), (700.0, 1000.0))
#: Own-history time scales of the population GLM (seconds; a subset of HISTORY_TAUS).
POP_TAUS = (0.05, 0.25, 1.0, 5.0)
POP_COMPONENTS = 8
POP_L2_GRID = (30.0, 300.0, 3000.0)
POP_INTERCEPT_L2 = 1.0  # keeps a unit that was (nearly) silent in the fit window near its slow rate
POP_STEP_S = 0.1  # spacing of the fit window's prediction times
#: A population GLM fitted as a correction of another predictor (``offset``) keeps a unit's band only where it
#: gains on the choosing parts (:data:`CORRECTION_SPLIT`), the unit's gain shrunk toward the mean of every
#: unit's in the band (:func:`shrunk_gains`), and corrects at all only where the kept bands together gain on
#: the judging parts, which no choice saw. It never scales the predictor's rates by more than
#: ``exp(CORRECTION_MAX_LOG)``. Demanding a margin of 2 nats and 1 Hz per unit as well dropped corrections
#: that help (docs/model-card.md); looser rules offered *beside* a strict one won inside a real recording's
#: reference and lost on the rest of it.
CORRECTION_MAX_LOG = math.log(3.0)
#: Newton's stopping rule (relative decrease) for the fits at registration, which must be quick: a step
#: fewer for many units than the default 1e-9, weights that differ by far less than their noise
#: (tests/test_baselines.py holds a correction fitted with both to each other).
CORRECTION_TOL = 1e-7
#: What a registration's per-unit read-out (:mod:`nh_serve.inference.reference_fit`) and the recording's
#: calibration (:mod:`nh_serve.core.calibration`) must show to be kept: units firing at least this often in the
#: fit and held-out parts, and a held-out gain of at least this many nats.
MIN_FIT_RATE_HZ = 1.0
KEEP_MARGIN_NATS = 2.0
#: Time split of a correction's fit times: the L2 path is fitted on the first 70%, each unit's band choices are
#: made on the next 15%, and whether to correct at all on the last 15%, in two folds (forward, and mirrored
#: in time: fitted on the last 70%, judged on the first 15%); the kept fits are refitted on all. Fit times whose
#: horizons overlap the part before them are left out (:func:`purge_gap`): no spike is both fitted and judged.
CORRECTION_SPLIT = (0.70, 0.85)
POP_CLIP_SD = 5.0
#: The context bins ``(seconds, number)`` the ``population_glm_forecast`` baseline reads: the default model's.
BASELINE_CONTEXT_BINS = (0.1, 10)
RECENT_EVERY_S = 30.0
RECENT_SPAN_S = 120.0


def correction_split(n: int) -> tuple[int, int]:
    """Ends of the fit and choosing parts of ``n`` fit times in time order (:data:`CORRECTION_SPLIT`): fit on
    ``[0, a)``, choose on ``[a, b)``, judge on ``[b, n)``; each part holds at least one time."""
    a = max(1, min(n - 2, int(round(CORRECTION_SPLIT[0] * n))))
    return a, max(a + 1, min(n - 1, int(round(CORRECTION_SPLIT[1] * n))))


def purge_gap(horizon_s: float, step_s: float) -> int:
    """How many fit times, ``step_s`` apart, to leave out after a part whose fit times predict the next
    ``horizon_s`` seconds, so that no time of the next part predicts a spike the part before it was fitted (or
    chosen) on: ``ceil(horizon_s / step_s) - 1``."""
    if not (horizon_s > 0 and step_s > 0):
        raise ValueError(f"purge_gap: horizon_s and step_s must be positive, got {horizon_s!r} and {step_s!r}")
    return max(0, math.ceil(horizon_s / step_s - 1e-9) - 1)


def correction_folds(n: int, gap: int = 0) -> tuple[tuple[slice, slice, slice], tuple[slice, slice, slice]]:
    """The two folds' ``(fit, choose, judge)`` parts of ``n`` fit times in time order
    (:func:`correction_split`): forward, and mirrored in time (fitted on the last part, judged on the first).
    The ``gap`` fit times next to a part that comes before them in time (:func:`purge_gap`) are left out of the
    later part, so overlapping horizons carry no spike of one part into the next; a fit too short to leave
    every part a time after the gap gets none."""
    a, b = correction_split(n)
    g = int(gap) if min(b - a, n - b) > int(gap) else 0
    return (slice(0, a), slice(a + g, b), slice(b + g, n)), (slice(n - a, n), slice(n - b, n - a - g), slice(0, n - b - g))


def shrunk_gains(block_gains: np.ndarray) -> np.ndarray:
    """``(U, K)`` each unit's held-out gain (nats) in ``K`` blocks of fit times, a horizon each (only
    neighbouring blocks share target spikes, so the noise below is somewhat underestimated) -> ``(U,)`` each
    unit's total gain shrunk toward the mean of every unit's (empirical Bayes, normal model): the total of unit ``u`` counts by ``tau2 / (tau2 + s2_u)``, where
    ``s2_u = K var(its block gains)`` is the noise of its total and ``tau2`` the spread of the units' totals beyond
    their noise (method of moments, at least 0). Where the units share one link to the population (a
    recording driven by common latents), a unit whose short held-out stretch happens to lose is judged by
    the others; where they differ, each by its own. Fewer than 3 units or 2 blocks: the totals as they are."""
    B = np.asarray(block_gains, dtype=np.float64)
    g = B.sum(1)
    U, K = B.shape
    if U < 3 or K < 2:
        return g
    s2 = K * B.var(1, ddof=1)
    tau2 = max(0.0, float(g.var(ddof=1) - s2.mean()))
    return g.mean() + tau2 / (tau2 + s2 + 1e-12) * (g - g.mean())


def _choices(paths, none_nll, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's penalty (its index on the folds' L2 paths ``paths``) and whether its band keeps the
    correction, from the folds' choosing parts: ``none_nll`` holds each fold's per-time NLL ``(U, times)``
    there without the correction; a unit's gain counts in blocks of a horizon's fit times (``gap + 1``), shrunk
    toward the band's mean (:func:`shrunk_gains`)."""
    U = none_nll[0].shape[0]
    pick = sum(np.stack([h.sum(1) for _, h in path]) for path in paths).argmin(0)  # (U,)
    blocks = [np.add.reduceat(nn - np.stack([h for _, h in path])[pick, np.arange(U)], np.arange(0, nn.shape[1], gap + 1),
                              axis=1) for path, nn in zip(paths, none_nll)]
    return pick, shrunk_gains(np.concatenate(blocks, 1)) > 0.0


def too_sparse_to_fit(counts: np.ndarray, n_fit: int, bin_size: float, min_rate_hz: float = MIN_FIT_RATE_HZ) -> np.ndarray:
    """``(U,)`` units whose mean rate over the horizons ``counts`` ``(P, U, T)`` of the first ``n_fit`` fit times,
    or of the rest (the held-out part), is under ``min_rate_hz``: too few spikes to judge a fit."""
    rate = counts.mean(2) / bin_size  # (P, U) Hz over each horizon
    return (rate[:n_fit].mean(0) < min_rate_hz) | (rate[n_fit:].mean(0) < min_rate_hz)


def band_index(n_bins: int, bin_size: float, bands_ms=GLM_BANDS_MS) -> np.ndarray:
    """``(n_bins,)`` band of each horizon bin (by its start time; bins past the last band join it)."""
    start_ms = np.arange(int(n_bins)) * float(bin_size) * 1000.0
    edges = np.array([b[0] for b in bands_ms[1:]])
    return np.searchsorted(edges, start_ms + 1e-9, side="right")


def band_sums(x: np.ndarray, bands: np.ndarray, n_bands: int | None = None) -> np.ndarray:
    """``(..., T)`` -> ``(..., n_bands)`` sums over each band's bins (``bands``: each bin's band, in order, as
    :func:`band_index` gives them; default ``n_bands``: up to the last one; a band with no bins sums to 0)."""
    if np.any(np.diff(bands) < 0):
        raise ValueError("band_sums: bands must be in order (each band a run of consecutive bins)")
    present, starts = np.unique(bands, return_index=True)  # each band's first bin
    out = np.zeros((*x.shape[:-1], int(bands.max()) + 1 if n_bands is None else int(n_bands)), dtype=x.dtype)
    out[..., present] = np.add.reduceat(x, starts, axis=-1)
    return out


def _band_targets(counts: np.ndarray, bands: np.ndarray, n_bands: int) -> tuple[np.ndarray, np.ndarray]:
    """``(P, U, T)`` counts -> per-band sums ``(n_bands, P, U)`` and bins per band ``(n_bands,)``."""
    per = np.ascontiguousarray(np.moveaxis(band_sums(counts, bands, n_bands), -1, 0))
    return per, np.bincount(bands, minlength=n_bands).astype(np.float64)


def _log_band_sum(log_counts: np.ndarray, bands: np.ndarray, b: int) -> np.ndarray:
    """``(P, U, T)`` log expected counts per bin -> ``(P, U)`` log of their sum over band ``b``'s bins
    (each clipped to [-30, 10]; a band's bins are consecutive)."""
    k = np.flatnonzero(bands == b)
    part = torch.from_numpy(np.asarray(log_counts[:, :, k[0] : k[-1] + 1], dtype=np.float64))  # a view where it can
    return torch.logsumexp(part.clamp(-30.0, 10.0), dim=-1).numpy()


def _expand(rates_per_band: np.ndarray, bands: np.ndarray, bin_size: float) -> np.ndarray:
    """``(W, U, n_bands)`` Hz -> ``(W, U, T)`` float32 expected counts per bin."""
    return (rates_per_band[:, :, bands] * bin_size).astype(np.float32)


# ================================================================================================
# Population GLM
# ================================================================================================


@dataclass
class _Design:
    """A population GLM's design: per-unit columns ``own`` ``(U, P, F_o)`` (the unit's own history), then
    ``shared`` ``(P, F_s)`` columns every unit has alike (the population's components and the 1)."""

    own: np.ndarray
    shared: np.ndarray

    @property
    def F(self) -> int:
        return self.own.shape[-1] + self.shared.shape[-1]

    def rows(self, sl: slice) -> _Design:
        return _Design(self.own[:, sl], self.shared[sl])

    def units(self, k) -> _Design:
        return _Design(self.own[k], self.shared)

    def full(self) -> np.ndarray:
        """``(U, P, F)``: every unit's columns written out."""
        U, P = self.own.shape[:2]
        return np.concatenate([self.own, np.broadcast_to(self.shared, (U, P, self.shared.shape[1]))], -1)

    def lin(self, w: np.ndarray) -> np.ndarray:
        """``(U, F)`` weights -> ``(U, P)`` linear predictor."""
        f = self.own.shape[-1]
        return np.einsum("upf,uf->up", self.own, w[:, :f]) + w[:, f:] @ self.shared.T


class PopulationGLM:
    """Per-unit, per-band Poisson GLM on own and population history, fitted on one stretch of a recording."""

    def __init__(self, *, n_bins: int, bin_size: float, components: int = POP_COMPONENTS, taus=HISTORY_TAUS,
                 context_bins: tuple[float, int] | None = None):
        """``taus``: the time constants of the smoothed rates ``R`` it is given (they must include
        :data:`POP_TAUS` and the slow rate's). ``context_bins``: ``(bin seconds, number of bins)`` of the
        context counts it is given; then each unit reads the population forecast of its band
        (:mod:`nh_serve.core.population_forecast`) instead of every component."""
        self.n_bins, self.bin_size, self.components = int(n_bins), float(bin_size), int(components)
        self.context_bins = None if context_bins is None else (float(context_bins[0]), int(context_bins[1]))
        self.forecast = None if context_bins is None else self._new_forecast()  # fitted by fit()
        self.bands = band_index(n_bins, bin_size)
        self.n_bands = len(GLM_BANDS_MS)
        taus = [float(t) for t in taus]
        self.i_scales = [taus.index(t) for t in POP_TAUS]
        self.i_slow = taus.index(SLOW_TAU)
        # set by a fit as a correction: whether it corrects, its judged gain, and each fold's forecast and weights
        self.corrected, self.max_log, self.judged_gain, self.fold_forecasts, self.fold_W = False, 0.0, 0.0, [], None

    @staticmethod
    def supports(taus) -> bool:
        """Whether smoothed rates at ``taus`` hold every scale the GLM reads."""
        return all(float(t) in [float(x) for x in taus] for t in (*POP_TAUS, SLOW_TAU))

    def _logs(self, R: np.ndarray):
        logs = np.log(np.maximum(R, 0.0) + LOG_FLOOR_HZ)  # (P, U, K)
        slow = logs[..., self.i_slow]
        return logs, slow

    def _design(self, R: np.ndarray, bins=None, *, fitting: bool = False, targets=None, fold_rows=(), fold=None):
        """Smoothed rates ``(P, U, K)`` (and with ``context_bins`` the context counts ``bins`` ``(P, U, nb)``)
        -> each band's design (``F`` columns per unit), the offset ``(U, P)`` (log Hz) and, fitting, each fold's
        designs: ``targets``, the fit's ``(per-band counts, bins per band)``, are what the population forecast is
        fitted on, on all times for the first, and on the times of each of ``fold_rows`` for the folds' (kept in
        :attr:`fold_forecasts`). ``fold``: the design with that fold's forecast in place of the final one."""
        if self.context_bins is not None and bins is None:
            raise ValueError("PopulationGLM: this GLM reads the population forecast; pass the context counts (bins)")
        logs, slow = self._logs(R)
        own = np.stack([logs[..., i] - slow for i in self.i_scales], -1)  # (P, U, 4)
        pcs = np.concatenate(
            [((logs[..., i] - self.mu[j]) / self.sd[j]) @ self.V[j] for j, i in enumerate(self.i_scales)], axis=1
        )  # (P, 4 K)
        if fitting:
            self.own_lo, self.own_hi = own.min(0), own.max(0)
            self.pc_sd = pcs.std(0) + 1e-6
        own = np.clip(own, self.own_lo, self.own_hi)
        pcs = np.clip(pcs / self.pc_sd, -POP_CLIP_SD, POP_CLIP_SD)
        own, one, slow = np.ascontiguousarray(own.transpose(1, 0, 2)), np.ones((pcs.shape[0], 1)), np.ascontiguousarray(slow.T)
        if self.context_bins is None:
            X = [_Design(own, np.concatenate([pcs, one], 1))] * self.n_bands  # shared: (P, 4 K + 1), alike for every band
            return X, slow, [X] * len(fold_rows)  # nothing in this design saw the targets
        lagged = self.forecast.lags(bins, np.maximum(R[..., self.i_slow], 0.0))  # (P, U, n_lag)

        def designs(forecast: PopulationForecast) -> list[_Design]:
            return [_Design(own, np.concatenate([f, one], 1)) for f in forecast.features(pcs, lagged)]  # (P, rank + 1)

        if fitting:
            per, nb = targets
            self.fold_forecasts = [self._new_forecast().fit(pcs[r], lagged[r], per[:, r], nb) for r in fold_rows]
            self.forecast = self._new_forecast().fit(pcs, lagged, per, nb)
            return designs(self.forecast), slow, [designs(f) for f in self.fold_forecasts]
        return designs(self.forecast if fold is None else self.fold_forecasts[fold]), slow, []

    def _new_forecast(self) -> PopulationForecast:
        return PopulationForecast(components=self.components, bin_s=self.context_bins[0], n_bins=self.context_bins[1])

    def fit(self, R: np.ndarray, counts: np.ndarray, *, offset: np.ndarray | None = None, bins=None,
            gap: int = 0) -> PopulationGLM:
        """Fit on smoothed rates ``R`` ``(P, U, K)`` at prediction times in time order and their
        next-horizon counts ``(P, U, T)`` (with ``context_bins``: and the context counts ``bins`` ``(P, U, nb)``;
        the population forecast is fitted on the same times as the weights it is judged with, then on all).

        ``offset``: ``(P, U, T)`` log expected counts per bin of another predictor. The GLM then
        *corrects* that predictor (:meth:`_fit_correction`): a band's expected count is the predictor's
        times ``exp(w_b . x_u)`` (:meth:`log_correction`). ``gap``: fit times left out after each part that
        comes before another in time (:func:`purge_gap` of the times' spacing and horizon).
        """
        self._fit_pcs(R)
        per, nb = _band_targets(counts, self.bands, self.n_bands)  # (n_bands, P, U)
        P, U = R.shape[0], R.shape[1]
        n_fit = max(1, min(P - 1, int(round(0.8 * P))))
        if offset is not None:
            a, _ = correction_split(P)
            fold_rows = (slice(0, a), slice(P - a, P))  # the fit parts of the correction's two folds
        else:
            fold_rows = (slice(0, n_fit),)
        X, slow, folds = self._design(R, bins, fitting=True, targets=(per, nb), fold_rows=fold_rows)
        if offset is not None:
            return self._fit_correction(X, folds, counts, offset, gap)
        F = X[0].F
        self.W = np.zeros((self.n_bands, U, F))
        self.l2 = np.zeros((self.n_bands, U))
        o = slow + math.log(self.bin_size)
        held_out = n_fit + gap if P - n_fit > gap else n_fit  # the penalty's choice: times whose horizons the fit never saw
        for b in range(self.n_bands):
            y = per[b].T  # (U, P)
            e = np.full_like(y, nb[b])
            path = self._l2_path(folds[0][b], y, e, o, slice(None, n_fit), slice(held_out, None))
            nll = np.stack([h.sum(1) for _, h in path])  # (L2s, U) held-out NLL
            pick = nll.argmin(0)
            best_w = np.stack([w for w, _ in path])[pick, np.arange(U)]
            self.l2[b] = np.asarray(sorted(POP_L2_GRID, reverse=True))[pick]
            self.W[b] = self._refit(X[b], y, e, o, self.l2[b], best_w)
        self.release_folds()  # the penalty's fold serves this choice alone
        return self

    def _fit_pcs(self, R: np.ndarray) -> None:
        """The population's principal components at each time scale, from smoothed rates ``(P, U, K)``."""
        logs, _ = self._logs(R)
        P, U = R.shape[:2]
        K = max(1, min(self.components, U - 1, P - 1))
        self.mu, self.sd, self.V = [], [], []
        for i in self.i_scales:
            Z = logs[..., i]
            mu, sd = Z.mean(0), Z.std(0) + 0.05
            Zs = (Z - mu) / sd
            V = np.zeros((U, self.components))
            V[:, :K] = _top_right_singular_vectors(Zs - Zs.mean(0), K)
            self.mu.append(mu)
            self.sd.append(sd)
            self.V.append(V)

    @staticmethod
    def _l2_path(X, y, e, o, fit_rows: slice, rows: slice, tol: float = 1e-9) -> list[tuple[np.ndarray, np.ndarray]]:
        """Fits on the times ``fit_rows`` for each L2 penalty, strongest first (each solve starts from the
        last): ``[(w (U, F), held-out NLL (U, times) at each of the times rows)]``."""
        fit, ho = X.rows(fit_rows), X.rows(rows)
        out, w = [], None
        for l2 in sorted(POP_L2_GRID, reverse=True):
            pen = np.full(X.F, l2)
            pen[-1] = POP_INTERCEPT_L2
            w = fit_poisson(fit.own, y[:, fit_rows], shared=fit.shared, exposure=e[:, fit_rows], offset=o[:, fit_rows],
                            l2=pen, w0=w, max_iter=15, tol=tol)
            eta = np.clip(o[:, rows] + ho.lin(w), -30, 30)
            out.append((w, e[:, rows] * np.exp(eta) - y[:, rows] * eta))
        return out

    @staticmethod
    def _refit(X, y, e, o, l2: np.ndarray, w0: np.ndarray, tol: float = 1e-9) -> np.ndarray:
        """Each unit's GLM refitted on every time with its chosen penalty ``l2`` ``(U,)``."""
        pen = np.repeat(np.asarray(l2, dtype=np.float64)[:, None], X.F, axis=1)
        pen[:, -1] = POP_INTERCEPT_L2
        return fit_poisson(X.own, y, shared=X.shared, exposure=e, offset=o, l2=pen, w0=w0, max_iter=15, tol=tol)

    def _fit_correction(self, X: list[_Design], folds: list[list[_Design]], counts: np.ndarray, offset: np.ndarray,
                        gap: int = 0) -> PopulationGLM:
        """The GLM as a correction of the predictor whose log expected counts per bin are ``offset`` ``(P, U, T)``.

        The fit times split in time (:data:`CORRECTION_SPLIT`, two folds): the L2 path is fitted on the
        first part; on the second, each unit and band keeps its best penalty, and the bands whose gain there
        (shrunk toward the band's mean, :func:`shrunk_gains`) is positive; on the third, the kept bands'
        correction must predict better than the predictor alone, or there is none at all
        (``self.corrected`` False, and every weight 0). Real recordings drift and a correction that helps
        one minute can hurt the next: this choice is made on data none of the fits saw. The penalties and the
        kept bands are chosen on both folds' choosing parts together, and the second fold's fit holds the
        first fold's judging part: that part reaches the choices only through the other fold's weights
        (choosing on each fold's own part alone was too noisy: it dropped a correction that helps on a held-out
        real recording). Each fold's weights (:attr:`fold_W`, kept bands only, fitted on the fold's first
        part) stay for a later fit judged on the same parts (:meth:`log_correction` with ``fold``).
        """
        U, P, F = X[0].own.shape[0], X[0].own.shape[1], X[0].F
        per, _ = _band_targets(counts, self.bands, self.n_bands)  # (n_bands, P, U)
        parts = correction_folds(P, gap)  # two folds, forward and mirrored in time: (fit, choose, judge) times
        keep = np.zeros((self.n_bands, U), dtype=bool)
        judged, judged_none = 0.0, 0.0
        best_w = np.zeros((self.n_bands, U, F))
        fold_w = np.zeros((len(parts), self.n_bands, U, F))
        self.l2 = np.zeros((self.n_bands, U))
        os_, ys = [], []
        for b in range(self.n_bands):
            y = per[b].T  # (U, P)
            e = np.ones_like(y)  # the band's expected count under the predictor: exposure 1, offset its log
            o = _log_band_sum(offset, self.bands, b).T  # (U, P)
            os_.append(o)
            ys.append(y)
            paths = [self._l2_path(Xf[b], y, e, o, fit, choose, CORRECTION_TOL) for Xf, (fit, choose, _) in zip(folds, parts)]
            none_nll = [np.exp(o[:, c]) - y[:, c] * o[:, c] for _, c, _ in parts]  # (U, times) on each choosing part
            pick, keep[b] = _choices(paths, none_nll, gap)  # on both folds' choosing parts
            best_w[b] = np.stack([w for w, _ in paths[0]])[pick, np.arange(U)]  # the refit's start
            self.l2[b] = np.asarray(sorted(POP_L2_GRID, reverse=True))[pick]
            # judged fold by fold with that fold's weights (fitted on its first part) and the choices above
            for f, (Xf, (_, _, judge)) in enumerate(zip(folds, parts)):
                fold_w[f, b, keep[b]] = np.stack([w for w, _ in paths[f]])[pick, np.arange(U)][keep[b]]
                lin = Xf[b].rows(judge).lin(fold_w[f, b])  # (U, P_judge)
                judged_none += float((np.exp(o[:, judge]) - y[:, judge] * o[:, judge]).sum())
                eta = o[:, judge] + np.clip(lin, -CORRECTION_MAX_LOG, CORRECTION_MAX_LOG)
                judged += float((np.exp(eta) - y[:, judge] * eta).sum())
        self.corrected = judged < judged_none
        n_judge = max(1.0, float(sum(per[:, j].sum() for _, _, j in parts)))
        self.judged_gain = (judged_none - judged) / n_judge  # nats per held-out spike
        self.max_log = CORRECTION_MAX_LOG if self.corrected else 0.0
        self.W = np.zeros((self.n_bands, U, F))
        self.fold_W = fold_w if self.corrected else np.zeros_like(fold_w)
        if not self.corrected:
            return self
        for b in range(self.n_bands):
            k = keep[b]
            if k.any():
                self.W[b, k] = self._refit(X[b].units(k), ys[b][k], np.ones_like(ys[b][k]), os_[b][k], self.l2[b, k], best_w[b, k],
                                           CORRECTION_TOL)
        return self

    def log_correction(self, R: np.ndarray, bins=None, *, fold: int | None = None) -> np.ndarray:
        """``(W, U, T)`` float32 ``w_b . x_u`` per bin: the log factor a GLM fitted with ``offset`` applies
        to that predictor's rates, from smoothed rates ``R`` ``(W, U, K)`` (and context counts ``bins``).
        ``fold``: the correction fold ``fold`` of the fit gave (fitted on that fold's first part only, with its
        own forecast), for a later fit judged on the same held-out parts."""
        if fold is not None and self.fold_W is None:
            raise ValueError("PopulationGLM.log_correction: no fold corrections (not fitted as a correction, or released)")
        X, _, _ = self._design(R, bins, fold=fold)
        W = self.W if fold is None else self.fold_W[fold]
        eta = np.stack([x.lin(w) for x, w in zip(X, W)], -1).transpose(1, 0, 2)  # (W, U, n_bands)
        return np.clip(eta[:, :, self.bands], -self.max_log, self.max_log).astype(np.float32)

    def release_folds(self) -> None:
        """Drop each fold's forecast and weights once the fits judged on them are done (a session keeps the GLM)."""
        self.fold_forecasts, self.fold_W = [], None

    def predict(self, R: np.ndarray, bins=None) -> np.ndarray:
        """``(W, U, T)`` float32 expected counts per bin from smoothed rates ``(W, U, K)`` (and context counts ``bins``)."""
        X, slow, _ = self._design(R, bins)  # F columns per unit, (U, W)
        eta = slow[None] + np.stack([x.lin(w) for x, w in zip(X, self.W)])  # (n_bands, U, W) log Hz
        rates = np.exp(np.clip(eta, -20.0, 10.0)).transpose(2, 1, 0)  # (W, U, n_bands)
        return _expand(rates, self.bands, self.bin_size)


def window_counts(times, units, t_now, *, n_units: int, context_bins: tuple[float, int] = BASELINE_CONTEXT_BINS) -> np.ndarray:
    """``(W, U, nb)`` each unit's counts in the ``context_bins`` of the context that ends at each ``t_now``
    (:func:`nh_serve.data.tokens.context_counts`, as the model's tokenizer bins a window)."""
    bin_s, nb = float(context_bins[0]), int(context_bins[1])
    ctx = bin_s * nb
    times, units = np.asarray(times, dtype=np.float64), np.asarray(units, dtype=np.int64)
    t_now = np.asarray(t_now, dtype=np.float64).reshape(-1)
    lo, hi = np.searchsorted(times, t_now - ctx), np.searchsorted(times, t_now)
    out = np.zeros((t_now.size, int(n_units), nb), dtype=np.float32)
    for i, (a, b, t) in enumerate(zip(lo, hi, t_now)):
        out[i] = context_counts(times[a:b] - (t - ctx), units[a:b], n_units=n_units, context_s=ctx, n_bins=nb)
    return out


def fit_population_glm(times, units, *, n_units: int, start: float, ref_rate_hz, fit_from: float, fit_to: float,
                       n_bins: int, bin_size: float, init=None, init_time: float | None = None,
                       forecast: bool = False) -> PopulationGLM:
    """A :class:`PopulationGLM` fitted on prediction times every 0.1 s in ``[fit_from + 1 s, fit_to - horizon]``
    (``forecast``: one that reads the population forecast of :data:`BASELINE_CONTEXT_BINS`).

    ``times`` / ``units`` hold the spikes from ``start`` (or from ``init_time``, with the
    smoothed-rate state ``init`` there) to ``fit_to``.
    """
    span = n_bins * bin_size
    pos = np.arange(fit_from + 1.0, fit_to - span + 1e-9, POP_STEP_S)
    if pos.size < 10:
        raise InputError(
            f"population GLM: the fit window [{fit_from:g}, {fit_to:g}) s is too short; it needs at least "
            f"{1.0 + span + 10 * POP_STEP_S:g} s"
        )
    R = ema_rates(times, units, n_units=n_units, t_eval=pos, start=start if init is None else init_time,
                  ref_rate_hz=ref_rate_hz, taus=HISTORY_TAUS, init=init)
    counts = target_counts(times, units, pos, n_units=n_units, bin_size=bin_size, n_bins=n_bins)
    gap = purge_gap(span, POP_STEP_S)
    if not forecast:
        return PopulationGLM(n_bins=n_bins, bin_size=bin_size).fit(R, counts, gap=gap)
    bins = window_counts(times, units, pos, n_units=n_units)
    return PopulationGLM(n_bins=n_bins, bin_size=bin_size, context_bins=BASELINE_CONTEXT_BINS).fit(R, counts, bins=bins, gap=gap)
