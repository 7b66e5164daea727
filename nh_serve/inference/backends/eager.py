"""The PyTorch backends: eager ``torch`` (the reference every other backend is checked against)
and ``torch-compile``; :func:`verify`, the parity check every backend built from a model passes."""

from __future__ import annotations

import os
import shutil
import sys
import warnings

import torch
from torch import Tensor

from nh_serve.errors import CheckpointError
from nh_serve.inference.backends.base import (
    Backend,
    BackendSpec,
    BuildRequest,
    model_device,
    need_model,
    set_threads,
    to_device,
)
from nh_serve.inference.backends.parity import compare_backends, example_inputs


class TorchBackend(Backend):
    """Eager PyTorch: the reference path every other backend is checked against."""

    name = "torch"

    def __init__(self, model, *, threads: int | None = None):
        super().__init__(device=model_device(model))
        set_threads(threads)
        self.model = model

    def run(self, batch: dict[str, Tensor], unit_embeddings: Tensor) -> Tensor:
        out = self.model.forward_with_embeddings(
            unit_embeddings.to(self.device), **to_device(batch, self.device)
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
        return self._fn(unit_embeddings.to(self.device), **to_device(batch, self.device)).cpu()

    def describe(self) -> dict:
        return {**super().describe(), "mode": self.mode or "default", "dynamic": True}


def verify(backend: Backend, req: BuildRequest) -> Backend:
    """``backend`` if it matches eager PyTorch on random inputs (a small check), else ``ParityError``."""
    if req.verify and req.model is not None:
        report = compare_backends(TorchBackend(req.model), backend, req.model.cfg, small=True)
        report.raise_if_failed(f"backend {backend.name}")
    return backend


def _always(device: str) -> str | None:
    return None


def _compile_available(device: str) -> str | None:
    if device == "cpu" and not any(
        shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c
    ):
        return "no C++ compiler found (torch.compile's CPU code generator needs one)"
    if sys.platform == "win32":
        return "torch.compile is not supported on Windows here"
    return None


def _build_torch(req: BuildRequest) -> Backend:
    need_model(req, "torch")
    return TorchBackend(req.model, threads=req.threads)


def _build_compile(req: BuildRequest) -> Backend:
    need_model(req, "torch-compile")
    return verify(TorchCompileBackend(req.model, threads=req.threads), req)


TORCH = BackendSpec("torch", "eager PyTorch (reference)", _build_torch, _always)
TORCH_COMPILE = BackendSpec(
    "torch-compile", "torch.compile (Inductor), dynamic shapes", _build_compile, _compile_available
)
