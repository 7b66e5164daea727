"""Inference backends: who runs the model for the Predictor.

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
``torchscript``
    ``torch.jit.script`` of the model, made in memory from the loaded model
    (0.3 s; it shares the model's tensors), or a TorchScript artifact from
    ``nh-serve export``.
``onnxruntime``
    An ONNX export run by onnxruntime (CPUExecutionProvider; the CUDA provider
    on ``cuda`` when onnxruntime-gpu is installed). From a loaded model the
    export is made once and cached on disk under a key of the weights' content
    hash, config, model code and versions (:func:`cache_dir`):
    the first export of nh-small takes 15-30 s on 2 cores, later loads 0.2 s.
    Loading an exported ``.onnx`` / TorchScript file needs no export.
``triton``
    The fused Triton kernels (rotary attention, per-neuron head), registered
    with :func:`register_backend` by ``kernels/backend.py`` (a plugin module,
    see :data:`PLUGIN_MODULES`). Available on CUDA, and on CPU only under
    ``TRITON_INTERPRET=1`` (for tests); ``auto`` never picks it on CPU.

Every backend built from a model passes a parity check against eager PyTorch
on random inputs (:func:`export.parity.compare_backends`, relative error <= 1e-4)
before it is used; a failure raises :class:`~export.parity.ParityError`.

``auto`` (:func:`choose_backend`) takes the first available backend of
:data:`AUTO_ORDER` for the model's device (falling back to the next one if its
build fails). The CPU order was measured with ``nh-serve bench predict``
(``docs/benchmarks.md``): see the comment above :data:`AUTO_ORDER`.

Threads: onnxruntime sessions get ``intra_op_num_threads = threads``
(default :func:`default_threads`). ``torch.set_num_threads`` is process-wide,
so torch backends only change it when a ``threads`` value is passed explicitly
(never at import).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nh_serve.errors import CheckpointError, InputError

PLUGIN_MODULES = ("kernels.backend",)
"""Modules imported (if they exist) before the registry is used; each calls :func:`register_backend`."""

CACHE_ENV = "NH_SERVE_CACHE_DIR"
"""Environment variable overriding the folder of on-the-fly exports."""

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


def default_threads() -> int:
    """Intra-op threads for latency: 1 on machines with at most 2 usable cores, else half of them (max 4).

    On 2 cores a single window is a chain of ~200 small ops (tens of microseconds each);
    splitting them over two threads costs more in synchronisation than it gains and
    competes with the Python tokenizer and the acquisition process (measured in
    ``docs/benchmarks.md``).
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return 1 if n <= 2 else min(4, n // 2)


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Folder of on-the-fly exports: ``path``, ``$NH_SERVE_CACHE_DIR`` or ``~/.cache/nh-serve/export``."""
    if path is not None:
        return Path(path)
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nh-serve" / "export"


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if int(threads) < 1:
            raise InputError(f"threads: must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))


# ----------------------------------------------------------------------------- backends


# Float model inputs -> the request fields they come from (for error messages).
_INPUT_SOURCES = {
    "unit_counts": "context spikes",
    "history_rate_hz": "history_counts/history_duration_s",
    "ref_rate_hz": "reference spikes",
    "spike_times": "context spikes",
    "behavior_times": "behavior",
    "behavior_values": "behavior",
    "image_times": "images",
    "image_values": "images",
}


def check_finite_inputs(batch: dict[str, Tensor]) -> None:
    """:class:`InputError` if a float model input holds NaN or infinity.

    Backends differ on such input (eager PyTorch answers NaN, onnxruntime's Clip turns
    NaN into the 1000 Hz ceiling), so no backend runs on it: every one refuses it here.
    Tokenized input is finite unless values overflow (e.g. ``history_counts`` 1e300 over
    ``history_duration_s`` 1e-300).
    """
    for key, source in _INPUT_SOURCES.items():
        t = batch.get(key)
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(
                f"{source}: the model input {key} is not finite (the values overflowed); send spike counts, "
                "seconds and feature values of realistic size"
            )


class Backend:
    """Base class: runs ``forward_with_embeddings`` / ``embed_units`` for the Predictor.

    Subclasses implement :meth:`run`; calling the backend checks that the inputs are
    finite first (:func:`check_finite_inputs`), the same for every backend.
    """

    name = "?"

    def __init__(self, *, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def __call__(self, batch: dict[str, Tensor], unit_embeddings: Tensor) -> Tensor:
        """``batch`` (collate output without ``unit_features``), ``(B, U, D)`` -> ``(B, U, T)`` log-rate (Hz), CPU."""
        check_finite_inputs(batch)
        return self.run(batch, unit_embeddings)

    def run(self, batch: dict[str, Tensor], unit_embeddings: Tensor) -> Tensor:
        """The model call itself (inputs already checked)."""
        raise NotImplementedError

    def embed_units(self, unit_features: Tensor) -> Tensor:
        """``(B, U, n_features)`` z-scored features -> ``(B, U, D)`` embeddings, CPU."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What runs: backend name, device and backend-specific details."""
        return {"name": self.name, "device": str(self.device)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.describe().items())})"


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class TorchBackend(Backend):
    """Eager PyTorch: the reference path every other backend is checked against."""

    name = "torch"

    def __init__(self, model, *, threads: int | None = None):
        super().__init__(device=_model_device(model))
        _set_threads(threads)
        self.model = model

    def run(self, batch: dict[str, Tensor], unit_embeddings: Tensor) -> Tensor:
        out = self.model.forward_with_embeddings(
            unit_embeddings.to(self.device), **_to_device(batch, self.device)
        )
        return out.cpu()

    def embed_units(self, unit_features: Tensor) -> Tensor:
        return self.model.embed_units(unit_features.to(self.device)).cpu()

    def describe(self) -> dict:
        return {**super().describe(), "torch_threads": torch.get_num_threads()}


