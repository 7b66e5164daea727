"""ONNX export (``torch.onnx.export(dynamo=True)``) and the onnxruntime runner.

Two graphs are exported from the eager model with dynamic batch, unit, token
and event counts (``torch.export`` ``Dim`` s):

* ``forward_with_embeddings`` -> the main graph of the ``.onnx`` file (inputs
  listed in :mod:`export.artifact`, output ``log_rate_hz (B, U, n_bins)``);
* ``embed_units`` (the IDEncoder) -> a second ONNX model, serialised and stored
  base64-encoded in the ``metadata_props`` entry ``nh_serve.embed_units_onnx``
  (onnxruntime runs one graph per session and needs every graph input fed, so
  the two graphs cannot share one ``GraphProto``).

Weights are stored inside the file (``external_data=False``): one file is the
whole artifact. ``integrity`` in the metadata holds the sha256 of the main
graph (``GraphProto`` serialised deterministically) and of the embedded
``embed_units`` model; both are checked on load, so a damaged file is refused
instead of producing wrong rates.

The onnxruntime sessions use ``intra_op_num_threads`` = ``threads`` (default
:func:`nh_serve.inference.backends.default_threads`), one inter-op thread and sequential
execution: the graph is a chain of small ops, latency is what counts.
"""

from __future__ import annotations

import base64
import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from export.artifact import (
    EMBED_INPUT,
    EMBED_KEY,
    EMBED_OUTPUT,
    METADATA_KEY,
    OUTPUT_NAME,
    encode_metadata,
    forward_input_names,
    parse_metadata,
)
from nh_serve.errors import CheckpointError, InputError

# Example sizes for tracing: all different and >= 2, so that torch.export keeps every
# dynamic axis symbolic (size-0/1 axes and axes of equal size would be specialised / merged).
_EX_BATCH, _EX_UNITS, _EX_SPIKES, _EX_BEHAVIOR, _EX_IMAGES = 2, 7, 9, 5, 4


class _Graph(nn.Module):
    """Calls ``model.<method>(**dict(zip(names, inputs)))``: a positional signature for export."""

    def __init__(self, model: nn.Module, method: str, names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.method = method
        self.names = names

    def forward(self, *inputs: Tensor) -> Tensor:
        return getattr(self.model, self.method)(**dict(zip(self.names, inputs)))


def example_inputs(cfg, *, seed: int = 0) -> dict[str, Tensor]:
    """Random ``forward_with_embeddings`` inputs of the tracing sizes (``B=2, U=7``, ...), CPU."""
    g = torch.Generator().manual_seed(seed)
    B, U = _EX_BATCH, _EX_UNITS
    N = 2 * U + _EX_SPIKES
    S = len(cfg.activity_scales)
    x: dict[str, Tensor] = {
        "unit_embeddings": torch.randn(B, U, cfg.dim, generator=g),
        "unit_mask": torch.ones(B, U, dtype=torch.bool),
        "unit_counts": torch.randint(0, 5, (B, U, S), generator=g).float(),
        "history_rate_hz": torch.rand(B, U, generator=g) * 10,
        "ref_rate_hz": torch.rand(B, U, generator=g) * 10,
        "spike_unit_index": torch.randint(0, U, (B, N), generator=g),
        "spike_times": torch.rand(B, N, generator=g) * cfg.context_s,
        "spike_type": torch.randint(0, 3, (B, N), generator=g),
        "spike_mask": torch.ones(B, N, dtype=torch.bool),
    }
    x["unit_mask"][1, -1] = False
    x["spike_mask"][1, -2:] = False
    for prefix, n, width in (
        ("behavior", _EX_BEHAVIOR, cfg.behavior_dim),
        ("image", _EX_IMAGES, cfg.image_dim),
    ):
        if width > 0:
            # images may lie in the forecast window and carry the schedule-marker column
            span = cfg.context_s + (cfg.horizon_s if prefix == "image" else 0.0)
            x[f"{prefix}_times"] = torch.rand(B, n, generator=g) * span
            x[f"{prefix}_values"] = torch.randn(B, n, width + (prefix == "image"), generator=g)
            x[f"{prefix}_mask"] = torch.ones(B, n, dtype=torch.bool)
            x[f"{prefix}_mask"][1, -1] = False
    return {k: x[k] for k in forward_input_names(cfg)}


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
    feats = torch.randn(_EX_BATCH, _EX_UNITS, cfg.n_features, generator=torch.Generator().manual_seed(1))
    embed = _export(
        _Graph(model, "embed_units", (EMBED_INPUT,)).eval(), (feats,), [EMBED_INPUT], EMBED_OUTPUT, opset
    )
    return _strip(fwd), _strip(embed)


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def integrity(fwd, embed_bytes: bytes) -> dict:
    """Hashes that :func:`load` re-checks: main graph, embedded ``embed_units`` model, opset."""
    opset = max((o.version for o in fwd.opset_import if o.domain in ("", "ai.onnx")), default=None)
    return {
        "graph_sha256": _sha256(fwd.graph.SerializeToString(deterministic=True)),
        "embed_units_sha256": _sha256(embed_bytes),
        "opset": opset,
    }


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


def _parse(path: Path):
    """``(model proto, checked metadata, embed_units bytes)``; :class:`CheckpointError` if damaged."""
    try:
        import onnx
    except ImportError:
        raise InputError(
            "reading ONNX artifacts needs the onnx package: pip install 'nh-serve[onnx]'"
        ) from None
    redo = f"copy it again or re-export it (nh-serve export --format onnx --out {path.name})"
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc}); {redo}"
        ) from None
    props = {p.key: p.value for p in model.metadata_props}
    doc = parse_metadata(props.get(METADATA_KEY), path=path, fmt="onnx")
    try:
        embed_bytes = base64.b64decode(props.get(EMBED_KEY, ""), validate=True)
    except ValueError:
        embed_bytes = b""
    want = doc["integrity"]
    have = integrity(model, embed_bytes)
    for key in ("graph_sha256", "embed_units_sha256"):
        if want.get(key) != have[key]:
            what = "main graph (forward_with_embeddings)" if key == "graph_sha256" else "embed_units graph"
            raise CheckpointError(
                f"{path}: the {what} is damaged (its hash does not match the metadata); {redo}"
            )
    return model, doc, embed_bytes


