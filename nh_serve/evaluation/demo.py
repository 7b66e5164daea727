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

from nh_serve.data.synth import make_demo
from nh_serve.evaluation.quality import evaluate_recording
from nh_serve.evaluation.quality_cli import BPS_MEANING, verdict
from nh_serve.inference.predictor import Predictor
from nh_serve.util import help_text


def score_table(rows: dict[str, dict]) -> str:
    """Format ``{name: scores}`` (:func:`nh_serve.evaluation.quality.summarize` dicts) as an aligned text table."""
    bands = next(iter(rows.values()))["bands"].keys() if rows else []
    head = ["predictor", "bits/spike", *(f"bps {b}" for b in bands), "corr", "R2"]
    lines = [head]
    for name, m in rows.items():
        lines.append(
            [
                name,
                f"{m['bits_per_spike']:+.4f}",
                *(f"{m['bands'][b]:+.4f}" for b in bands),
                f"{m['correlation']:.3f}",
                f"{m['r2']:+.3f}",
            ]
        )
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines)


def demo_headline(res: dict) -> str:
    """One plain paragraph: who won, by how much, whether beyond the paired interval, what bits/spike means."""
    scores = res["scores"]
    winner = max((n for n in scores if n != "oracle"), key=lambda n: scores[n]["bits_per_spike"])
    text = f"Best forecaster here: {winner} ({scores[winner]['bits_per_spike']:+.4f} bits/spike)"
    if "oracle" in scores:
        text += f"; the true rates (oracle) reach {scores['oracle']['bits_per_spike']:+.4f}"
    text += ". "
    if "model" in res.get("paired", {}):
        best = res["best_baseline"]
        text += verdict(res["paired"]["model"][best], "The default model", best) + " "
    return text + BPS_MEANING


def run_demo(out_dir: Path, *, checkpoint="default", stride_s: float = 1.0, progress: bool = True) -> dict:
    """Make (or reuse) ``out_dir/demo.h5``, score it (:func:`~nh_serve.evaluation.quality.evaluate_recording`)
    and return that result (``scores`` per predictor, ``best_baseline``, ``paired`` intervals).

    ``checkpoint=None`` scores only the baselines and the oracle.
    """
    path = Path(out_dir) / "demo.h5"
    if not path.exists():
        path = make_demo(out_dir)
    predictors = {} if checkpoint is None else {"model": Predictor.load(checkpoint, backend="torch")}
    res = evaluate_recording(path, predictors=predictors, stride_s=stride_s, progress=progress)
    ref = res["reference_s"]
    print(f"{path}: {res['units']} units, {res['duration_s']:.0f} s; reference {ref[0]:g}-{ref[1]:g} s; "
          f"{res['windows']} windows of 1 s context -> 50 x 20 ms bins")
    return res


def _run(args: argparse.Namespace) -> int:
    res = run_demo(Path(args.out), checkpoint=None if args.no_model else args.checkpoint, stride_s=args.stride)
    print(score_table(res["scores"]))
    print(demo_headline(res))
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
