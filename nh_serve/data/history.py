"""Each unit's smoothed firing-rate history: exponential moving averages at several time scales.

One definition for every caller (the model's history inputs, the baselines, the
streaming Predictor). For a unit with reference rate ``r_ref`` (Hz), spikes
``t_i`` observed from ``h0`` on, and a time constant ``tau``::

    r_tau(t) = r_ref * exp(-(t - h0) / tau) + (1 / tau) * sum_{h0 <= t_i < t} exp(-(t - t_i) / tau)

The rate before the observed history is taken to be the reference rate (the
average is "started at the reference rate"), and every spike adds ``1 / tau``
that decays with time constant ``tau``. ``r_tau`` is in Hz: for small ``tau``
it follows single spikes, for large ``tau`` it is the long-run rate.

:func:`ema_rates` evaluates it at many times at once, exactly (no binning): a
recursion over the sorted query times adds every spike once, so the cost is
O(spikes x taus + queries x units x taus) and no exponential can overflow.
It also continues from a known state (``init``), which is how long recordings
are processed a block at a time. :class:`EmaState` keeps the same quantity up
to date for a stream of spikes; a stretch with no observed data (a gap between
two contexts) relaxes toward the reference rate, the rate assumed wherever
nothing was observed.
"""

from __future__ import annotations

import numpy as np

from nh_serve.errors import InputError

#: Time constants (seconds) of the history the model and the univariate GLM see.
HISTORY_TAUS = (0.05, 0.25, 1.0, 5.0, 30.0, 120.0)
#: The slow rate every history feature is measured against (seconds; one of HISTORY_TAUS).
SLOW_TAU = 30.0
#: Added to rates (Hz) before taking logs, so a silent unit's log rate stays finite.
LOG_FLOOR_HZ = 0.1


def check_taus(taus) -> np.ndarray:
    """``taus`` as a float64 array of positive seconds, else ``InputError``."""
    t = np.asarray(taus, dtype=np.float64)
    if t.ndim != 1 or t.size == 0 or not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise InputError(f"taus: must be positive time constants in seconds, got {taus!r}")
    return t


def ema_rates(
    times, units, *, n_units: int, t_eval, start: float, ref_rate_hz, taus, init=None
) -> np.ndarray:
    """``(len(t_eval), n_units, len(taus))`` float64 smoothed rates (Hz) at each time of ``t_eval``.

    Args:
        times: ``(N,)`` sorted spike times, seconds; spikes before ``start`` are ignored.
        units: ``(N,)`` unit row of each spike.
        n_units: number of units ``U``.
        t_eval: ``(Q,)`` query times ``>= start``, any order.
        start: where the observed history begins, seconds.
        ref_rate_hz: ``(U,)`` the rate assumed before ``start``.
        taus: ``(K,)`` time constants, seconds.
        init: optional ``(U, K)`` state at ``start`` (default: ``ref_rate_hz`` for every tau).
    """
    taus = check_taus(taus)
    t = np.asarray(times, dtype=np.float64)
    u = np.asarray(units, dtype=np.int64)
    q = np.asarray(t_eval, dtype=np.float64).reshape(-1)
    U, K = int(n_units), taus.size
    if q.size == 0:
        return np.zeros((0, U, K))
    if float(q.min()) < float(start):
        raise InputError(f"history: query time {float(q.min()):.6g} s is before the history start {start:.6g} s")
    if init is None:
        state = np.repeat(np.asarray(ref_rate_hz, dtype=np.float64).reshape(U, 1), K, axis=1)  # (U, K)
    else:
        state = np.array(init, dtype=np.float64).reshape(U, K)
    order = np.argsort(q, kind="stable")
    qs = q[order]  # (Q,) ascending
    lo = np.searchsorted(t, start, side="left")
    hi = np.searchsorted(t, qs[-1], side="left")
    t, u = t[lo:hi], u[lo:hi]
    seg = np.searchsorted(qs, t, side="right")  # spike i is first seen by query seg[i]
    inc = np.empty((qs.size, U, K))
    for k, tau in enumerate(taus):
        w = np.exp(-(qs[seg] - t) / tau) / tau  # each spike decayed to its first query
        inc[:, :, k] = np.bincount(seg * U + u, weights=w, minlength=qs.size * U).reshape(qs.size, U)
    dec = np.exp(-np.diff(np.concatenate(([float(start)], qs)))[:, None] / taus[None, :])  # (Q, K)
    out = np.empty((q.size, U, K))
    for j in range(qs.size):
        state = state * dec[j] + inc[j]
        out[order[j]] = state
    return out


