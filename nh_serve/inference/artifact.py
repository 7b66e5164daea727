"""The exported-artifact file format: layout, metadata document and format detection.

Artifacts are written by ``nh-serve export`` (the ``export`` package) and read by
the inference backends (:mod:`nh_serve.inference.backends.artifacts` loads them,
with the runners of :mod:`~nh_serve.inference.backends.onnx_runner` and
:mod:`~nh_serve.inference.backends.torchscript_runner`).

An artifact is ONE file that needs nothing else to serve predictions:

``.onnx`` (ONNX)
    The main graph is ``forward_with_embeddings`` (the graph the Predictor runs
    for every window). The ``embed_units`` graph (the IDEncoder, run once per
    registered recording) is a second, small ONNX model stored base64-encoded in
    the ``metadata_props`` entry ``nh_serve.embed_units_onnx``. The JSON metadata
    document is the ``metadata_props`` entry ``nh_serve``.
``.pt`` / ``.ts`` / ``.torchscript`` (TorchScript)
    ``torch.jit.script`` of the whole model, whose exported methods
    ``embed_units`` and ``forward_with_embeddings`` are the two graphs. The JSON
    metadata document is the extra file ``nh_serve.json``.

The metadata document (:func:`build_metadata`)::

    {
      "artifact_format_version": 1,
      "format": "onnx" | "torchscript",
      "graphs": {"forward_with_embeddings": {"inputs": [...], "outputs": ["log_rate_hz"]},
                 "embed_units": {"inputs": ["unit_features"], "outputs": ["unit_embeddings"]}},
      "config": {...},                 # ModelConfig.to_dict()
      "feature_norm": {"mean": [...], "std": [...]},
      "source": {"content_hash": ..., "short_hash": ..., "file": name or null,
                 "training": {...}, "metrics": {...}, "provenance": {...}},
      "exported": "<UTC ISO 8601>",
      "versions": {"nh_serve": ..., "torch": ..., "onnx": ..., "onnxruntime": ..., "python": ...},
      "integrity": {...},              # format specific, see the runners of nh_serve.inference.backends
      "parity": {...},                 # the parity check the export passed (export.parity)
      "metadata_hash": "<sha256 of the canonical JSON of everything else>"
    }

Inputs of the graphs (names = keyword arguments of
:meth:`~nh_serve.core.model.NeuroHorizon.forward_with_embeddings`): the unit
inputs ``unit_embeddings (B, U, D)``, ``unit_mask``, ``unit_counts``,
``history_rate_hz``, ``ref_rate_hz``, the spike-token inputs ``(B, N)`` of
:data:`~nh_serve.data.windows.SPIKE_KEYS`, and ONLY for multimodal configs the
behaviour inputs (``behavior_dim > 0``) and/or image inputs (``image_dim > 0``),
which are then required (the Predictor's collate always provides them:
behaviour padded to at least one masked sample; images always hold at least the
schedule-marker token that ``tokenize`` appends). ``image_values`` is
``(B, Ni, image_dim + 1)``, the last column marking that token (see
:mod:`nh_serve.data.windows`); build image inputs with ``tokenize``, not by hand.
Format version 2 added that column; version-1 artifacts are refused. ``B``, ``U``, ``N`` and the event counts are
dynamic. The output is ``log_rate_hz (B, U, n_bins)``.

Every problem with an artifact file (missing, truncated, not an nh-serve export,
metadata damaged, format version of another nh-serve, inputs that do not match
this code) raises :class:`~nh_serve.errors.CheckpointError`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nh_serve.core.config import ModelConfig
from nh_serve.data.features import FeatureNorm
from nh_serve.data.windows import BEHAVIOR_KEYS, IMAGE_KEYS, SPIKE_KEYS
from nh_serve.errors import CheckpointError, InputError
from nh_serve.util import package_version

ARTIFACT_FORMAT_VERSION = 2  # 2: image inputs carry the schedule-marker column
"""Version of the artifact layout and metadata written (and the only one read) by this nh-serve."""

FORMATS = ("onnx", "torchscript")
"""Export formats."""

SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".ts", ".torchscript")}
"""File name suffixes of each format (the first is the default)."""

METADATA_KEY = "nh_serve"
"""ONNX ``metadata_props`` key of the JSON metadata document."""

EMBED_KEY = "nh_serve.embed_units_onnx"
"""ONNX ``metadata_props`` key of the base64-encoded ``embed_units`` ONNX model."""

EXTRA_FILE = "nh_serve.json"
"""TorchScript ``_extra_files`` entry holding the JSON metadata document."""

UNIT_INPUTS = ("unit_embeddings", "unit_mask", "unit_counts", "history_rate_hz", "ref_rate_hz")
OUTPUT_NAME = "log_rate_hz"
EMBED_INPUT = "unit_features"
EMBED_OUTPUT = "unit_embeddings"


def forward_input_names(cfg: ModelConfig) -> tuple[str, ...]:
    """Input names of the ``forward_with_embeddings`` graph for ``cfg`` (the variant the config has)."""
    names = UNIT_INPUTS + SPIKE_KEYS
    if cfg.behavior_dim > 0:
        names += BEHAVIOR_KEYS
    if cfg.image_dim > 0:
        names += IMAGE_KEYS
    if cfg.history_taus:
        names += ("history_rates",)
    if cfg.readout_dim:
        names += ("unit_readout",)
    if cfg.pop_context_bins:
        names += ("unit_bins",)
    return names


def check_format(fmt: Any) -> str:
    """``fmt`` if it is a known export format, else :class:`InputError`."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return str(fmt)


