"""``nh-serve score``: score recordings with a model and every baseline; ``nh-serve score merge``.

Usage::

    nh-serve score RECORDINGS... --checkpoint PATH|default --out DIR [options]
    nh-serve score merge SHARD_DIRS... --out DIR

Exit codes: 0 every recording scored; 1 some could not be scored (they are
listed, the others are scored); 2 bad usage (options, checkpoint, output folder).
"""

from __future__ import annotations

import argparse
import json
import sys

from nh_serve.data.features import DEFAULT_REFERENCE_S
from nh_serve.errors import InputError
from nh_serve.evaluation.score.core import ScoreSettings
from nh_serve.evaluation.score.runner import run_score
from nh_serve.evaluation.score.shard import merge_outputs
from nh_serve.ingest.on_the_fly import resolve_recordings

DESCRIPTION = """\
Score recordings: slide prediction windows over each session file (after a
reference window), predict every unit's next-second rates with the model, run
the causal baselines on the same windows (and the true rates of synthetic
files), and write bits/spike (NLB definition), correlation and R2 per
recording, unit, horizon bin and band to OUT: scores.json, summary.csv,
units.csv, PNG plots and report.html. Finished recordings are skipped when
run again (--force scores them again).

An .npz (spike_times + unit_ids) or NWB file is ingested on the fly with
nh-serve ingest's default unit filter into a cached session file (a note says
which units were kept); a Kilosort/phy folder is converted first with
nh-serve ingest phy (the command stops and prints it).

`nh-serve score merge SHARD_DIRS... --out DIR` combines the output folders of
runs made with --shard I/N into one (same files as an unsharded run).
Exit codes: 0 all scored, 1 some recordings could not be scored, 2 usage error."""

# Options that only make sense when scoring (rejected with `merge` when changed from their default).
_SCORING_ONLY = (
    "checkpoint",
    "backend",
    "batch_size",
    "threads",
    "reference_s",
    "reference",
    "stride",
    "max_windows",
    "force",
    "shard",
    "engine",
    "ray_address",
    "ray_num_cpus",
    "ray_cpus_per_task",
    "ray_runtime_env",
    "no_plots",
)


def add_cli(subparsers) -> None:
    """Register ``score`` (and its ``merge`` form) on the ``nh-serve`` subparsers."""
    p = subparsers.add_parser(
        "score",
        help="score recordings (model vs baselines): scores.json, CSVs, plots, report.html",
        description=DESCRIPTION,
        usage="nh-serve score RECORDINGS... --out DIR [--checkpoint PATH|default] [options]\n"
        "       nh-serve score merge SHARD_DIRS... --out DIR",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="RECORDINGS",
        help="session files (.h5) or folders holding them, .npz or NWB files (ingested on the fly); "
        "or `merge` followed by shard output folders",
    )
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument(
        "--checkpoint",
        default="default",
        help="model checkpoint (.safetensors) or 'default' (the built-in one)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        help="Predictor backend: auto (best available), torch, ... (default auto)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="windows per model call (default 32)")
    p.add_argument("--threads", type=int, default=None, help="model threads (default: the backend's choice)")
    g = p.add_argument_group("windows")
    g.add_argument(
        "--reference-s",
        type=float,
        default=DEFAULT_REFERENCE_S,
        help=f"reference window: the first N seconds of each recording (default {DEFAULT_REFERENCE_S:g})",
    )
    g.add_argument(
        "--reference",
        type=float,
        nargs=2,
        metavar=("T0", "T1"),
        default=None,
        help="reference window [T0, T1) seconds instead; windows overlapping it are not scored",
    )
    g.add_argument("--stride", type=float, default=1.0, help="seconds between prediction windows (default 1)")
    g.add_argument(
        "--max-windows", type=int, default=None, help="score only the first N windows of each recording"
    )
    r = p.add_argument_group("running")
    r.add_argument(
        "--force", action="store_true", help="score again recordings that already have results in --out"
    )
    r.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="score only shard I of N (0-based) of the sorted inputs, e.g. $SLURM_ARRAY_TASK_ID/8; "
        "combine with `nh-serve score merge`",
    )
    r.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local (this process) or ray (one task per recording)",
    )
    r.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to use (auto, ray://HOST:10001); default: start a local instance",
    )
    r.add_argument("--ray-num-cpus", type=int, default=2, help="CPUs of the local Ray instance (default 2)")
    r.add_argument(
        "--ray-cpus-per-task", type=int, default=1, help="CPUs (torch threads) per recording task (default 1)"
    )
    r.add_argument(
        "--ray-runtime-env",
        default=None,
        metavar="JSON",
        help='Ray runtime_env for the workers, e.g. \'{"py_modules": ["/shared/src/nh_serve"]}\'',
    )
    r.add_argument(
        "--baselines",
        choices=("default", "full"),
        default="default",
        help="baseline set: default, or full (adds population_glm_recent, refitted every 30 s; slower)",
    )
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots (faster)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run, _parser=p)


def _run(args: argparse.Namespace) -> int:
    if args.paths[0] == "merge":
        return _merge(args)
    env = None
    if args.ray_runtime_env:
        try:
            env = json.loads(args.ray_runtime_env)
        except ValueError as e:
            raise InputError(f"--ray-runtime-env: not valid JSON ({e})") from None
        if not isinstance(env, dict):
            raise InputError('--ray-runtime-env: pass a JSON object, e.g. \'{"pip": ["nh-serve"]}\'')
    settings = ScoreSettings(
        reference_s=args.reference_s,
        reference=tuple(args.reference) if args.reference else None,
        stride_s=args.stride,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        backend=args.backend,
        threads=args.threads,
        plots=not args.no_plots,
        baselines=args.baselines,
    )
    paths = resolve_recordings(args.paths, command="nh-serve score", echo=_note)
    report = run_score(
        paths,
        out=args.out,
        checkpoint=args.checkpoint,
        settings=settings,
        shard=args.shard,
        engine=args.engine,
        force=args.force,
        progress=not args.quiet,
        ray_address=args.ray_address,
        ray_num_cpus=args.ray_num_cpus,
        ray_cpus_per_task=args.ray_cpus_per_task,
        ray_runtime_env=env,
    )
    return report.exit_code


def _note(line: str) -> None:
    print(line, file=sys.stderr)


def _merge(args: argparse.Namespace) -> int:
    parser = args._parser
    changed = [k for k in _SCORING_ONLY if getattr(args, k) != parser.get_default(k)]
    if changed:
        raise InputError(
            f"score merge: {', '.join('--' + k.replace('_', '-') for k in changed)} only apply when scoring; "
            "merge takes the shard folders and --out"
        )
    if len(args.paths) < 2:
        raise InputError(
            "score merge: pass the shard output folders, e.g. nh-serve score merge out-0 out-1 --out all"
        )
    return merge_outputs(args.paths[1:], out=args.out).exit_code
