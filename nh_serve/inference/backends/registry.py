"""The backend registry: which backends exist, which one ``auto`` picks, and building one.

A backend takes the model inputs of a batch of windows and returns the log
firing rate (Hz)::

    backend(batch, unit_embeddings) -> (B, U, n_bins) CPU tensor
    backend.embed_units(unit_features (B, U, 33)) -> (B, U, D)

``batch`` is the :func:`~nh_serve.data.windows.collate` output without
``unit_features``; ``unit_embeddings`` are the cached embeddings of the
registered session, expanded to ``(B, U, D)``. Tokenization and reference
features always run in the Predictor (numpy), whatever the backend.

Backends (:data:`BACKENDS`):

``torch``
    Eager PyTorch, the reference every other backend is checked against.
``torch-compile``
    ``torch.compile(model.forward_with_embeddings, dynamic=True)`` (Inductor;
    on CPU it needs a C++ compiler). Built with two warm-up calls (batch 1 and
    batch 2, so both specialisations are compiled before the first request):
    20-60 s on 2 cores with a warm Inductor cache, up to 3 minutes without.
``torchscript`` (plugin: ``export.backends``)
    ``torch.jit.script`` of the model, made in memory from the loaded model
    (0.3 s; it shares the model's tensors).
``onnxruntime`` (plugin: ``export.backends``)
    An ONNX export run by onnxruntime (CPUExecutionProvider; the CUDA provider
    on ``cuda`` when onnxruntime-gpu is installed). From a loaded model the
    export is made once and cached on disk under a key of the weights' content
    hash, config, model code and versions (:func:`~nh_serve.inference.backends.base.cache_dir`):
    the first export of nh-small takes 15-30 s on 2 cores, later loads 0.2 s.
``triton`` (plugin: ``kernels.backend``)
    The fused Triton kernels (rotary attention, per-neuron head). Available on
    CUDA, and on CPU only under ``TRITON_INTERPRET=1`` (for tests); ``auto``
    never picks it on CPU.

``torch`` and ``torch-compile`` are built in. Backends that need code outside
nh_serve register themselves as plugins: an entry point of the group
:data:`PLUGIN_GROUP` (``[project.entry-points."nh_serve.backends"]`` in
pyproject.toml) names a :class:`~nh_serve.inference.backends.base.BackendSpec`,
registered under the entry point's name the first time the registry is used.
An exported ``.onnx`` / TorchScript file needs no plugin: it runs on the backend
its format names (:mod:`nh_serve.inference.backends.artifacts`).

Every backend built from a model passes a parity check against eager PyTorch
on random inputs (:func:`nh_serve.inference.backends.eager.verify`, relative
error <= 1e-4) before it is used; a failure raises
:class:`~nh_serve.inference.backends.parity.ParityError`.

``auto`` (:func:`choose_backend`) takes the first available backend of
:data:`AUTO_ORDER` for the model's device (falling back to the next one if its
build fails). The CPU order was measured with ``nh-serve bench predict``
(``docs/benchmarks.md``): see the comment above :data:`AUTO_ORDER`.

Threads: onnxruntime sessions get ``intra_op_num_threads = threads``
(default :func:`~nh_serve.inference.backends.base.default_threads`). ``torch.set_num_threads`` is process-wide,
so torch backends only change it when a ``threads`` value is passed explicitly
(never at import).
"""

from __future__ import annotations

import os
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import torch

from nh_serve.data.features import FeatureNorm
from nh_serve.errors import CheckpointError, InputError
from nh_serve.inference.backends.artifacts import ArtifactModel, artifact_backend
from nh_serve.inference.backends.base import Backend, BackendSpec, BuildRequest, model_device
from nh_serve.inference.backends.eager import TORCH, TORCH_COMPILE
from nh_serve.inference.checkpoint import content_hash

PLUGIN_GROUP = "nh_serve.backends"
"""Entry-point group of backend plugins: each entry point names a BackendSpec of the same name."""

# auto: first available backend for the device; if building it fails (an export or parity failure), the
# next one. The CPU order comes from `nh-serve bench predict` (docs/benchmarks.md: trained nh-small, 2-core
# AMD EPYC, 1 thread, backends' calls interleaved; bare-model p50 on a quiet machine), weighing per-window
# latency (the closed-loop target) against what a backend costs to build:
#   torch-compile  fastest: 3.1 ms at 100 units vs 3.5 (onnxruntime), 4.4 vs 5.6 at 300, 9.5 vs 14.5 at 1000;
#                  but 20 s (warm Inductor cache) to 3 min of C++ compilation in EVERY new process -> by name
#                  only, for long-running services that can afford the start-up.
#   onnxruntime    3-10% faster per window than torchscript up to 100 units, equal at 300, 6% slower at 1000;
#                  1.3-2x its batch throughput. Costs one ONNX export per checkpoint (~15 s, parity-checked,
#                  cached on disk), then 0.2 s loads.
#   torchscript    builds in 0.3 s with no files: the fallback when onnxruntime is missing or fails.
#   torch          eager reference, 1.1-1.5x slower per window.
# CUDA order: not measured (no GPU here); fused kernels first when registered.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("onnxruntime", "torchscript", "torch"),
    "cuda": ("triton", "torchscript", "onnxruntime", "torch"),
}

