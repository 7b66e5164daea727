"""Step 3 and 4 of the window pipeline (:mod:`nh_serve.data.windows`): tokenize and collate.

:func:`tokenize` turns ONE window's data into the model's inputs (CPU tensors, checked, with
:class:`~nh_serve.errors.InputError` for people); :func:`collate` pads a list of them into a batch
whose keys are exactly the keyword arguments of :meth:`nh_serve.core.model.NeuroHorizon.forward`.
Import them from :mod:`nh_serve.data.windows`, which owns the whole pipeline.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from nh_serve.data.history import SLOW_TAU
from nh_serve.data.spikes import check_spikes
from nh_serve.errors import InputError

if TYPE_CHECKING:  # only read here (context_s, history_taus, horizon_s, input widths): data sits below core
    from nh_serve.core.config import ModelConfig

# Largest history rate (Hz) tokenize accepts: far above any neuron, below float overflow.
MAX_HISTORY_RATE_HZ = 1e4

# Image-token input column that marks the end of the known image schedule (1) vs a presentation (0).
IMAGE_MARKER_COLUMN = -1

# Token types of the spike sequence.
TOKEN_SPIKE, TOKEN_UNIT_START, TOKEN_UNIT_END = 0, 1, 2

# Keys produced by tokenize / collate, grouped by the axis they are padded along.
UNIT_KEYS = (
    "unit_features", "unit_mask", "unit_counts", "history_rate_hz", "ref_rate_hz", "history_rates", "unit_bins"
)
SPIKE_KEYS = ("spike_unit_index", "spike_times", "spike_type", "spike_mask")
BEHAVIOR_KEYS = ("behavior_times", "behavior_values", "behavior_mask")
IMAGE_KEYS = ("image_times", "image_values", "image_mask")



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


def context_counts(rel, units, *, n_units: int, context_s: float, n_bins: int) -> np.ndarray:
    """``(n_units, n_bins)`` float32: each unit's spike count in ``n_bins`` equal bins of a context of
    ``context_s`` seconds, oldest first, from spike times ``rel`` in seconds since the context start (in
    ``[0, context_s)``) and unit rows ``units``. The model's ``unit_bins`` and the population forecast
    (:mod:`nh_serve.core.population_forecast`) both read these."""
    nb = int(n_bins)
    b = np.minimum((np.asarray(rel, dtype=np.float64) * (nb / float(context_s))).astype(np.int64), nb - 1)
    u = np.asarray(units, dtype=np.int64)
    return np.bincount(u * nb + b, minlength=int(n_units) * nb).reshape(int(n_units), nb).astype(np.float32)


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
    if cfg.pop_context_bins:  # each unit's spike count in equal bins of the context
        out["unit_bins"] = torch.from_numpy(
            context_counts(rel, units, n_units=n_units, context_s=cfg.context_s, n_bins=cfg.pop_context_bins)
        )  # (U, nb)
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


