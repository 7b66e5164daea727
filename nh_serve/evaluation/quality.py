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

from nh_serve.core.config import ModelConfig
from nh_serve.data.features import MIN_REFERENCE_S, auto_reference_s
from nh_serve.data.history import HistoryTrack
from nh_serve.data.session import open_session
from nh_serve.data.windows import RecordedInputs, cut_windows, recorded_input_notes, recorded_inputs
from nh_serve.errors import InputError
from nh_serve.evaluation.baselines import DEFAULT_HISTORY_S, baseline_names, checkpoint_univariate_glm
from nh_serve.evaluation.insample import seen_as
from nh_serve.evaluation.metrics import paired_bps_interval
from nh_serve.evaluation.refits import RefitReplay
from nh_serve.evaluation.reporting import machine_info
from nh_serve.evaluation.sliding import (
    StreamingMetrics,
    WindowPlan,
    horizon_counts,
    iter_spike_blocks,
    make_baseline_set,
    oracle_rates,
    plan_windows,
)
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


class _Variant:
    """One scored model row: a Predictor with a registered session, cutting its own windows."""

    def __init__(self, name: str, p, token: str, *, offset_only: bool = False):
        self.name, self.p, self.token, self.offset_only = name, p, token, offset_only

    def rates(self, windows, plan) -> np.ndarray:
        if self.offset_only:
            return _offset_counts(self.p, self.token, windows, plan)
        preds = self.p.predict_windows(self.token, windows, horizon_s=plan.n_bins * plan.bin_size)
        return np.stack([pr.expected_counts for pr in preds])  # (w, U, T)


def fit_record(fit: dict) -> dict:
    """What a registration fit kept (a session's ``fit`` record), for the JSON and the report."""
    keys = ("mode", "units_fitted", "calibration_only", "population_corrected", "floor_beta", "shrink_gamma", "level_lambda",
            "note")
    return {k: fit[k] for k in keys if k in fit}


def _register(p, times, units, unit_ids, plan, *, adapt_steps=0, adapt_budget_s=30.0, seed=0, fit="reference") -> str:
    r0, r1 = plan.reference
    a, b = np.searchsorted(times, [r0, r1])
    return p.register(
        times[a:b], unit_ids[units[a:b]], reference_window=(r0, r1), units=unit_ids,
        adapt_steps=adapt_steps, adapt_time_budget_s=adapt_budget_s, seed=seed, fit=fit,
    )


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
    """Expected counts ``(W, U, T)`` of a Predictor on every planned window of a (short) recording.

    The whole-array form of what :func:`evaluate_recording` does a block at a time: register the
    reference window (with ``adapt_steps`` of test-time adaptation), cut every window with the
    window pipeline (:func:`nh_serve.data.windows.cut_windows`, as training and scoring do) and
    predict. ``offset=True`` also returns the model's persistence offset by itself
    (:meth:`~nh_serve.core.model.NeuroHorizon.log_baseline` on the very inputs the model gets),
    which shows what the network adds on top of it.
    """
    token = _register(p, times, units, unit_ids, plan, adapt_steps=adapt_steps, adapt_budget_s=adapt_budget_s, seed=seed)
    windows = cut_windows(
        times, units, plan.ctx_starts, n_units=unit_ids.shape[0], cfg=p.cfg, history_start=start,
        behavior=inputs.behavior if inputs is not None else None,
        images=inputs.images if inputs is not None else None,
        ref_rate_hz=p.session(token).ref_rate_hz,
    )
    rates = _Variant("model", p, token).rates(windows, plan)
    offset_counts = _offset_counts(p, token, windows, plan) if offset else None
    info = p.session(token).adaptation
    p.sessions.discard(token)  # free the cached embeddings of this recording
    return ModelRates(rates, info, offset_counts)


