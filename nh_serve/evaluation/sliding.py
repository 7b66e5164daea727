"""Sliding-window evaluation of a recording: the one loop behind demo, eval and score.

A recording is split into a reference window (default: the first 60 s, used
for the per-unit features and reference rates) and, after it, prediction
windows every ``stride_s`` seconds. Window ``i`` has its context
``[c_i, c_i + context_s)`` and its horizon ``[c_i + context_s, c_i + context_s + n_bins * bin_size)``;
``t_now = c_i + context_s`` is the prediction time. Windows never overlap the
reference window, so nothing a prediction was conditioned on is scored.

:func:`plan_windows` validates the lengths and returns a :class:`WindowPlan`;
:func:`collect_targets` bins the observed horizon counts and runs every
baseline of :mod:`nh_serve.evaluation.baselines` on the same windows
(:func:`make_baseline_set`);
:func:`oracle_rates` reads synthetic ground truth where the file has it.
All predictions are expected counts per bin, shaped ``(windows, units, bins)``
as :mod:`nh_serve.evaluation.metrics` expects.

For long recordings the same work is available a block of windows at a time,
without per-window file reads or ``(windows, units, bins)`` arrays of the whole
recording: :func:`iter_spike_blocks` reads the spikes of consecutive windows
(plus their history) once; :func:`horizon_counts` and
:meth:`~nh_serve.evaluation.baselines.BaselineSet.predict` work on a block with
per-unit prefix sums and carried smoothed rates; :class:`StreamingMetrics`
accumulates :func:`nh_serve.evaluation.metrics.evaluate` block by block, plus each
window's likelihood for the paired intervals (:meth:`StreamingMetrics.paired`).
:func:`collect_targets` is built on them; its history-only baselines equal
:func:`~nh_serve.evaluation.baselines.predict_baselines` called window by window
(up to float64 round-off).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from nh_serve.data.features import DEFAULT_REFERENCE_S, MIN_REFERENCE_S, reference_rate_hz
from nh_serve.data.spikes import prefix_counts
from nh_serve.data.windows import target_counts
from nh_serve.errors import InputError
from nh_serve.evaluation.baselines import DEFAULT_BASELINES, DEFAULT_HISTORY_S, BaselineSet
from nh_serve.evaluation.metrics import (  # one definition of each
    _REL_TOL,
    DEFAULT_BANDS_MS,
    LN2,
    ZERO_RATE,
    _band_bins,
    paired_bps_interval,
)


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


def make_baseline_set(
    session, plan: WindowPlan, *, names=DEFAULT_BASELINES, univariate=None, history_s: float = DEFAULT_HISTORY_S
) -> BaselineSet:
    """The :class:`~nh_serve.evaluation.baselines.BaselineSet` of an open session for ``plan``
    (reference rates from the plan's reference window; smoothed rates from the recording start)."""
    r0, r1 = plan.reference
    ref_t, ref_u = session.spikes(r0, r1)
    ref_rate = reference_rate_hz(ref_t, ref_u, n_units=session.n_units, start=r0, end=r1)
    return BaselineSet(
        names,
        read=session.spikes,
        n_units=session.n_units,
        n_bins=plan.n_bins,
        bin_size=plan.bin_size,
        ref_rate_hz=ref_rate,
        start=float(session.start),
        reference=(r0, r1),
        univariate=univariate,
        history_s=history_s,
    )


def collect_targets(
    session, plan: WindowPlan, *, names=DEFAULT_BASELINES, univariate=None, progress: bool = True
) -> Targets:
    """Bin the horizon counts of every window and run every baseline of ``names`` on it.

    ``session`` is an open :class:`nh_serve.data.session.Session`. Returns whole
    ``(W, U, T)`` arrays, so it suits short recordings (eval and score work a block
    of windows at a time instead: :func:`iter_spike_blocks`, :func:`horizon_counts`,
    :class:`~nh_serve.evaluation.baselines.BaselineSet`).
    """
    U, W, T = session.n_units, len(plan), plan.n_bins
    bset = make_baseline_set(session, plan, names=names, univariate=univariate)
    counts = np.zeros((W, U, T), dtype=np.float32)
    base = {name: np.zeros((W, U, T), dtype=np.float32) for name in bset.names}
    with tqdm(total=W, desc="windows", disable=not progress, leave=False) as bar:
        for block in iter_spike_blocks(session, plan, lookback_s=DEFAULT_HISTORY_S):
            sl = slice(block.first, block.stop)
            counts[sl] = horizon_counts(block, plan, n_units=U)
            preds = bset.predict(plan.t_now[sl], block.times, block.units, t0=block.t0)
            for name, p in preds.items():
                base[name][sl] = p
            bar.update(block.stop - block.first)
    return Targets(counts=counts, ref_rate_hz=bset.ref, baselines=base)


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


# --------------------------------------------------------------------------- blocks of windows
#
# Reading and scoring one window at a time costs a file read, a validation pass
# and an exponential over the whole 60 s history per window. The functions
# below read the spikes of a run of consecutive windows once (a "block") and
# compute every window's counts, baselines and history from per-unit prefix
# sums, so the cost grows with the number of spikes, not spikes x windows.

BLOCK_WINDOWS = 256  # windows per block
BLOCK_SPAN_S = 600.0  # most seconds of prediction times per block (bounds memory and exp() range)


@dataclass
class SpikeBlock:
    """The spikes of ``[t0, t1)``, covering windows ``[first, stop)`` of a plan and their history."""

    first: int  # first window (index into the plan)
    stop: int  # one past the last window
    t0: float  # seconds; start of the spikes read (history of the first window)
    t1: float  # seconds; end of the last window's horizon
    times: np.ndarray  # (N,) float64 seconds, sorted
    units: np.ndarray  # (N,) int64 unit index

    def positions(self, t) -> np.ndarray:
        """Index of the first spike at or after each time in ``t`` (like ``searchsorted(times, t, 'left')``)."""
        return np.searchsorted(self.times, t, side="left")

    def prefix_sums(self, t, *, n_units: int, weights: np.ndarray | None = None) -> np.ndarray:
        """``(len(t), n_units)`` per-unit count (or sum of ``weights``) of the spikes before each time in ``t``.

        Counts are int64 and exact; ``counts in [a, b) = prefix(b) - prefix(a)``.
        """
        return prefix_counts(self.units, self.positions(np.asarray(t, dtype=np.float64)), n_units, weights)

    def counts_between(self, a, b, *, n_units: int) -> np.ndarray:
        """``(len(a), n_units)`` int64 spike counts of every unit in ``[a_i, b_i)`` (seconds)."""
        a = np.asarray(a, dtype=np.float64)
        pre = self.prefix_sums(np.concatenate([a, np.asarray(b, dtype=np.float64)]), n_units=n_units)
        return pre[a.size :] - pre[: a.size]


def iter_spike_blocks(
    session, plan: WindowPlan, *, lookback_s: float, block_windows: int = BLOCK_WINDOWS
) -> Iterator[SpikeBlock]:
    """Yield :class:`SpikeBlock` s covering every window of ``plan`` in order.

    Each block holds the spikes from ``lookback_s`` seconds before its first
    prediction time (not before the recording start) to the end of its last
    horizon, so per-window history, context and horizon are all inside it.
    """
    W = len(plan)
    t_now = plan.t_now
    first = 0
    while first < W:
        stop = min(W, first + int(block_windows))
        stop = first + max(1, int(np.searchsorted(t_now[first:stop], t_now[first] + BLOCK_SPAN_S, side="right")))
        t0 = max(float(session.start), float(min(t_now[first] - lookback_s, plan.ctx_starts[first])))
        t1 = float(t_now[stop - 1] + plan.horizon_s)
        times, units = session.spikes(t0, t1)
        yield SpikeBlock(first=first, stop=stop, t0=t0, t1=t1, times=times, units=units)
        first = stop


def horizon_counts(block: SpikeBlock, plan: WindowPlan, *, n_units: int) -> np.ndarray:
    """``(w, U, T)`` float32 observed counts in the horizon bins of the block's windows.

    :func:`nh_serve.data.windows.target_counts` (the targets training and test-time
    adaptation use) on the block's spikes; horizons may overlap (stride < horizon).
    """
    t_now = plan.t_now[block.first : block.stop]  # (w,)
    return target_counts(block.times, block.units, t_now, n_units=n_units, bin_size=plan.bin_size, n_bins=plan.n_bins)


# --------------------------------------------------------------------------- streaming metrics


class StreamingMetrics:
    """:func:`nh_serve.evaluation.metrics.evaluate` of predictions that arrive one block of windows at a time.

    Keeps float64 sufficient statistics per (unit, bin) cell instead of the
    ``(windows, units, bins)`` arrays: sums, centred second moments and
    co-moments (merged across blocks with the pairwise update of Chan, Golub &
    LeVeque), sums of squared errors and of Poisson NLL terms. :meth:`result`
    rebuilds every number of :func:`~nh_serve.evaluation.metrics.evaluate` from them (same
    definitions, same zero-variance and no-spike conventions), equal to
    evaluating the stacked arrays up to float64 round-off. Memory is
    ``O(units x bins x predictors)`` whatever the number of windows.

    ``update(counts, {name: rates})`` takes ``(w, U, T)`` observed counts and
    expected counts per bin of each predictor for the same windows.
    """

    CHUNK = 32  # windows per internal update

    def __init__(self, names, *, n_units: int, n_bins: int):
        self.names = list(names)
        self.n_units, self.n_bins = int(n_units), int(n_bins)
        self.n = 0  # windows seen
        shape = (self.n_units, self.n_bins)
        self._c = {k: np.zeros(shape) for k in ("mean", "m2", "sum", "sq")}
        self._c_min = np.full(self.n_units, np.inf)
        self._c_max = np.full(self.n_units, -np.inf)
        self._p = {n: {k: np.zeros(shape) for k in ("mean", "m2", "sum", "sq", "cm", "sse", "nll")} for n in self.names}
        self._win_nll: dict[str, list[np.ndarray]] = {n: [] for n in self.names}  # per-window NLL sums
        self._win_spikes: list[np.ndarray] = []  # per-window spike totals

    def update(self, counts, rates: dict[str, np.ndarray]) -> None:
        """Add ``w`` windows: ``counts`` ``(w, U, T)`` and ``rates[name]`` of the same shape (expected counts)."""
        c_in = np.asarray(counts)
        if c_in.ndim != 3 or c_in.shape[1:] != (self.n_units, self.n_bins):
            raise InputError(
                f"metrics: counts have shape {c_in.shape}; pass (windows, {self.n_units}, {self.n_bins}) arrays"
            )
        if set(rates) != set(self.names):
            raise InputError(f"metrics: pass rates of exactly {self.names}, got {sorted(rates)}")
        r_in = {k: np.asarray(v) for k, v in rates.items()}
        for name, x in r_in.items():
            if x.shape != c_in.shape:
                raise InputError(f"metrics: rates of {name} have shape {x.shape} but counts have shape {c_in.shape}")
        if c_in.shape[0] == 0:
            return
        if c_in.shape[0] > self.CHUNK:  # cache-sized pieces: several times faster than one big pass
            for a in range(0, c_in.shape[0], self.CHUNK):
                self.update(c_in[a : a + self.CHUNK], {k: v[a : a + self.CHUNK] for k, v in r_in.items()})
            return
        lo, hi = c_in.min(), c_in.max()
        if not (lo >= 0 and np.isfinite(hi)):
            raise InputError("metrics: counts must be finite and non-negative spike counts per bin")
        c = c_in.astype(np.float64)
        nb, na = c.shape[0], self.n
        n = na + nb
        f = na * nb / n
        cells = self.n_units * self.n_bins
        cs = self._c
        c_sum = c.sum(axis=0)  # (U, T)
        cm = c_sum / nb  # (U, T) block mean
        dc = c - cm  # (w, U, T)
        c_m2 = np.einsum("wut,wut->ut", dc, dc)
        delta_c = cm - cs["mean"]
        nz = np.flatnonzero(c)  # counts are sparse: the log term of the NLL only where c > 0
        c_nz, cell_nz = c.ravel()[nz], nz % cells
        win_nz = nz // cells  # window of each non-zero count
        self._win_spikes.append(c.sum(axis=(1, 2)))
        for name in self.names:
            x_in = r_in[name]
            x_min, x_max = x_in.min(), x_in.max()
            if np.isnan(x_min) or np.isnan(x_max) or not np.isfinite(x_max):
                raise InputError("metrics: rates contain NaN or inf; predictions must be finite expected counts per bin")
            if x_min < 0:
                raise InputError("metrics: rates contain negative values; predictions are expected counts per bin (>= 0)")
            x = x_in.astype(np.float64)
            st = self._p[name]
            x_sum = x.sum(axis=0)
            xm = x_sum / nb
            dx = x - xm
            m2 = np.einsum("wut,wut->ut", dx, dx)
            cov = np.einsum("wut,wut->ut", dx, dc)
            delta_x = xm - st["mean"]
            st["m2"] += m2 + delta_x * delta_x * f
            st["cm"] += cov + delta_x * delta_c * f
            st["mean"] += delta_x * (nb / n)
            st["sum"] += x_sum
            st["sq"] += m2 + nb * xm * xm  # sum of x^2 (only scales the zero-variance test)
            # sum of (c - x)^2 from the centred moments: M2_c + M2_x - 2 C + n (mean_c - mean_x)^2
            st["sse"] += np.maximum(c_m2 + m2 - 2.0 * cov + nb * (cm - xm) ** 2, 0.0)
            x_nz = x.ravel()[nz]
            if x_min == 0:  # zero rates count as ZERO_RATE in the NLL (nlb_tools convention)
                x_sum = x_sum + ZERO_RATE * (x == 0).sum(axis=0)
                x_nz = np.where(x_nz == 0, ZERO_RATE, x_nz)
            c_log = c_nz * np.log(x_nz)
            log_term = np.bincount(cell_nz, weights=c_log, minlength=cells).reshape(cm.shape)
            st["nll"] += x_sum - log_term  # sum of r - c log r
            x_win = x.sum(axis=(1, 2)) + (ZERO_RATE * (x == 0).sum(axis=(1, 2)) if x_min == 0 else 0.0)
            self._win_nll[name].append(x_win - np.bincount(win_nz, weights=c_log, minlength=nb))
        cs["m2"] += c_m2 + delta_c * delta_c * f
        cs["mean"] += delta_c * (nb / n)
        cs["sum"] += c_sum
        cs["sq"] += np.einsum("wut,wut->ut", c, c)
        self._c_min = np.minimum(self._c_min, c.min(axis=(0, 2)))
        self._c_max = np.maximum(self._c_max, c.max(axis=(0, 2)))
        self.n = n

    def window_nll(self, name: str) -> np.ndarray:
        """``(W,)`` Poisson NLL of predictor ``name`` in each window seen, summed over units and bins."""
        return np.concatenate(self._win_nll[name]) if self._win_nll[name] else np.zeros(0)

    def window_spikes(self) -> np.ndarray:
        """``(W,)`` observed spikes in each window seen."""
        return np.concatenate(self._win_spikes) if self._win_spikes else np.zeros(0)

    def paired(self, a: str, b: str, **kw) -> dict[str, float]:
        """Bits/spike of ``a`` minus ``b`` with its block-bootstrap interval
        (:func:`nh_serve.evaluation.metrics.paired_bps_interval`)."""
        return paired_bps_interval(self.window_nll(a), self.window_nll(b), self.window_spikes(), **kw)

    def _group(self, st: dict, gain: np.ndarray, cells) -> dict[str, np.ndarray]:
        """Metrics over groups of cells: ``cells`` indexes/reshapes (U, T) arrays to (groups, k)."""
        cs, W = self._c, self.n
        xm, cm = cells(st["mean"]), cells(cs["mean"])
        k = xm.shape[-1]
        n_el = W * k
        dx = xm - xm.mean(axis=-1, keepdims=True)
        dc = cm - cm.mean(axis=-1, keepdims=True)
        sxx = cells(st["m2"]).sum(-1) + W * (dx * dx).sum(-1)
        syy = cells(cs["m2"]).sum(-1) + W * (dc * dc).sum(-1)
        sxy = cells(st["cm"]).sum(-1) + W * (dx * dc).sum(-1)
        sq_x, sq_c = cells(st["sq"]).sum(-1), cells(cs["sq"]).sum(-1)
        const = (sxx <= _REL_TOL * sq_x) | (syy <= _REL_TOL * sq_c)
        corr = np.where(const, 0.0, sxy / np.where(const, 1.0, np.sqrt(sxx * syy))).clip(-1.0, 1.0)
        sse = cells(st["sse"]).sum(-1)
        scale = _REL_TOL * sq_c
        ok = syy > scale
        r2 = np.where(ok, 1.0 - sse / np.where(ok, syy, 1.0), np.where(sse <= scale, 1.0, 0.0))
        n_spk = cells(cs["sum"]).sum(-1)
        g = cells(gain).sum(-1)
        return {
            "bits_per_spike": np.where(n_spk > 0, g / np.where(n_spk > 0, n_spk, 1.0) / LN2, 0.0),
            "correlation": corr,
            "r2": r2,
            "nll": cells(st["nll"]).sum(-1) / n_el,
            "n_spikes": n_spk,
            "mean_rate": cells(st["sum"]).sum(-1) / n_el,
            "mean_count": n_spk / n_el,
        }

    def result(self, name: str, *, bin_size: float, bands_ms=DEFAULT_BANDS_MS) -> dict:
        """The :func:`~nh_serve.evaluation.metrics.evaluate` dict of predictor ``name`` over every window seen."""
        if self.n == 0:
            raise InputError("metrics: no windows were added; there is nothing to evaluate")
        st, cs, W, T = self._p[name], self._c, self.n, self.n_bins
        null = cs["sum"].sum(axis=1) / (W * T)  # (U,) per-unit mean count per bin
        null = np.where(null == 0, ZERO_RATE, null)[:, None]
        gain = (W * null - cs["sum"] * np.log(null)) - st["nll"]  # (U, T) summed over windows, nats
        pu = self._group(st, gain, lambda a: a)  # groups = units
        pb = self._group(st, gain, lambda a: a.T)  # groups = bins
        pooled = self._group(st, gain, lambda a: a.reshape(1, -1))
        varying = self._c_max != self._c_min
        bands = {}
        for band, idx in _band_bins(T, bin_size, bands_ms):
            if idx.size == 0:
                bands[band] = dict.fromkeys(("bits_per_spike", "correlation", "r2", "nll", "n_spikes"), 0.0)
                bands[band]["n_bins"] = 0
                continue
            m = self._group(st, gain, lambda a, idx=idx: a[:, idx].reshape(1, -1))
            bands[band] = {k: float(m[k][0]) for k in ("bits_per_spike", "correlation", "r2", "nll", "n_spikes")}
            bands[band]["n_bins"] = int(idx.size)
        return {
            "bits_per_spike": float(pooled["bits_per_spike"][0]),
            "correlation": float(pooled["correlation"][0]),
            "r2": float(pooled["r2"][0]),
            "nll": float(pooled["nll"][0]),
            "n_spikes": float(pooled["n_spikes"][0]),
            "corr_unit_mean": float(pu["correlation"][varying].mean()) if varying.any() else 0.0,
            "r2_unit_mean": float(pu["r2"][varying].mean()) if varying.any() else 0.0,
            "per_unit": pu,
            "per_bin": pb,
            "per_band": bands,
        }
