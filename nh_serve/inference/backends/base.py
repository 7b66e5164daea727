"""What every inference backend shares: the :class:`Backend` interface, the spec a registered
backend is described by, the input check every backend runs, and thread / device helpers."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nh_serve.errors import InputError

CACHE_ENV = "NH_SERVE_CACHE_DIR"
"""Environment variable overriding the folder of on-the-fly exports."""


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


def model_device(model) -> torch.device:
    """The device of a model's parameters (CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` (process-wide), only when a value is given."""
    if threads is not None:
        if int(threads) < 1:
            raise InputError(f"threads: must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
    "history_rates": "history_rates",
    "unit_readout": "the registered read-out",
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


@dataclass(frozen=True)
class BuildRequest:
    """What a backend factory gets: the eager model and the options of the build."""

    model: Any = None
    source_hash: str | None = None  # content hash of the checkpoint (keys cached exports)
    feature_norm: Any = None
    threads: int | None = None
    cache_dir: Path | None = None
    verify: bool = True  # parity-check the built backend against eager PyTorch


@dataclass(frozen=True)
class BackendSpec:
    """A registered backend.

    ``build(request) -> Backend``; ``available(device) -> None`` if usable on ``device``
    (``"cpu"`` / ``"cuda"``) else a reason; ``artifact_format``: the export format it
    also runs as a file (``"onnx"`` / ``"torchscript"``), None if it runs only a model.
    """

    name: str
    description: str
    build: Callable[[BuildRequest], Backend]
    available: Callable[[str], str | None]
    artifact_format: str | None = None


def need_model(req: BuildRequest, name: str) -> None:
    """:class:`InputError` unless the request carries the eager model (not an artifact alone)."""
    if req.model is None:
        raise InputError(
            f"backend {name!r} needs the PyTorch checkpoint (.safetensors), not an exported artifact"
        )
