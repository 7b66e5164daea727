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
:func:`cut_windows` when it comes from the recording, to :func:`tokenize` and to the
key lists below) and to ``NeuroHorizon.forward``; every path above picks it up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from nh_serve.data.history import SLOW_TAU, ema_rates
from nh_serve.data.spikes import check_spikes, prefix_counts
from nh_serve.errors import InputError

if TYPE_CHECKING:  # only read here (context_s, history_s, horizon_s, input widths): data sits below core
    from nh_serve.core.config import ModelConfig

# Largest history rate (Hz) tokenize accepts: far above any neuron, below float overflow.
MAX_HISTORY_RATE_HZ = 1e4

# Image-token input column that marks the end of the known image schedule (1) vs a presentation (0).
IMAGE_MARKER_COLUMN = -1

# Token types of the spike sequence.
TOKEN_SPIKE, TOKEN_UNIT_START, TOKEN_UNIT_END = 0, 1, 2

# Keys produced by tokenize / collate, grouped by the axis they are padded along.
UNIT_KEYS = ("unit_features", "unit_mask", "unit_counts", "history_rate_hz", "ref_rate_hz", "history_rates")
SPIKE_KEYS = ("spike_unit_index", "spike_times", "spike_type", "spike_mask")
BEHAVIOR_KEYS = ("behavior_times", "behavior_values", "behavior_mask")
IMAGE_KEYS = ("image_times", "image_values", "image_mask")


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


def target_counts(times, units, t_now, *, n_units: int, bin_size: float, n_bins: int) -> np.ndarray:
    """``(W, U, T)`` float32 observed spike counts in the ``n_bins`` bins of ``bin_size`` s after each ``t_now``.

    Bin ``k`` of window ``w`` is ``[t_now_w + k bin_size, t_now_w + (k + 1) bin_size)``
    (``floor((t - t_now) / bin_size)``); horizons may overlap. ``times`` must be sorted.
    """
    times = np.asarray(times, dtype=np.float64)
    units = np.asarray(units, dtype=np.int64)
    t_now = np.asarray(t_now, dtype=np.float64).reshape(-1)  # (W,)
    w, T = t_now.size, int(n_bins)
    lo = np.searchsorted(times, t_now, side="left")
    hi = np.searchsorted(times, t_now + T * bin_size, side="left")
    lens = hi - lo
    win = np.repeat(np.arange(w), lens)  # (M,) window of each (window, spike) pair
    idx = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(lo, lens)
    k = np.floor((times[idx] - t_now[win]) / bin_size).astype(np.int64)
    ok = (k >= 0) & (k < T)
    flat = (win[ok] * n_units + units[idx][ok]) * T + k[ok]
    return np.bincount(flat, minlength=w * n_units * T).reshape(w, n_units, T).astype(np.float32)


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


# ================================================================================================
# Tokenizer and collate (CPU, numpy)
# ================================================================================================


def _float_array(x: Any, *, name: str, shape: tuple[int | None, ...], fix: str) -> np.ndarray:
    """``x`` as a finite float array of ``shape`` (None = any length), else :class:`InputError`."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)) or a.dtype == np.bool_:
        raise InputError(f"{name}: must be numbers, got dtype {a.dtype}; {fix}")
    if a.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, a.shape)):
        want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
        raise InputError(f"{name}: expected shape {want}, got {a.shape}; {fix}")
    if a.size and not np.all(np.isfinite(a)):
        raise InputError(f"{name}: contains NaN or infinite values; {fix}")
    return a


def _events(
    events: Any, *, name: str, width: int, start: float, end: float, where: str = "context window"
) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(times (N,), values (N, width))`` events inside ``[start, end)`` (``where`` names it)."""
    if not isinstance(events, (tuple, list)) or len(events) != 2:
        raise InputError(
            f"{name}: pass a pair (times (N,), values (N, {width})), got {type(events).__name__}"
        )
    times = _float_array(events[0], name=f"{name} times", shape=(None,), fix="pass times in seconds")
    values = _float_array(
        events[1], name=f"{name} values", shape=(None, None), fix=f"pass a (N, {width}) float array"
    )
    if values.shape[1] != width:
        raise InputError(
            f"{name}: values have width {values.shape[1]} but this model takes {width}; "
            "pass the features the model was trained with"
        )
    if values.shape[0] != times.shape[0]:
        raise InputError(
            f"{name}: {times.shape[0]} times but {values.shape[0]} value rows; pass one row per time"
        )
    if times.size and (times.min() < start or times.max() >= end):
        off = times.min() if times.min() < start else times.max()
        raise InputError(
            f"{name}: time {off:.6g} s is outside the {where} [{start:.6g}, {end:.6g}) s; "
            f"send only {name} inside the {where}"
        )
    return times.astype(np.float64), values.astype(np.float32)


