"""TorchScript export (``torch.jit.script``) of a model into an artifact file.

The whole :class:`~nh_serve.core.model.NeuroHorizon` (eval mode) is scripted; the
methods marked ``@torch.jit.export`` in the model (``embed_units``,
``forward_with_embeddings``, ...) stay callable on the loaded module, and the
optional multimodal inputs stay ``Optional[Tensor]`` arguments (passed when the
config has them). Scripting, not tracing: tracing would freeze the token and
unit counts of the example.

The metadata document is the extra file ``nh_serve.json``. ``integrity`` records
that the module's state dict has the source checkpoint's content hash
(:func:`nh_serve.inference.checkpoint.content_hash`); the runner
(:mod:`nh_serve.inference.backends.torchscript_runner`) recomputes it on load.

TorchScript is deprecated upstream in favour of ``torch.export``; it still
runs in this torch and, on 2 CPU cores, it is one of the fastest backends
(see ``docs/benchmarks.md``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from nh_serve.errors import CheckpointError
from nh_serve.inference.artifact import EXTRA_FILE, encode_metadata
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
