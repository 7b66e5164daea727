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

Modules: :mod:`export.onnx` and :mod:`export.torchscript` (making the graphs),
:mod:`export.parity` (the Predictor-level check), :mod:`export.exporter`
(:func:`export_model`), :mod:`export.backends` (the ``onnxruntime`` and
``torchscript`` backends built from a loaded model, a plugin of the backend
registry) and :mod:`export.cli`. The artifact format and its loading are inference
code: :mod:`nh_serve.inference.artifact`, :mod:`nh_serve.inference.backends.artifacts`.
"""

from __future__ import annotations

from export.exporter import ExportResult, export_checkpoint, export_model
from nh_serve.inference.artifact import ARTIFACT_FORMAT_VERSION, FORMATS, Artifact, artifact_format
from nh_serve.inference.backends.artifacts import load_artifact, read_artifact_metadata
from nh_serve.inference.backends.parity import DEFAULT_TOLERANCE, ParityError, ParityReport

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
