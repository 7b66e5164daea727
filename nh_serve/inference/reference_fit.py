"""The registration fit: each new unit's population read-out, fitted on the reference window.

A history model with a read-out (``cfg.readout_dim``) predicts
``log_rate[u, k] = eta0[u, k] + r_u . X_k`` where ``eta0`` is everything the network
computes zero-shot (offset, univariate GLM term, head, zero-shot read-out) and
``X_k = [P_k, 1]`` the decoded population forecast of bin ``k`` with a column of ones
(:meth:`~nh_serve.core.model.NeuroHorizon.log_rate_parts`). With the network frozen,
``r_u`` is the solution of a convex Poisson regression per unit, solved for every unit
at once by Newton's method (:func:`nh_serve.core.poisson.fit_poisson`):

1. Contexts every :data:`STEP_S` seconds inside the reference window (``fit="reference"``; every
   0.05 s with ``fit="reference-dense"``, :data:`FIT_STEPS_S`: twice the windows and about twice the
   time, for fits that carry over better), starting :data:`WARMUP_S` seconds in (so every window has
   some observed history; the history starts at the reference start, at the reference rates), at
   most :data:`MAX_WINDOWS` of them (twice that for the dense fit); each window's next second is the target.
2. One frozen forward pass per window gives ``eta0`` and ``X``.
3. On windows :data:`READOUT_STEP_S` apart (rows are the windows' bins), split
   in time as the correction's (:data:`~nh_serve.core.glm.CORRECTION_SPLIT`, each part starting a horizon
   after the one before it: :func:`~nh_serve.core.glm.purge_gap`): ``r_u`` for each
   L2 penalty of :data:`L2_GRID` on the first 70%; each unit keeps the penalty whose fit
   predicts the next 15% best, and a fit at all only where that beats the zero-shot
   prediction (``r_u = 0``) there; the read-outs are kept at all only where they predict the
   last 15% better than none. Kept units are refitted on all those windows.
4. The population correction: a population GLM (:class:`nh_serve.core.glm.PopulationGLM`:
   per unit and horizon band, the unit's own smoothed rates and the population forecast of the band,
   :mod:`nh_serve.core.population_forecast`, from the windows' history rates and context counts
   ``unit_bins``; models without those read the population's principal components) fitted with everything above as its
   offset, so it multiplies the model's rates by ``exp(w_b . x_u)`` (models whose history holds
   the GLM's time scales, :meth:`~nh_serve.core.glm.PopulationGLM.supports`). Fitted on the first
   70% of the windows; each unit and band keeps it only where it predicts the next 15% better
   (:func:`~nh_serve.core.glm.shrunk_gains`); whether to correct at all is decided
   on the last 15%, which none of the fits saw; both in two folds, the second mirrored in time.
5. The recording's calibration (:mod:`nh_serve.core.calibration`): two numbers per recording,
   how much of the slow rate's 0.1 Hz floor to take out of the corrected rates (it sets the level
   of units that fire at a fraction of a hertz) and how much of the network's departure from the
   slow rate to keep (a recording without short-term structure keeps less), fitted and judged on
   the read-out's windows with the same split, each fold with the population correction of the same fold
   (fitted without the part that judges); in a streaming refit (``history_init`` given: rates
   the stream carried, not started at the window's own mean) also which time scale sets the level.
   Steps 4 and 5 together are the :class:`RateCorrection` the Predictor applies.

The read-out is kept only for units firing at least 1 Hz in both parts of the reference and only
where the held-out gain exceeds :data:`~nh_serve.core.glm.KEEP_MARGIN_NATS`. A reference
shorter than :data:`MIN_FIT_REFERENCE_S` leaves too few held-out seconds for per-unit fits: it gets the
calibration alone (a few numbers pooled over every unit, judged the same way; ``calibration_only`` in the
record), and one shorter than :data:`MIN_CALIBRATION_REFERENCE_S` no fit at all (zero-shot, with a note). On real
recordings a reference-window fit can still fail to carry over to an hour of drift:
``refit_every_s`` refits on the recent stream.

Deterministic (no random numbers; float64 solves). Units that are not kept get
``r_u = 0``: their predictions stay zero-shot. :class:`Refitter` repeats the fit on
the most recent stretch of a stream (``register(..., refit_every_s=...)``).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from nh_serve.core.calibration import LEVEL_TAUS, Calibration
from nh_serve.core.glm import (
    CORRECTION_TOL,
    KEEP_MARGIN_NATS,
    PopulationGLM,
    correction_folds,
    purge_gap,
    too_sparse_to_fit,
)
from nh_serve.core.poisson import fit_poisson
from nh_serve.data.history import SLOW_TAU, ema_rates
from nh_serve.data.windows import collate, cut_windows, target_counts, tokenize_window

STEP_S = 0.1
#: Spacing of the fit's windows per fit mode (seconds).
FIT_STEPS_S = {"reference": STEP_S, "reference-dense": 0.05}
WARMUP_S = 5.0
MAX_WINDOWS = 600  # at STEP_S; a denser fit may use proportionally more
READOUT_STEP_S = 0.5  # the read-out's fit uses windows this far apart; the population correction every one
#: Shorter references leave too few held-out seconds to tell a fit that generalises from one that follows noise.
MIN_FIT_REFERENCE_S = 45.0
#: A shorter reference, down to this, gets the recording's calibration alone (a few numbers pooled over units).
MIN_CALIBRATION_REFERENCE_S = 20.0
L2_GRID = (3.0, 30.0)  # penalties tried per unit; the chosen ones are counted in the fit record (l2_chosen)
MAX_ITER = 12
FORWARD_CHUNK_UNIT_WINDOWS = 4_096  # windows x units per forward pass (smaller chunks stay in cache)
SOLVE_CHUNK_UNITS = 256  # units per batched Newton solve


class RateCorrection:
    """What the registration fit does to the network's rates (the Predictor applies it on every backend
    alike): the population GLM's correction, where one was kept, then the recording's calibration
    (:mod:`nh_serve.core.calibration`), where one was kept."""

    def __init__(self, *, population: PopulationGLM | None, calibration: Calibration | None):
        self.population, self.calibration = population, calibration

    def apply(self, rates_hz: np.ndarray, R: np.ndarray, bins: np.ndarray | None = None) -> np.ndarray:
        """Corrected ``(W, U, T)`` float32 rates from the network's rates (Hz), the smoothed rates ``R``
        ``(W, U, K)`` at the context ends and the windows' context counts ``bins`` ``(W, U, nb)`` (the
        tokenizer's ``unit_bins``; the population forecast reads them)."""
        R = np.asarray(R, dtype=np.float64)
        log_r = np.log(np.clip(np.asarray(rates_hz, dtype=np.float64), 1e-30, 1e12))  # finite, whatever the backend gave
        if self.population is not None:
            log_r = log_r + self.population.log_correction(R, bins)
        if self.calibration is not None:
            log_r = log_r + self.calibration.log_factor(log_r, R)
        return np.exp(log_r).astype(np.float32)


