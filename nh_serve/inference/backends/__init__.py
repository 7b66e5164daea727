"""Inference backends: who runs the model for the Predictor.

A backend takes the model inputs of a batch of windows and returns the log
firing rate (Hz)::

    backend(batch, unit_embeddings) -> (B, U, n_bins) CPU tensor
    backend.embed_units(unit_features (B, U, 33)) -> (B, U, D)

``batch`` is the :func:`~nh_serve.data.windows.collate` output without
``unit_features``; ``unit_embeddings`` are the cached embeddings of the
registered session, expanded to ``(B, U, D)``. Input preparation (the window
pipeline) and reference features always run in the Predictor, whatever the backend.

Modules: :mod:`~.base` (the interface, the spec of a registered backend, the input
check), :mod:`~.registry` (registry, plugins, ``auto``, :func:`make_backend`),
:mod:`~.eager` (``torch``, ``torch-compile``, :func:`verify`), :mod:`~.artifacts`
with :mod:`~.onnx_runner` and :mod:`~.torchscript_runner` (serving exported files),
:mod:`~.parity` (the parity check against eager PyTorch).
"""

from nh_serve.inference.backends.artifacts import (
    ARTIFACT_BACKEND,
    ArtifactBackend,
    ArtifactModel,
    load_artifact,
    open_artifact_model,
    read_artifact_metadata,
)
from nh_serve.inference.backends.base import (
    Backend,
    BackendSpec,
    BuildRequest,
    cache_dir,
    check_finite_inputs,
    default_threads,
)
from nh_serve.inference.backends.eager import TorchBackend, TorchCompileBackend, verify
from nh_serve.inference.backends.parity import ParityError, ParityReport, compare_backends
from nh_serve.inference.backends.registry import (
    AUTO_ORDER,
    BACKENDS,
    PLUGIN_GROUP,
    available_backends,
    backend_names,
    check_backend_name,
    choose_backend,
    make_backend,
    register_backend,
)

__all__ = [
    "ARTIFACT_BACKEND",
    "AUTO_ORDER",
    "BACKENDS",
    "PLUGIN_GROUP",
    "ArtifactBackend",
    "ArtifactModel",
    "Backend",
    "BackendSpec",
    "BuildRequest",
    "ParityError",
    "ParityReport",
    "TorchBackend",
    "TorchCompileBackend",
    "available_backends",
    "backend_names",
    "cache_dir",
    "check_backend_name",
    "check_finite_inputs",
    "choose_backend",
    "compare_backends",
    "default_threads",
    "load_artifact",
    "make_backend",
    "open_artifact_model",
    "read_artifact_metadata",
    "register_backend",
    "verify",
]