def read_metadata(path: Path) -> dict:
    """The checked metadata document of an ONNX artifact (graphs are hash-checked, no session built)."""
    return _parse(Path(path))[1]


def providers_for(device: str) -> list[str]:
    """onnxruntime execution providers for ``device`` (``cpu`` or ``cuda``)."""
    import onnxruntime as ort

    if str(device).startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError(
                "device 'cuda' with the onnxruntime backend needs onnxruntime-gpu (this onnxruntime has "
                f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu INSTEAD of onnxruntime "
                "(never both), or use device 'cpu'"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(threads: int):
    """onnxruntime options for low-latency single-request inference on ``threads`` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only
    return so


def _as_numpy(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu").contiguous().numpy()


class OnnxRunner:
    """onnxruntime sessions of an artifact: ``embed_units`` and ``forward`` on CPU tensors."""

    def __init__(self, path: Path, embed_bytes: bytes, input_names: list[str], *, threads: int, device: str):
        import onnxruntime as ort

        so = session_options(threads)
        providers = providers_for(device)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
            self.embed_session = ort.InferenceSession(embed_bytes, so, providers=providers)
        except Exception as exc:
            raise CheckpointError(
                f"{path}: onnxruntime cannot load the graph ({type(exc).__name__}: {exc}); re-export it with this "
                "nh-serve (nh-serve export --format onnx) or upgrade onnxruntime"
            ) from None
        have = [i.name for i in self.session.get_inputs()]
        if have != list(input_names):
            raise CheckpointError(
                f"{path}: the ONNX graph takes inputs {have} but its metadata lists {input_names}; re-export it"
            )
        self.input_names = list(input_names)
        self.threads = int(threads)
        self.providers = self.session.get_providers()

    def embed_units(self, unit_features: Tensor) -> Tensor:
        """``(B, U, n_features)`` z-scored features -> ``(B, U, D)`` unit embeddings."""
        out = self.embed_session.run([EMBED_OUTPUT], {EMBED_INPUT: _as_numpy(unit_features.float())})[0]
        return torch.from_numpy(out)

    def forward(self, batch: dict[str, Tensor], unit_embeddings: Tensor) -> Tensor:
        """``batch`` (collate output without ``unit_features``) -> ``(B, U, n_bins)`` log-rate (Hz)."""
        feed = {"unit_embeddings": _as_numpy(unit_embeddings)}
        for name in self.input_names[1:]:
            if name not in batch:
                raise InputError(f"the exported model needs input {name!r}, which the batch lacks")
            feed[name] = _as_numpy(batch[name])
        return torch.from_numpy(self.session.run([OUTPUT_NAME], feed)[0])


def load(path: Path, *, threads: int | None = None, device: str = "cpu") -> tuple[dict, OnnxRunner]:
    """Check an ONNX artifact and build its onnxruntime sessions: ``(metadata, runner)``."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise InputError(
            "the onnxruntime backend needs onnxruntime: pip install 'nh-serve[onnx]' (onnxruntime-gpu on CUDA machines)"
        ) from None
    from nh_serve.inference.backends import default_threads

    path = Path(path)
    _, doc, embed_bytes = _parse(path)
    names = doc["graphs"]["forward_with_embeddings"]["inputs"]
    runner = OnnxRunner(path, embed_bytes, names, threads=threads or default_threads(), device=device)
    return doc, runner
