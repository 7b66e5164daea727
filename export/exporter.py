"""Export a model to an artifact, check its parity, and only then put it in place.

:func:`export_model` (and :func:`export_checkpoint`, used by ``nh-serve export``):

1. exports the graphs (:mod:`export.onnx` or :mod:`export.torchscript`) and writes
   them with their metadata to a temporary file beside ``out``;
2. loads that file through :meth:`nh_serve.inference.predictor.Predictor.load`, exactly as
   a service would, and compares it with the eager model
   (:func:`export.parity.check_predictor_parity`: random inputs and a real or
   synthetic recording);
3. on success records the parity results in the metadata, re-checks the final
   file and renames it onto ``out`` (atomic); on failure raises
   :class:`~nh_serve.inference.backends.parity.ParityError` and removes the temporary file, so
   ``out`` is never a model that failed the check (an older file at ``out`` is
   left untouched).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from export import onnx as onnx_export
from export import torchscript as torchscript_export
from export.parity import check_predictor_parity
from nh_serve.errors import InputError
from nh_serve.inference.artifact import SUFFIXES, build_metadata, check_format
from nh_serve.inference.backends.parity import DEFAULT_TOLERANCE, ParityReport, compare_backends
from nh_serve.inference.checkpoint import content_hash
from nh_serve.inference.model_io import load_model
from nh_serve.inference.predictor import Predictor
from nh_serve.util import atomic_path


@dataclass
class ExportResult:
    """What :func:`export_model` wrote."""

    path: Path
    format: str
    metadata: dict
    parity: ParityReport
    seconds: float


_ARTICLE = {"onnx": "an ONNX", "torchscript": "a TorchScript"}


def output_path(out: str | os.PathLike, *, fmt: str, default_stem: str) -> Path:
    """``out`` checked for ``fmt`` (a directory gets ``<default_stem><suffix>``)."""
    if out is None or str(out) == "":
        raise InputError("--out: pass the path of the file to write, e.g. model.onnx")
    p = Path(out)
    if p.is_dir():
        return p / f"{default_stem}{SUFFIXES[fmt][0]}"
    if p.suffix.lower() not in SUFFIXES[fmt]:
        raise InputError(
            f"--out {p}: {_ARTICLE[fmt]} artifact must end in {' or '.join(SUFFIXES[fmt])} (the loaders recognise "
            f"it by that), e.g. {p.with_suffix(SUFFIXES[fmt][0])}"
        )
    return p


def export_model(
    model,
    *,
    fmt: str,
    out: str | os.PathLike,
    feature_norm,
    source_hash: str | None = None,
    source_file: str | None = None,
    training: dict | None = None,
    metrics: dict | None = None,
    provenance: dict | None = None,
    recordings="auto",
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int | None = None,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export ``model`` (a :class:`~nh_serve.core.model.NeuroHorizon`) to ``out`` as ``fmt`` after a parity check.

    ``recordings``: see :func:`export.parity.check_predictor_parity` (``"auto"``: real recordings
    if found, else synthetic). ``tolerance``: largest relative error accepted (default 1e-4).
    Raises :class:`InputError` (bad format / path), :class:`~nh_serve.errors.CheckpointError`
    (export failed) or :class:`~nh_serve.inference.backends.parity.ParityError` (no file written).
    """
    t_start = time.perf_counter()
    say = log or (lambda msg: None)
    fmt = check_format(fmt)
    model = model.eval()
    cfg = model.cfg
    if source_hash is None:
        source_hash = content_hash(model.state_dict())
    dest = output_path(out, fmt=fmt, default_stem=f"{cfg.name}-{source_hash[:12]}")
    doc = build_metadata(
        fmt=fmt,
        cfg=cfg,
        feature_norm=feature_norm,
        source_hash=source_hash,
        source_file=source_file,
        training=training,
        metrics=metrics,
        provenance=provenance,
    )
    # The file goes in place only if the block below ends without an exception (a failed check raises).
    with atomic_path(dest, make_parents=True, keep_suffix=True) as tmp:
        say(f"exporting {cfg.name} ({source_hash[:12]}) to {fmt} ...")
        if fmt == "onnx":
            fmt_module = onnx_export
            graphs = fmt_module.export_graphs(model, opset=opset)
        else:
            fmt_module = torchscript_export
            graphs = (fmt_module.script_model(model),)
        fmt_module.write(tmp, *graphs, {**doc, "parity": {"status": "pending"}})

        say("checking parity against eager PyTorch ...")
        reference = Predictor(model=model, feature_norm=feature_norm, backend="torch")
        candidate = Predictor.load(tmp, backend="auto")
        report = check_predictor_parity(
            reference, candidate, recordings=recordings, tolerance=tolerance, log=say
        )
        say(report.summary())
        report.raise_if_failed(f"the exported {fmt} model")

        doc["parity"] = {"status": "passed", **report.to_dict()}
        fmt_module.write(tmp, *graphs, doc)
        final = Predictor.load(tmp, backend="auto")  # the bytes that go in place, loaded again
        compare_backends(
            reference._backend, final._backend, cfg, tolerance=tolerance, small=True
        ).raise_if_failed(f"the exported {fmt} model (final file)")
        metadata = final.checkpoint.metadata
        del candidate, final
    return ExportResult(
        path=dest, format=fmt, metadata=metadata, parity=report, seconds=time.perf_counter() - t_start
    )


def export_checkpoint(
    checkpoint: str | os.PathLike | None,
    *,
    fmt: str,
    out: str | os.PathLike,
    recordings="auto",
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int | None = None,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Load a checkpoint (path, ``"default"`` or None) and :func:`export_model` it."""
    fmt = check_format(fmt)
    model, norm, ckpt = load_model(checkpoint)
    return export_model(
        model,
        fmt=fmt,
        out=out,
        feature_norm=norm,
        source_hash=ckpt.content_hash,
        source_file=Path(ckpt.path).name if ckpt.path is not None else None,
        training=ckpt.training,
        metrics=ckpt.metrics,
        provenance=ckpt.provenance,
        recordings=recordings,
        tolerance=tolerance,
        opset=opset,
        log=log,
    )
