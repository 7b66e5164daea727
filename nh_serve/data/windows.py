"""The window pipeline: from a recording's spikes to the model's input tensors.

Every path that feeds the model goes through here, so all give it the same inputs for the same
window: the Predictor (``predict``, ``predict_batch``, test-time adaptation), ``nh-serve eval``,
``nh-serve score``, training and the export parity check. Times are absolute seconds.

1. **Cut** (:func:`cut_windows`, :func:`cut_window`): a :class:`Window` per context
   start ``c``: the context spikes ``[c, c + context_s)``; each unit's spike count in
   the history ``[max(history_start, c - history_s), c)`` and that history's length;
   behaviour samples inside the context; image events shown in the context or
   scheduled in the forecast window, and how far the schedule is known. A caller of
   the Predictor sends the same fields (:data:`WINDOW_INPUTS`) itself.
2. **Targets** (:func:`target_counts`): the observed spike counts in the ``n_bins``
   bins after each context (training loss, test-time adaptation, evaluation).
3. **Tokenize** (:func:`tokenize`, :func:`tokenize_window`): one window's inputs,
   checked (:class:`~nh_serve.errors.InputError` for people), as a dict of CPU tensors.
4. **Collate** (:func:`collate`): pad a list of them into a batch whose keys are
   exactly the keyword arguments of :meth:`nh_serve.core.model.NeuroHorizon.forward`.

To give the model another input, add it here (to :class:`Window`, to
:func:`cut_windows` when it comes from the recording, to :func:`tokenize` and the key
lists in :mod:`nh_serve.data.tokens`) and to ``NeuroHorizon.forward``; every path above picks it up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from torch import Tensor

from nh_serve.data.history import ema_rates
from nh_serve.data.spikes import prefix_counts
from nh_serve.data.tokens import (  # noqa: F401 (the window pipeline's tokenizer, re-exported)
    BEHAVIOR_KEYS,
    IMAGE_KEYS,
    IMAGE_MARKER_COLUMN,
    MAX_HISTORY_RATE_HZ,
    SPIKE_KEYS,
    TOKEN_SPIKE,
    TOKEN_UNIT_END,
    TOKEN_UNIT_START,
    UNIT_KEYS,
    collate,
    tokenize,
)
from nh_serve.errors import InputError

if TYPE_CHECKING:  # only read here (context_s, history_s, horizon_s, input widths): data sits below core
    from nh_serve.core.config import ModelConfig

# ================================================================================================
# Windows
# ================================================================================================


@dataclass(frozen=True, eq=False)
class Window:
    """One prediction window's raw inputs (absolute seconds; units are rows of the unit table)."""

    context_start: float
    spike_times: np.ndarray  # (n,) sorted, inside [context_start, context_start + context_s)
    spike_unit_index: np.ndarray  # (n,) int row of each spike's unit
    history_counts: np.ndarray | None = None  # (U,) spikes in the history before the context
    history_duration_s: float | None = None  # seconds the history covers (None: history_s)
    behavior: tuple[np.ndarray, np.ndarray] | None = None  # (times (Nb,), values (Nb, behavior_dim))
    images: tuple[np.ndarray, np.ndarray] | None = None  # (onsets (Ni,), embeddings (Ni, image_dim))
    image_schedule_s: float | None = None  # seconds after the context end up to which images is complete
    history_rates: np.ndarray | None = None  # (U, K) smoothed rates (Hz) at the context end (history models)


#: The optional inputs of a window beyond its spikes (the keyword arguments ``Predictor.predict`` takes).
WINDOW_INPUTS = tuple(f.name for f in fields(Window))[3:]


def history_counts(times, unit_index, *, n_units: int, ctx_start: float, history_s: float, start: float):
    """``(counts (U,) float32, duration_s)`` of the history ``[max(start, ctx_start - history_s), ctx_start)``
    (sorted ``times``): what ``tokenize`` and ``Predictor.predict`` take as ``history_counts`` / ``history_duration_s``."""
    ctx = np.array([float(ctx_start)])
    counts, h0 = _history(times, unit_index, ctx, n_units=n_units, history_s=history_s, start=start)
    return counts[0], float(ctx_start) - float(h0[0])


