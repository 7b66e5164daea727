"""What a full ``nh-serve eval`` costs with each baseline set (``nh-serve bench eval``).

A synthetic recording (``--duration`` seconds, default one hour, ``--units`` 300, seed 11) is
written once under ``runs/data/bench-eval/``; then ``nh-serve eval`` runs on it in a fresh
process for each ``--baselines`` set (``default``: every baseline but ``population_glm_recent``;
``full``: with it, a population GLM refitted every 30 s). Reported: wall time and the
process's peak resident memory (sampled every 0.2 s), with the checkpoint and the machine.
Results go to the ``eval-cost`` section of ``docs/benchmarks.md`` (``--no-doc`` to skip).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import psutil

from nh_serve.evaluation.reporting import machine_line, markdown_table, write_doc_section

ROOT = Path(__file__).resolve().parents[2]
DOC_PATH = ROOT / "docs" / "benchmarks.md"


def recording(duration_s: float, n_units: int) -> Path:
    """The benchmark's synthetic recording (written on first use)."""
    out = ROOT / "runs" / "data" / "bench-eval" / f"{int(duration_s)}s-{n_units}u"
    path = out / "synth_000.h5"
    if not path.exists():
        subprocess.run(
            [sys.executable, "-m", "nh_serve.cli", "synth", "--out", str(out), "--sessions", "1", "--seed", "11",
             "--duration", str(duration_s), "--units", str(n_units)],
            check=True,
        )
    return path


def run_eval(path: Path, *, checkpoint: str, baselines: str) -> dict:
    """Wall time and peak RSS of one ``nh-serve eval`` process."""
    cmd = [sys.executable, "-m", "nh_serve.cli", "eval", "--checkpoint", checkpoint, "--baselines", baselines,
           "--no-progress", str(path)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"nh-serve eval failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    return {"baselines": baselines, "wall (s)": round(wall, 1), "peak RSS (GB)": round(peak / 2**30, 2)}


def _run(args: argparse.Namespace) -> int:
    rows = []
    for baselines in args.baselines:
        duration = args.duration if baselines == "default" else (args.full_duration or args.duration)
        path = recording(duration, args.units)
        row = {"recording": f"{duration / 60:g} min x {args.units} units", **run_eval(
            path, checkpoint=args.checkpoint, baselines=baselines)}
        print(row, flush=True)
        rows.append(row)
    table = markdown_table(rows)
    print(table)
    if not args.no_doc:
        text = (
            "## Cost of a full evaluation\n\n"
            f"`nh-serve bench eval --checkpoint {args.checkpoint} --duration {args.duration:g}"
            + (f" --full-duration {args.full_duration:g}" if args.full_duration else "")
            + "`: one `nh-serve eval` process per baseline set on "
            "a synthetic recording (seed 11; 60 s reference, a window every 1 s, the model with and without its "
            "reference fit, every baseline and the oracle). `full` adds `population_glm_recent` (a population GLM "
            "refitted every 30 s on the last 120 s).\n\n" + table + "\n\n" + machine_line()
        )
        print(f"wrote the eval-cost section of {write_doc_section(args.doc, 'eval-cost', text)}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="wall time and memory of nh-serve eval per baseline set",
                              description="Time nh-serve eval on a long synthetic recording with each baseline set.")
    p.add_argument("--checkpoint", default="default", help="checkpoint file or 'default'")
    p.add_argument("--duration", type=float, default=3600.0, help="recording length in seconds (default 3600)")
    p.add_argument("--full-duration", type=float, default=None,
                   help="recording length for the 'full' set (default: --duration)")
    p.add_argument("--units", type=int, default=300, help="units (default 300)")
    p.add_argument("--baselines", nargs="+", default=["default", "full"], choices=["default", "full"])
    p.add_argument("--doc", default=str(DOC_PATH), help="Markdown file whose 'eval-cost' section is rewritten")
    p.add_argument("--no-doc", action="store_true", help="print only; do not write the Markdown file")
    p.set_defaults(func=_run)