BACKENDS: dict[str, BackendSpec] = {}
_plugins_loaded = False


def register_backend(spec: BackendSpec, *, replace: bool = False) -> None:
    """Add a backend to :data:`BACKENDS` (plugins are registered through their entry points)."""
    if spec.name == "auto":
        raise ValueError("'auto' is reserved for the automatic choice")
    if spec.name in BACKENDS and not replace:
        raise ValueError(f"backend {spec.name!r} is already registered; pass replace=True to override it")
    BACKENDS[spec.name] = spec


def load_plugins() -> None:
    """Register the backends of every installed plugin (entry points of :data:`PLUGIN_GROUP`), once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            spec = ep.load()
        except Exception as exc:  # a broken optional backend must not break the others
            warnings.warn(f"backend plugin {ep.name} ({ep.value}) failed to load ({exc}); it is unavailable", stacklevel=2)
            continue
        if not isinstance(spec, BackendSpec) or spec.name != ep.name:
            warnings.warn(
                f"backend plugin {ep.name} ({ep.value}) is not a BackendSpec named {ep.name!r}; it is ignored",
                stacklevel=2,
            )
            continue
        register_backend(spec, replace=True)


def backend_names() -> list[str]:
    """All registered backend names (plugins included)."""
    load_plugins()
    return sorted(BACKENDS)


def available_backends(device: str = "cpu") -> dict[str, str | None]:
    """``{name: None if usable on device else why not}`` for every registered backend."""
    load_plugins()
    dev = torch.device(device).type
    return {name: spec.available(dev) for name, spec in sorted(BACKENDS.items())}


def choose_backend(device: str = "cpu") -> str:
    """The ``auto`` choice: the first available backend of :data:`AUTO_ORDER` for ``device``."""
    avail = available_backends(device)
    dev = torch.device(device).type
    for name in AUTO_ORDER.get(dev, AUTO_ORDER["cpu"]):
        if avail.get(name, "not registered") is None:
            return name
    return "torch"


def check_backend_name(name) -> str:
    """``name`` if it is ``auto`` or a registered backend, else :class:`InputError` listing them."""
    names = backend_names()
    if name != "auto" and name not in names:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(names)} or 'auto'")
    return name


def make_backend(
    name: str | Backend = "auto",
    *,
    model=None,
    checkpoint=None,
    feature_norm=None,
    threads: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    verify: bool = True,
) -> Backend:
    """Build backend ``name`` (or ``auto``) for a loaded model or an :class:`ArtifactModel`.

    ``checkpoint`` (a :class:`~nh_serve.inference.checkpoint.Checkpoint` or an artifact) gives the
    content hash that keys cached exports; without it the hash of the model's weights is used.
    """
    if isinstance(name, Backend):
        return name
    check_backend_name(name)
    if isinstance(model, ArtifactModel):
        return artifact_backend(model.artifact, name=name, threads=threads)
    if model is None:
        raise InputError("make_backend: pass the loaded model")
    device = model_device(model).type
    auto = name == "auto"
    avail = available_backends(device)
    if auto:
        candidates = [
            n for n in AUTO_ORDER.get(device, AUTO_ORDER["cpu"]) if avail.get(n, "not registered") is None
        ]
        candidates = candidates or ["torch"]
    else:
        if avail[name] is not None:
            raise InputError(f"backend {name!r} is not available here: {avail[name]}")
        candidates = [name]
    source_hash = getattr(checkpoint, "content_hash", None)
    if source_hash is None:
        source_hash = content_hash(model.state_dict())
    req = BuildRequest(
        model=model,
        source_hash=source_hash,
        feature_norm=feature_norm if feature_norm is not None else FeatureNorm.identity(),
        threads=threads,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        verify=verify,
    )
    for i, cand in enumerate(candidates):
        try:
            return BACKENDS[cand].build(req)
        except CheckpointError as exc:  # auto: an export or parity failure falls back to the next backend
            if not auto or i == len(candidates) - 1:
                raise
            warnings.warn(f"backend {cand} failed ({exc}); using {candidates[i + 1]} instead", stacklevel=2)
    raise AssertionError("unreachable")


register_backend(TORCH)
register_backend(TORCH_COMPILE)
