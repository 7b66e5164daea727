"""``nh-serve eval``: the command line and Markdown tables of the quality benchmark.

The scoring itself is :mod:`nh_serve.evaluation.quality` (:func:`run_benchmark`);
``--json PATH`` writes every figure; ``--report A.json B.json --doc
docs/results.md`` turns saved results into the ``quality`` section of a Markdown file.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from nh_serve.core.calibration import mean_record
from nh_serve.errors import InputError
from nh_serve.evaluation.quality import run_benchmark
from nh_serve.evaluation.reporting import machine_line, markdown_table, write_doc_section
from nh_serve.ingest.on_the_fly import resolve_recordings

# ================================================================================================
# Tables
# ================================================================================================


def _rows(scores: dict, names: list[str] | None = None, paired: dict | None = None, best: str | None = None) -> list[dict]:
    rows = []
    for n in names or list(scores):
        s = scores[n]
        row = {"predictor": n, "bits/spike": s["bits_per_spike"]}
        if paired is not None and best is not None:
            pb = paired.get(n, {}).get(best)
            row["− best baseline [95% CI]"] = (
                f"{pb['diff']:+.4f} [{pb['lo']:+.4f}, {pb['hi']:+.4f}]" if pb else ("(best baseline)" if n == best else "")
            )
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


def verdict(p: dict, name: str, best: str) -> str:
    """One sentence on ``name`` against the best baseline ``best`` from a paired interval ``p``."""
    what = (
        "better, beyond the paired 95% interval" if p["lo"] > 0
        else "worse, beyond the paired 95% interval" if p["hi"] < 0
        else "not distinguishable within the paired 95% interval"
    )
    return f"{name} − {best} = {p['diff']:+.4f} bits/spike [{p['lo']:+.4f}, {p['hi']:+.4f}]: {what}."


def _calibration_text(cal: dict) -> str:
    """``floor taken out 0.94, departures shrunk by 0.91, level moved toward r5 0.01, r120 0.99`` from a fit record
    or :func:`~nh_serve.core.calibration.mean_record` of several."""
    text = f"floor taken out {cal['floor_beta']:.2f}, departures shrunk by {cal['shrink_gamma']:.2f}"
    levels = cal.get("level_lambda", {})
    return text + (", level moved toward " + ", ".join(f"r{t} {w:.2f}" for t, w in levels.items()) if levels else "")


def _synthetic_fits(result: dict) -> str:
    """One line on what the main checkpoint's registration fits kept on the held-out synthetic recordings."""
    main = result["main"]
    fits = [r.get("fits", {}).get(main) for r in result["recordings"] if r["synthetic"] and not r["in_sample"].get(main)]
    fits = [f for f in fits if f]
    if not fits:
        return ""
    done = [f for f in fits if "floor_beta" in f]
    line = f"{main}'s registration fit on these {len(fits)} recordings:"
    if len(done) < len(fits):
        line += f" no calibration on {len(fits) - len(done)} ({next((f['note'] for f in fits if 'note' in f), 'no note')});"
    if done:
        cal = [f for f in done if f["floor_beta"] or f["shrink_gamma"] or any(f.get("level_lambda", {}).values())]
        pop = sum(bool(f.get("population_corrected")) for f in done)
        line += f" population correction kept on {pop} of {len(done)}, calibration on {len(cal)} of {len(done)}"
        if cal:
            line += f" ({_calibration_text(mean_record(cal))} on average where kept)"
        line += "."
    return line + "\n"