def context_bins(cfg) -> tuple[float, int] | None:
    """The context bins ``(seconds, number)`` of a model's ``unit_bins`` that the population correction's forecast
    reads (:mod:`nh_serve.core.population_forecast`); None for a model without them (the correction then reads
    the population's components)."""
    return (cfg.context_s / cfg.pop_context_bins, int(cfg.pop_context_bins)) if cfg.pop_context_bins else None


def fit_windows(r0: float, r1: float, *, context_s: float, horizon_s: float, step_s: float = STEP_S) -> np.ndarray:
    """Context starts of the fit inside ``[r0, r1)``: every ``step_s`` from :data:`WARMUP_S` in (from
    the start of a short reference), at most :data:`MAX_WINDOWS` ``* STEP_S / step_s`` evenly spread (empty
    when too short)."""
    last = r1 - context_s - horizon_s
    first = r0 + WARMUP_S if (last - r0 - WARMUP_S) / step_s >= 4 else r0
    if last < first:
        return np.zeros(0)
    most = int(round(MAX_WINDOWS * STEP_S / step_s))
    n = (last - first) / step_s + 1  # windows at the full spacing; never built when there are too many
    if n > most:
        return np.linspace(first, last, most)
    return first + step_s * np.arange(int(np.floor(n + 1e-9)))


