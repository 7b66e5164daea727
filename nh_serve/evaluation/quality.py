"""Quality benchmark: ``nh-serve eval --checkpoint <path|default> <session files...>``.

Scores a checkpoint's next-second predictions on held-out recordings, next to
every causal baseline (:mod:`nh_serve.evaluation.baselines`) and, on synthetic recordings,
the oracle (the true rates). Everything goes through the shared pieces:

- :func:`nh_serve.evaluation.sliding.plan_windows` places the reference window (the
  first ``--reference-s`` seconds; by default :func:`~nh_serve.data.features.auto_reference_s`: 60 s, or
  a quarter of a recording shorter than 4 minutes, e.g. 30 s for a 2-minute
  one) and one prediction window every ``--stride`` seconds after it;
  :func:`nh_serve.evaluation.sliding.collect_targets` bins the observed horizon counts
  and runs the baselines; :func:`nh_serve.evaluation.sliding.oracle_rates` reads the
  ground truth of synthetic files.
- Model predictions come from the :class:`~nh_serve.inference.predictor.Predictor`:
  ``register`` with the reference-window spikes (zero-shot: the unit
  embeddings come from the IDEncoder only), then ``predict_windows`` with the
  windows the window pipeline (:func:`nh_serve.data.windows.cut_windows`, as in
  training and scoring) cuts: each window's context spikes, ``history_counts`` =
  each unit's spikes in the ``history_s`` seconds before the context, and for
  multimodal checkpoints the recording's behaviour and image events (the stimulus
  schedule of the forecast window known), as ``nh-serve score`` gives them. With
  ``--adapt-steps N`` the units are registered a second time with test-time
  adaptation and scored as ``<name> adapted``.
- :func:`nh_serve.evaluation.metrics.evaluate` gives bits/spike (NLB definition) over the
  whole 1 s horizon and per band (0-250, 250-500, 500-1000 ms), the pooled
  firing-rate correlation and R², and their means over units.

Several checkpoints can be scored on the same windows (``--compare
NAME=PATH``), e.g. ablations. Checkpoints trained with ``head_ablation =
no_activity`` (:mod:`training.train`) store ``head_activity=False`` in their config.
Synthetic recordings are also averaged (mean over recordings of each metric) and
the model's mean bits/spike is reported as a fraction of the oracle's. The
command line and the Markdown tables are :mod:`nh_serve.evaluation.quality_cli`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from nh_serve.data.features import MIN_REFERENCE_S, auto_reference_s
from nh_serve.data.session import open_session
from nh_serve.data.windows import RecordedInputs, cut_windows, recorded_inputs
from nh_serve.errors import InputError
from nh_serve.evaluation.baselines import DEFAULT_HISTORY_S
from nh_serve.evaluation.metrics import evaluate
from nh_serve.evaluation.reporting import machine_info
from nh_serve.evaluation.sliding import collect_targets, oracle_rates, plan_windows
from nh_serve.inference.predictor import Predictor

ORACLE = "oracle"


# ================================================================================================
# Scoring
# ================================================================================================


def summarize(m: dict) -> dict:
    """The scalar figures of a :func:`nh_serve.evaluation.metrics.evaluate` result."""
    out = {
        k: float(m[k])
        for k in ("bits_per_spike", "correlation", "r2", "corr_unit_mean", "r2_unit_mean", "nll", "n_spikes")
    }
    out["bands"] = {name: float(b["bits_per_spike"]) for name, b in m["per_band"].items()}
    return out


class ModelRates(NamedTuple):
    """What :func:`model_rates` returns (expected counts per 20 ms bin)."""

    rates: np.ndarray  # (W, U, T) the model's prediction
    adaptation: dict | None  # what test-time adaptation did, if it ran
    offset: np.ndarray | None  # (W, U, T) the persistence offset alone, if asked for


def model_rates(
    p,
    *,
    times,
    units,
    unit_ids,
    start: float,
    plan,
    inputs: RecordedInputs | None = None,
    adapt_steps: int = 0,
    adapt_budget_s: float = 30.0,
    seed: int = 0,
    offset: bool = False,
) -> ModelRates:
    """Expected counts ``(W, U, T)`` of a Predictor on every planned window, and its adaptation info.

    ``offset=True`` also returns the model's persistence offset by itself, flat over the
    horizon: the head adds the log of :func:`nh_serve.core.model.baseline_rate_hz` (the last
    ``activity_scales[-1]`` seconds' count shrunk toward the history rate) to the network's
    output, so scoring the offset alone shows what the network adds on top of it. It is
    computed by :meth:`~nh_serve.core.model.NeuroHorizon.log_baseline` on the very inputs the
    model gets. ``inputs``: the recording's behaviour / image events for a multimodal model
    (:func:`~nh_serve.data.windows.recorded_inputs`), given to it as ``nh-serve score`` does.
    """
    cfg = p.cfg
    r0, r1 = plan.reference
    a, b = np.searchsorted(times, [r0, r1])
    token = p.register(
        times[a:b],
        unit_ids[units[a:b]],
        reference_window=(r0, r1),
        units=unit_ids,
        adapt_steps=adapt_steps,
        adapt_time_budget_s=adapt_budget_s,
        seed=seed,
    )
    # each window's context spikes and history_counts = every unit's spikes in the history_s seconds
    # before the context (the window pipeline training and scoring use)
    windows = cut_windows(
        times,
        units,
        plan.ctx_starts,
        n_units=unit_ids.shape[0],
        cfg=cfg,
        history_start=start,
        behavior=inputs.behavior if inputs is not None else None,
        images=inputs.images if inputs is not None else None,
    )
    preds = p.predict_windows(token, windows, horizon_s=plan.n_bins * plan.bin_size)
    rates = np.stack([pr.expected_counts for pr in preds])  # (W, U, T)
    offset_counts = _offset_counts(p, token, windows, plan) if offset else None
    info = p.session(token).adaptation
    p.sessions.discard(token)  # free the cached embeddings of this recording
    return ModelRates(rates, info, offset_counts)


def _offset_counts(p, token: str, windows: list, plan) -> np.ndarray:
    """Expected counts ``(W, U, T)`` of the model's persistence offset alone (see :func:`model_rates`)."""
    unit_counts, hist_rate = [], []
    for w in windows:
        item = p.tokenize(token, w)
        unit_counts.append(item["unit_counts"])  # (U, S)
        hist_rate.append(item["history_rate_hz"])  # (U,)
    with torch.no_grad():
        log_base = p.model.log_baseline(torch.stack(unit_counts), torch.stack(hist_rate))  # (W, U) log Hz
    rate = torch.exp(log_base).numpy()
    return np.repeat((rate * plan.bin_size)[:, :, None], plan.n_bins, axis=2)


def evaluate_recording(
    path,
    *,
    predictors: dict,
    reference_s: float | None = None,
    adapt_steps: int = 0,
    adapt_budget_s: float = 30.0,
    stride_s: float = 1.0,
    max_windows: int | None = None,
    progress: bool = True,
) -> dict:
    """Score every predictor, baseline and (synthetic files) the oracle on one recording.

    Multimodal checkpoints get the recording's behaviour and image events as ``nh-serve
    score`` gives them (:func:`~nh_serve.data.windows.recorded_inputs`): the stimulus
    schedule of each forecast window is known; a file without them gives none.
    """
    first = next(iter(predictors.values())).cfg
    for name, p in predictors.items():
        c = p.cfg
        if (c.context_s, c.n_bins, c.bin_size_s) != (first.context_s, first.n_bins, first.bin_size_s):
            raise InputError(
                f"--compare {name}: its context / bins differ from the main checkpoint's; "
                "compare checkpoints with the same context and horizon"
            )
    path = Path(path)
    with open_session(path) as s:
        ref = auto_reference_s(s.duration) if reference_s is None else float(reference_s)
        plan = plan_windows(
            start=s.start,
            end=s.end,
            reference_s=ref,
            context_s=first.context_s,
            n_bins=first.n_bins,
            bin_size=first.bin_size_s,
            stride_s=stride_s,
            max_windows=max_windows,
            name=str(path),
        )
        targets = collect_targets(s, plan, history_s=DEFAULT_HISTORY_S, progress=progress)
        oracle = oracle_rates(s, plan)
        times, units = s.spikes(s.start, s.end)
        inputs = {name: recorded_inputs(s, p.cfg, s.start, s.end) for name, p in predictors.items()}
        unit_ids = np.asarray(s.unit_ids).astype(str)
        start, duration, n_units = float(s.start), float(s.duration), int(s.n_units)
    counts = targets.counts
    scores, raw, adaptation = {}, {}, {}

    def score(name: str, rates: np.ndarray) -> None:
        raw[name] = rates
        scores[name] = summarize(evaluate(rates, counts, bin_size=plan.bin_size))

    offsets_scored = set()
    for name, p in predictors.items():
        t0 = time.monotonic()
        offset_key = (p.cfg.activity_scales[-1], p.cfg.baseline_prior_s, p.cfg.history_s)
        want_offset = p.cfg.baseline_offset and offset_key not in offsets_scored  # one row per distinct offset
        got = model_rates(
            p, times=times, units=units, unit_ids=unit_ids, start=start, plan=plan, inputs=inputs[name], offset=want_offset
        )
        score(name, got.rates)
        scores[name]["seconds"] = round(time.monotonic() - t0, 2)
        if want_offset:
            offsets_scored.add(offset_key)
            score(f"{name} offset only", got.offset)
        if adapt_steps > 0:
            rates, info, _ = model_rates(
                p,
                times=times,
                units=units,
                unit_ids=unit_ids,
                start=start,
                plan=plan,
                inputs=inputs[name],
                adapt_steps=adapt_steps,
                adapt_budget_s=adapt_budget_s,
            )
            score(f"{name} adapted", rates)
            adaptation[name] = info
    for name, rates in targets.baselines.items():
        score(name, rates)
    if oracle is not None:
        score(ORACLE, oracle)
    return {
        "recording": f"{path.parent.name}/{path.name}",
        "synthetic": oracle is not None,
        "units": n_units,
        "duration_s": round(duration, 3),
        "reference_s": [round(plan.reference[0], 6), round(plan.reference[1], 6)],
        "windows": len(plan),
        "stride_s": stride_s,
        "scores": scores,
        "adaptation": adaptation,
    }


def _mean_scores(recs: list[dict]) -> dict:
    names = [n for n in recs[0]["scores"] if all(n in r["scores"] for r in recs)]
    out = {}
    for n in names:
        ss = [r["scores"][n] for r in recs]
        m = {
            k: float(np.mean([s[k] for s in ss]))
            for k in ("bits_per_spike", "correlation", "r2", "corr_unit_mean", "r2_unit_mean")
        }
        m["bands"] = {b: float(np.mean([s["bands"][b] for s in ss])) for b in ss[0]["bands"]}
        out[n] = m
    return out


def run_benchmark(
    checkpoints: dict,
    sessions: list,
    *,
    reference_s: float | None = None,
    adapt_steps: int = 0,
    adapt_budget_s: float = 30.0,
    stride_s: float = 1.0,
    max_windows: int | None = None,
    progress: bool = True,
) -> dict:
    """Score ``checkpoints`` (name -> path or ``"default"``) on every recording; a JSON-serialisable dict."""
    if not sessions:
        raise InputError("eval: pass at least one session file")
    if reference_s is not None and reference_s < MIN_REFERENCE_S:
        raise InputError(f"--reference-s: must be at least {MIN_REFERENCE_S:g} s, got {reference_s:g}")
    if adapt_steps < 0:
        raise InputError(f"--adapt-steps: must be >= 0, got {adapt_steps}")
    if stride_s <= 0:
        raise InputError(f"--stride: must be > 0 seconds, got {stride_s}")
    predictors = {name: Predictor.load(spec, backend="torch") for name, spec in checkpoints.items()}
    recs = [
        evaluate_recording(
            path,
            predictors=predictors,
            reference_s=reference_s,
            adapt_steps=adapt_steps,
            adapt_budget_s=adapt_budget_s,
            stride_s=stride_s,
            max_windows=max_windows,
            progress=progress,
        )
        for path in tqdm(sessions, desc="recordings", unit="recording", disable=not progress)
    ]
    main = next(iter(checkpoints))
    synth = [r for r in recs if r["synthetic"]]
    summary = {}
    if synth:
        mean = _mean_scores(synth)
        oracle_bps = mean[ORACLE]["bits_per_spike"]
        summary["synthetic_mean"] = mean
        summary["synthetic_recordings"] = len(synth)
        summary["fraction_of_oracle"] = {
            n: (m["bits_per_spike"] / oracle_bps if oracle_bps > 0 else None)
            for n, m in mean.items()
            if n != ORACLE
        }
    baselines = [n for n in recs[0]["scores"] if n in ("reference_rate", "persistence", "exp_smooth")]
    summary["beats_every_baseline"] = {
        r["recording"]: bool(
            all(r["scores"][main]["bits_per_spike"] > r["scores"][b]["bits_per_spike"] for b in baselines)
        )
        for r in recs
    }
    return {
        "checkpoints": {
            name: {
                "path": str(spec),
                "model": p.cfg.name,
                "hash": p.model_hash,
                "unit_embedding_mode": p.cfg.unit_embedding_mode,
                "head_ablation": (p.checkpoint.training or {}).get("head_ablation", "none"),
            }
            for (name, spec), p in zip(checkpoints.items(), predictors.values())
        },
        "main": main,
        "settings": {
            "reference_s": reference_s if reference_s is not None else "auto",
            "adapt_steps": adapt_steps,
            "adapt_budget_s": adapt_budget_s,
            "stride_s": stride_s,
            "max_windows": max_windows,
        },
        "recordings": recs,
        "summary": summary,
        "machine": machine_info(),
    }
