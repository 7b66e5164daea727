"""Streaming refits replayed on a recording: ``nh-serve eval --refit-every S``.

A session registered with ``refit_every_s=S`` fits its read-outs, population correction and calibration again
every ``S`` seconds of stream time on the last ``refit_window_s`` seconds it saw
(:mod:`nh_serve.inference.streaming`; by default the reference length, at least
:data:`~nh_serve.inference.streaming.DEFAULT_REFIT_WINDOW_S`). The evaluation scores
windows a block at a time with the history the recording gives, not through a stream, so
:class:`RefitReplay` makes the same refits at the same stream times, as if a tool had streamed the
whole recording after the reference window: before the first scored window whose context ends at
least ``S`` seconds after the last fit (the reference end at first), once ``refit_window_s`` seconds
have passed since the reference end, the fit runs on the spikes of the ``refit_window_s`` seconds
before that context end (with the smoothed rates the stream had at their start,
:class:`~nh_serve.data.history.EmaState` from the reference start), through the function a live
session's refit calls (:func:`~nh_serve.inference.streaming.refit_on`). Each window is predicted
with the fit made last at or before its context end: causal, as in the service.
"""

from __future__ import annotations

import math

import numpy as np

from nh_serve.core.calibration import mean_record
from nh_serve.data.history import EmaState
from nh_serve.errors import InputError
from nh_serve.inference.reference_fit import MIN_FIT_REFERENCE_S
from nh_serve.inference.streaming import default_refit_window, refit_on


class RefitReplay:
    """One scored model row that refits every ``every_s`` seconds of the recording (see the module).

    ``p``: an eager (``backend="torch"``) Predictor with a read-out; ``token``: a session registered
    on the recording's reference window in the recording's unit order (it is refitted in place);
    ``read(t0, t1)``: the recording's spikes ``(times, unit rows)`` in ``[t0, t1)``, sorted.
    """

    def __init__(self, name: str, p, token: str, *, read, every_s: float, window_s: float | None = None):
        if not p.cfg.readout_dim:
            raise InputError(f"--refit-every: {name} has no read-out to refit; leave --refit-every out for it")
        if not (math.isfinite(every_s) and every_s >= 1.0):
            raise InputError(f"--refit-every: must be at least 1 second, got {every_s!r}")
        self.name, self.p, self.token, self.read = name, p, token, read
        s = p.session(token)
        r0, r1 = s.reference
        self.every_s = float(every_s)
        # a live session's default
        self.window_s = float(window_s) if window_s is not None else default_refit_window((r0, r1))
        if not (math.isfinite(self.window_s) and self.window_s >= MIN_FIT_REFERENCE_S):
            raise InputError(f"refit window: must be at least {MIN_FIT_REFERENCE_S:g} s, got {self.window_s:g} s")
        self.reference_end = self.last_fit = float(r1)
        self.ema = EmaState(ref_rate_hz=s.ref_rate_hz, taus=p.cfg.history_taus, start=r0)
        self.records: list[dict] = []  # one per refit: its window and what it kept

    def due(self, now: float) -> bool:
        """Whether a live session would refit at stream time ``now`` (the same rule as the Refitter)."""
        return now - self.last_fit >= self.every_s and now - self.window_s >= self.reference_end - 1e-9

    def refit(self, now: float) -> None:
        """Fit on ``[now - window_s, now)``, with the smoothed rates the stream had at its start."""
        start = now - self.window_s
        if start > self.ema.t:
            t, u = self.read(self.ema.t, start)
            self.ema.update(t, u, until=start)
        times, units = self.read(start, now)
        info = refit_on(self.p.model, self.p.session(self.token), times=times, units=units,
                        window=(start, now), history_init=self.ema.rates.copy())
        self.last_fit = now
        self.records.append({
            "window": [round(start, 6), round(now, 6)],
            "units_fitted": info.get("units_fitted", 0),
            "population_units_corrected": info.get("population_units_corrected", 0),
            "population_corrected": bool(info.get("population_corrected", False)),
            "seconds": info.get("seconds", 0.0),
            **{k: info[k] for k in ("floor_beta", "shrink_gamma", "level_lambda") if k in info},
        })

    def rates(self, windows, plan) -> np.ndarray:
        """Expected counts ``(w, U, T)`` of ``windows`` (in time order), refitting where a stream would."""
        out, group = [], []
        for w in windows:
            now = float(w.context_start) + plan.context_s
            if self.due(now):
                out += self._predict(group, plan)
                group = []
                self.refit(now)
            group.append(w)
        out += self._predict(group, plan)
        return np.stack(out)

    def _predict(self, windows, plan) -> list[np.ndarray]:
        if not windows:
            return []
        preds = self.p.predict_windows(self.token, windows, horizon_s=plan.n_bins * plan.bin_size)
        return [pr.expected_counts for pr in preds]

    def summary(self) -> dict:
        """How many refits ran, how long they took and how many units kept each part, on average."""
        n = len(self.records)
        mean = (lambda k: round(float(np.mean([r[k] for r in self.records])), 2)) if n else (lambda k: 0.0)
        return {
            "every_s": self.every_s, "window_s": self.window_s, "refits": n,
            "mean_seconds": mean("seconds"), "mean_units_fitted": mean("units_fitted"),
            "mean_population_units_corrected": mean("population_units_corrected"),
            "corrected": sum(r["population_corrected"] for r in self.records),
            "calibration": mean_record(self.records),
        }