@torch.no_grad()
def _frozen_parts(model, cfg, windows, *, unit_features, ref_rate_hz, embeddings, stop=lambda: None):
    """``eta0`` ``(W, U, T)`` and the read-out design ``(W, T, K + 1)`` of every window (float64), and the
    windows' context counts ``(W, U, nb)`` (the tokenizer's ``unit_bins``; None for a model without them)."""
    U = embeddings.shape[0]
    step = max(1, FORWARD_CHUNK_UNIT_WINDOWS // max(U, 1))
    eta0, designs, bins = None, None, []
    for i in range(0, len(windows), step):
        stop()  # an abandoned registration stops between chunks
        items = [tokenize_window(cfg, w, unit_features=unit_features, ref_rate_hz=ref_rate_hz) for w in windows[i : i + step]]
        batch = collate(items)
        batch.pop("unit_features")
        if "unit_bins" in batch:
            bins.append(batch["unit_bins"].numpy())
        emb = embeddings.unsqueeze(0).expand(len(items), -1, -1)
        eta, design, _ = model.log_rate_parts(emb, **batch)
        if eta0 is None:  # written chunk by chunk: no list of copies to join
            eta0 = np.empty((len(windows), *eta.shape[1:]))
            designs = np.empty((len(windows), *design.shape[1:]))
        eta0[i : i + len(items)] = eta.numpy()
        designs[i : i + len(items)] = design.numpy()
    return eta0, designs, np.concatenate(bins) if bins else None


def fit_readout(
    model,
    *,
    times,
    units,
    reference: tuple[float, float],
    unit_features,
    ref_rate_hz,
    embeddings: torch.Tensor,
    history_init=None,
    should_stop=None,
    step_s: float = STEP_S,
) -> tuple[torch.Tensor, RateCorrection | None, dict]:
    """Fit every unit's read-out on the spikes ``times`` / ``units`` (sorted, unit rows) of ``reference``.

    Returns ``(readout (U, K + 1) float32, rate correction (:class:`RateCorrection`) or None, info)``; ``info`` says how many units kept a fit,
    the held-out Poisson NLL per (unit, bin) before and after, the penalties chosen and the
    seconds it took. ``history_init``: the units' smoothed-rate state at ``reference[0]``
    (default: their reference rates, as at registration). ``should_stop``: called between the
    steps (it raises to abandon the fit). ``step_s``: spacing of the fit's windows (:data:`FIT_STEPS_S`).
    """
    stop = should_stop if should_stop is not None else (lambda: None)
    t_start = time.monotonic()
    cfg = model.cfg
    r0, r1 = (float(x) for x in reference)
    U = int(embeddings.shape[0])
    K1 = cfg.readout_dim + 1
    if not (math.isfinite(step_s) and 0.01 <= step_s <= 1.0):
        raise ValueError(f"step_s: the fit's window spacing must be between 0.01 and 1 s, got {step_s!r}")
    starts = fit_windows(r0, r1, context_s=cfg.context_s, horizon_s=cfg.horizon_s, step_s=step_s)
    info = {"windows": int(starts.size), "window_step_s": float(step_s), "units": U, "units_fitted": 0}
    zero = torch.zeros(U, K1)
    calibration_only = r1 - r0 < MIN_FIT_REFERENCE_S  # too short for per-unit fits: the pooled calibration alone
    why = None
    if r1 - r0 < MIN_CALIBRATION_REFERENCE_S:
        why = f"a fit needs at least {MIN_CALIBRATION_REFERENCE_S:g} s of reference (its later parts judge it)"
    elif starts.size < 10:
        why = f"the reference holds {starts.size} fit windows of this model's context and horizon; a fit needs 10"
    elif calibration_only and not PopulationGLM.supports(cfg.history_taus):
        why = (f"a reference under {MIN_FIT_REFERENCE_S:g} s gets the calibration alone, and this model's history "
               "lacks the time scales it reads")
    if why is not None:
        info.update(seconds=round(time.monotonic() - t_start, 4), note=why + "; zero-shot")
        return zero, None, info
    info["calibration_only"] = calibration_only
    times = np.asarray(times, dtype=np.float64)
    units = np.asarray(units, dtype=np.int64)
    if history_init is None:
        windows = cut_windows(times, units, starts, n_units=U, cfg=cfg, history_start=r0, ref_rate_hz=ref_rate_hz)
    else:
        hr = ema_rates(times, units, n_units=U, t_eval=starts + cfg.context_s, start=r0, ref_rate_hz=ref_rate_hz,
                       taus=cfg.history_taus, init=history_init)
        windows = cut_windows(times, units, starts, n_units=U, cfg=cfg, history_start=r0, history_rates=hr)
    eta0, design, bins = _frozen_parts(model, cfg, windows, unit_features=unit_features, ref_rate_hz=ref_rate_hz,
                                 embeddings=embeddings, stop=stop)  # (W, U, T), (W, T, K1)
    stop()
    y = target_counts(times, units, starts + cfg.context_s, n_units=U, bin_size=cfg.bin_size_s, n_bins=cfg.n_bins)
    T = cfg.n_bins
    if design.shape[-1] == 0:  # a model without the population path has no read-out design: zeros stand in
        design = np.zeros((starts.size, T, K1))
    sub = slice(None, None, max(1, int(round(READOUT_STEP_S / step_s))))  # the read-out's Poisson fit: every few windows
    W = eta0[sub].shape[0]
    X = design[sub].reshape(W * T, K1)  # rows: (window, bin), shared by every unit
    off = eta0[sub].transpose(1, 0, 2).reshape(U, W * T) + math.log(cfg.bin_size_s)  # log expected counts
    off = np.clip(off, -30.0, 10.0)
    Y = y[sub].transpose(1, 0, 2).reshape(U, W * T).astype(np.float64)
    # fit on the first part, each unit's choice on the next, and whether to keep any read-out on the last
    # (the fit times a horizon after each part's are left out of the next: purge_gap)
    fit_w, choose_w, judge_w = correction_folds(W, purge_gap(cfg.horizon_s, step_s * sub.step))[0]
    w_a, w_b = fit_w.stop, choose_w.stop
    n_fit, choose, judge = w_a * T, slice(choose_w.start * T, w_b * T), slice(judge_w.start * T, None)

    def nll(w: np.ndarray, g: slice, rows: slice) -> np.ndarray:  # (units,) Poisson NLL of units g on ``rows``
        eta = np.clip(off[g, rows] + w @ X[rows].T, -30.0, 30.0)
        return (np.exp(eta) - Y[g, rows] * eta).sum(1)

    sparse = too_sparse_to_fit(y[sub][:w_b], w_a, cfg.bin_size_s)  # (U,)
    best_l2, best_w = np.full(U, np.inf), np.zeros((U, K1))
    judged_zero, judged_fit = 0.0, 0.0
    for c0 in range(0, 0 if calibration_only else U, SOLVE_CHUNK_UNITS):  # units are independent: chunks bound memory
        g = slice(c0, min(U, c0 + SOLVE_CHUNK_UNITS))
        # a gain of a margin (KEEP_MARGIN_NATS), and only units with enough spikes (MIN_FIT_RATE_HZ)
        b = np.where(sparse[g], -np.inf, nll(np.zeros((g.stop - g.start, K1)), g, choose) - KEEP_MARGIN_NATS)
        b_l2, b_w = np.full(g.stop - g.start, np.inf), np.zeros((g.stop - g.start, K1))
        for l2 in L2_GRID:
            stop()
            w = fit_poisson(X[:n_fit], Y[g, :n_fit], offset=off[g, :n_fit], l2=l2, max_iter=MAX_ITER, tol=CORRECTION_TOL)
            got = nll(w, g, choose)
            better = got < b - 1e-9
            b, b_l2 = np.where(better, got, b), np.where(better, l2, b_l2)
            b_w[better] = w[better]
        best_l2[g], best_w[g] = b_l2, b_w
        judged_zero += float(nll(np.zeros_like(b_w), g, judge).sum())
        judged_fit += float(nll(b_w, g, judge).sum())
    keep = np.isfinite(best_l2) & (judged_fit < judged_zero)  # no read-out at all unless the last part gains
    readout = np.zeros((U, K1))
    for c0 in range(0, U, SOLVE_CHUNK_UNITS):
        k = c0 + np.flatnonzero(keep[c0 : c0 + SOLVE_CHUNK_UNITS])
        if k.size:
            readout[k] = fit_poisson(X, Y[k], offset=off[k], l2=best_l2[k][:, None], w0=best_w[k], max_iter=MAX_ITER,
                                    tol=CORRECTION_TOL)
    correction = None
    if PopulationGLM.supports(cfg.history_taus):
        # The population correction on top, on every window: a population GLM whose offset is everything
        # fitted so far (the network's log rates with the read-outs just fitted); then the recording's calibration.
        stop()
        eta = eta0  # (W, U, T), the log expected counts from here on (eta0 is not needed again)
        eta += math.log(cfg.bin_size_s)
        if keep.any():  # the read-outs just fitted: (W, T, K1) @ (K1, U), a BLAS product
            eta += (design @ readout.T).transpose(0, 2, 1)
        R = np.stack([w.history_rates for w in windows]).astype(np.float64)  # (W, U, K) at the context ends
        population = None
        if not calibration_only:
            gap = purge_gap(cfg.horizon_s, step_s)  # fit windows whose next second overlaps the part before them
            population = PopulationGLM(n_bins=T, bin_size=cfg.bin_size_s, taus=cfg.history_taus,
                                       context_bins=context_bins(cfg)).fit(R, y, offset=eta, bins=bins, gap=gap)
            info["population_units_corrected"] = int((np.abs(population.W).sum((0, 2)) > 0).sum())
            info["population_corrected"] = bool(population.corrected)
            info["population_judged_gain"] = round(float(population.judged_gain), 5)
            if not population.corrected:
                population = None
        stop()
        # the recording's calibration (floor, departures) on the read-out's windows, with everything above as offset;
        # judged with each fold's own population correction, fitted without the part that judges
        e, e_folds = eta[sub], None
        if population is not None:
            R_s, b_s = R[sub], None if bins is None else bins[sub]
            e_folds = [e + population.log_correction(R_s, b_s, fold=f) for f in range(2)]
            e = e + population.log_correction(R_s, b_s)
        # the level's time scale only where the rates are causal: a refit's come from the stream before its window
        cal, cal_info = Calibration.fit(log_expected=e, counts=y[sub], R=R[sub], taus=cfg.history_taus,
                                        i_slow=list(cfg.history_taus).index(SLOW_TAU), bin_size=cfg.bin_size_s,
                                        level_taus=LEVEL_TAUS if history_init is not None else (),
                                        log_expected_folds=e_folds)
        if population is not None:
            population.release_folds()  # judged: the session keeps the correction, not its folds
        info.update(cal_info)
        if population is not None or cal.active:
            correction = RateCorrection(population=population, calibration=cal if cal.active else None)
    n_judge = max(1, W * T - judge.start) * U
    if not calibration_only:  # the read-outs' record (none were tried on a short reference)
        info.update(
            units_fitted=int(keep.sum()),
            heldout_nll_zero_shot=judged_zero / n_judge,  # per (unit, bin) on the last part of the fit windows
            heldout_nll_fitted=min(judged_fit, judged_zero) / n_judge,
            readout_judged_gain=(judged_zero - judged_fit) / n_judge,
            l2_chosen={f"{l2:g}": int(np.sum(best_l2[keep] == l2)) for l2 in L2_GRID},
        )
    info["seconds"] = round(time.monotonic() - t_start, 4)
    return torch.from_numpy(readout.astype(np.float32)), correction, info