def markdown_report(result: dict) -> str:
    """Markdown tables of one :func:`run_benchmark` result."""
    out = []
    s = result["summary"]
    main = result["main"]
    if "synthetic_mean" in s:
        sp = s.get("synthetic_paired", {})
        out.append(f"Synthetic recordings (mean over {s['synthetic_recordings']} held-out recordings):\n")
        paired = {m: {"best baseline": v["best_baseline"]} for m, v in sp.items()}
        out.append(markdown_table(_rows(s["synthetic_mean"], paired=paired, best="best baseline")))
        frac = ", ".join(f"{n}: {v:.1%}" for n, v in s["fraction_of_oracle"].items() if v is not None)
        out.append(f"\nFraction of the oracle's bits/spike: {frac}\n")
        bands = s.get("fraction_of_oracle_bands", {})
        if bands:
            rows = [{"predictor": n, **{f"{b}": (f"{v:.1%}" if v is not None else "") for b, v in fb.items()}}
                    for n, fb in bands.items()]
            out.append("Fraction of the oracle per horizon band:\n")
            out.append(markdown_table(rows))
            out.append("")
        if main in sp:
            out.append(
                f"Best baseline in hindsight, per recording, on average {s['best_baseline_mean_bps']:+.4f} bits/spike. "
                + verdict(sp[main]["best_baseline"], main, "best baseline") + "\n"
            )
        out.append(_synthetic_fits(result))
    in_sample = s.get("in_sample", {})
    if in_sample:
        out.append(
            "In-sample (the main checkpoint was trained or validated on them, so their figures are not "
            "held-out and no summary above includes them): "
            + ", ".join(f"{k} ({v})" for k, v in in_sample.items()) + "\n"
        )
    for r in result["recordings"]:
        if r["synthetic"] and not r["in_sample"].get(main):
            continue
        ref = r["reference_s"]
        mark = f" — **in-sample** ({r['in_sample'][main]} recording of the checkpoint)" if r["in_sample"].get(main) else ""
        out.append(
            f"{r['recording']} ({r['units']} units, {r['duration_s']:.0f} s, reference "
            f"{ref[1] - ref[0]:g} s, {r['windows']} windows){mark}:\n"
        )
        out.append(markdown_table(_rows(r["scores"], paired=r.get("paired"), best=r.get("best_baseline"))))
        if main in r.get("paired", {}):
            best = r["best_baseline"]
            out.append(
                f"\nBest baseline in hindsight: {best} ({r['scores'][best]['bits_per_spike']:+.4f}). "
                + verdict(r["paired"][main][best], main, best)
            )
        for name, fr in r.get("fits", {}).items():
            if "note" in fr:
                out.append(f"\n{name}: no registration fit ({fr['note']}).")
            elif "floor_beta" in fr:
                kept = ("a reference this short gets the calibration alone" if fr.get("calibration_only") else
                        f"the registration fit kept read-outs of {fr['units_fitted']} units, population correction "
                        f"{'on' if fr.get('population_corrected') else 'none'}")
                out.append(f"\n{name}: {kept}, calibration: {_calibration_text(fr)}.")
        for name, rf in r.get("refits", {}).items():
            out.append(
                f"\n{name}: {rf['refits']} refits on the last {rf['window_s']:g} s, {rf['mean_seconds']:.2f} s each; "
                f"population correction kept by {rf['corrected']} of them; units keeping it "
                f"{rf['mean_population_units_corrected']:g} and a read-out fit {rf['mean_units_fitted']:g} on average"
                + (f"; calibration on average: {_calibration_text(rf['calibration'])}." if rf.get("calibration") else ".")
            )
        out.append("")
    adapt = [(r["recording"], n, a) for r in result["recordings"] for n, a in r["adaptation"].items() if a]
    if adapt:
        secs = [a["seconds"] for _, _, a in adapt]
        steps = [a["steps"] for _, _, a in adapt]
        out.append(
            f"Test-time adaptation: {np.mean(steps):.0f} steps on average in {np.mean(secs):.1f} s per "
            f"recording (min {min(secs):.1f} s, max {max(secs):.1f} s).\n"
        )
    out.append(headline(result))
    return "\n".join(out)


BPS_MEANING = (
    "Bits/spike: higher is better; 0 is each unit's mean rate over the scored period (known only in "
    "hindsight, so a causal forecaster can score below 0); the oracle (the true rates, known only for "
    "synthetic recordings) is the ceiling."
)


