"""ONNX export (``torch.onnx.export(dynamo=True)``) of a model into an artifact file.

Two graphs are exported from the eager model with dynamic batch, unit, token
and event counts (``torch.export`` ``Dim`` s):

* ``forward_with_embeddings`` -> the main graph of the ``.onnx`` file (inputs
  listed in :mod:`nh_serve.inference.artifact`, output ``log_rate_hz (B, U, n_bins)``);
* ``embed_units`` (the IDEncoder) -> a second ONNX model, serialised and stored
  base64-encoded in the ``metadata_props`` entry ``nh_serve.embed_units_onnx``
  (onnxruntime runs one graph per session and needs every graph input fed, so
  the two graphs cannot share one ``GraphProto``).

Weights are stored inside the file (``external_data=False``): one file is the
whole artifact. ``integrity`` in the metadata holds the hashes the runner
(:mod:`nh_serve.inference.backends.onnx_runner`) checks on load. The graphs are
traced on :func:`nh_serve.inference.backends.parity.example_inputs`.
"""

from __future__ import annotations

import base64
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nh_serve.errors import CheckpointError
from nh_serve.inference.artifact import (
    EMBED_INPUT,
    EMBED_KEY,
    EMBED_OUTPUT,
    METADATA_KEY,
    OUTPUT_NAME,
    encode_metadata,
    forward_input_names,
)
from nh_serve.inference.backends.onnx_runner import integrity
from nh_serve.inference.backends.parity import EX_BATCH, EX_UNITS, example_inputs


class _Graph(nn.Module):
    """Calls ``model.<method>(**dict(zip(names, inputs)))``: a positional signature for export."""

    def __init__(self, model: nn.Module, method: str, names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.method = method
        self.names = names

    def forward(self, *inputs: Tensor) -> Tensor:
        return getattr(self.model, self.method)(**dict(zip(self.names, inputs)))


def _dims():
    from torch.export import Dim

    return {
        "batch": Dim("batch", min=1, max=1 << 16),
        "units": Dim("units", min=1, max=1 << 20),
        "tokens": Dim("tokens", min=2, max=1 << 28),
        "behavior_events": Dim("behavior_events", min=1, max=1 << 24),
        "image_events": Dim("image_events", min=1, max=1 << 24),
    }


def _axis_names(name: str) -> tuple[str, str]:
    if name.startswith("spike_"):
        return "batch", "tokens"
    if name.startswith("behavior_"):
        return "batch", "behavior_events"
    if name.startswith("image_"):
        return "batch", "image_events"
    return "batch", "units"


def _export(module: nn.Module, inputs: tuple[Tensor, ...], names: list[str], output: str, opset: int | None):
    dims = _dims()
    dynamic = tuple({0: dims[_axis_names(n)[0]], 1: dims[_axis_names(n)[1]]} for n in names)
    kwargs: dict[str, Any] = {} if opset is None else {"opset_version": int(opset)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # axis-renaming notes and deprecations from the exporter
        try:
            program = torch.onnx.export(
                module,
                inputs,
                input_names=names,
                output_names=[output],
                dynamic_shapes=(dynamic,),
                dynamo=True,
                external_data=False,
                optimize=True,
                verbose=False,
                **kwargs,
            )
        except Exception as exc:
            raise CheckpointError(
                f"ONNX export failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "export to TorchScript instead (--format torchscript) and report the model config"
            ) from exc
    return program.model_proto


def _strip(proto):
    """Drop per-node debugging metadata (source stack traces) that the exporter attaches: a third of the file."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    return proto


def export_graphs(model: nn.Module, *, opset: int | None = None):
    """Export ``forward_with_embeddings`` and ``embed_units`` of ``model`` (eval mode) as two ONNX models."""
    cfg = model.cfg
    model = model.eval()
    ex = example_inputs(cfg)
    names = list(forward_input_names(cfg))
    fwd = _export(
        _Graph(model, "forward_with_embeddings", tuple(names)).eval(),
        tuple(ex[n] for n in names),
        names,
        OUTPUT_NAME,
        opset,
    )
    feats = torch.randn(EX_BATCH, EX_UNITS, cfg.n_features, generator=torch.Generator().manual_seed(1))
    embed = _export(
        _Graph(model, "embed_units", (EMBED_INPUT,)).eval(), (feats,), [EMBED_INPUT], EMBED_OUTPUT, opset
    )
    return _strip(fwd), _strip(embed)


def write(path: str | Path, fwd, embed, doc: dict) -> None:
    """Write the artifact: ``fwd`` with ``doc`` (+ integrity) and the embedded ``embed`` model."""
    import onnx

    embed_bytes = embed.SerializeToString(deterministic=True)
    doc = {**doc, "integrity": integrity(fwd, embed_bytes)}
    model = onnx.ModelProto()
    model.CopyFrom(fwd)
    del model.metadata_props[:]
    onnx.helper.set_model_props(
        model, {METADATA_KEY: encode_metadata(doc), EMBED_KEY: base64.b64encode(embed_bytes).decode("ascii")}
    )
    onnx.save_model(model, str(path))
