"""The ``onnxruntime`` and ``torchscript`` backends built from a loaded model: export, then run.

A plugin of the backend registry (:mod:`nh_serve.inference.backends.registry`): the
entry points ``onnxruntime`` and ``torchscript`` of the group ``nh_serve.backends``
(pyproject.toml) name :data:`ONNXRUNTIME` and :data:`TORCHSCRIPT`. Running an
exported file is inference code (:mod:`nh_serve.inference.backends.artifacts`); what
this module adds is making the artifact from the model on the fly:

``onnxruntime``
    The model is exported to ONNX once (:func:`export.exporter.export_model`, which
    checks its parity) and cached on disk under a key of the weights' content hash,
    config, model code and versions (:func:`cached_export_path`); later loads take
    0.2 s. A stale or damaged cache entry is exported again.
``torchscript``
    ``torch.jit.script`` of the model in memory (0.3 s; it shares the model's tensors),
    parity-checked against eager PyTorch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from pathlib import Path

from export.exporter import export_model
from export.torchscript import script_model
from nh_serve import core
from nh_serve.errors import CheckpointError
from nh_serve.inference.artifact import ARTIFACT_FORMAT_VERSION, SUFFIXES, Artifact, versions
from nh_serve.inference.backends.artifacts import ArtifactBackend, load_artifact
from nh_serve.inference.backends.base import (
    Backend,
    BackendSpec,
    BuildRequest,
    cache_dir,
    model_device,
    need_model,
    set_threads,
)
from nh_serve.inference.backends.eager import verify
from nh_serve.inference.backends.torchscript_runner import TorchScriptRunner

#: The model code whose changes invalidate cached exports.
MODEL_CODE = Path(core.__file__).resolve().parent


def _onnxruntime_available(device: str) -> str | None:
    for mod in ("onnxruntime", "onnx", "onnxscript"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install 'nh-serve[onnx]')"
    if device == "cuda":
        import onnxruntime as ort  # an optional dependency, imported only when asked about CUDA

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDA provider (install onnxruntime-gpu instead of onnxruntime)"
    return None


def _torchscript_available(device: str) -> str | None:
    return None


def _code_hash() -> str:
    """Hash of the model code (nh_serve/core), so cached exports follow code changes."""
    h = hashlib.sha256()
    for name in ("config.py", "rotary.py", "blocks.py", "model.py"):
        try:
            h.update((MODEL_CODE / name).read_bytes())
        except OSError:
            h.update(name.encode())
    return h.hexdigest()


def cached_export_path(req: BuildRequest, fmt: str) -> Path:
    """Cache file of an on-the-fly export, keyed by the weights, config, model code and versions.

    The feature normalisation is not part of the key: it does not enter the graphs, and the
    Predictor applies its own. Cache files are an internal detail; ``nh-serve export`` writes
    stand-alone artifacts.
    """
    key = json.dumps(
        [req.source_hash, req.model.cfg.to_dict(), _code_hash(), versions(), ARTIFACT_FORMAT_VERSION],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return (
        cache_dir(req.cache_dir)
        / f"{req.model.cfg.name}-{(req.source_hash or 'unsaved')[:12]}-{digest}{SUFFIXES[fmt][0]}"
    )


def build_onnxruntime(req: BuildRequest) -> Backend:
    """The cached ONNX export of ``req.model`` (exported and parity-checked on first use) on onnxruntime."""
    need_model(req, "onnxruntime")
    device = model_device(req.model).type
    path = cached_export_path(req, "onnx")
    if path.is_file():
        try:
            art = load_artifact(path, threads=req.threads, device=device)
            return verify(ArtifactBackend(art, name="onnxruntime", path=path, cached=True), req)
        except CheckpointError as exc:  # stale or damaged cache entry: export again
            warnings.warn(f"re-exporting the cached ONNX model {path.name}: {exc}", stacklevel=2)
    export_model(
        req.model,
        fmt="onnx",
        out=path,
        feature_norm=req.feature_norm,
        source_hash=req.source_hash,
        recordings="synthetic",
    )
    for stale in path.parent.glob(f"{path.name.rsplit('-', 1)[0]}-*{path.suffix}"):
        if stale != path:  # older exports of this checkpoint (other code or library versions)
            stale.unlink(missing_ok=True)
    art = load_artifact(path, threads=req.threads, device=device)
    return ArtifactBackend(art, name="onnxruntime", path=path)  # export_model checked its parity


def build_torchscript(req: BuildRequest) -> Backend:
    """``torch.jit.script`` of ``req.model`` in memory, parity-checked."""
    need_model(req, "torchscript")
    set_threads(req.threads)
    runner = TorchScriptRunner(script_model(req.model), device=str(model_device(req.model)))
    art = Artifact(
        path=Path("<memory>"),
        format="torchscript",
        metadata={},
        cfg=req.model.cfg,
        feature_norm=req.feature_norm,
        runner=runner,
    )
    return verify(ArtifactBackend(art, name="torchscript"), req)


ONNXRUNTIME = BackendSpec(
    "onnxruntime",
    "ONNX export run by onnxruntime",
    build_onnxruntime,
    _onnxruntime_available,
    artifact_format="onnx",
)
TORCHSCRIPT = BackendSpec(
    "torchscript",
    "torch.jit.script of the model",
    build_torchscript,
    _torchscript_available,
    artifact_format="torchscript",
)