def _offset_counts(p, token: str, windows: list, plan) -> np.ndarray:
    """Expected counts ``(W, U, T)`` of the model's offset alone (see :func:`model_rates`): the
    persistence offset, or a history model's ``log(r_30s + 0.1 Hz)``."""
    unit_counts, hist_rate, hist = [], [], []
    for w in windows:
        item = p.tokenize(token, w)
        unit_counts.append(item["unit_counts"])  # (U, S)
        hist_rate.append(item["history_rate_hz"])  # (U,)
        hist.append(item.get("history_rates"))
    with torch.no_grad():
        if p.cfg.has_history:
            log_base = p.model.history_features(torch.stack(hist))[1]  # (W, U) log Hz
        else:
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
    baselines: str = "default",
    shuffled_units: bool = False,
    dense_fit: bool = False,
    refit_every_s: float | None = None,
    refit_window_s: float | None = None,
    progress: bool = True,
) -> dict:
    """Score every predictor, every baseline and (synthetic files) the oracle on one recording.

    Rows per checkpoint: ``<name>`` (registered as the Predictor does by default: with the
    reference fit when the model has a read-out), ``<name> zero-shot`` (``fit="none"``),
    ``<name> offset only``, with ``dense_fit`` ``<name> dense fit`` (``fit="reference-dense"``), with
    ``refit_every_s`` ``<name> refit every <S> s`` (the reference fit, then refitted as a streaming
    session with ``refit_every_s`` and ``refit_window_s`` would be: :class:`~nh_serve.evaluation.refits.RefitReplay`), with
    ``adapt_steps`` ``<name> adapted``, and with ``shuffled_units``
    ``<name> shuffled units``: zero-shot with every unit's descriptors and embedding given to
    another unit (a fixed random permutation), which shows what binding each unit to its own
    descriptors is worth.

    A block of windows at a time (memory does not grow with the recording): the observed
    counts, every baseline (:class:`~nh_serve.evaluation.baselines.BaselineSet`), each model's
    predictions on the windows the window pipeline cuts for it, and the oracle go into one
    :class:`~nh_serve.evaluation.sliding.StreamingMetrics`, which also keeps every window's
    likelihood for the paired intervals. Multimodal checkpoints get the recording's behaviour
    and image events as ``nh-serve score`` gives them (the stimulus schedule of each forecast
    window known); a file without them gives none.
    """
    first = next(iter(predictors.values())).cfg if predictors else ModelConfig()  # 1 s context, 50 x 20 ms
    for name, p in predictors.items():
        c = p.cfg
        if (c.context_s, c.n_bins, c.bin_size_s) != (first.context_s, first.n_bins, first.bin_size_s):
            raise InputError(
                f"--compare {name}: its context / bins differ from the main checkpoint's; "
                "compare checkpoints with the same context and horizon"
            )
    path = Path(path)
    main = next(iter(predictors), None)
    with open_session(path) as s:
        ref = auto_reference_s(s.duration) if reference_s is None else float(reference_s)
        plan = plan_windows(
            start=s.start, end=s.end, reference_s=ref, context_s=first.context_s, n_bins=first.n_bins,
            bin_size=first.bin_size_s, stride_s=stride_s, max_windows=max_windows, name=str(path),
        )
        U, start, duration = int(s.n_units), float(s.start), float(s.duration)
        unit_ids = np.asarray(s.unit_ids).astype(str)
        all_t, all_u = s.spikes(s.start, s.end)
        label = f"{path.parent.name}/{path.name}"
        in_sample = {name: seen_as(p.checkpoint, times=all_t, units=all_u, name=label) for name, p in predictors.items()}
        del all_t, all_u
        r0, r1 = plan.reference
        ref_t, ref_u = s.spikes(min(start, r0), r1)
        t0 = time.monotonic()
        univariate, uni_source = checkpoint_univariate_glm(predictors[main].checkpoint if main else None)
        bset = make_baseline_set(s, plan, names=baseline_names(baselines), univariate=univariate)
        fit_seconds = time.monotonic() - t0
        has_oracle = oracle_rates(s, WindowPlan(plan.reference, plan.ctx_starts[:1], plan.context_s, plan.n_bins, plan.bin_size)) is not None
        variants, adaptation, offsets_scored = [], {}, set()
        for name, p in predictors.items():
            token = _register(p, ref_t, ref_u, unit_ids, plan)
            variants.append(_Variant(name, p, token))
            if p.cfg.readout_dim:  # the same checkpoint with no reference fit: pure zero-shot
                variants.append(_Variant(f"{name} zero-shot", p, _register(p, ref_t, ref_u, unit_ids, plan, fit="none")))
                if dense_fit:
                    variants.append(_Variant(f"{name} dense fit", p,
                                             _register(p, ref_t, ref_u, unit_ids, plan, fit="reference-dense")))
                if refit_every_s is not None:
                    variants.append(RefitReplay(f"{name} refit every {refit_every_s:g} s", p,
                                                _register(p, ref_t, ref_u, unit_ids, plan), read=s.spikes,
                                                every_s=refit_every_s, window_s=refit_window_s))
            if shuffled_units:
                tok = _register(p, ref_t, ref_u, unit_ids, plan, fit="none")
                sess = p.session(tok)
                perm = np.random.Generator(np.random.PCG64(0)).permutation(U)
                sess.embeddings, sess.features = sess.embeddings[torch.from_numpy(perm)], sess.features[perm]
                variants.append(_Variant(f"{name} shuffled units", p, tok))
            offset_key = (p.cfg.history_taus, p.cfg.activity_scales[-1], p.cfg.baseline_prior_s, p.cfg.history_s)
            if p.cfg.baseline_offset and offset_key not in offsets_scored:  # one row per distinct offset
                offsets_scored.add(offset_key)
                variants.append(_Variant(f"{name} offset only", p, token, offset_only=True))
            if adapt_steps > 0:
                tok = _register(p, ref_t, ref_u, unit_ids, plan, adapt_steps=adapt_steps, adapt_budget_s=adapt_budget_s)
                variants.append(_Variant(f"{name} adapted", p, tok))
                adaptation[name] = p.session(tok).adaptation
        inputs = {name: recorded_input_notes(s, p.cfg) for name, p in predictors.items()}
        # each history model's smoothed rates at every prediction time, carried block to block
        tracks = {
            taus: HistoryTrack(read=s.spikes, n_units=U, ref_rate_hz=bset.ref, start=start, taus=taus)
            for taus in {p.cfg.history_taus for p in predictors.values() if p.cfg.has_history}
        }
        names = [v.name for v in variants] + list(bset.names) + ([ORACLE] if has_oracle else [])
        acc = StreamingMetrics(names, n_units=U, n_bins=plan.n_bins)
        seconds = dict.fromkeys([v.name for v in variants], 0.0)
        lookback = max([DEFAULT_HISTORY_S] + [p.cfg.history_s + first.context_s for p in predictors.values()])
        with tqdm(total=len(plan), desc=path.stem[:24], unit="win", disable=not progress, leave=False) as bar:
            for block in iter_spike_blocks(s, plan, lookback_s=lookback):
                sl = slice(block.first, block.stop)
                ctx = plan.ctx_starts[sl]
                counts = horizon_counts(block, plan, n_units=U)
                t0 = time.monotonic()
                preds = bset.predict(plan.t_now[sl], block.times, block.units, t0=block.t0)
                fit_seconds += time.monotonic() - t0
                hist = {taus: tr.at(plan.t_now[sl], block.times, block.units, t0=block.t0) for taus, tr in tracks.items()}
                cut = {}
                for v in variants:
                    if v.p not in cut:
                        rec = recorded_inputs(s, v.p.cfg, float(ctx[0]), float(ctx[-1]) + first.context_s + first.horizon_s)
                        cut[v.p] = cut_windows(
                            block.times, block.units, ctx, n_units=U, cfg=v.p.cfg, history_start=start,
                            behavior=rec.behavior, images=rec.images, history_rates=hist.get(v.p.cfg.history_taus),
                        )
                    t0 = time.monotonic()
                    preds[v.name] = v.rates(cut[v.p], plan)
                    seconds[v.name] += time.monotonic() - t0
                if has_oracle:
                    oracle = oracle_rates(s, WindowPlan(plan.reference, ctx, plan.context_s, plan.n_bins, plan.bin_size))
                    if oracle is None:
                        raise InputError(f"{path}: its true_rates do not cover windows {block.first}-{block.stop - 1}")
                    preds[ORACLE] = oracle
                acc.update(counts, preds)
                bar.update(block.stop - block.first)
        refits = {v.name: v.summary() for v in variants if isinstance(v, RefitReplay)}
        fits = {v.name: fit_record(f) for v in variants if isinstance(v, _Variant) and not v.offset_only
                if (f := v.p.session(v.token).fit or {}).get("mode", "none") != "none"}
        for v in variants:
            v.p.sessions.discard(v.token)
    scores = {n: summarize(acc.result(n, bin_size=plan.bin_size)) for n in names}
    for v in variants:
        scores[v.name]["seconds"] = round(seconds[v.name], 2)
    base = list(bset.names)
    best = max(base, key=lambda n: scores[n]["bits_per_spike"])
    paired = {v.name: {b: acc.paired(v.name, b) for b in base} for v in variants}
    return {
        "recording": f"{path.parent.name}/{path.name}",
        "in_sample": in_sample,  # checkpoint -> "training" / "validation" when it has seen this recording, else None
        "synthetic": has_oracle,
        "units": U,
        "duration_s": round(duration, 3),
        "reference_s": [round(plan.reference[0], 6), round(plan.reference[1], 6)],
        "windows": len(plan),
        "stride_s": stride_s,
        "scores": scores,
        "baselines": base,
        "best_baseline": best,
        "paired": paired,
        "beats_best_baseline": {v.name: bool(paired[v.name][best]["lo"] > 0) for v in variants},
        "univariate_glm_weights": uni_source,
        "baseline_seconds": round(fit_seconds, 2),
        "model_inputs": inputs,
        "adaptation": adaptation,
        "refits": refits,
        "fits": fits,
        "_window_nll": {n: acc.window_nll(n) for n in names},
        "_window_spikes": acc.window_spikes(),
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
    baselines: str = "default",
    shuffled_units: bool = False,
    dense_fit: bool = False,
    refit_every_s: float | None = None,
    refit_window_s: float | None = None,
    progress: bool = True,
) -> dict:
    """Score ``checkpoints`` (name -> path or ``"default"``) on every recording; a JSON-serialisable dict.

    Per recording: every predictor's scores, the best baseline in hindsight and, for every model
    row, its paired bits/spike difference to each baseline with a 95% block-bootstrap interval
    (``paired``). The summary averages synthetic recordings (with the oracle fraction overall and
    per band, and the mean paired differences, each recording resampled on its own) and says per
    recording whether the main model beats the best baseline beyond the interval.
    """
    if not sessions:
        raise InputError("eval: pass at least one session file")
    if reference_s is not None and reference_s < MIN_REFERENCE_S:
        raise InputError(f"--reference-s: must be at least {MIN_REFERENCE_S:g} s, got {reference_s:g}")
    if adapt_steps < 0:
        raise InputError(f"--adapt-steps: must be >= 0, got {adapt_steps}")
    if stride_s <= 0:
        raise InputError(f"--stride: must be > 0 seconds, got {stride_s}")
    if refit_window_s is not None and refit_every_s is None:  # the values are RefitReplay's to check
        raise InputError("--refit-window: set --refit-every too (the window is that of the refits)")
    baseline_names(baselines)  # a bad set name fails before any work
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
            baselines=baselines,
            shuffled_units=shuffled_units,
            dense_fit=dense_fit,
            refit_every_s=refit_every_s,
            refit_window_s=refit_window_s,
            progress=progress,
        )
        for path in tqdm(sessions, desc="recordings", unit="recording", disable=not progress)
    ]
    main = next(iter(checkpoints))
    summary = summarize_recordings(recs, main=main)
    for r in recs:
        r.pop("_window_nll")
        r.pop("_window_spikes")
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
            "baselines": baselines,
            "shuffled_units": shuffled_units,
            "dense_fit": dense_fit,
            "refit_every_s": refit_every_s,
            "refit_window_s": refit_window_s,
        },
        "recordings": recs,
        "summary": summary,
        "machine": machine_info(),
    }