class TorchCompileBackend(TorchBackend):
    """``torch.compile(forward_with_embeddings, dynamic=True)``, warmed up at construction."""

    name = "torch-compile"

    def __init__(self, model, *, threads: int | None = None, mode: str | None = None):
        super().__init__(model, threads=threads)
        self.mode = mode
        self._fn = torch.compile(model.forward_with_embeddings, dynamic=True, mode=mode)
        self._warm_up(model.cfg)

    def _warm_up(self, cfg) -> None:
        from export.onnx import example_inputs

        ex = example_inputs(cfg)
        emb = ex.pop("unit_embeddings")
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for b in (1, 2):  # batch 1 is specialised by the compiler; batch >= 2 is dynamic
                    self(
                        {k: v[:b] for k, v in ex.items()},
                        emb[:b],
                    )
        except Exception as exc:
            raise CheckpointError(
                f"backend torch-compile: compilation failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "use backend 'torchscript' or 'torch'"
            ) from exc

    def run(self, batch: dict[str, Tensor], unit_embeddings: Tensor) -> Tensor:
        return self._fn(unit_embeddings.to(self.device), **_to_device(batch, self.device)).cpu()

    def describe(self) -> dict:
        return {**super().describe(), "mode": self.mode or "default", "dynamic": True}


class ArtifactBackend(Backend):
    """Runs a loaded artifact's runner (onnxruntime sessions or a TorchScript module)."""

    def __init__(self, artifact, *, name: str, path: Path | None = None, cached: bool = False):
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


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BuildRequest:
    """What a backend factory gets: the eager model (None when serving an artifact alone) and options."""

    model: Any = None
    source_hash: str | None = None
    feature_norm: Any = None
    artifact: Any = None  # a loaded export.artifact.Artifact
    threads: int | None = None
    cache_dir: Path | None = None
    verify: bool = True


@dataclass(frozen=True)
class BackendSpec:
    """A registered backend.

    ``build(request) -> Backend``; ``available(device) -> None`` if usable on ``device``
    (``"cpu"`` / ``"cuda"``) else a reason; ``artifact_format``: the export format it runs
    (``"onnx"`` / ``"torchscript"``), None if it needs the eager model.
    """

    name: str
    description: str
    build: Callable[[BuildRequest], Backend]
    available: Callable[[str], str | None]
    artifact_format: str | None = None


BACKENDS: dict[str, BackendSpec] = {}
_plugins_loaded = False


def register_backend(spec: BackendSpec, *, replace: bool = False) -> None:
    """Add a backend to :data:`BACKENDS` (the registration point for the Triton kernels)."""
    if spec.name == "auto":
        raise ValueError("'auto' is reserved for the automatic choice")
    if spec.name in BACKENDS and not replace:
        raise ValueError(f"backend {spec.name!r} is already registered; pass replace=True to override it")
    BACKENDS[spec.name] = spec


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for mod in PLUGIN_MODULES:
        try:
            if importlib.util.find_spec(mod) is None:
                continue
        except (ImportError, ValueError):
            continue
        try:
            importlib.import_module(mod)
        except Exception as exc:  # a broken optional backend must not break the others
            warnings.warn(
                f"backend plugin {mod} failed to load ({exc}); its backend is unavailable", stacklevel=2
            )


