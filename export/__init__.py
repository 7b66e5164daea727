"""Export NeuroHorizon models to self-contained ONNX and TorchScript artifacts.

``nh-serve export --checkpoint CKPT --format onnx|torchscript --out PATH``
(:mod:`export.cli`) writes one file holding the two graphs the Predictor runs
(``forward_with_embeddings`` per window, ``embed_units`` once per registered
recording) and the metadata a loader needs (model config, feature
normalisation, source checkpoint hash, export date, versions, parity results).
Reference features and tokenization stay outside the graphs: they are numpy
code shared with the Predictor, which serves an artifact with
``Predictor.load("model.onnx")``.

Every export is checked against eager PyTorch (random inputs and a real or
synthetic recording, relative error <= 1e-4) before it is moved into place.

Modules: :mod:`export.artifact` (layout, metadata, loading),
:mod:`export.onnx`, :mod:`export.torchscript`, :mod:`export.parity`,
:mod:`export.exporter` (:func:`export_model`), :mod:`export.cli`.
"""

from __future__ import annotations

from export.artifact import (
    ARTIFACT_FORMAT_VERSION,
    FORMATS,
    Artifact,
    artifact_format,
    load_artifact,
    read_artifact_metadata,
)
from export.exporter import ExportResult, export_checkpoint, export_model
from export.parity import DEFAULT_TOLERANCE, ParityError, ParityReport

__all__ = [
    "ARTIFACT_FORMAT_VERSION",
    "FORMATS",
    "DEFAULT_TOLERANCE",
    "Artifact",
    "ExportResult",
    "ParityError",
    "ParityReport",
    "artifact_format",
    "export_checkpoint",
    "export_model",
    "load_artifact",
    "read_artifact_metadata",
]