def artifact_format(path: str | os.PathLike) -> str | None:
    """The export format of the file at ``path`` (``"onnx"``, ``"torchscript"``) or None if it is not an artifact.

    Decided by the suffix (``.onnx``; ``.ts`` / ``.torchscript``) and, for ``.pt``, by the
    content: a TorchScript archive is a zip file with a ``code/`` folder, while a
    ``torch.save`` pickle is not an artifact (None, so that the checkpoint loader
    explains it). A missing ``.pt`` file counts as TorchScript (its loader reports it missing).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in SUFFIXES["onnx"]:
        return "onnx"
    if suffix in (".ts", ".torchscript"):
        return "torchscript"
    if suffix == ".pt":
        if not p.is_file():
            return "torchscript"
        try:
            with open(p, "rb") as f:
                magic = f.read(4)
        except OSError:
            return "torchscript"
        if magic != b"PK\x03\x04":
            return None
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "torchscript"  # a damaged zip: the TorchScript loader reports it
        return "torchscript" if any("/code/" in n or n.endswith("constants.pkl") for n in names) else None
    return None


# ----------------------------------------------------------------------------- metadata


def _canonical_json(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def metadata_hash(doc: dict) -> str:
    """sha256 hex of the canonical JSON of ``doc`` without its ``metadata_hash`` entry."""
    body = {k: v for k, v in doc.items() if k != "metadata_hash"}
    return hashlib.sha256(_canonical_json(body).encode("utf-8")).hexdigest()


def encode_metadata(doc: dict) -> str:
    """The JSON text stored in an artifact, with ``metadata_hash`` filled in."""
    doc = dict(doc)
    doc["metadata_hash"] = metadata_hash(doc)
    return _canonical_json(doc)


def versions() -> dict[str, str]:
    """Versions of the software that matters for an export (``not installed`` when absent)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for key, dist in (
        ("nh_serve", "nh-serve"),
        ("onnx", "onnx"),
        ("onnxscript", "onnxscript"),
        ("onnxruntime", "onnxruntime"),
        ("onnxruntime_gpu", "onnxruntime-gpu"),
    ):
        v = package_version(dist, None)
        if v is not None or key != "onnxruntime_gpu":
            out[key] = v or "not installed"
    return out


def build_metadata(
    *,
    fmt: str,
    cfg: ModelConfig,
    feature_norm: FeatureNorm,
    source_hash: str,
    source_file: str | None = None,
    training: dict | None = None,
    metrics: dict | None = None,
    provenance: dict | None = None,
) -> dict:
    """The metadata document of a new artifact (without ``integrity``, ``parity`` and ``metadata_hash``)."""
    return {
        "artifact_format_version": ARTIFACT_FORMAT_VERSION,
        "format": check_format(fmt),
        "graphs": {
            "forward_with_embeddings": {"inputs": list(forward_input_names(cfg)), "outputs": [OUTPUT_NAME]},
            "embed_units": {"inputs": [EMBED_INPUT], "outputs": [EMBED_OUTPUT]},
        },
        "config": cfg.to_dict(),
        "feature_norm": feature_norm.to_dict(),
        "source": {
            "content_hash": source_hash,
            "short_hash": source_hash[:12],
            "file": source_file,
            "training": training or {},
            "metrics": metrics or {},
            "provenance": provenance or {},
        },
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }


