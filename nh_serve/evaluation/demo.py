"""``nh-serve demo``: make the demo recording and score predictions on it.

The demo recording is a small synthetic session with ground-truth rates
(:func:`nh_serve.data.synth.make_demo`), never seen in training. The command slides
prediction windows over it after a 60 s reference window and prints, for the
built-in default model (zero-shot), the baselines and the oracle (the true
rates), bits/spike (NLB definition), firing-rate correlation and R² of the
next second's 20 ms bins.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nh_serve.data.session import open_session
from nh_serve.data.synth import make_demo
from nh_serve.data.windows import recorded_inputs
from nh_serve.evaluation.metrics import evaluate
from nh_serve.evaluation.quality import model_rates
from nh_serve.evaluation.sliding import collect_targets, oracle_rates, plan_windows
from nh_serve.inference.predictor import Predictor
from nh_serve.util import help_text


def score_table(rows: dict[str, dict]) -> str:
    """Format ``{name: metrics.evaluate(...) result}`` as an aligned text table."""
    bands = next(iter(rows.values()))["per_band"].keys() if rows else []
    head = ["predictor", "bits/spike", *(f"bps {b}" for b in bands), "corr", "R2"]
    lines = [head]
    for name, m in rows.items():
        lines.append(
            [
                name,
                f"{m['bits_per_spike']:+.4f}",
                *(f"{m['per_band'][b]['bits_per_spike']:+.4f}" for b in bands),
                f"{m['correlation']:.3f}",
                f"{m['r2']:+.3f}",
            ]
        )
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines)


def run_demo(out_dir: Path, *, checkpoint="default", stride_s: float = 1.0, progress: bool = True) -> dict[str, dict]:
    """Make (or reuse) ``out_dir/demo.h5`` and return metrics per predictor.

    ``checkpoint=None`` scores only the baselines and the oracle.
    """
    path = Path(out_dir) / "demo.h5"
    if not path.exists():
        path = make_demo(out_dir)
    with open_session(path) as s:
        plan = plan_windows(start=s.start, end=s.end, stride_s=stride_s, name=str(path))
        targets = collect_targets(s, plan, progress=progress)
        rows = {}
        if checkpoint is not None:
            p = Predictor.load(checkpoint, backend="torch")
            times, units = s.spikes(s.start, s.end)
            inputs = recorded_inputs(s, p.cfg, s.start, s.end)
            rates = model_rates(
                p, times=times, units=units, unit_ids=s.unit_ids, start=s.start, plan=plan, inputs=inputs
            ).rates
            rows[f"model {p.cfg.name} ({p.model_hash})"] = evaluate(rates, targets.counts, bin_size=plan.bin_size)
        rows.update({name: evaluate(p, targets.counts, bin_size=plan.bin_size) for name, p in targets.baselines.items()})
        oracle = oracle_rates(s, plan)
        if oracle is not None:
            rows["oracle (true rates)"] = evaluate(oracle, targets.counts, bin_size=plan.bin_size)
        print(f"{path}: {s.n_units} units, {s.duration:.0f} s; reference {plan.reference[0]:g}-{plan.reference[1]:g} s; "
              f"{len(plan)} windows of 1 s context -> {plan.n_bins} x {plan.bin_size * 1000:g} ms bins")
    return rows


def _run(args: argparse.Namespace) -> int:
    rows = run_demo(Path(args.out), checkpoint=None if args.no_model else args.checkpoint, stride_s=args.stride)
    print(score_table(rows))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="make the demo recording and print prediction scores on it",
        description=help_text(__doc__.split("\n\n")[1]) if __doc__ else None,
    )
    p.add_argument("--out", default="demo", help="folder for demo.h5 (default ./demo)")
    p.add_argument("--checkpoint", default="default", help="model checkpoint (default: the built-in one)")
    p.add_argument("--no-model", action="store_true", help="score only the baselines and the oracle")
    p.add_argument("--stride", type=float, default=1.0, help="seconds between prediction windows (default 1)")
    p.set_defaults(func=_run)
