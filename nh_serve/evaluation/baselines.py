"""Causal, training-free baselines that any trained model must beat.

Every baseline predicts, for each unit, the expected spike count in each of
``n_bins`` horizon bins of ``bin_size`` seconds that start at ``t_now``
(bin ``k`` covers ``[t_now + k*bin_size, t_now + (k+1)*bin_size)``), using only
spikes strictly before ``t_now`` plus each unit's reference-window rate
``ref_rate_hz`` (see :func:`nh_serve.data.features.reference_rate_hz`).

Causality is enforced, not assumed: a spike at or after ``t_now`` raises
:class:`~nh_serve.errors.InputError`. The history is ``[history_start, t_now)``;
by default ``history_start = max(0, t_now - DEFAULT_HISTORY_S)`` (60 s) and
spikes before ``history_start`` are ignored. Pass the spikes of the whole
history (e.g. ``session.spikes(t_now - 60, t_now)``): a gap in the history reads
as silence.

Baselines (rates in Hz, converted to counts as ``rate * bin_size``, floored at
``RATE_FLOOR_HZ * bin_size``; never NaN):

``reference_rate``
    Each unit's reference-window mean rate, flat over the horizon.
``persistence``
    Rate over the last ``CONTEXT_S`` = 1 s (the model's context), shrunk toward
    the reference rate with a Gamma-Poisson prior worth ``PERSIST_PRIOR_S``
    seconds of the reference rate:
    ``r_ctx = (n_ctx + PERSIST_PRIOR_S * r_ref) / (W + PERSIST_PRIOR_S)`` (``W``
    the available context, at most 1 s). The prediction relaxes from ``r_ctx``
    back to ``r_ref`` with the lag ``l`` of the bin centre after ``t_now``:
    ``r(l) = r_ref + (r_ctx - r_ref) * exp(-l / PERSIST_DECAY_S)``.
``exp_smooth``
    Exponentially weighted rate over the history with time constant
    ``SMOOTH_TAU_S``: ``S = sum_i exp(-(t_now - t_i) / tau)`` over the unit's
    spikes, exposure ``E = tau * (1 - exp(-H / tau))`` (``H`` the history
    length), shrunk toward the reference rate with a prior worth
    ``SMOOTH_PRIOR_S`` seconds: ``r = (S + SMOOTH_PRIOR_S * r_ref) / (E + SMOOTH_PRIOR_S)``,
    flat over the horizon.

The constants were tuned once, by grid search of pooled bits/spike (nlb
definition, :func:`nh_serve.evaluation.metrics.bits_per_spike`) on three real recordings
(IBL Neuropixels, human MTL microwires, rat CA1 tetrodes) and three synthetic
sessions (:mod:`nh_serve.data.synth`, 80 units, 400 s): reference = the first 60 s,
one 1 s horizon of 20 ms bins every second after it, 60 s history. For each
recording the score of every grid point was turned into a regret between 0 (the
best grid point on that recording) and 1 (the worst), and the constants with
the smallest mean regret over the six recordings were kept, so that no single
recording (the rat CA1 one, whose first minute is unrepresentative, has by far
the largest spread) dominates; the optimum is flat. Coarse grids on the real
recordings first (``PERSIST_PRIOR_S`` 0.25-16 s x ``PERSIST_DECAY_S`` 0.5 s to
infinite, ``SMOOTH_TAU_S`` 2-60 s x ``SMOOTH_PRIOR_S`` 0-40 s,
``RATE_FLOOR_HZ`` 1e-4-0.05 Hz: 0.01 Hz helps units that were silent in the
reference window), then the regret rule on 0.5-4 s x 1-5 s and 10-40 s x 1-10 s.
Bits/spike on the real recordings with the chosen constants (the null model is
an oracle that knows each unit's mean over the evaluated data, so causal
predictions can score below 0):

==============  =======  =========  =======
baseline        IBL      human MTL  rat CA1
==============  =======  =========  =======
reference_rate  -0.074   -0.007     -1.096
persistence     -0.049   -0.019     -0.554
exp_smooth      -0.024   -0.006     +0.058
==============  =======  =========  =======
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nh_serve.data.spikes import check_spikes
from nh_serve.errors import InputError

DEFAULT_HISTORY_S = 60.0  # history used when history_start is not given, seconds
CONTEXT_S = 1.0  # persistence context window, seconds (the model's context length)
PERSIST_PRIOR_S = 3.0  # Gamma-Poisson prior strength of persistence, seconds of the reference rate
PERSIST_DECAY_S = 3.0  # persistence relaxes toward the reference rate with this time constant, seconds
SMOOTH_TAU_S = 20.0  # exponential-smoothing time constant, seconds
SMOOTH_PRIOR_S = 5.0  # Gamma-Poisson prior strength of exp_smooth, seconds of the reference rate
RATE_FLOOR_HZ = 1e-2  # smallest predicted rate, Hz (one spike per 100 s)


@dataclass
class _History:
    t: np.ndarray  # (N,) float64 spike times in [history_start, t_now)
    u: np.ndarray  # (N,) int64 unit index
    n_units: int
    t_now: float
    history_start: float
    ref_hz: np.ndarray  # (U,) float64
    n_bins: int
    bin_size: float

    @property
    def lags(self) -> np.ndarray:
        """(n_bins,) bin-centre lags after t_now, seconds."""
        return (np.arange(self.n_bins) + 0.5) * self.bin_size

    def counts(self, rate_hz: np.ndarray) -> np.ndarray:
        """(U,) or (U, n_bins) Hz -> (U, n_bins) float32 expected counts per bin."""
        r = np.maximum(np.nan_to_num(rate_hz, nan=RATE_FLOOR_HZ), RATE_FLOOR_HZ)
        r = np.broadcast_to(r if r.ndim == 2 else r[:, None], (self.n_units, self.n_bins))
        return (r * self.bin_size).astype(np.float32)


def _finite(x, name: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise InputError(f"baselines: {name} must be a number, got {x!r}") from None
    if not math.isfinite(v):
        raise InputError(f"baselines: {name} must be finite, got {v}")
    return v


def _prepare(*, times, unit_index, n_units, t_now, ref_rate_hz, n_bins, bin_size, history_start) -> _History:
    t_now = _finite(t_now, "t_now (seconds)")
    bin_size = _finite(bin_size, "bin_size (seconds)")
    if bin_size <= 0:
        raise InputError(f"baselines: bin_size must be > 0 seconds, got {bin_size}")
    if int(n_bins) != n_bins or int(n_bins) <= 0:
        raise InputError(f"baselines: n_bins must be a positive integer, got {n_bins!r}")
    n_units = int(n_units)
    t, u = check_spikes(times, unit_index, n_units=n_units, name="history spikes")
    if t.size and t[-1] >= t_now:
        bad = int(np.flatnonzero(t >= t_now)[0])
        raise InputError(
            f"history spikes: spike #{bad} at {t[bad]:.6g} s is not before t_now = {t_now:.6g} s; "
            "baselines are causal: pass only spikes before t_now"
        )
    hs = (
        max(0.0, t_now - DEFAULT_HISTORY_S)
        if history_start is None
        else _finite(history_start, "history_start")
    )
    if hs > t_now:
        raise InputError(f"baselines: history_start {hs:.6g} s is after t_now {t_now:.6g} s")
    keep = t >= hs
    if not keep.all():
        t, u = t[keep], u[keep]
    try:
        ref = np.asarray(ref_rate_hz, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("baselines: ref_rate_hz must be an array of rates in Hz") from None
    if ref.shape != (n_units,):
        raise InputError(
            f"baselines: ref_rate_hz has shape {ref.shape}; pass one reference rate (Hz) per unit: ({n_units},)"
        )
    if not np.all(np.isfinite(ref)) or np.any(ref < 0):
        raise InputError("baselines: ref_rate_hz must be finite and >= 0 (Hz)")
    return _History(
        t=t,
        u=u,
        n_units=n_units,
        t_now=t_now,
        history_start=hs,
        ref_hz=ref,
        n_bins=int(n_bins),
        bin_size=bin_size,
    )


def _reference_rate(h: _History) -> np.ndarray:
    return h.counts(h.ref_hz)


def _persistence(
    h: _History, *, prior_s: float = PERSIST_PRIOR_S, decay_s: float = PERSIST_DECAY_S
) -> np.ndarray:
    w = min(CONTEXT_S, h.t_now - h.history_start)
    in_ctx = h.t >= h.t_now - w
    n_ctx = np.bincount(h.u[in_ctx], minlength=h.n_units).astype(np.float64)  # (U,)
    r_ctx = (n_ctx + prior_s * h.ref_hz) / (w + prior_s) if w + prior_s > 0 else h.ref_hz
    relax = np.exp(-h.lags / decay_s) if decay_s > 0 else np.zeros(h.n_bins)  # (n_bins,)
    return h.counts(h.ref_hz[:, None] + (r_ctx - h.ref_hz)[:, None] * relax[None, :])


def _exp_smooth(h: _History, *, tau_s: float = SMOOTH_TAU_S, prior_s: float = SMOOTH_PRIOR_S) -> np.ndarray:
    s = np.bincount(h.u, weights=np.exp(-(h.t_now - h.t) / tau_s), minlength=h.n_units)  # (U,)
    exposure = tau_s * -math.expm1(-(h.t_now - h.history_start) / tau_s)
    den = exposure + prior_s
    r = (s + prior_s * h.ref_hz) / den if den > 0 else h.ref_hz
    return h.counts(r)


def _public(impl, doc: str):
    def fn(
        *,
        times,
        unit_index,
        n_units: int,
        t_now: float,
        ref_rate_hz,
        n_bins: int,
        bin_size: float,
        history_start: float | None = None,
        **constants,
    ) -> np.ndarray:
        h = _prepare(
            times=times,
            unit_index=unit_index,
            n_units=n_units,
            t_now=t_now,
            ref_rate_hz=ref_rate_hz,
            n_bins=n_bins,
            bin_size=bin_size,
            history_start=history_start,
        )
        return impl(h, **constants)

    fn.__name__ = impl.__name__.lstrip("_")
    fn.__qualname__ = fn.__name__
    fn.__doc__ = doc + (
        "\n\nKeyword args: times (N,) seconds and unit_index (N,) of the history spikes (all before t_now), "
        "n_units, t_now (s), ref_rate_hz (U,) Hz, n_bins, bin_size (s), history_start (s, default "
        "t_now - 60 s). Returns (n_units, n_bins) float32 expected counts per bin."
    )
    return fn


reference_rate = _public(_reference_rate, "Reference-window mean rate, flat over the horizon.")
persistence = _public(
    _persistence,
    "Last-1 s rate shrunk toward the reference rate, relaxing to it over the horizon "
    "(constants prior_s, decay_s may be overridden).",
)
exp_smooth = _public(
    _exp_smooth,
    "Exponentially smoothed history rate shrunk toward the reference rate (constants tau_s, prior_s may be overridden).",
)

BASELINES = {"reference_rate": reference_rate, "persistence": persistence, "exp_smooth": exp_smooth}
_IMPLS = {"reference_rate": _reference_rate, "persistence": _persistence, "exp_smooth": _exp_smooth}


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
) -> dict[str, np.ndarray]:
    """Predictions of every baseline in :data:`BASELINES` for one ``t_now``.

    Args:
        times: (N,) sorted spike times in seconds, all before ``t_now``.
        unit_index: (N,) unit of each spike in ``[0, n_units)``.
        n_units: number of units.
        t_now: prediction time in seconds; the horizon starts here.
        ref_rate_hz: (n_units,) reference-window rates in Hz.
        n_bins, bin_size: horizon bins (count) and their width in seconds.
        history_start: start of the history the spikes cover, seconds
            (default ``max(0, t_now - 60)``; earlier spikes are ignored).

    Returns ``{name: (n_units, n_bins) float32 expected counts per bin}``, all finite and > 0.
    """
    h = _prepare(
        times=times,
        unit_index=unit_index,
        n_units=n_units,
        t_now=t_now,
        ref_rate_hz=ref_rate_hz,
        n_bins=n_bins,
        bin_size=bin_size,
        history_start=history_start,
    )
    return {name: impl(h) for name, impl in _IMPLS.items()}