def tokenize(
    cfg: ModelConfig,
    *,
    unit_features: Any,
    spike_times: Any,
    spike_unit_index: Any,
    ctx_start: float,
    ref_rate_hz: Any,
    history_counts: Any = None,
    history_duration_s: float | None = None,
    behavior: tuple[Any, Any] | None = None,
    images: tuple[Any, Any] | None = None,
    image_schedule_s: float | None = None,
    history_rates: Any = None,
) -> dict[str, Tensor]:
    """Turn ONE window's data into model inputs (CPU tensors, no batch axis).

    Args:
        cfg: The model config.
        unit_features: ``(U, n_features)`` float z-scored reference features (FeatureNorm applied).
        spike_times: ``(n,)`` spike times in absolute seconds, sorted, all inside the context
            ``[ctx_start, ctx_start + context_s)``.
        spike_unit_index: ``(n,)`` int row of each spike's unit in ``unit_features``.
        ctx_start: context start, absolute seconds.
        ref_rate_hz: ``(U,)`` firing rate in the reference window, Hz.
        history_counts: ``(U,)`` spike counts in ``[ctx_start - history_s, ctx_start)``; None falls
            back to ``ref_rate_hz * history_s`` (i.e. the history rate is the reference rate).
        history_duration_s: seconds actually covered by ``history_counts`` (default ``history_s``;
            pass less near the recording start).
        behavior: ``(times (Nb,), values (Nb, behavior_dim))`` samples inside the context, absolute
            seconds; only for models with ``behavior_dim > 0``.
        images: ``(times (Ni,), embeddings (Ni, image_dim))`` image-presentation onsets inside the
            context or the forecast window, ``[ctx_start, ctx_start + context_s + horizon_s)`` (images
            already shown and those scheduled next); only for models with ``image_dim > 0``.
        image_schedule_s: how many seconds after the context end ``images`` is complete, in
            ``[0, horizon_s]``: 0 = only the images shown so far are known, ``horizon_s`` = the whole
            coming stimulus sequence is known (pass it with an empty list for "no image will be
            shown"). Default: ``horizon_s`` when an image lies after the context end, else 0.
        history_rates: ``(U, K)`` each unit's smoothed rates (Hz) at ``cfg.history_taus`` at the
            context end (:mod:`nh_serve.data.history`); history models only (they take it instead of
            ``history_counts``). None: the reference rate stands in for every time constant.

    Returns:
        Dict with the keys of :meth:`NeuroHorizon.forward` (unbatched): unit-level
        ``unit_features (U, F)``, ``unit_mask (U,)``, ``unit_counts (U, S)``,
        ``history_rate_hz (U,)``, ``ref_rate_hz (U,)`` (history models: ``history_rates (U, K)``,
        and ``history_rate_hz`` is the 30 s rate); token-level ``spike_unit_index``,
        ``spike_times`` (float32 seconds from ``ctx_start``), ``spike_type``, ``spike_mask`` of
        length ``2 U + n`` (each unit's start and end tokens first, then the spikes); and for
        multimodal models ``behavior_*`` / ``image_*``.

    Raises:
        InputError: for any malformed input (the message says how to fix it).
    """
    feats = _float_array(
        unit_features,
        name="unit_features",
        shape=(None, cfg.n_features),
        fix=f"pass one row of {cfg.n_features} normalised reference features per unit",
    )
    if not np.issubdtype(feats.dtype, np.floating):
        raise InputError(f"unit_features: must be float (z-scored features), got dtype {feats.dtype}")
    n_units = feats.shape[0]
    if n_units == 0:
        raise InputError("unit_features: there are zero units; pass at least one unit")
    try:
        ctx_start = float(ctx_start)
    except (TypeError, ValueError):
        raise InputError(f"ctx_start: must be a number of seconds, got {ctx_start!r}") from None
    if not (math.isfinite(ctx_start) and ctx_start >= 0):
        raise InputError(f"ctx_start: must be a finite time >= 0 seconds, got {ctx_start}")
    ctx_end = ctx_start + cfg.context_s
    times, units = check_spikes(
        spike_times, spike_unit_index, n_units=n_units, name="context spikes", window=(ctx_start, ctx_end)
    )
    ref = _float_array(ref_rate_hz, name="ref_rate_hz", shape=(n_units,), fix="pass one rate (Hz) per unit")
    if np.any(ref < 0):
        raise InputError("ref_rate_hz: rates must be >= 0 Hz")
    hist_s = cfg.history_s if history_duration_s is None else float(history_duration_s)
    if not (math.isfinite(hist_s) and hist_s > 0):
        raise InputError(f"history_duration_s: must be > 0 seconds, got {history_duration_s}")
    if history_counts is None:
        hist_rate = ref.astype(np.float64)
    else:
        hist = _float_array(
            history_counts, name="history_counts", shape=(n_units,), fix="pass one spike count per unit"
        )
        if np.any(hist < 0):
            raise InputError("history_counts: counts must be >= 0")
        with np.errstate(over="ignore"):
            hist_rate = hist / hist_s  # (U,) Hz; overflow is rejected just below
        if not np.all(hist_rate <= MAX_HISTORY_RATE_HZ):
            raise InputError(
                f"history_counts / history_duration_s: gives a rate above {MAX_HISTORY_RATE_HZ:g} Hz; "
                "pass spike counts over the history window and its length in seconds"
            )

    hist_rates = None
    if cfg.history_taus:
        if history_counts is not None:
            raise InputError(
                "history_counts: this model takes each unit's smoothed rates (history_rates) instead of "
                "spike counts; pass history_rates, or neither (the Predictor keeps them per session)"
            )
        K = len(cfg.history_taus)
        if history_rates is None:
            hist_rates = np.repeat(ref.astype(np.float64)[:, None], K, axis=1)
        else:
            hist_rates = _float_array(
                history_rates, name="history_rates", shape=(n_units, K),
                fix=f"pass each unit's smoothed rates (Hz) at the {K} time constants {tuple(cfg.history_taus)}",
            )
            if np.any(hist_rates < 0) or not np.all(hist_rates <= MAX_HISTORY_RATE_HZ):
                raise InputError(f"history_rates: rates must be in [0, {MAX_HISTORY_RATE_HZ:g}] Hz")
        hist_rate = hist_rates[:, list(cfg.history_taus).index(SLOW_TAU)]
    elif history_rates is not None:
        raise InputError("history_rates: this model takes a 30 s history count (history_counts) instead; pass history_rates=None")

    # Per-unit counts in the last s seconds of the context, for each activity scale.
    rel = times - ctx_start  # (n,) seconds from the context start, float64
    counts = np.stack(
        [np.bincount(units[rel >= cfg.context_s - s], minlength=n_units) for s in cfg.activity_scales], axis=1
    ).astype(np.float32)  # (U, S)

    # Token sequence: per-unit start / end tokens, then the spikes.
    se_units = np.repeat(np.arange(n_units, dtype=np.int64), 2)  # (2U,) [0, 0, 1, 1, ..]
    se_types = np.tile(np.array([TOKEN_UNIT_START, TOKEN_UNIT_END], dtype=np.int64), n_units)  # (2U,)
    se_times = np.tile(np.array([0.0, cfg.context_s]), n_units)  # (2U,)
    tok_units = np.concatenate([se_units, units])
    tok_types = np.concatenate([se_types, np.full(units.shape[0], TOKEN_SPIKE, dtype=np.int64)])
    tok_times = np.concatenate([se_times, rel]).astype(np.float32)

    out = {
        "unit_features": torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)),
        "unit_mask": torch.ones(n_units, dtype=torch.bool),
        "unit_counts": torch.from_numpy(counts),
        "history_rate_hz": torch.from_numpy(np.asarray(hist_rate, dtype=np.float32)),
        "ref_rate_hz": torch.from_numpy(np.asarray(ref, dtype=np.float32)),
        "spike_unit_index": torch.from_numpy(tok_units),
        "spike_times": torch.from_numpy(tok_times),
        "spike_type": torch.from_numpy(tok_types),
        "spike_mask": torch.ones(tok_units.shape[0], dtype=torch.bool),
    }
    if hist_rates is not None:
        out["history_rates"] = torch.from_numpy(np.ascontiguousarray(hist_rates, dtype=np.float32))  # (U, K)
    if cfg.image_dim == 0 and image_schedule_s is not None:
        raise InputError("image_schedule_s: this model takes no images; pass image_schedule_s=None")
    img_end = ctx_end + cfg.horizon_s
    for kind, events, width, keys, end, where in (
        ("behavior", behavior, cfg.behavior_dim, BEHAVIOR_KEYS, ctx_end, "context window"),
        ("images", images, cfg.image_dim, IMAGE_KEYS, img_end, "context and forecast window"),
    ):
        if width == 0:
            if events is not None:
                raise InputError(
                    f"{kind}: this model takes no {kind} input ({kind} width 0); pass {kind}=None"
                )
            continue
        if events is None:
            ev_t, ev_v = np.zeros(0), np.zeros((0, width), dtype=np.float32)
        else:
            ev_t, ev_v = _events(events, name=kind, width=width, start=ctx_start, end=end, where=where)
        if kind == "images":
            ev_t, ev_v = _with_schedule_marker(ev_t, ev_v, image_schedule_s, ctx_end=ctx_end, cfg=cfg)
        out[keys[0]] = torch.from_numpy((ev_t - ctx_start).astype(np.float32))  # (Ne,) s from ctx start
        out[keys[1]] = torch.from_numpy(np.ascontiguousarray(ev_v, dtype=np.float32))  # (Ne, width)
        out[keys[2]] = torch.ones(ev_t.shape[0], dtype=torch.bool)  # (Ne,)
    return out