def backend_names() -> list[str]:
    """All registered backend names (plugins included)."""
    _load_plugins()
    return sorted(BACKENDS)


def available_backends(device: str = "cpu") -> dict[str, str | None]:
    """``{name: None if usable on device else why not}`` for every registered backend."""
    _load_plugins()
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


def check_backend_name(name: Any) -> str:
    """``name`` if it is ``auto`` or a registered backend, else :class:`InputError` listing them."""
    names = backend_names()
    if name != "auto" and name not in names:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(names)} or 'auto'")
    return name


# ----------------------------------------------------------------------------- factories


def _always(device: str) -> str | None:
    return None


def _export_missing() -> str | None:
    """Why the ``export`` package (installed with nh-serve) cannot be imported, or None."""
    try:
        found = importlib.util.find_spec("export.artifact") is not None
    except (ImportError, ValueError):
        found = False
    return (
        None
        if found
        else "the export package of nh-serve is not importable (reinstall nh-serve: pip install -e .)"
    )


def _torchscript_available(device: str) -> str | None:
    return _export_missing()


def _compile_available(device: str) -> str | None:
    missing = _export_missing()
    if missing:
        return missing
    if device == "cpu" and not any(
        shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c
    ):
        return "no C++ compiler found (torch.compile's CPU code generator needs one)"
    if sys.platform == "win32":
        return "torch.compile is not supported on Windows here"
    return None


def _onnxruntime_available(device: str) -> str | None:
    missing = _export_missing()
    if missing:
        return missing
    for mod in ("onnxruntime", "onnx", "onnxscript"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install 'nh-serve[onnx]')"
    if device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDA provider (install onnxruntime-gpu instead of onnxruntime)"
    return None


def _verify(backend: Backend, req: BuildRequest) -> Backend:
    """Random-input parity against eager PyTorch (raises ParityError)."""
    if req.verify and req.model is not None:
        from export.parity import compare_backends

        report = compare_backends(TorchBackend(req.model), backend, req.model.cfg, small=True)
        report.raise_if_failed(f"backend {backend.name}")
    return backend


def _need_model(req: BuildRequest, name: str) -> None:
    if req.model is None:
        raise InputError(
            f"backend {name!r} needs the PyTorch checkpoint (.safetensors), not an exported artifact"
        )


def _build_torch(req: BuildRequest) -> Backend:
    _need_model(req, "torch")
    return TorchBackend(req.model, threads=req.threads)


def _build_compile(req: BuildRequest) -> Backend:
    _need_model(req, "torch-compile")
    return _verify(TorchCompileBackend(req.model, threads=req.threads), req)


def _build_torchscript(req: BuildRequest) -> Backend:
    if req.artifact is not None:
        _check_artifact_format(req.artifact, "torchscript")
        _set_threads(req.threads)
        return ArtifactBackend(req.artifact, name="torchscript", path=req.artifact.path)
    _need_model(req, "torchscript")
    from export.artifact import Artifact
    from export.torchscript import TorchScriptRunner, script_model

    _set_threads(req.threads)
    runner = TorchScriptRunner(script_model(req.model), device=str(_model_device(req.model)))
    art = Artifact(
        path=Path("<memory>"),
        format="torchscript",
        metadata={},
        cfg=req.model.cfg,
        feature_norm=req.feature_norm,
        runner=runner,
    )
    return _verify(ArtifactBackend(art, name="torchscript"), req)


def _build_onnxruntime(req: BuildRequest) -> Backend:
    from export.artifact import load_artifact

    if req.artifact is not None:
        _check_artifact_format(req.artifact, "onnx")
        return ArtifactBackend(req.artifact, name="onnxruntime", path=req.artifact.path)
    _need_model(req, "onnxruntime")
    device = _model_device(req.model).type
    path = cached_export_path(req, "onnx")
    if path.is_file():
        try:
            art = load_artifact(path, threads=req.threads, device=device)
            return _verify(ArtifactBackend(art, name="onnxruntime", path=path, cached=True), req)
        except CheckpointError as exc:  # stale or damaged cache entry: export again
            warnings.warn(f"re-exporting the cached ONNX model {path.name}: {exc}", stacklevel=2)
    from export.exporter import export_model

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


