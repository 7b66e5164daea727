"""Batch scoring of recordings: ``nh-serve score`` (see docs/scoring.md).

Python API::

    from nh_serve.evaluation.score import ScoreSettings, run_score, merge_outputs
    report = run_score(["recs/"], out="scores", checkpoint="default",
                       settings=ScoreSettings(stride_s=1.0, batch_size=32))
    report.exit_code, report.doc["recordings"][0]["predictors"]["model"]["bits_per_spike"]

Modules: :mod:`~nh_serve.evaluation.score.core` (one recording), :mod:`~nh_serve.evaluation.score.runner`
(many recordings, resume, summary), :mod:`~nh_serve.evaluation.score.store` (output
folder), :mod:`~nh_serve.evaluation.score.report` (plots, report.html),
:mod:`~nh_serve.evaluation.score.shard` (``--shard``, merge), :mod:`~nh_serve.evaluation.score.ray_engine`
(``--engine ray``), :mod:`~nh_serve.evaluation.score.cli`.

``scores.json`` (schema ``nh-serve/scores/v1``)::

    {
      "schema": "nh-serve/scores/v1",
      "nh_serve_version": "0.1.0",
      "model": {"name", "hash" (12 hex), "content_hash" (sha256 of the weights), "checkpoint" (path)},
      "settings": {"reference_s", "reference" ([t0, t1] or null), "stride_s", "max_windows",
                   "backend", "baseline_history_s", "bands_ms"},
      "inputs": [resolved paths of the recordings in scope],
      "summary": {"n_inputs", "n_ok", "n_failed", "mean_bits_per_spike": {predictor: mean over recordings},
                  "model_beats_best_baseline": number of recordings},
      "recordings": [                                   # sorted by path
        {"key", "name", "path", "status": "ok", "input": {"size_bytes", "mtime_ns"},
         "recording": {"n_units", "n_spikes", "start_s", "end_s", "duration_s", "has_true_rates"},
         "windows": {"n", "reference": [t0, t1], "first_prediction_s", "last_prediction_s",
                     "context_s", "n_bins", "bin_size_s"},
         "model_inputs": {"history", "fit", "behavior", "images"},   # what the model was given
         "units": {"id": [...], "ref_rate_hz": [...], "n_spikes": [...], "flags": ["no_spikes_scored;..."]},
         "flagged_units": {"no_spikes_scored", "silent_in_reference"},
         "predictors": {                                # model, reference_rate, persistence, exp_smooth[, oracle]
           NAME: {"bits_per_spike", "correlation", "r2", "nll", "n_spikes", "corr_unit_mean", "r2_unit_mean",
                  "per_band": {"0-250ms": {"bits_per_spike", "correlation", "r2", "nll", "n_spikes", "n_bins"}, ...},
                  "per_bin": {"bits_per_spike": [T], "correlation": [T], "r2": [T], "nll": [T], "mean_rate": [T]},
                  "per_unit": {"bits_per_spike": [U], "correlation": [U], "r2": [U], "nll": [U], "mean_rate": [U]}}},
         "best_baseline", "model_minus_best_baseline_bps", "backend", "plots": [file names],
         "identity": {"model_hash", "settings"},        # what a rerun must match to skip this recording
         "timing": {"read_s", "targets_s", "inputs_s", "model_s", "metrics_s", "plots_s", "total_s",
                    "windows_per_s"}}],                 # stage times overlap (pipelined); total_s is wall time
      "failed": [{"key", "name", "path", "error"}],     # inputs that could not be scored, sorted by path
      "run": {"created", "engine", "shard", "all_inputs", "scored", "skipped", "interrupted", "seconds"}
    }

Metrics follow :func:`nh_serve.evaluation.metrics.evaluate` (expected vs observed counts per
bin; bits/spike as the Neural Latents Benchmark). Everything except ``run`` and
each recording's ``timing`` depends only on the inputs, checkpoint and settings.
"""

from __future__ import annotations

from nh_serve.evaluation.score.core import SCHEMA, RecordingResult, ScoreSettings, score_recording
from nh_serve.evaluation.score.runner import RunReport, run_score
from nh_serve.evaluation.score.shard import merge_outputs

__all__ = [
    "SCHEMA",
    "RecordingResult",
    "RunReport",
    "ScoreSettings",
    "merge_outputs",
    "run_score",
    "score_recording",
]
