"""The ``nh-serve`` command line.

Each subcommand lives in the module that owns the work; that module exposes
``add_cli(subparsers)``, which registers its parser and sets ``func`` to a
callable ``(args) -> exit code``. This file only wires them together and turns
:class:`~nh_serve.errors.InputError` into a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nh_serve.errors import InputError

# Modules with top-level subcommands, in the order ``--help`` lists them.
COMMAND_MODULES = (
    "nh_serve.evaluation.demo",
    "nh_serve.data.synth",
    "nh_serve.ingest.cli",
    "training.train",
    "nh_serve.evaluation.quality_cli",
    "export.cli",
    "nh_serve.evaluation.score.cli",
)

# Modules with ``nh-serve bench <name>`` subcommands.
BENCH_MODULES = (
    "nh_serve.bench.features",
    "nh_serve.bench.forward",
    "nh_serve.bench.predict",
    "nh_serve.bench.service",
    "nh_serve.bench.score",
)


def _add_kernels_bench(bench_sub) -> None:
    p = bench_sub.add_parser(
        "kernels",
        help="Triton kernel microbenchmarks (same as python -m kernels.bench)",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def run(args) -> int:
        from kernels import bench

        return int(bench.main(args.rest) or 0)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nh-serve",
        description="Serve, score and train NeuroHorizon spike-prediction models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench_sub = bench.add_subparsers(dest="bench", metavar="<benchmark>")
    for name in BENCH_MODULES:
        importlib.import_module(name).add_cli(bench_sub)
    _add_kernels_bench(bench_sub)
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "kernels"]:  # its own argparse takes every remaining option
        from kernels import bench

        return int(bench.main(argv[2:]) or 0)
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
