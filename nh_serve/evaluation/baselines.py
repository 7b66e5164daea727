"""Causal forecasters a neuroscientist would try first: the measuring stick of every model.

Every baseline predicts, for each unit, the expected spike count in each of
``n_bins`` horizon bins of ``bin_size`` seconds that start at ``t_now`` (bin ``k``
covers ``[t_now + k bin_size, t_now + (k + 1) bin_size)``), using only spikes
strictly before ``t_now`` and each unit's reference-window rate ``r_ref``
(:func:`nh_serve.data.features.reference_rate_hz`). Rates are in Hz, converted
to counts as ``rate * bin_size`` and floored at ``RATE_FLOOR_HZ * bin_size``.

The ladder (:data:`DEFAULT_BASELINES`; ``--baselines full`` adds ``population_glm_recent``):

``reference_rate``
    ``r_ref``, flat over the horizon.
``persistence``
    The last second's rate shrunk toward ``r_ref`` with ``PERSIST_PRIOR_S`` seconds of
    pseudo-observation, ``r_ctx = (n_1s + 3 r_ref) / (1 + 3)``, relaxing back to ``r_ref``
    over the horizon: ``r(l) = r_ref + (r_ctx - r_ref) exp(-l / PERSIST_DECAY_S)`` at the
    bin-centre lag ``l``.
``exp_smooth``
    ``(S + 5 r_ref) / (E + 5)`` with ``S = sum_i exp(-(t_now - t_i) / 20 s)`` over the last
    60 s and ``E = 20 (1 - exp(-60 / 20))`` its exposure: a 20 s exponential average shrunk
    toward ``r_ref``, flat.
``ema_tau{1,2,5,10,30,60}``
    The exponential moving average of the unit's rate with time constant tau seconds
    (:mod:`nh_serve.data.history`: started at ``r_ref`` at the recording start, every spike
    adds ``1 / tau``), with no shrinkage, flat.
``persistence_k{1,5,20}``
    The last second's rate shrunk toward ``r_ref`` with ``k`` seconds of pseudo-observation,
    ``(n_1s + k r_ref) / (1 + k)`` (less than a second observed: its length instead of 1), flat.
``univariate_glm`` / ``population_glm`` / ``population_glm_forecast`` / ``population_glm_recent``
    Poisson GLMs on each unit's smoothed-rate history (and the population's, for the
    population ones): :mod:`nh_serve.core.glm`. ``population_glm_forecast`` reads the population
    forecast (:mod:`nh_serve.core.population_forecast`: the last 0.6 s of the population's activity
    in 100 ms bins, reduced to a few numbers per band) instead of every component.

``best_baseline`` (in eval and score) is the best of these *in hindsight* on each
recording: it knows which forecaster won, which no causal forecaster could, so a
model that beats it beats every one of them.

:func:`predict_baselines` computes the history-only baselines for one ``t_now``
from that window's spikes (the reference implementation the tests read);
:class:`BaselineSet` computes every baseline for blocks of windows of a whole
recording, with the same values.

The constants of ``persistence`` and ``exp_smooth`` were tuned once by grid search
of pooled bits/spike on three real and three synthetic recordings (the smallest
mean regret over the six; the optimum is flat).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nh_serve.core.glm import (
    RECENT_EVERY_S,
    RECENT_SPAN_S,
    fit_population_glm,
    window_counts,
)
from nh_serve.core.univariate_glm import UnivariateGLM
from nh_serve.data.history import HISTORY_TAUS, HistoryTrack, ema_rates
from nh_serve.data.spikes import check_spikes, prefix_counts
from nh_serve.errors import InputError

DEFAULT_HISTORY_S = 60.0  # history of persistence / exp_smooth, seconds
CONTEXT_S = 1.0  # "the last second", seconds (the model's context length)
PERSIST_PRIOR_S = 3.0
PERSIST_DECAY_S = 3.0
SMOOTH_TAU_S = 20.0
SMOOTH_PRIOR_S = 5.0
RATE_FLOOR_HZ = 1e-2  # smallest predicted rate, Hz (one spike per 100 s)

EMA_TAUS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
PERSIST_KS = (1.0, 5.0, 20.0)
LEGACY = ("reference_rate", "persistence", "exp_smooth")
EMA_NAMES = tuple(f"ema_tau{t:g}" for t in EMA_TAUS)
PERSIST_K_NAMES = tuple(f"persistence_k{k:g}" for k in PERSIST_KS)
HISTORY_ONLY = LEGACY + EMA_NAMES + PERSIST_K_NAMES
DEFAULT_BASELINES = HISTORY_ONLY + ("univariate_glm", "population_glm", "population_glm_forecast")
FULL_BASELINES = DEFAULT_BASELINES + ("population_glm_recent",)
BASELINE_SETS = {"default": DEFAULT_BASELINES, "full": FULL_BASELINES}
#: Every smoothed-rate time scale any baseline reads (seconds).
ALL_TAUS = tuple(sorted(set(HISTORY_TAUS) | set(EMA_TAUS)))

DEFAULT_GLM_FILE = Path(__file__).resolve().parents[1] / "models" / "univariate_glm.json"


def baseline_names(which: str) -> tuple[str, ...]:
    """The baselines of a set name (``default`` or ``full``)."""
    if which not in BASELINE_SETS:
        raise InputError(f"--baselines: choose one of {', '.join(BASELINE_SETS)}, got {which!r}")
    return BASELINE_SETS[which]


def default_univariate_glm() -> UnivariateGLM:
    """The univariate GLM weights shipped with nh-serve (``nh_serve/models/univariate_glm.json``)."""
    import json

    try:
        return UnivariateGLM.from_dict(json.loads(DEFAULT_GLM_FILE.read_text()))
    except (OSError, ValueError) as e:
        raise InputError(
            f"univariate GLM: cannot read the shipped weights {DEFAULT_GLM_FILE.name} ({e}); "
            "refit them with `nh-serve fit-baselines`"
        ) from None


def checkpoint_univariate_glm(checkpoint) -> tuple[UnivariateGLM, str]:
    """The univariate GLM a checkpoint was trained beside (``training["baselines"]["univariate_glm"]``),
    else the shipped default; and where it came from (``"checkpoint"`` or ``"default"``)."""
    rec = ((getattr(checkpoint, "training", None) or {}).get("baselines") or {}).get("univariate_glm")
    if rec:
        return UnivariateGLM.from_dict(rec), "checkpoint"
    return default_univariate_glm(), "default"


def _floor_counts(rate_hz: np.ndarray, bin_size: float, n_bins: int) -> np.ndarray:
    """``(..., U)`` or ``(..., U, T)`` Hz -> ``(..., U, T)`` float32 counts (floored, times the bin)."""
    r = np.maximum(np.nan_to_num(rate_hz, nan=RATE_FLOOR_HZ), RATE_FLOOR_HZ) * bin_size
    if r.shape[-1] != n_bins or r.ndim < 2:
        r = np.repeat(r[..., None], n_bins, axis=-1)
    return np.ascontiguousarray(r, dtype=np.float32)


# ================================================================================================
# One window: the reference implementation of the history-only baselines
# ================================================================================================


def _finite(x, name: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise InputError(f"baselines: {name} must be a number, got {x!r}") from None
    if not math.isfinite(v):
        raise InputError(f"baselines: {name} must be finite, got {v}")
    return v


def predict_baselines(
    *,
    times,
    unit_index,
    n_units: int,
    t_now: float,
    ref_rate_hz,
    n_bins: int,
    bin_size: float,
    history_start: float | None = None,
    recording_start: float | None = None,
    names=HISTORY_ONLY,
) -> dict[str, np.ndarray]:
    """Every history-only baseline (``names``, a subset of :data:`HISTORY_ONLY`) for one ``t_now``.

    Args:
        times, unit_index: ``(N,)`` sorted spike times (seconds, all before ``t_now``) and units.
        n_units: number of units; ``ref_rate_hz`` ``(n_units,)`` reference rates (Hz).
        t_now: prediction time, seconds; ``n_bins`` / ``bin_size``: the horizon bins.
        history_start: start of the 60 s history of ``persistence`` / ``exp_smooth`` (default
            ``max(recording_start or 0, t_now - 60)``); earlier spikes are ignored by them.
        recording_start: where the ``ema_tau*`` averages start (at ``r_ref``; default the
            earliest of ``history_start`` and the first spike given); pass the recording start
            and every spike since to match :class:`BaselineSet`.

    Returns ``{name: (n_units, n_bins) float32 expected counts per bin}``, all finite and > 0.
    """
    t_now = _finite(t_now, "t_now (seconds)")
    bin_size = _finite(bin_size, "bin_size (seconds)")
    if bin_size <= 0:
        raise InputError(f"baselines: bin_size must be > 0 seconds, got {bin_size}")
    if isinstance(n_bins, bool) or int(n_bins) != n_bins or int(n_bins) <= 0:
        raise InputError(f"baselines: n_bins must be a positive integer, got {n_bins!r}")
    unknown = sorted(set(names) - set(HISTORY_ONLY))
    if unknown:
        raise InputError(f"baselines: {', '.join(unknown)} need a whole recording; use BaselineSet")
    n_bins, U = int(n_bins), int(n_units)
    t, u = check_spikes(times, unit_index, n_units=U, name="history spikes")
    if t.size and t[-1] >= t_now:
        bad = int(np.flatnonzero(t >= t_now)[0])
        raise InputError(
            f"history spikes: spike #{bad} at {t[bad]:.6g} s is not before t_now = {t_now:.6g} s; "
            "baselines are causal: pass only spikes before t_now"
        )
    try:
        ref = np.asarray(ref_rate_hz, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("baselines: ref_rate_hz must be an array of rates in Hz") from None
    if ref.shape != (U,):
        raise InputError(f"baselines: ref_rate_hz has shape {ref.shape}; pass one reference rate (Hz) per unit: ({U},)")
    if not np.all(np.isfinite(ref)) or np.any(ref < 0):
        raise InputError("baselines: ref_rate_hz must be finite and >= 0 (Hz)")
    rs = None if recording_start is None else _finite(recording_start, "recording_start")
    hs = max(rs or 0.0, t_now - DEFAULT_HISTORY_S) if history_start is None else _finite(history_start, "history_start")
    if hs > t_now:
        raise InputError(f"baselines: history_start {hs:.6g} s is after t_now {t_now:.6g} s")
    if rs is None:
        rs = min(hs, float(t[0])) if t.size else hs
    if rs > t_now:
        raise InputError(f"baselines: recording_start {rs:.6g} s is after t_now {t_now:.6g} s")
    out: dict[str, np.ndarray] = {}
    in_hist = t >= hs
    th, uh = t[in_hist], u[in_hist]
    w = min(CONTEXT_S, t_now - hs)
    n_ctx = np.bincount(uh[th >= t_now - w], minlength=U).astype(np.float64)  # (U,)
    lags = (np.arange(n_bins) + 0.5) * bin_size
    if "reference_rate" in names:
        out["reference_rate"] = _floor_counts(ref, bin_size, n_bins)
    if "persistence" in names:
        r_ctx = (n_ctx + PERSIST_PRIOR_S * ref) / (w + PERSIST_PRIOR_S)
        relax = np.exp(-lags / PERSIST_DECAY_S)
        out["persistence"] = _floor_counts(ref[:, None] + (r_ctx - ref)[:, None] * relax[None, :], bin_size, n_bins)
    if "exp_smooth" in names:
        s = np.bincount(uh, weights=np.exp(-(t_now - th) / SMOOTH_TAU_S), minlength=U)
        exposure = SMOOTH_TAU_S * -math.expm1(-(t_now - hs) / SMOOTH_TAU_S)
        out["exp_smooth"] = _floor_counts((s + SMOOTH_PRIOR_S * ref) / (exposure + SMOOTH_PRIOR_S), bin_size, n_bins)
    if any(n in names for n in EMA_NAMES):
        R = ema_rates(t, u, n_units=U, t_eval=[t_now], start=rs, ref_rate_hz=ref, taus=EMA_TAUS)[0]  # (U, 6)
        for i, name in enumerate(EMA_NAMES):
            if name in names:
                out[name] = _floor_counts(R[:, i], bin_size, n_bins)
    w_last = min(CONTEXT_S, t_now - rs)  # the observed part of the last second
    n_last = np.bincount(u[t >= t_now - w_last], minlength=U).astype(np.float64)
    for k, name in zip(PERSIST_KS, PERSIST_K_NAMES):
        if name in names:
            out[name] = _floor_counts((n_last + k * ref) / (w_last + k), bin_size, n_bins)
    return {n: out[n] for n in names}


# ================================================================================================
# A whole recording, block by block
# ================================================================================================


class BaselineSet:
    """Every baseline of ``names`` on one recording, a block of windows at a time (in time order).

    ``read(t0, t1)`` returns the recording's spikes ``(times, units)`` in ``[t0, t1)``.
    The smoothed rates are carried from block to block (exact, :func:`nh_serve.data.history.ema_rates`);
    ``population_glm`` is fitted on the reference window when the set is built, and
    ``population_glm_recent`` every 30 s on the last 120 s.
    """

    def __init__(
        self,
        names,
        *,
        read: Callable[[float, float], tuple[np.ndarray, np.ndarray]],
        n_units: int,
        n_bins: int,
        bin_size: float,
        ref_rate_hz,
        start: float,
        reference: tuple[float, float],
        univariate: UnivariateGLM | None = None,
        history_s: float = DEFAULT_HISTORY_S,
    ):
        unknown = sorted(set(names) - set(FULL_BASELINES))
        if unknown:
            raise InputError(f"baselines: unknown {', '.join(unknown)}; choose from {', '.join(FULL_BASELINES)}")
        self.names = tuple(names)
        self.read = read
        self.U, self.T, self.bs = int(n_units), int(n_bins), float(bin_size)
        self.ref = np.asarray(ref_rate_hz, dtype=np.float64)
        self.start = float(start)
        self.history_s = float(history_s)
        self.univariate = univariate if univariate is not None or "univariate_glm" not in names else default_univariate_glm()
        self.track = HistoryTrack(read=read, n_units=self.U, ref_rate_hz=self.ref, start=self.start, taus=ALL_TAUS)
        self._i_hist = [ALL_TAUS.index(x) for x in HISTORY_TAUS]
        self._i_ema = [ALL_TAUS.index(x) for x in EMA_TAUS]
        self.population = self.forecast = None
        if "population_glm" in names or "population_glm_forecast" in names:
            r0, r1 = reference
            t, u = read(min(self.start, r0), r1)
            kw = dict(n_units=self.U, start=self.start, ref_rate_hz=self.ref, fit_from=r0, fit_to=r1, n_bins=self.T,
                      bin_size=self.bs)
            if "population_glm" in names:
                self.population = fit_population_glm(t, u, **kw)
            if "population_glm_forecast" in names:
                self.forecast = fit_population_glm(t, u, forecast=True, **kw)
        self._recent = None  # (valid_from, model) of population_glm_recent
        self._snapshots: list[tuple[float, np.ndarray]] = []  # (time, state) for the recent refits

    def _rates_at(self, t_now: np.ndarray, times: np.ndarray, units: np.ndarray, t0: float) -> np.ndarray:
        """``(w, U, K)`` smoothed rates at the sorted ``t_now`` (carrying the state between calls)."""
        R = self.track.at(t_now, times, units, t0=t0)
        if "population_glm_recent" in self.names:
            self._snapshots.append((self.track.t, self.track.state.copy()))
        return R

    def _recent_model(self, t_now: float):
        """The population GLM fitted on the last 120 s before the latest 30 s refit time <= ``t_now``."""
        if self._recent is not None and t_now < self._recent[0] + RECENT_EVERY_S:
            return self._recent[1]
        fit_to = t_now
        fit_from = max(self.start, fit_to - RECENT_SPAN_S)
        snap = [(ts, st) for ts, st in self._snapshots if ts <= fit_from + 1.0]
        t_init, init = snap[-1] if snap else (self.start, None)
        t, u = self.read(t_init, fit_to)
        model = fit_population_glm(
            t, u, n_units=self.U, start=self.start, ref_rate_hz=self.ref, fit_from=fit_from, fit_to=fit_to,
            n_bins=self.T, bin_size=self.bs, init=None if init is None else init[:, self._i_hist],
            init_time=t_init,
        )
        self._snapshots = [(ts, st) for ts, st in self._snapshots if ts > fit_from - RECENT_SPAN_S]
        self._recent = (t_now, model)
        return model

    def predict(self, t_now, times, units, *, t0: float) -> dict[str, np.ndarray]:
        """Every baseline for the windows at ``t_now`` ``(w,)`` (ascending): ``{name: (w, U, T) float32}``.

        ``times`` / ``units``: the spikes of ``[t0, t_now[-1])`` or longer (a block covering
        each window's last ``history_s`` seconds; spikes at or after a window's ``t_now`` are never
        used for it).
        """
        t_now = np.asarray(t_now, dtype=np.float64)
        w, U, T, bs = t_now.size, self.U, self.T, self.bs
        out: dict[str, np.ndarray] = {}
        R = self._rates_at(t_now, times, units, t0)  # (w, U, K)
        h0 = np.maximum(self.start, t_now - self.history_s)
        w_ctx = np.minimum(CONTEXT_S, t_now - h0)
        pos = np.searchsorted(times, np.concatenate([t_now - w_ctx, t_now, np.maximum(self.start, t_now - CONTEXT_S)]))
        pre = prefix_counts(np.asarray(units, dtype=np.int64), pos, U).astype(np.float64)
        n_ctx = pre[w : 2 * w] - pre[:w]  # (w, U) last second within the 60 s history
        n_last = pre[w : 2 * w] - pre[2 * w :]  # (w, U) last second since the recording start
        w_last = t_now - np.maximum(self.start, t_now - CONTEXT_S)  # (w,) its observed length
        ref = self.ref
        if "reference_rate" in self.names:
            out["reference_rate"] = _floor_counts(np.broadcast_to(ref, (w, U)), bs, T)
        if "persistence" in self.names:
            r_ctx = (n_ctx + PERSIST_PRIOR_S * ref) / (w_ctx + PERSIST_PRIOR_S)[:, None]
            relax = np.exp(-(np.arange(T) + 0.5) * bs / PERSIST_DECAY_S)
            out["persistence"] = _floor_counts(ref[None, :, None] + (r_ctx - ref)[:, :, None] * relax, bs, T)
        if "exp_smooth" in self.names:
            # sum over [h0, t_now) of exp(-(t_now - t_i) / tau) from prefix sums of exp((t_i - t0) / tau)
            # (t0 the block start: a block spans at most a few hundred seconds, so nothing overflows)
            ew = prefix_counts(
                np.asarray(units, dtype=np.int64),
                np.searchsorted(times, np.concatenate([h0, t_now])),
                U,
                np.exp((np.asarray(times) - t0) / SMOOTH_TAU_S),
            )
            s = (ew[w:] - ew[:w]) * np.exp(-(t_now - t0) / SMOOTH_TAU_S)[:, None]  # (w, U)
            exposure = SMOOTH_TAU_S * -np.expm1(-(t_now - h0) / SMOOTH_TAU_S)
            out["exp_smooth"] = _floor_counts((s + SMOOTH_PRIOR_S * ref) / (exposure + SMOOTH_PRIOR_S)[:, None], bs, T)
        for i, name in zip(self._i_ema, EMA_NAMES):
            if name in self.names:
                out[name] = _floor_counts(R[:, :, i], bs, T)
        for k, name in zip(PERSIST_KS, PERSIST_K_NAMES):
            if name in self.names:
                out[name] = _floor_counts((n_last + k * ref) / (w_last + k)[:, None], bs, T)
        R_hist = R[:, :, self._i_hist]
        if "univariate_glm" in self.names:
            out["univariate_glm"] = self.univariate.predict(R_hist, n_bins=T, bin_size=bs)
        if "population_glm" in self.names:
            out["population_glm"] = self.population.predict(R_hist)
        if "population_glm_forecast" in self.names:
            out["population_glm_forecast"] = self.forecast.predict(R_hist, window_counts(times, units, t_now, n_units=U))
        if "population_glm_recent" in self.names:
            rec = np.empty((w, U, T), dtype=np.float32)
            for i in range(w):
                rec[i] = self._recent_model(float(t_now[i])).predict(R_hist[i : i + 1])[0]
            out["population_glm_recent"] = rec
        return {n: out[n] for n in self.names}
