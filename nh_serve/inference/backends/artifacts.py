"""Serving exported artifacts: load a ``.onnx`` / TorchScript file and run it as a backend.

:func:`load_artifact` checks a file (format, metadata, integrity) and builds its
runner (:mod:`~nh_serve.inference.backends.onnx_runner` or
:mod:`~nh_serve.inference.backends.torchscript_runner`); :class:`ArtifactBackend`
runs a runner for the Predictor; :class:`ArtifactModel` stands in for the model
in a Predictor that serves an artifact alone. Serving a file needs no export code
and no registry entry: a file runs on the backend its format names
(:data:`ARTIFACT_BACKEND`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nh_serve.core.config import ModelConfig
from nh_serve.data.features import FeatureNorm
from nh_serve.errors import CheckpointError, InputError
from nh_serve.inference.artifact import SUFFIXES, Artifact, artifact_format
from nh_serve.inference.backends import onnx_runner, torchscript_runner
from nh_serve.inference.backends.base import Backend, set_threads

ARTIFACT_BACKEND = {"onnx": "onnxruntime", "torchscript": "torchscript"}
"""The backend that runs each artifact format."""


def _check_file(path: Path, fmt: str) -> None:
    if not path.exists():
        raise CheckpointError(
            f"{fmt} artifact {path} does not exist; check the path or export it with `nh-serve export`"
        )
    if not path.is_file():
        raise CheckpointError(f"{fmt} artifact {path} is not a file; pass the path of the exported file")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"{fmt} artifact {path} is empty (an interrupted copy?); copy or export it again"
        )


def read_artifact_metadata(path: str | os.PathLike) -> dict:
    """The checked metadata document of an artifact, without building a runtime session."""
    p = Path(path)
    fmt = artifact_format(p)
    if fmt is None:
        raise CheckpointError(
            f"{p}: not an exported artifact (expected a {', '.join(s for v in SUFFIXES.values() for s in v)} file "
            "written by `nh-serve export`)"
        )
    _check_file(p, fmt)
    if fmt == "onnx":
        return onnx_runner.read_metadata(p)
    return torchscript_runner.read_metadata(p)


def load_artifact(path: str | os.PathLike, *, threads: int | None = None, device: str = "cpu") -> Artifact:
    """Load an exported artifact with its runtime (onnxruntime session or TorchScript module).

    ``threads``: intra-op threads of the onnxruntime sessions (default
    :func:`~nh_serve.inference.backends.base.default_threads`); TorchScript uses torch's global
    thread setting. ``device``: ``"cpu"`` or ``"cuda"`` (onnxruntime's CUDA provider
    when onnxruntime-gpu is installed; TorchScript moves the module).
    """
    p = Path(path)
    fmt = artifact_format(p)
    if fmt is None:
        raise CheckpointError(
            f"{p}: not an exported artifact (expected a .onnx, .pt, .ts or .torchscript file written by `nh-serve export`)"
        )
    _check_file(p, fmt)
    if fmt == "onnx":
        doc, runner = onnx_runner.load(p, threads=threads, device=device)
    else:
        doc, runner = torchscript_runner.load(p, device=device)
    cfg = ModelConfig.from_dict(doc["config"])
    return Artifact(
        path=p,
        format=fmt,
        metadata=doc,
        cfg=cfg,
        feature_norm=FeatureNorm.from_dict(doc["feature_norm"]),
        runner=runner,
    )


class ArtifactBackend(Backend):
    """Runs a loaded artifact's runner (onnxruntime sessions or a TorchScript module)."""

    def __init__(self, artifact: Artifact, *, name: str, path: Path | None = None, cached: bool = False):
        super().__init__(device=getattr(artifact.runner, "device", "cpu"))
        self.name = name
        self.artifact = artifact
        self.runner = artifact.runner
        self.path = path
        self.cached = cached

    def run(self, batch: dict[str, Tensor], unit_embeddings: Tensor) -> Tensor:
        return self.runner.forward(batch, unit_embeddings)

    def embed_units(self, unit_features: Tensor) -> Tensor:
        return self.runner.embed_units(unit_features)

    def describe(self) -> dict:
        d = {**super().describe(), "artifact": str(self.path) if self.path else "in memory"}
        if hasattr(self.runner, "providers"):
            d["providers"] = list(self.runner.providers)
            d["intra_op_threads"] = self.runner.threads
        else:
            d["torch_threads"] = torch.get_num_threads()
        return d


def artifact_backend(artifact: Artifact, *, name: str = "auto", threads: int | None = None) -> ArtifactBackend:
    """The backend of a loaded artifact: ``name`` must be ``"auto"`` or the backend of its format."""
    want = ARTIFACT_BACKEND[artifact.format]
    if name not in ("auto", want):
        raise InputError(
            f"{artifact.path} is a {artifact.format} export, which runs on backend {want!r} only; "
            f"to use backend {name!r}, load its source checkpoint (.safetensors) instead"
        )
    if artifact.format == "torchscript":
        set_threads(threads)  # onnxruntime sessions got their threads when the artifact was loaded
    return ArtifactBackend(artifact, name=want, path=artifact.path)


class ArtifactModel:
    """Stands in for :class:`~nh_serve.core.model.NeuroHorizon` in a Predictor that serves an artifact alone.

    Input preparation is the Predictor's (the window pipeline, :mod:`nh_serve.data.windows`);
    ``embed_units`` runs the artifact's IDEncoder graph. Test-time adaptation
    (gradients through the model) works for TorchScript artifacts and raises
    :class:`InputError` for ONNX ones.
    """

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self.cfg: ModelConfig = artifact.cfg

    def eval(self) -> ArtifactModel:
        return self

    def embed_units(self, unit_features: Tensor) -> Tensor:
        return self.artifact.runner.embed_units(unit_features)

    def _module(self):
        module = getattr(self.artifact.runner, "module", None)
        if module is None:
            raise InputError(
                f"test-time adaptation (adapt_steps > 0) needs gradients, which the {self.artifact.format} artifact "
                f"{self.artifact.path.name} cannot give; load its source checkpoint or a TorchScript export, or pass adapt_steps=0"
            )
        return module

    def forward_with_embeddings(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._module().forward_with_embeddings(*args, **kwargs)

    def parameters(self):
        module = getattr(self.artifact.runner, "module", None)
        return iter(()) if module is None else module.parameters()


def open_artifact_model(path, *, threads: int | None = None) -> ArtifactModel | None:
    """An :class:`ArtifactModel` if ``path`` names an exported artifact (.onnx / TorchScript), else None."""
    if path is None or not isinstance(path, (str, os.PathLike)) or str(path) == "default":
        return None
    if artifact_format(path) is None:
        return None
    return ArtifactModel(load_artifact(path, threads=threads))
