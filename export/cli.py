"""``nh-serve export``: export a checkpoint to ONNX or TorchScript, with a parity check.

Examples::

    nh-serve export --checkpoint default --format onnx --out nh-small.onnx
    nh-serve export --checkpoint runs/train/best.safetensors --format torchscript --out model.pt

The artifact is written only if the exported model matches eager PyTorch
(relative error <= ``--tolerance``, default 1e-4) on random inputs and on
real recording windows (``--real-data``, default ``$NH_SERVE_REAL_DATA`` or
``shared/data/real`` beside the source tree; a synthetic recording if none).
Exit codes: 0 written; 2 bad input, unusable checkpoint, failed export or
failed parity check (nothing written).
"""

from __future__ import annotations

import argparse
import sys

from export.exporter import export_checkpoint
from nh_serve.errors import InputError
from nh_serve.inference.backends.parity import DEFAULT_TOLERANCE
from nh_serve.util import help_text


def add_cli(subparsers) -> None:
    """Register ``export`` on the ``nh-serve`` subparsers."""
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX or TorchScript (checked against PyTorch)",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        default="default",
        help="checkpoint file (.safetensors) or 'default' (the built-in model)",
    )
    p.add_argument(
        "--format", dest="fmt", required=True, metavar="{onnx,torchscript}", help="artifact format"
    )
    p.add_argument("--out", required=True, help="file to write (.onnx; .pt/.ts/.torchscript), or a directory")
    p.add_argument(
        "--real-data",
        default=None,
        help="folder of real recordings <name>/spikes_flat.npz for the parity check (default: see above)",
    )
    p.add_argument(
        "--synthetic-only", action="store_true", help="check parity on a synthetic recording, not real ones"
    )
    p.add_argument(
        "--tolerance", type=float, default=None, help="largest relative error accepted (default 1e-4)"
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run the export described by parsed ``args``; returns the exit code (errors raise InputError)."""
    recordings = "synthetic" if args.synthetic_only else (args.real_data or "auto")
    result = export_checkpoint(
        args.checkpoint,
        fmt=args.fmt,
        out=args.out,
        recordings=recordings,
        tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
        opset=args.opset,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    md = result.metadata
    size_mb = result.path.stat().st_size / 1e6
    print(
        f"wrote {result.path} ({result.format}, {size_mb:.2f} MB, model {md['config']['name']} "
        f"{md['source']['short_hash']}) in {result.seconds:.1f} s; parity max relative error "
        f"{result.parity.max_error:.2e} over {len(result.parity.cases)} cases"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m export``) with the same error handling as ``nh-serve``."""
    parser = argparse.ArgumentParser(prog="python -m export")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["export"]:
        argv = ["export", *argv]
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"nh-serve export: error: {exc}", file=sys.stderr)
        return 2