def summarize_recordings(recs: list[dict], *, main: str) -> dict:
    """The ``summary`` of :func:`run_benchmark` (see there) from :func:`evaluate_recording` results."""
    summary: dict = {}
    summary["in_sample"] = {r["recording"]: r["in_sample"].get(main) for r in recs if r["in_sample"].get(main)}
    held = [r for r in recs if not r["in_sample"].get(main)]  # every "held-out" figure leaves these out
    summary["held_out_recordings"] = [r["recording"] for r in held]
    synth = [r for r in held if r["synthetic"]]
    if synth:
        mean = _mean_scores(synth)
        oracle = mean[ORACLE]
        models = [n for n in synth[0]["paired"]]
        base = synth[0]["baselines"]
        summary["synthetic_mean"] = mean
        summary["synthetic_recordings"] = len(synth)
        summary["fraction_of_oracle"] = {
            n: (m["bits_per_spike"] / oracle["bits_per_spike"] if oracle["bits_per_spike"] > 0 else None)
            for n, m in mean.items()
            if n != ORACLE
        }
        summary["fraction_of_oracle_bands"] = {
            n: {b: (v / oracle["bands"][b] if oracle["bands"][b] > 0 else None) for b, v in m["bands"].items()}
            for n, m in mean.items()
            if n != ORACLE
        }
        summary["best_baseline_mean_bps"] = float(np.mean([r["scores"][r["best_baseline"]]["bits_per_spike"] for r in synth]))

        def mean_paired(model: str, pick) -> dict:
            return paired_bps_interval(
                [r["_window_nll"][model] for r in synth],
                [r["_window_nll"][pick(r)] for r in synth],
                [r["_window_spikes"] for r in synth],
            )

        summary["synthetic_paired"] = {
            m: {
                "best_baseline": mean_paired(m, lambda r: r["best_baseline"]),
                **{b: mean_paired(m, lambda r, b=b: b) for b in base},
            }
            for m in models
        }
    summary["best_baseline"] = {r["recording"]: r["best_baseline"] for r in recs}
    summary["beats_best_baseline"] = {r["recording"]: r["beats_best_baseline"].get(main, False) for r in held}
    summary["beats_every_baseline"] = summary["beats_best_baseline"]  # the best one in hindsight, beyond the interval
    return summary