def parse_metadata(text: str | bytes | None, *, path: Path, fmt: str) -> dict:
    """Parse and check an artifact's metadata document; :class:`CheckpointError` if unusable.

    Checks: present, JSON, hash intact, ``artifact_format_version`` equal to
    :data:`ARTIFACT_FORMAT_VERSION`, the format, a config this code accepts, a usable
    feature normalisation, and graph inputs equal to what this code feeds.
    """
    redo = f"re-export it from its checkpoint: nh-serve export --checkpoint CKPT --format {fmt} --out {path.name}"
    if not text:
        raise CheckpointError(
            f"{path}: this {fmt} file has no nh-serve metadata, so it was not written by `nh-serve export` "
            f"(or its metadata was stripped); {redo}"
        )
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path}: the nh-serve metadata is not valid JSON ({exc}); the file is damaged; {redo}"
        ) from None
    if not isinstance(doc, dict):
        raise CheckpointError(
            f"{path}: the nh-serve metadata is not a JSON object; the file is damaged; {redo}"
        )
    version = doc.get("artifact_format_version")
    if version != ARTIFACT_FORMAT_VERSION:
        newer = isinstance(version, int) and version > ARTIFACT_FORMAT_VERSION
        raise CheckpointError(
            f"{path}: artifact format version {version!r} but this nh-serve reads version {ARTIFACT_FORMAT_VERSION} "
            f"(the file was exported by {'a newer' if newer else 'another'} nh-serve); "
            + ("upgrade nh-serve or " if newer else "")
            + redo
        )
    if doc.get("metadata_hash") != metadata_hash(doc):
        raise CheckpointError(
            f"{path}: the nh-serve metadata was changed after export (its hash does not match); {redo}"
        )
    if doc.get("format") != fmt:
        raise CheckpointError(
            f"{path}: the metadata says format {doc.get('format')!r} but the file is {fmt}; rename it or {redo}"
        )
    for key in ("graphs", "config", "feature_norm", "source", "integrity"):
        if not isinstance(doc.get(key), dict):
            raise CheckpointError(f"{path}: the nh-serve metadata lacks {key!r}; {redo}")
    try:
        cfg = ModelConfig.from_dict(doc["config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: its model config does not fit this nh-serve version ({exc}); {redo}"
        ) from None
    try:
        norm = FeatureNorm.from_dict(doc["feature_norm"])
    except (InputError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: bad feature normalisation in the metadata ({exc}); {redo}") from None
    if norm.mean.shape[0] != cfg.n_features:
        raise CheckpointError(
            f"{path}: feature normalisation has {norm.mean.shape[0]} entries but the model takes {cfg.n_features}; {redo}"
        )
    want = list(forward_input_names(cfg))
    have = doc["graphs"].get("forward_with_embeddings", {}).get("inputs")
    if have != want:
        raise CheckpointError(
            f"{path}: the exported graph takes inputs {have} but this nh-serve feeds {want}; {redo}"
        )
    source = doc["source"]
    if not isinstance(source.get("content_hash"), str) or len(source["content_hash"]) < 12:
        raise CheckpointError(f"{path}: the metadata lacks the source checkpoint hash; {redo}")
    return doc


# ----------------------------------------------------------------------------- loaded artifacts


@dataclass(eq=False)
class Artifact:
    """A loaded artifact: its metadata, model config, feature normalisation and a runner.

    ``runner`` has ``embed_units(unit_features (B, U, F)) -> (B, U, D)`` and
    ``forward(batch, unit_embeddings (B, U, D)) -> (B, U, n_bins)`` log-rate (Hz),
    both on CPU tensors. The checkpoint-like attributes (``short_hash``,
    ``content_hash``, ``training``, ``metrics``, ``provenance``) describe the
    SOURCE checkpoint, so a Predictor serving the artifact reports the same
    model hash as one serving the checkpoint.
    """

    path: Path
    format: str
    metadata: dict
    cfg: ModelConfig
    feature_norm: FeatureNorm
    runner: Any = field(repr=False)

    @property
    def content_hash(self) -> str:
        return self.metadata["source"]["content_hash"]

    @property
    def short_hash(self) -> str:
        return self.content_hash[:12]

    @property
    def training(self) -> dict:
        return self.metadata["source"].get("training", {})

    @property
    def metrics(self) -> dict:
        return self.metadata["source"].get("metrics", {})

    @property
    def provenance(self) -> dict:
        return {
            **self.metadata["source"].get("provenance", {}),
            "artifact": {
                "path": str(self.path),
                "format": self.format,
                "exported": self.metadata.get("exported"),
                "versions": self.metadata.get("versions"),
                "parity": self.metadata.get("parity"),
            },
        }
