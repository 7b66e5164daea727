"""Quality benchmark: ``nh-serve eval --checkpoint <path|default> <session files...>``.

Scores a checkpoint's next-second predictions on held-out recordings, next to
every causal baseline (:mod:`nh_serve.evaluation.baselines`) and, on synthetic recordings,
the oracle (the true rates). Everything goes through the shared pieces:

- :func:`nh_serve.evaluation.sliding.plan_windows` places the reference window (the
  first ``--reference-s`` seconds; by default :func:`auto_reference_s`: 60 s, or
  a quarter of a recording shorter than 4 minutes, e.g. 30 s for a 2-minute
  one) and one prediction window every ``--stride`` seconds after it;
  :func:`nh_serve.evaluation.sliding.collect_targets` bins the observed horizon counts
  and runs the baselines; :func:`nh_serve.evaluation.sliding.oracle_rates` reads the
  ground truth of synthetic files.
- Model predictions come from the :class:`~nh_serve.inference.predictor.Predictor`:
  ``register`` with the reference-window spikes (zero-shot: the unit
  embeddings come from the IDEncoder only), then ``predict_batch`` with each
  window's context spikes and ``history_counts`` = each unit's spikes in the
  ``history_s`` seconds before the context (:func:`history_counts`, the same
  function training uses). With ``--adapt-steps N`` the units are registered a
  second time with test-time adaptation and scored as ``<name> adapted``.
- :func:`nh_serve.evaluation.metrics.evaluate` gives bits/spike (NLB definition) over the
  whole 1 s horizon and per band (0-250, 250-500, 500-1000 ms), the pooled
  firing-rate correlation and R², and their means over units.

Several checkpoints can be scored on the same windows (``--compare
NAME=PATH``), e.g. ablations. Checkpoints trained with ``head_ablation =
no_activity`` (:mod:`training.train`) store ``head_activity=False`` in their config.
Synthetic recordings are also averaged (mean over recordings of each metric) and
the model's mean bits/spike is reported as a fraction of the oracle's.
``--json PATH`` writes every figure; ``--report A.json B.json --doc
docs/results.md`` turns saved results into the ``quality`` section of a
Markdown file.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nh_serve.data.features import DEFAULT_REFERENCE_S, MIN_REFERENCE_S
from nh_serve.data.spikes import history_counts
from nh_serve.errors import InputError
from nh_serve.evaluation.baselines import DEFAULT_HISTORY_S

HEAD_ABLATIONS = ("none", "no_activity")
ORACLE = "oracle"


# ================================================================================================
# Shared with training
# ================================================================================================


def auto_reference_s(duration_s: float, reference_s: float = DEFAULT_REFERENCE_S) -> float:
    """Reference-window length (s): ``reference_s``, or a quarter of a short recording, at least 10 s."""
    return float(min(reference_s, max(MIN_REFERENCE_S, duration_s / 4.0)))


def build_model(cfg, *, head_ablation: str = "none"):
    """A fresh model for ``cfg``; ``head_ablation="no_activity"`` also turns the baseline offset off."""
    from nh_serve.core.model import NeuroHorizon

    if head_ablation == "none":
        return NeuroHorizon(cfg)
    if head_ablation == "no_activity":
        return NeuroHorizon(cfg.replace(baseline_offset=False, head_activity=False))
    raise InputError(f"unknown head ablation {head_ablation!r}; use one of {', '.join(HEAD_ABLATIONS)}")


def load_predictor(spec):
    """A :class:`~nh_serve.inference.predictor.Predictor` for a checkpoint path or ``"default"`` (ablations rebuilt)."""
    from nh_serve.inference.checkpoint import load_model
    from nh_serve.inference.predictor import Predictor

    model, norm, ckpt = load_model(spec)
    ablation = (ckpt.training or {}).get("head_ablation", "none")
    if ablation == "no_activity" and model.cfg.head_activity:
        # checkpoints from before ``head_activity`` existed say so only in their training record
        m = build_model(model.cfg, head_ablation=ablation)
        m.load_state_dict(model.state_dict())
        model = m.eval()
    return Predictor(model=model, feature_norm=norm, checkpoint=ckpt)


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
    model gets.
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
    windows = []
    for c in plan.ctx_starts:
        c = float(c)
        i, j = np.searchsorted(times, [c, c + cfg.context_s])
        hist, hist_s = history_counts(
            times, units, n_units=unit_ids.shape[0], ctx_start=c, history_s=cfg.history_s, start=start
        )
        windows.append(
            {
                "spike_times": times[i:j],
                "unit_ids": unit_ids[units[i:j]],
                "context_start": c,
                "history_counts": hist,
                "history_duration_s": hist_s,
            }
        )
    preds = p.predict_batch(token, windows, horizon_s=plan.n_bins * plan.bin_size)
    rates = np.stack([pr.expected_counts for pr in preds])  # (W, U, T)
    offset_counts = _offset_counts(p, token, windows, plan) if offset else None
    info = p.session(token).adaptation
    p.sessions.discard(token)  # free the cached embeddings of this recording
    return ModelRates(rates, info, offset_counts)


def _offset_counts(p, token: str, windows: list[dict], plan) -> np.ndarray:
    """Expected counts ``(W, U, T)`` of the model's persistence offset alone (see :func:`model_rates`)."""
    import torch

    s = p.session(token)
    unit_counts, hist_rate = [], []
    for w in windows:
        item = p.tokenize_window(s, w["spike_times"], w["unit_ids"], **{k: v for k, v in w.items() if k not in ("spike_times", "unit_ids")})
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
    """Score every predictor, baseline and (synthetic files) the oracle on one recording."""
    from nh_serve.data.session import open_session
    from nh_serve.evaluation.metrics import evaluate
    from nh_serve.evaluation.sliding import collect_targets, oracle_rates, plan_windows

    first = next(iter(predictors.values())).cfg
    for name, p in predictors.items():
        c = p.cfg
        if (c.context_s, c.n_bins, c.bin_size_s) != (first.context_s, first.n_bins, first.bin_size_s):
            raise InputError(
                f"--compare {name}: its context / bins differ from the main checkpoint's; "
                "compare checkpoints with the same context and horizon"
            )
        if c.is_multimodal:
            raise InputError(
                f"checkpoint {name} takes behaviour or images; this benchmark scores spike-only models"
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
        got = model_rates(p, times=times, units=units, unit_ids=unit_ids, start=start, plan=plan, offset=want_offset)
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
    from tqdm.auto import tqdm

    from nh_serve.evaluation.reporting import machine_info

    if not sessions:
        raise InputError("eval: pass at least one session file")
    if reference_s is not None and reference_s < MIN_REFERENCE_S:
        raise InputError(f"--reference-s: must be at least {MIN_REFERENCE_S:g} s, got {reference_s:g}")
    if adapt_steps < 0:
        raise InputError(f"--adapt-steps: must be >= 0, got {adapt_steps}")
    if stride_s <= 0:
        raise InputError(f"--stride: must be > 0 seconds, got {stride_s}")
    predictors = {name: load_predictor(spec) for name, spec in checkpoints.items()}
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


# ================================================================================================
# Tables
# ================================================================================================


def _rows(scores: dict, names: list[str] | None = None) -> list[dict]:
    rows = []
    for n in names or list(scores):
        s = scores[n]
        row = {"predictor": n, "bits/spike": s["bits_per_spike"]}
        row.update({f"bps {b}": v for b, v in s["bands"].items()})
        row.update(
            {
                "corr": s["correlation"],
                "R²": s["r2"],
                "corr (unit mean)": s["corr_unit_mean"],
                "R² (unit mean)": s["r2_unit_mean"],
            }
        )
        rows.append(row)
    return rows


def markdown_report(result: dict) -> str:
    """Markdown tables of one :func:`run_benchmark` result."""
    from nh_serve.evaluation.reporting import markdown_table

    out = []
    s = result["summary"]
    if "synthetic_mean" in s:
        out.append(f"Synthetic recordings (mean over {s['synthetic_recordings']} held-out recordings):\n")
        out.append(markdown_table(_rows(s["synthetic_mean"])))
        frac = ", ".join(f"{n}: {v:.1%}" for n, v in s["fraction_of_oracle"].items() if v is not None)
        out.append(f"\nFraction of the oracle's bits/spike: {frac}\n")
    for r in result["recordings"]:
        if r["synthetic"]:
            continue
        ref = r["reference_s"]
        out.append(
            f"{r['recording']} ({r['units']} units, {r['duration_s']:.0f} s, reference "
            f"{ref[1] - ref[0]:g} s, {r['windows']} windows):\n"
        )
        out.append(markdown_table(_rows(r["scores"])))
        out.append("")
    adapt = [(r["recording"], n, a) for r in result["recordings"] for n, a in r["adaptation"].items() if a]
    if adapt:
        secs = [a["seconds"] for _, _, a in adapt]
        steps = [a["steps"] for _, _, a in adapt]
        out.append(
            f"Test-time adaptation: {np.mean(steps):.0f} steps on average in {np.mean(secs):.1f} s per "
            f"recording (min {min(secs):.1f} s, max {max(secs):.1f} s).\n"
        )
    return "\n".join(out)


# ================================================================================================
# Command line
# ================================================================================================


def _parse_compare(items: list[str]) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise InputError(f"--compare: expected NAME=PATH, got {it!r}")
        name, path = it.split("=", 1)
        if not name or name in out:
            raise InputError(f"--compare: names must be unique and non-empty, got {name!r}")
        out[name] = path
    return out


def _command(args: argparse.Namespace) -> str:
    parts = ["nh-serve", "eval", "--checkpoint", args.checkpoint]
    for c in args.compare:
        parts += ["--compare", c]
    for flag, v in (
        ("--reference-s", args.reference_s),
        ("--adapt-steps", args.adapt_steps or None),
        ("--stride", args.stride if args.stride != 1.0 else None),
        ("--max-windows", args.max_windows),
        ("--json", args.json),
        ("--name", args.name if args.name != "model" else None),
    ):
        if v is not None:
            parts += [flag, str(v)]
    return shlex.join(parts + list(args.sessions))


def write_report(json_paths: list[str], doc: str) -> Path:
    """Write saved benchmark results (``--json`` files) as the ``quality`` section of ``doc``."""
    from nh_serve.evaluation.reporting import machine_line, write_doc_section

    parts = [
        "## Quality benchmark\n",
        "Zero-shot next-second prediction on recordings no model saw in training (bits/spike: NLB "
        "definition over the 50 x 20 ms bins after each prediction time, overall and per band; correlation "
        "and R² pooled over windows, units and bins, and their means over units). Which recordings each "
        "checkpoint was trained on: [model-card.md](model-card.md).\n",
    ]
    for jp in json_paths:
        try:
            res = json.loads(Path(jp).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(
                f"--report: cannot read {jp} ({e}); pass files written by `nh-serve eval --json`"
            ) from None
        ck = res["checkpoints"]
        parts.append(f"### {res.get('title') or res['main']}\n")
        parts.append(
            "Checkpoints: "
            + "; ".join(f"`{n}` = {c['path']} ({c['model']}, {c['hash']})" for n, c in ck.items())
            + "\n"
        )
        parts.append(f"Command: `{res.get('command', '')}`\n")
        parts.append(markdown_report(res))
    parts.append(machine_line())
    return write_doc_section(doc, "quality", "\n".join(parts))


def _run(args: argparse.Namespace) -> int:
    if args.report:
        if not args.doc:
            raise InputError("--report: pass --doc FILE.md to write the tables into")
        p = write_report(args.report, args.doc)
        print(f"wrote the quality section of {p}")
        return 0
    if not args.sessions:
        raise InputError("eval: pass at least one session file")
    checkpoints = {args.name: args.checkpoint, **_parse_compare(args.compare)}
    res = run_benchmark(
        checkpoints,
        [Path(s) for s in args.sessions],
        reference_s=args.reference_s,
        adapt_steps=args.adapt_steps,
        adapt_budget_s=args.adapt_budget_s,
        stride_s=args.stride,
        max_windows=args.max_windows,
        progress=not args.no_progress,
    )
    res["command"] = _command(args)
    if args.title:
        res["title"] = args.title
    print(markdown_report(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def add_cli(subparsers) -> None:
    """Register ``nh-serve eval``."""
    p = subparsers.add_parser(
        "eval",
        help="quality benchmark of a checkpoint on held-out recordings",
        description="Score a checkpoint's next-second predictions (zero-shot, and adapted with --adapt-steps) "
        "against the baselines and, on synthetic recordings, the true rates.",
    )
    p.add_argument("sessions", nargs="*", help="held-out session files")
    p.add_argument(
        "--checkpoint", default="default", help="checkpoint file or 'default' (the built-in model)"
    )
    p.add_argument("--name", default="model", help="name of the main checkpoint in tables (default 'model')")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also score this checkpoint on the same windows (repeatable), e.g. ablations",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write every figure to this JSON file")
    p.add_argument(
        "--reference-s",
        type=float,
        default=None,
        help="reference window length, seconds (default: 60, or a quarter of recordings under 4 min)",
    )
    p.add_argument(
        "--adapt-steps", type=int, default=0, help="also score with N steps of test-time adaptation"
    )
    p.add_argument(
        "--adapt-budget-s", type=float, default=30.0, help="time budget of the adaptation, seconds"
    )
    p.add_argument("--stride", type=float, default=1.0, help="seconds between prediction windows (default 1)")
    p.add_argument(
        "--max-windows", type=int, default=None, help="score at most this many windows per recording"
    )
    p.add_argument("--title", default=None, help="heading of this run in --report output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--report",
        nargs="+",
        default=None,
        metavar="JSON",
        help="instead of scoring, write saved --json results as the quality section of --doc",
    )
    p.add_argument("--doc", default=None, help="Markdown file for --report (e.g. docs/results.md)")
    p.set_defaults(func=_run)