def _with_schedule_marker(
    times: np.ndarray, emb: np.ndarray, schedule_s: float | None, *, ctx_end: float, cfg: ModelConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Image events ``(Ni,)``, ``(Ni, image_dim)`` -> ``(Ni + 1,)``, ``(Ni + 1, image_dim + 1)``: a
    zero marker column, then one marker token at ``ctx_end + schedule_s`` (see the module docstring)."""
    if schedule_s is None:
        schedule_s = cfg.horizon_s if times.size and times.max() >= ctx_end else 0.0
    try:
        schedule_s = float(schedule_s)
    except (TypeError, ValueError):
        raise InputError(f"image_schedule_s: must be a number of seconds, got {schedule_s!r}") from None
    if not (math.isfinite(schedule_s) and 0.0 <= schedule_s <= cfg.horizon_s + 1e-9):
        raise InputError(
            f"image_schedule_s: must be between 0 and {cfg.horizon_s:g} s (the forecast window), got {schedule_s}"
        )
    known_until = ctx_end + schedule_s
    if times.size and times.max() >= known_until:
        raise InputError(
            f"images: an image at {times.max():.6g} s lies after the known schedule, which ends at "
            f"{known_until:.6g} s (image_schedule_s={schedule_s:g}); pass image_schedule_s up to "
            f"{cfg.horizon_s:g} s to say the coming images are known, or drop the later images"
        )
    marked = np.zeros((emb.shape[0] + 1, emb.shape[1] + 1), dtype=np.float32)
    marked[:-1, :-1] = emb
    marked[-1, IMAGE_MARKER_COLUMN] = 1.0
    return np.append(times, min(known_until, ctx_end + cfg.horizon_s)), marked


def _pad_stack(tensors: list[Tensor], *, min_len: int = 0) -> Tensor:
    """Stack ``(n_i, ...)`` tensors into ``(B, max(n_i, min_len), ...)``, zero-padded at the end."""
    rest = tensors[0].shape[1:]
    length = max(max(t.shape[0] for t in tensors), min_len)
    out = torch.zeros((len(tensors), length, *rest), dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Pad a list of :func:`tokenize` outputs into a batch (keys = :meth:`NeuroHorizon.forward` kwargs).

    Units are padded to the largest unit count, tokens to the largest token count
    (masks False, zeros elsewhere). Behaviour / image axes are padded to at least 1
    so that a batch without any such event still has a (fully masked) token.
    """
    if not isinstance(items, (list, tuple)) or len(items) == 0:
        raise InputError("collate: pass a non-empty list of tokenized windows")
    keys = list(items[0].keys())
    for i, it in enumerate(items):
        if list(it.keys()) != keys:
            raise InputError(
                f"collate: window #{i} has keys {sorted(it)} but window #0 has {sorted(keys)}; "
                "tokenize every window with the same model"
            )
    batch: dict[str, Tensor] = {}
    for key in keys:
        tensors = [it[key] for it in items]
        shapes = {tuple(t.shape[1:]) for t in tensors}
        if len(shapes) != 1:
            raise InputError(f"collate: {key} has different trailing shapes {sorted(shapes)} across windows")
        min_len = 1 if key in BEHAVIOR_KEYS or key in IMAGE_KEYS else 0
        batch[key] = _pad_stack(tensors, min_len=min_len)
    return batch


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