def headline(result: dict) -> str:
    """Plain sentences: who won on the held-out recordings, by how much, and whether beyond the interval."""
    s, main = result["summary"], result["main"]
    parts = []
    if "synthetic_mean" in s and main in s.get("synthetic_paired", {}):
        m = s["synthetic_mean"]
        frac = s["fraction_of_oracle"].get(main)
        p = s["synthetic_paired"][main]["best_baseline"]
        parts.append(
            f"On {s['synthetic_recordings']} held-out synthetic recordings {main} scores "
            f"{m[main]['bits_per_spike']:+.4f} bits/spike"
            + (f" ({frac:.0%} of the oracle)" if frac is not None else "")
            + f"; the best baseline in hindsight scores {s['best_baseline_mean_bps']:+.4f}, so "
            + verdict(p, main, "best baseline")
        )
    for r in result["recordings"]:
        if r["synthetic"] or r["in_sample"].get(main) or main not in r.get("paired", {}):
            continue
        best = r["best_baseline"]
        winner = max(r["scores"], key=lambda n: r["scores"][n]["bits_per_spike"])
        parts.append(
            f"On {r['recording']} the best predictor is {winner} ({r['scores'][winner]['bits_per_spike']:+.4f}); "
            + verdict(r["paired"][main][best], main, best)
        )
    if not parts:
        parts.append(f"Every recording scored was in-sample for {main}: there is no held-out figure here.")
    return "**Verdict.** " + " ".join(parts) + " " + BPS_MEANING + "\n"


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
        ("--baselines", args.baselines if args.baselines != "default" else None),
        ("--shuffled-units", True if args.shuffled_units else None),
        ("--dense-fit", True if args.dense_fit else None),
        ("--refit-every", args.refit_every),
        ("--refit-window", args.refit_window),
        ("--json", args.json),
        ("--name", args.name if args.name != "model" else None),
    ):
        if v is True:
            parts.append(flag)
        elif v is not None:
            parts += [flag, str(v)]
    return shlex.join(parts + list(args.sessions))


def write_report(json_paths: list[str], doc: str) -> Path:
    """Write saved benchmark results (``--json`` files) as the ``quality`` section of ``doc``."""
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
    sessions = resolve_recordings(args.sessions, command="nh-serve eval", echo=lambda line: print(line, file=sys.stderr))
    res = run_benchmark(
        checkpoints,
        [Path(s) for s in sessions],
        reference_s=args.reference_s,
        adapt_steps=args.adapt_steps,
        adapt_budget_s=args.adapt_budget_s,
        stride_s=args.stride,
        max_windows=args.max_windows,
        baselines=args.baselines,
        shuffled_units=args.shuffled_units,
        dense_fit=args.dense_fit,
        refit_every_s=args.refit_every,
        refit_window_s=args.refit_window,
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
    p.add_argument(
        "sessions", nargs="*", help="held-out session files (.h5), or .npz / NWB files (ingested on the fly)"
    )
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
    p.add_argument(
        "--baselines",
        choices=("default", "full"),
        default="default",
        help="baseline set: default, or full (adds population_glm_recent, refitted every 30 s; slower)",
    )
    p.add_argument(
        "--shuffled-units",
        action="store_true",
        help="also score each checkpoint with every unit's descriptors given to another unit (an ablation)",
    )
    p.add_argument(
        "--dense-fit",
        action="store_true",
        help="also score each checkpoint with fit='reference-dense' (the reference fit on windows twice as dense)",
    )
    p.add_argument(
        "--refit-every",
        type=float,
        default=None,
        metavar="S",
        help="also score each checkpoint registered with refit_every_s=S: the read-outs fitted again every S "
        "seconds on the last --refit-window seconds, as a session streaming the whole recording would",
    )
    p.add_argument(
        "--refit-window",
        type=float,
        default=None,
        metavar="S",
        help="with --refit-every: refit on the last S seconds (refit_window_s; default the reference length, at least 180; at least 45)",
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
