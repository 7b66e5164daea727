"""Sliding-window evaluation of a recording: the one loop behind demo, eval and score.

A recording is split into a reference window (default: the first 60 s, used
for the per-unit features and reference rates) and, after it, prediction
windows every ``stride_s`` seconds. Window ``i`` has its context
``[c_i, c_i + context_s)`` and its horizon ``[c_i + context_s, c_i + context_s + n_bins * bin_size)``;
``t_now = c_i + context_s`` is the prediction time. Windows never overlap the
reference window, so nothing a prediction was conditioned on is scored.

:func:`plan_windows` validates the lengths and returns a :class:`WindowPlan`;
:func:`collect_targets` bins the observed horizon counts and runs every
baseline of :mod:`nh_serve.baselines` on the same windows;
:func:`oracle_rates` reads synthetic ground truth where the file has it.
All predictions are expected counts per bin, shaped ``(windows, units, bins)``
as :mod:`nh_serve.metrics` expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from nh_serve.baselines import DEFAULT_HISTORY_S, predict_baselines
from nh_serve.errors import InputError
from nh_serve.features import DEFAULT_REFERENCE_S, MIN_REFERENCE_S, reference_rate_hz
from nh_serve.spikes import bin_counts


@dataclass(frozen=True)
class WindowPlan:
    """Where the reference and the prediction windows of one recording lie (seconds)."""

    reference: tuple[float, float]  # [start, end) of the reference window
    ctx_starts: np.ndarray  # (W,) context start of each prediction window
    context_s: float
    n_bins: int
    bin_size: float

    @property
    def horizon_s(self) -> float:
        return self.n_bins * self.bin_size

    @property
    def t_now(self) -> np.ndarray:
        """(W,) prediction time of each window: the end of its context."""
        return self.ctx_starts + self.context_s

    def __len__(self) -> int:
        return int(self.ctx_starts.shape[0])


def plan_windows(
    *,
    start: float,
    end: float,
    reference: tuple[float, float] | None = None,
    reference_s: float = DEFAULT_REFERENCE_S,
    context_s: float = 1.0,
    n_bins: int = 50,
    bin_size: float = 0.02,
    stride_s: float = 1.0,
    max_windows: int | None = None,
    name: str = "recording",
) -> WindowPlan:
    """Plan the reference window and the prediction windows of a recording spanning ``[start, end)``.

    ``reference`` is an explicit ``(t0, t1)`` interval; otherwise the first
    ``reference_s`` seconds. Windows start right after the reference window
    (or at the recording start when the reference lies later) and must end
    inside the recording; ``max_windows`` keeps the first ones.
    """
    if not (np.isfinite(start) and np.isfinite(end) and end > start):
        raise InputError(f"{name}: its time span [{start}, {end}) is empty")
    if reference is None:
        reference = (float(start), float(start) + float(reference_s))
    r0, r1 = float(reference[0]), float(reference[1])
    if r1 - r0 < MIN_REFERENCE_S:
        raise InputError(
            f"{name}: the reference window [{r0:g}, {r1:g}) s is {r1 - r0:g} s long; "
            f"it must be at least {MIN_REFERENCE_S:g} s (pass a longer reference window)"
        )
    if r0 < start or r1 > end:
        raise InputError(
            f"{name}: the reference window [{r0:g}, {r1:g}) s lies outside the recording [{start:g}, {end:g}) s"
        )
    if stride_s <= 0:
        raise InputError(f"{name}: the stride must be positive seconds, got {stride_s}")
    span = context_s + n_bins * bin_size
    first = r1 if r1 + span <= end else float(start)
    n = int(np.floor((end - span - first) / stride_s + 1e-9)) + 1
    if end - first < span or n <= 0:
        raise InputError(
            f"{name}: is {end - start:.3g} s long; it needs the {r1 - r0:g} s reference window plus at least "
            f"{span:g} s (context {context_s:g} s + horizon {n_bins * bin_size:g} s) after it. "
            "Use a longer recording or a shorter reference window."
        )
    ctx = first + stride_s * np.arange(n, dtype=np.float64)
    if first < r1:  # reference lies later in the recording: keep windows that do not overlap it
        keep = (ctx + span <= r0) | (ctx >= r1)
        ctx = ctx[keep]
        if ctx.size == 0:
            raise InputError(f"{name}: no prediction window fits outside the reference window [{r0:g}, {r1:g}) s")
    if max_windows is not None:
        ctx = ctx[: int(max_windows)]
    return WindowPlan(reference=(r0, r1), ctx_starts=ctx, context_s=float(context_s), n_bins=int(n_bins), bin_size=float(bin_size))


@dataclass
class Targets:
    """Observed horizon counts, reference rates and baseline predictions of one recording."""

    counts: np.ndarray  # (W, U, T) observed spike counts per horizon bin
    ref_rate_hz: np.ndarray  # (U,) reference-window mean rates
    baselines: dict[str, np.ndarray]  # name -> (W, U, T) expected counts per bin


def collect_targets(session, plan: WindowPlan, *, history_s: float = DEFAULT_HISTORY_S, progress: bool = True) -> Targets:
    """Bin the horizon counts of every window and run every baseline on it.

    ``session`` is an open :class:`nh_serve.session.Session`. Baselines see the
    ``history_s`` seconds before each prediction time (never the horizon).
    """
    U, W, T = session.n_units, len(plan), plan.n_bins
    r0, r1 = plan.reference
    ref_t, ref_u = session.spikes(r0, r1)
    ref_rate = reference_rate_hz(ref_t, ref_u, n_units=U, start=r0, end=r1)
    counts = np.zeros((W, U, T), dtype=np.float32)
    base: dict[str, np.ndarray] = {}
    for i, t_now in enumerate(tqdm(plan.t_now, desc="windows", disable=not progress, leave=False)):
        t_now = float(t_now)
        h_t, h_u = session.spikes(t_now, t_now + plan.horizon_s)
        counts[i] = bin_counts(h_t, h_u, n_units=U, start=t_now, bin_size=plan.bin_size, n_bins=T)
        h0 = max(float(session.start), t_now - history_s)
        p_t, p_u = session.spikes(h0, t_now)
        preds = predict_baselines(
            times=p_t, unit_index=p_u, n_units=U, t_now=t_now, ref_rate_hz=ref_rate,
            n_bins=T, bin_size=plan.bin_size, history_start=h0,
        )
        for name, p in preds.items():
            base.setdefault(name, np.zeros((W, U, T), dtype=np.float32))[i] = p
    return Targets(counts=counts, ref_rate_hz=ref_rate, baselines=base)


def oracle_rates(session, plan: WindowPlan) -> np.ndarray | None:
    """Ground-truth expected counts per bin ``(W, U, T)`` from a synthetic file, else ``None``.

    Needs the file's true-rate bins to be aligned with the horizon bins (same
    bin size, window starts on the true-rate grid); otherwise returns ``None``.
    """
    bin_size = getattr(session, "true_rate_bin_size", None)
    if bin_size is None or not np.isclose(bin_size, plan.bin_size):
        return None
    out = np.zeros((len(plan), session.n_units, plan.n_bins), dtype=np.float32)
    for i, t_now in enumerate(plan.t_now):
        got = session.true_rates(float(t_now), float(t_now) + plan.horizon_s)
        if got is None:
            return None
        starts, rates_hz = got  # (T',), (T', U)
        if starts.shape[0] != plan.n_bins or not np.allclose(starts[0], t_now, atol=plan.bin_size * 1e-3):
            return None
        out[i] = rates_hz.T * plan.bin_size
    return out
