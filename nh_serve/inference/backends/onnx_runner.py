"""onnxruntime runner of ONNX artifacts: check a ``.onnx`` export and run its two graphs.

The artifact (written by ``export.onnx``) holds ``forward_with_embeddings`` as its
main graph and the ``embed_units`` graph base64-encoded in the ``metadata_props``
entry ``nh_serve.embed_units_onnx`` (onnxruntime runs one graph per session and
needs every graph input fed, so the two graphs cannot share one ``GraphProto``).
``integrity`` in the metadata holds the sha256 of the main graph (``GraphProto``
serialised deterministically) and of the embedded ``embed_units`` model; both are
checked on load, so a damaged file is refused instead of producing wrong rates.

The onnxruntime sessions use ``intra_op_num_threads`` = ``threads`` (default
:func:`~nh_serve.inference.backends.base.default_threads`), one inter-op thread and
sequential execution: the graph is a chain of small ops, latency is what counts.
onnx and onnxruntime are optional dependencies (``nh-serve[onnx]``), imported only here,
inside the functions that need them.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nh_serve.errors import CheckpointError, InputError
from nh_serve.inference.artifact import (
    EMBED_INPUT,
    EMBED_KEY,
    EMBED_OUTPUT,
    METADATA_KEY,
    OUTPUT_NAME,
    parse_metadata,
)
from nh_serve.inference.backends.base import default_threads


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
    path = Path(path)
    _, doc, embed_bytes = _parse(path)
    names = doc["graphs"]["forward_with_embeddings"]["inputs"]
    runner = OnnxRunner(path, embed_bytes, names, threads=threads or default_threads(), device=device)
    return doc, runner
