"""TorchScript export (``torch.jit.script``) and its runner.

The whole :class:`~nh_serve.core.model.NeuroHorizon` (eval mode) is scripted; the
methods marked ``@torch.jit.export`` in the model (``embed_units``,
``forward_with_embeddings``, ...) stay callable on the loaded module, and the
optional multimodal inputs stay ``Optional[Tensor]`` arguments (passed when the
config has them). Scripting, not tracing: tracing would freeze the token and
unit counts of the example.

The metadata document is the extra file ``nh_serve.json``. ``integrity`` records
that the module's state dict has the source checkpoint's content hash
(:func:`nh_serve.inference.checkpoint.content_hash`); the loader recomputes it, so
damaged or swapped weights are refused.

TorchScript is deprecated upstream in favour of ``torch.export``; it still
runs in this torch and, on 2 CPU cores, it is one of the fastest backends
(see ``docs/benchmarks.md``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from export.artifact import EXTRA_FILE, encode_metadata, parse_metadata
from nh_serve.errors import CheckpointError
from nh_serve.inference.checkpoint import content_hash


def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of ``model`` in eval mode (the model itself is not modified)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.script is deprecated"
        try:
            return torch.jit.script(model.eval())
        except Exception as exc:
            raise CheckpointError(
                f"TorchScript export failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "export to ONNX instead (--format onnx) and report the model config"
            ) from exc


def write(path: str | Path, scripted: torch.jit.ScriptModule, doc: dict) -> None:
    """Save ``scripted`` with ``doc`` (+ integrity: the weights' content hash) as the extra file."""
    doc = {**doc, "integrity": {"state_dict_content_hash": content_hash(scripted.state_dict())}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, str(path), _extra_files={EXTRA_FILE: encode_metadata(doc)})


def _load_module(path: Path, *, device: str = "cpu") -> tuple[torch.jit.ScriptModule, bytes]:
    extra = {EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{path}: not a readable TorchScript archive ({first}); the file is damaged or not an export: "
                f"copy it again or re-export it (nh-serve export --format torchscript --out {path.name})"
            ) from None
    return module, extra[EXTRA_FILE]


def _check(path: Path, module: torch.jit.ScriptModule, text: bytes) -> dict:
    doc = parse_metadata(text, path=path, fmt="torchscript")
    want = doc["integrity"].get("state_dict_content_hash")
    if want != content_hash(module.state_dict()):
        raise CheckpointError(
            f"{path}: the weights are damaged (their content hash does not match the metadata); "
            f"copy the file again or re-export it (nh-serve export --format torchscript --out {path.name})"
        )
    missing = [m for m in ("embed_units", "forward_with_embeddings") if not hasattr(module, m)]
    if missing:
        raise CheckpointError(f"{path}: the TorchScript module lacks {', '.join(missing)}; re-export it")
    return doc


def read_metadata(path: Path) -> dict:
    """The checked metadata document of a TorchScript artifact."""
    path = Path(path)
    module, text = _load_module(path)
    return _check(path, module, text)


class TorchScriptRunner:
    """A scripted model: ``embed_units`` and ``forward`` (inputs moved to its device, outputs on CPU)."""

    def __init__(self, module: torch.jit.ScriptModule, *, device: str = "cpu"):
        self.module = module.eval()
        self.device = torch.device(device)

    def embed_units(self, unit_features: Tensor) -> Tensor:
        """``(B, U, n_features)`` -> ``(B, U, D)``."""
        return self.module.embed_units(unit_features.to(self.device)).cpu()

    def forward(self, batch: dict[str, Tensor], unit_embeddings: Tensor) -> Tensor:
        """``batch`` (collate output without ``unit_features``) -> ``(B, U, n_bins)`` log-rate (Hz)."""
        if self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        out = self.module.forward_with_embeddings(unit_embeddings=unit_embeddings.to(self.device), **batch)
        return out.cpu()


def load(path: Path, *, device: str = "cpu") -> tuple[dict, TorchScriptRunner]:
    """Load and check a TorchScript artifact: ``(metadata, runner)``."""
    path = Path(path)
    module, text = _load_module(path, device=device)
    doc = _check(path, module, text)
    return doc, TorchScriptRunner(module, device=device)