def _history(times, units, ctx: np.ndarray, *, n_units: int, history_s: float, start: float):
    """``(W, U)`` float32 spike counts in ``[h0, ctx)`` with ``h0 = max(start, ctx - history_s)``, and ``h0``."""
    h0 = np.maximum(float(start), ctx - float(history_s))  # (W,)
    lo = np.searchsorted(times, h0, side="left")
    hi = np.searchsorted(times, ctx, side="left")
    a, b = int(lo.min()), int(hi.max())
    pre = prefix_counts(np.asarray(units[a:b], dtype=np.int64), np.concatenate([lo, hi]) - a, n_units)
    return (pre[ctx.size :] - pre[: ctx.size]).astype(np.float32), h0


def _slice_events(events, starts: np.ndarray, ends: np.ndarray):
    """Per-window ``(times, values)`` of events in ``[starts_i, ends_i)``."""
    t, v = events
    lo = np.searchsorted(t, starts, side="left")
    hi = np.searchsorted(t, ends, side="left")
    return [(t[a:b], v[a:b]) for a, b in zip(lo, hi)]


def cut_windows(
    times,
    units,
    ctx_starts,
    *,
    n_units: int,
    cfg: ModelConfig,
    history_start: float,
    full_history: bool = False,
    behavior: tuple[np.ndarray, np.ndarray] | None = None,
    images: tuple[np.ndarray, np.ndarray] | None = None,
    image_schedule_s: float | Sequence[float] | None = None,
    history_rates: np.ndarray | None = None,
    ref_rate_hz: np.ndarray | None = None,
) -> list[Window]:
    """The :class:`Window` of every context start ``ctx_starts`` ``(W,)``, cut from a recording.

    ``times`` ``(N,)`` sorted spike times covering the contexts and their histories, ``units``
    their unit rows (of ``n_units``); ``cfg`` gives ``context_s``, ``history_s`` and ``horizon_s``.
    The history never reaches before ``history_start`` (the recording start, or the reference
    start for test-time adaptation); with ``full_history`` only windows with a whole
    ``history_s`` before them get history counts (the others none: the reference rate stands
    in), otherwise any history longer than 0 counts. ``behavior`` / ``images``: the recording's
    ``(times, values)`` events, or None; ``image_schedule_s``: how far into the forecast window
    the images are known (a number or one per window; default the whole horizon).

    History models (``cfg.history_taus``) also get each unit's smoothed rates at each context
    end: ``history_rates`` ``(W, U, K)`` when the caller has them (a block of a long recording,
    carried from the recording start), else computed here from ``times`` (which must then hold
    every spike since ``history_start``) with the history started at ``ref_rate_hz``.
    """
    times = np.asarray(times, dtype=np.float64)
    units = np.asarray(units)
    ctx = np.asarray(ctx_starts, dtype=np.float64).reshape(-1)
    if ctx.size == 0:
        return []
    a = np.searchsorted(times, ctx, side="left")
    b = np.searchsorted(times, ctx + cfg.context_s, side="left")
    hist, h0 = _history(times, units, ctx, n_units=n_units, history_s=cfg.history_s, start=history_start)
    dur = ctx - h0  # (W,) seconds of history
    keep = dur >= cfg.history_s - 1e-9 if full_history else dur > 0
    beh = _slice_events(behavior, ctx, ctx + cfg.context_s) if behavior is not None else None
    img, sched = None, None
    if images is not None:
        sched = np.broadcast_to(
            np.asarray(cfg.horizon_s if image_schedule_s is None else image_schedule_s, dtype=np.float64),
            ctx.shape,
        )
        # presentations already shown and those scheduled in the known part of the forecast window
        img = _slice_events(images, ctx, ctx + cfg.context_s + sched)
    hr = None
    if cfg.history_taus:
        if history_rates is not None:
            hr = np.asarray(history_rates)
            if hr.shape != (ctx.size, n_units, len(cfg.history_taus)):
                raise InputError(
                    f"history_rates: expected shape ({ctx.size}, {n_units}, {len(cfg.history_taus)}), got {hr.shape}"
                )
        elif ref_rate_hz is not None:
            hr = ema_rates(times, units, n_units=n_units, t_eval=ctx + cfg.context_s, start=history_start,
                           ref_rate_hz=ref_rate_hz, taus=cfg.history_taus)
    return [
        Window(
            context_start=float(c),
            spike_times=times[a[i] : b[i]],
            spike_unit_index=units[a[i] : b[i]],
            history_counts=hist[i] if keep[i] and hr is None else None,  # history models: the rates instead
            history_duration_s=float(dur[i]) if keep[i] and hr is None else None,
            behavior=beh[i] if beh is not None else None,
            images=img[i] if img is not None else None,
            image_schedule_s=float(sched[i]) if img is not None else None,
            history_rates=hr[i] if hr is not None else None,
        )
        for i, c in enumerate(ctx)
    ]