def _check_artifact_format(artifact, fmt: str) -> None:
    if artifact.format != fmt:
        raise InputError(
            f"{artifact.path} is a {artifact.format} export; it runs on backend "
            f"{ARTIFACT_BACKEND[artifact.format]!r} (or 'auto'), not on a {fmt} backend"
        )


ARTIFACT_BACKEND = {"onnx": "onnxruntime", "torchscript": "torchscript"}
"""The backend that runs each artifact format."""


def _code_hash() -> str:
    """Hash of the model code (nh_serve/core), so cached exports follow code changes."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parents[1] / "core"
    for name in ("config.py", "rotary.py", "blocks.py", "model.py"):
        try:
            h.update((here / name).read_bytes())
        except OSError:
            h.update(name.encode())
    return h.hexdigest()


def cached_export_path(req: BuildRequest, fmt: str) -> Path:
    """Cache file of an on-the-fly export, keyed by the weights, config, model code and versions.

    The feature normalisation is not part of the key: it does not enter the graphs, and the
    Predictor applies its own. Cache files are an internal detail; ``nh-serve export`` writes
    stand-alone artifacts.
    """
    from export.artifact import ARTIFACT_FORMAT_VERSION, SUFFIXES, versions

    key = json.dumps(
        [req.source_hash, req.model.cfg.to_dict(), _code_hash(), versions(), ARTIFACT_FORMAT_VERSION],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return (
        cache_dir(req.cache_dir)
        / f"{req.model.cfg.name}-{(req.source_hash or 'unsaved')[:12]}-{digest}{SUFFIXES[fmt][0]}"
    )


register_backend(BackendSpec("torch", "eager PyTorch (reference)", _build_torch, _always))
register_backend(
    BackendSpec(
        "torch-compile", "torch.compile (Inductor), dynamic shapes", _build_compile, _compile_available
    )
)
register_backend(
    BackendSpec(
        "torchscript",
        "torch.jit.script of the model",
        _build_torchscript,
        _torchscript_available,
        artifact_format="torchscript",
    )
)
register_backend(
    BackendSpec(
        "onnxruntime",
        "ONNX export run by onnxruntime",
        _build_onnxruntime,
        _onnxruntime_available,
        artifact_format="onnx",
    )
)
# The Triton kernels register "triton" here from kernels/backend.py (see PLUGIN_MODULES), e.g.
#   register_backend(BackendSpec("triton", "fused Triton kernels", build, available))
# and it is then chosen first by auto on CUDA (AUTO_ORDER["cuda"]).


# ----------------------------------------------------------------------------- entry points


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
        art = model.artifact
        want = ARTIFACT_BACKEND[art.format]
        if name not in ("auto", want):
            raise InputError(
                f"{art.path} is a {art.format} export, which runs on backend {want!r} only; "
                f"to use backend {name!r}, load its source checkpoint (.safetensors) instead"
            )
        return BACKENDS[want].build(BuildRequest(artifact=art, threads=threads))
    if model is None:
        raise InputError("make_backend: pass the loaded model")
    device = _model_device(model).type
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
        from nh_serve.inference.checkpoint import content_hash

        source_hash = content_hash(model.state_dict())
    if feature_norm is None:
        from nh_serve.data.features import FeatureNorm

        feature_norm = FeatureNorm.identity()
    req = BuildRequest(
        model=model,
        source_hash=source_hash,
        feature_norm=feature_norm,
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


class ArtifactModel:
    """Stands in for :class:`~nh_serve.core.model.NeuroHorizon` in a Predictor that serves an artifact alone.

    Input preparation is the Predictor's (the window pipeline, :mod:`nh_serve.data.windows`);
    ``embed_units`` runs the artifact's IDEncoder graph. Test-time adaptation
    (gradients through the model) works for TorchScript artifacts and raises
    :class:`InputError` for ONNX ones.
    """

    def __init__(self, artifact):
        self.artifact = artifact
        self.cfg = artifact.cfg

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
    missing = _export_missing()
    if missing:
        if Path(path).suffix.lower() in (".onnx", ".ts", ".torchscript"):
            raise InputError(f"cannot load the exported artifact {path}: {missing}")
        return None
    from export.artifact import artifact_format, load_artifact

    if artifact_format(path) is None:
        return None
    return ArtifactModel(load_artifact(path, threads=threads))