def log_history(rates_hz: np.ndarray, taus=HISTORY_TAUS) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed rates ``(..., K)`` at ``taus`` -> ``(relative (..., K - 1), slow (...))``.

    ``slow = log(r_slow + LOG_FLOOR_HZ)`` with ``r_slow`` the rate at :data:`SLOW_TAU`, and
    ``relative[..., j] = log(r_j + LOG_FLOOR_HZ) - slow`` for every other time constant (in the
    order of ``taus``): how much faster or slower than its slow rate the unit fires now, at
    each time scale. These are the univariate GLM's features and its offset.
    """
    taus = list(np.asarray(taus, dtype=np.float64))
    i_slow = taus.index(SLOW_TAU)
    logs = np.log(np.maximum(rates_hz, 0.0) + LOG_FLOOR_HZ)
    slow = logs[..., i_slow]
    rel = np.delete(logs, i_slow, axis=-1) - slow[..., None]
    return rel, slow


class EmaState:
    """Streaming :func:`ema_rates` of one recording: ``update`` with spikes in time order.

    ``rates`` ``(U, K)`` is the state at time ``t``; ``observed_s`` how many seconds of
    spikes it has seen without a gap (the history behind it that is real, not assumed).
    """

    def __init__(self, *, ref_rate_hz, taus=HISTORY_TAUS, start: float):
        self.taus = check_taus(taus)
        self.ref = np.asarray(ref_rate_hz, dtype=np.float64).reshape(-1)
        self.rates = np.repeat(self.ref[:, None], self.taus.size, axis=1)  # (U, K)
        self.t = float(start)
        self.observed_from = float(start)

    @property
    def observed_s(self) -> float:
        return self.t - self.observed_from

    def copy(self) -> EmaState:
        new = EmaState.__new__(EmaState)
        new.taus, new.ref, new.rates = self.taus, self.ref, self.rates.copy()
        new.t, new.observed_from = self.t, self.observed_from
        return new

    def skip_to(self, t: float) -> None:
        """Move to ``t`` through a stretch with no observed spikes: relax toward the reference rate."""
        t = float(t)
        if t <= self.t:
            return
        d = np.exp(-(t - self.t) / self.taus)  # (K,)
        self.rates = self.ref[:, None] + (self.rates - self.ref[:, None]) * d
        self.t = t
        self.observed_from = t

    def update(self, times, units, *, until: float) -> None:
        """Add the spikes observed in ``[self.t, until)`` (others are ignored); the state moves to ``until``."""
        until = float(until)
        if until <= self.t:
            return
        t = np.asarray(times, dtype=np.float64)
        u = np.asarray(units, dtype=np.int64)
        keep = (t >= self.t) & (t < until)
        self.rates = ema_rates(
            t[keep], u[keep], n_units=self.ref.size, t_eval=[until], start=self.t,
            ref_rate_hz=self.ref, taus=self.taus, init=self.rates,
        )[0]
        self.t = until


class HistoryTrack:
    """Smoothed rates of a whole recording at its prediction times, a block of windows at a time.

    ``read(t0, t1)`` returns the recording's spikes ``(times, units)`` in ``[t0, t1)``. The state
    starts at ``ref_rate_hz`` at ``start`` and is carried from call to call, so every block needs
    only its own spikes (gaps between blocks are read); :meth:`at` must be called with
    non-decreasing times. Values equal :func:`ema_rates` from ``start`` (up to float64 round-off).
    """

    def __init__(self, *, read, n_units: int, ref_rate_hz, start: float, taus):
        self.read = read
        self.U = int(n_units)
        self.taus = check_taus(taus)
        self.ref = np.asarray(ref_rate_hz, dtype=np.float64)
        self.t = float(start)
        self.state = np.repeat(self.ref[:, None], self.taus.size, axis=1)  # (U, K)

    def at(self, t_eval, times, units, *, t0: float) -> np.ndarray:
        """``(w, U, K)`` smoothed rates at the sorted ``t_eval``; ``times`` / ``units``: the spikes from
        ``t0`` (at most the last queried time) to ``t_eval[-1]`` or beyond."""
        t_eval = np.asarray(t_eval, dtype=np.float64)
        if t_eval.size == 0:
            return np.zeros((0, self.U, self.taus.size))
        if float(t_eval[0]) < self.t - 1e-9:
            raise InputError(f"history: time {float(t_eval[0]):.6g} s is before the last one asked ({self.t:.6g} s)")
        if t0 > self.t:  # spikes between the last state and this block: read them
            gt, gu = self.read(self.t, t0)
            self.state = ema_rates(gt, gu, n_units=self.U, t_eval=[t0], start=self.t, ref_rate_hz=self.ref,
                                   taus=self.taus, init=self.state)[0]
            self.t = float(t0)
        R = ema_rates(times, units, n_units=self.U, t_eval=t_eval, start=self.t, ref_rate_hz=self.ref,
                      taus=self.taus, init=self.state)
        self.t, self.state = float(t_eval[-1]), R[-1].copy()
        return R