def cut_window(times, units, ctx_start: float, **kwargs: Any) -> Window:
    return cut_windows(times, units, [ctx_start], **kwargs)[0]  # one context start


_TARGET_CHUNK_BINS = 1 << 18  # (window, unit, bin) counts per chunk of target_counts


def target_counts(times, units, t_now, *, n_units: int, bin_size: float, n_bins: int) -> np.ndarray:
    """``(W, U, T)`` float32 observed spike counts in the ``n_bins`` bins of ``bin_size`` s after each ``t_now``.

    Bin ``k`` of window ``w`` is ``[t_now_w + k bin_size, t_now_w + (k + 1) bin_size)``
    (``floor((t - t_now) / bin_size)``); horizons may overlap. ``times`` must be sorted.
    """
    times = np.asarray(times, dtype=np.float64)
    units = np.asarray(units, dtype=np.int64)
    t_now = np.asarray(t_now, dtype=np.float64).reshape(-1)  # (W,)
    w, T = t_now.size, int(n_bins)
    out = np.empty((w, int(n_units), T), dtype=np.float32)
    lo = np.searchsorted(times, t_now, side="left")
    hi = np.searchsorted(times, t_now + T * bin_size, side="left")
    # a few windows at a time, so that the (window, spike) pairs and their counts stay small
    step = max(1, _TARGET_CHUNK_BINS // max(1, int(n_units) * T))
    for w0 in range(0, w, step):
        w1 = min(w, w0 + step)
        lens = hi[w0:w1] - lo[w0:w1]
        win = np.repeat(np.arange(w1 - w0), lens)  # (M,) window of each (window, spike) pair
        idx = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(lo[w0:w1], lens)
        k = np.floor((times[idx] - t_now[w0:w1][win]) / bin_size).astype(np.int64)
        ok = (k >= 0) & (k < T)
        flat = (win[ok] * n_units + units[idx][ok]) * T + k[ok]
        out[w0:w1] = np.bincount(flat, minlength=(w1 - w0) * n_units * T).reshape(w1 - w0, n_units, T)
    return out


class RecordedInputs(NamedTuple):
    """A recording's behaviour / image events for a model (None where it takes or has none), and why."""

    behavior: tuple[np.ndarray, np.ndarray] | None
    images: tuple[np.ndarray, np.ndarray] | None
    notes: dict[str, str]  # {"behavior": ..., "images": ...}: "used", or why not


def _input_note(session_dim: int, model_dim: int, what: str) -> str:
    """``"used"``, or why the model is not given the session's behaviour / images."""
    if model_dim == 0:
        return f"model takes no {what}" + (" (the file has some)" if session_dim else "")
    if session_dim == 0:
        return f"file has no {what}; the model saw none"
    if session_dim != model_dim:
        return f"file's {what} are {session_dim}-D but the model takes {model_dim}-D; not used"
    return "used"


def recorded_input_notes(session, cfg: ModelConfig) -> dict[str, str]:
    """``{"behavior": ..., "images": ...}``: ``"used"`` where the model gets the session's events, else why not."""
    return {
        "behavior": _input_note(session.behavior_dim, cfg.behavior_dim, "behaviour"),
        "images": _input_note(session.image_dim, cfg.image_dim, "images"),
    }


def recorded_inputs(session, cfg: ModelConfig, t0: float, t1: float) -> RecordedInputs:
    """The behaviour / image events of an open session in ``[t0, t1)`` that the model takes (a file
    without them, or with other widths than the model's, gives None and a note saying so)."""
    notes = recorded_input_notes(session, cfg)
    return RecordedInputs(
        behavior=session.behavior(t0, t1) if notes["behavior"] == "used" else None,
        images=session.image_events(t0, t1) if notes["images"] == "used" else None,
        notes=notes,
    )


def tokenize_window(cfg: ModelConfig, window: Window, *, unit_features: Any, ref_rate_hz: Any) -> dict[str, Tensor]:
    """:func:`tokenize` of a :class:`Window` with the registered units' features and reference rates."""
    return tokenize(
        cfg,
        unit_features=unit_features,
        spike_times=window.spike_times,
        spike_unit_index=window.spike_unit_index,
        ctx_start=window.context_start,
        ref_rate_hz=ref_rate_hz,
        history_counts=window.history_counts,
        history_duration_s=window.history_duration_s,
        behavior=window.behavior,
        images=window.images,
        image_schedule_s=window.image_schedule_s,
        history_rates=window.history_rates,
    )
