"""The ``nh-serve`` command line: the composition root.

Each subcommand lives in the module that owns the work; that module exposes
``add_cli(subparsers)``, which registers its parser and sets ``func`` to a
callable ``(args) -> exit code``. This file only wires them together and turns
:class:`~nh_serve.errors.InputError` into a one-line message and exit code 2. It is
the only module of nh_serve that imports ``training``, ``export``, ``kernels``,
``service`` and the benchmarks (``nh_serve.bench``, ``kernels.bench``,
``service.bench``); see docs/architecture.md.
"""

from __future__ import annotations

import argparse
import sys

from export import cli as export_cli
from kernels import bench as kernels_bench
from nh_serve import __version__
from nh_serve.bench import eval_cost as bench_eval
from nh_serve.bench import features as bench_features
from nh_serve.bench import forward as bench_forward
from nh_serve.bench import predict as bench_predict
from nh_serve.bench import register as bench_register
from nh_serve.bench import score as bench_score
from nh_serve.data import synth
from nh_serve.errors import InputError
from nh_serve.evaluation import demo, fit_baselines, quality_cli
from nh_serve.evaluation.score import cli as score_cli
from nh_serve.ingest import cli as ingest_cli
from service import bench as bench_service
from training import train

# Modules with top-level subcommands, in the order ``--help`` lists them.
COMMAND_MODULES = (demo, synth, ingest_cli, train, quality_cli, fit_baselines, export_cli, score_cli)

# Modules with ``nh-serve bench <name>`` subcommands.
BENCH_MODULES = (bench_eval, bench_features, bench_forward, bench_predict, bench_register, bench_service, bench_score)


def _add_kernels_bench(bench_sub) -> None:
    p = bench_sub.add_parser(
        "kernels",
        help="Triton kernel microbenchmarks (same as python -m kernels.bench)",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: int(kernels_bench.main(args.rest) or 0))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nh-serve",
        description="Serve, score and train NeuroHorizon spike-prediction models.",
    )
    parser.add_argument("--version", action="version", version=f"nh-serve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for module in COMMAND_MODULES:
        module.add_cli(sub)
    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench_sub = bench.add_subparsers(dest="bench", metavar="<benchmark>")
    for module in BENCH_MODULES:
        module.add_cli(bench_sub)
    _add_kernels_bench(bench_sub)
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "kernels"]:  # its own argparse takes every remaining option
        return int(kernels_bench.main(argv[2:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except InputError as exc:
        print(f"nh-serve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
