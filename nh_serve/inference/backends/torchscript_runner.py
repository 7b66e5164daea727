"""TorchScript runner of TorchScript artifacts: check a ``.pt`` / ``.ts`` export and run it.

The artifact (written by ``export.torchscript``) is ``torch.jit.script`` of the
whole model; its exported methods ``embed_units`` and ``forward_with_embeddings``
are the two graphs. ``integrity`` records that the module's state dict has the
source checkpoint's content hash (:func:`nh_serve.inference.checkpoint.content_hash`);
the loader recomputes it, so damaged or swapped weights are refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from nh_serve.errors import CheckpointError
from nh_serve.inference.artifact import EXTRA_FILE, parse_metadata
from nh_serve.inference.checkpoint import content_hash


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
