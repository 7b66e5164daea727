"""Self-describing checkpoints: one ``.safetensors`` file with weights and metadata.

A checkpoint is a plain safetensors file (readable by ``safetensors.torch.load_file``
and any other safetensors reader). Its header (checked by :mod:`nh_serve.inference.checkpoint_header`)
holds in its ``__metadata__`` map one key,
``"nh_serve"``, whose value is a JSON document::

    {
      "format_version": 1,
      "content_hash":  "<sha256 hex of the weights, see content_hash()>",
      "metadata_hash": "<sha256 hex of this document without metadata_hash>",
      "config":       {...},   # model configuration
      "feature_norm": {"mean": [...], "std": [...]},  # one entry per reference feature
      "training":     {...},   # training data summary
      "metrics":      {...},   # evaluation metrics
      "provenance":   {...}    # nh_serve/torch/safetensors/python versions, created (UTC ISO 8601), command
    }

Loading never unpickles anything: the header is parsed and checked here (8-byte
little-endian header length, then JSON) before the tensor bytes are handed to
``safetensors``, and every problem with a file (missing, empty, truncated, not a
safetensors file, a pickled ``torch.save`` file, corrupted weights or metadata, a
format version from a newer nh-serve) raises :class:`CheckpointError` with a
message saying what is wrong and what to do.

This module knows nothing about the model class: it deals in ``dict[str,
torch.Tensor]`` state dicts and JSON metadata dicts. Building a model from a
checkpoint (and checking its weights against the model) is
:mod:`nh_serve.inference.model_io`.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from nh_serve.errors import CheckpointError, InputError
from nh_serve.inference.checkpoint_header import (
    CODE_TO_DTYPE,
    DTYPE_TO_CODE,
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    METADATA_KEY,
    as_dict,
    canonical_json,
    dtype_name,
    feature_norm_problem,
    metadata_hash,
    parse_header,
    to_json,
    utf8_ok,
)
from nh_serve.util import atomic_write, package_version

_HASH_DOMAIN = b"nh-serve/weights/v1\n"
_SHORT_HASH_LEN = 12

# ----------------------------------------------------------------------------- public API


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded (or just saved) checkpoint.

    ``state_dict`` maps tensor names to tensors (sorted by name); the metadata
    fields are plain JSON-compatible dicts. ``content_hash`` is the sha256 hex
    digest of the weights (:func:`content_hash`), ``path`` the file it was read
    from or written to.
    """

    state_dict: dict[str, torch.Tensor] = field(repr=False)
    config: dict
    feature_norm: dict
    training: dict
    metrics: dict
    provenance: dict
    format_version: int
    content_hash: str
    path: Path | None = None

    @property
    def short_hash(self) -> str:
        """First 12 hex characters of :attr:`content_hash`, for display."""
        return short_hash(self.content_hash)

    @property
    def n_elements(self) -> int:
        """Total number of values over all tensors (parameters and buffers)."""
        return sum(int(t.numel()) for t in self.state_dict.values())

    def metadata(self) -> dict:
        """The same dict :func:`read_metadata` returns for this checkpoint's file (a deep copy)."""
        tensors = {
            name: (DTYPE_TO_CODE[t.dtype], tuple(int(d) for d in t.shape))
            for name, t in self.state_dict.items()
        }
        return _summary(self._doc(), tensors)

    def _doc(self) -> dict:
        return {
            "format_version": self.format_version,
            "content_hash": self.content_hash,
            "config": self.config,
            "feature_norm": self.feature_norm,
            "training": self.training,
            "metrics": self.metrics,
            "provenance": self.provenance,
        }

    def __repr__(self) -> str:
        where = f"{str(self.path)!r}" if self.path is not None else "None"
        return (
            f"Checkpoint(path={where}, hash={self.short_hash}, tensors={len(self.state_dict)}, "
            f"elements={self.n_elements}, format_version={self.format_version})"
        )


def save_checkpoint(
    path: str | os.PathLike,
    *,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping | Any,
    feature_norm: Mapping | Any,
    training: Mapping | None = None,
    metrics: Mapping | None = None,
    provenance: Mapping | None = None,
) -> Checkpoint:
    """Write weights and metadata to ``path`` as one safetensors file, atomically.

    ``state_dict``: tensor name -> tensor (any device; stored as contiguous CPU
    copies, tied/shared tensors stored once per name). ``config`` and
    ``feature_norm`` are dicts (or objects with ``to_dict()`` such as ``ModelConfig``
    and ``FeatureNorm``, or dataclasses);
    ``feature_norm`` is ``{"mean": [...], "std": [...]}`` with one finite entry
    per reference feature and ``std > 0``. ``training``, ``metrics`` and
    ``provenance`` are optional dicts. All metadata must be JSON-compatible
    (str keys; str, bool, int, finite float, None, lists, dicts; numpy/torch
    scalars and arrays are converted to numbers and lists). NaN or infinity are
    refused: store ``None`` for an undefined value.

    ``provenance`` is merged over defaults (``nh_serve_version``,
    ``torch_version``, ``safetensors_version``, ``python_version``, ``created``
    as UTC ISO 8601, ``command``); keys you pass win.

    The file is written to a temporary file in the same directory, fsynced and
    renamed over ``path``, so an interrupted save never leaves a partial file at
    ``path``. Missing parent directories are created. Returns the
    :class:`Checkpoint` exactly as :func:`load_checkpoint` will read it back.
    """
    dest = _as_path(path, "path")
    if dest.is_dir():
        raise InputError(
            f"cannot save checkpoint to {dest}: it is a directory; pass a file path such as {dest / 'model.safetensors'}"
        )
    tensors = _prepare_tensors(state_dict)
    norm = to_json(as_dict(feature_norm, "feature_norm"), "feature_norm")
    problem = feature_norm_problem(norm)
    if problem is not None:
        raise InputError(f"feature_norm: {problem}")
    doc = {
        "format_version": FORMAT_VERSION,
        "content_hash": _hash_tensors(tensors),
        "config": to_json(as_dict(config, "config"), "config"),
        "feature_norm": norm,
        "training": to_json(as_dict(training, "training"), "training"),
        "metrics": to_json(as_dict(metrics, "metrics"), "metrics"),
        "provenance": {**_default_provenance(), **to_json(as_dict(provenance, "provenance"), "provenance")},
    }
    doc["metadata_hash"] = metadata_hash(doc)
    blob = safetensors.torch.save(tensors, metadata={METADATA_KEY: canonical_json(doc)})
    try:
        atomic_write(dest, blob, durable=True, make_parents=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot write checkpoint {dest}: {exc.strerror or exc}; check that the directory is writable and "
            "has free space (nothing was written)"
        ) from exc
    loaded = safetensors.torch.load(
        blob
    )  # exactly what load_checkpoint returns, detached from the caller's tensors
    return _make_checkpoint(doc, loaded, dest)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Checks the file layout, the metadata (format version, required fields,
    metadata hash) and the weights' content hash, then moves the tensors to
    ``map_location``. Raises :class:`CheckpointError` saying what is wrong with
    the file and what to do; nothing in the file is ever unpickled.
    """
    src = _as_path(path, "path")
    device = _as_device(map_location)
    with _open_checkpoint(src) as f:
        data = _read(f, -1, src)
    header = parse_header(data, len(data), src)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # the header was validated above; this is a last line of defence
        raise CheckpointError(
            f"checkpoint {src}: the tensor data cannot be read ({exc}); the file is damaged, copy or export it again"
        ) from exc
    del data
    actual = _hash_tensors(tensors)
    expected = header.doc["content_hash"]
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {src}: the weights are corrupt: their content hash is {short_hash(actual)} but the file "
            f"records {short_hash(expected)}, so tensor bytes or names changed after the file was written; "
            "copy the file again from a good source or re-export it"
        )
    if device.type != "cpu":
        try:
            tensors = {k: v.to(device) for k, v in tensors.items()}
        except Exception as exc:
            raise InputError(
                f"cannot move checkpoint tensors to map_location={str(device)!r} ({exc}); pass map_location='cpu' or a device this machine has"
            ) from exc
    return _make_checkpoint(header.doc, tensors, src)


def read_metadata(path: str | os.PathLike) -> dict:
    """Read a checkpoint's metadata from its header, without reading any tensor bytes.

    Returns a new dict with ``format_version``, ``content_hash``, ``short_hash``,
    ``config``, ``feature_norm``, ``training``, ``metrics``, ``provenance``,
    ``tensors`` (name -> ``{"dtype": "float32", "shape": [...]}``, sorted by
    name) and ``n_elements`` (total values over all tensors).

    The header is fully validated (layout, metadata hash, format version) and the
    file size must match what the header describes, so a truncated file is
    reported; but the tensor bytes are not read, so corrupted weights are only
    detected by :func:`load_checkpoint`.
    """
    src = _as_path(path, "path")
    with _open_checkpoint(src) as f:
        size = os.fstat(f.fileno()).st_size
        head = _read(f, 9, src)  # length field + first header byte, enough to tell what the file is
        if len(head) == 9 and head[8:9] == b"{":
            n = int.from_bytes(head[:8], "little")
            if 2 <= n <= MAX_HEADER_BYTES and n + 8 <= size:
                head += _read(f, n - 1, src)
    header = parse_header(head, size, src)
    return _summary(header.doc, header.tensors)


def content_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex digest of a state dict's tensor names, dtypes, shapes and bytes.

    Independent of the dict's order and of devices/strides: tensors are taken in
    sorted name order and, for each, the hash is fed the 8-byte little-endian
    length and UTF-8 bytes of the compact JSON ``[name, safetensors_dtype_code,
    shape]`` (e.g. ``["enc.w","F32",[64,32]]``), then the 8-byte little-endian
    length and the raw little-endian bytes of the contiguous tensor. The digest
    starts from the prefix ``b"nh-serve/weights/v1\\n"``.
    """
    return _hash_tensors(_prepare_tensors(state_dict))


def short_hash(content_hash: str) -> str:
    """First 12 hex characters of a content hash, for display (logs, ``GET /model``)."""
    return str(content_hash)[:_SHORT_HASH_LEN]


# ----------------------------------------------------------------------------- helpers


def _as_path(path: Any, name: str) -> Path:
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise InputError(f"{name} must be a file path (str or pathlib.Path), got {path!r}")
    return Path(path)


def _as_device(map_location: Any) -> torch.device:
    try:
        return torch.device(map_location)
    except Exception as exc:
        raise InputError(
            f"map_location={map_location!r} is not a torch device ({exc}); pass 'cpu', 'cuda', 'cuda:0', ..."
        ) from exc


@contextlib.contextmanager
def _open_checkpoint(path: Path):
    """Open ``path`` for binary reading, turning OS errors into CheckpointError."""
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.safetensors"))[:5]
        hint = f" (it contains {', '.join(found)})" if found else ""
        raise CheckpointError(
            f"checkpoint {path}: is a directory{hint}; pass the path of the .safetensors checkpoint file"
        )
    try:
        f = open(path, "rb")  # closed in the finally below
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path}: no such file; check the path") from exc
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {path}: cannot open it ({exc.strerror or exc}); check the path and its permissions"
        ) from exc
    try:
        yield f
    finally:
        f.close()


def _read(f, n: int, path: Path) -> bytes:
    try:
        return f.read(n)
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {path}: cannot read it ({exc.strerror or exc}); check the disk or copy the file again"
        ) from exc


def _prepare_tensors(state_dict: Any) -> dict[str, torch.Tensor]:
    """Validate a state dict; return detached, contiguous CPU tensors that share no memory."""
    if not isinstance(state_dict, Mapping):
        raise InputError(
            f"state_dict must be a dict of name -> torch.Tensor (e.g. model.state_dict()), got {type(state_dict).__name__}"
        )
    if not state_dict:
        raise InputError("state_dict is empty; pass the model's weights, e.g. model.state_dict()")
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if not isinstance(name, str) or not name or not utf8_ok(name):
            raise InputError(f"state_dict keys must be non-empty str tensor names, got {name!r}")
        if name == "__metadata__":
            raise InputError(
                "state_dict key '__metadata__' is reserved by the safetensors format; rename that tensor"
            )
        if not isinstance(t, torch.Tensor):
            raise InputError(
                f"state_dict[{name!r}] is a {type(t).__name__}, not a torch.Tensor; checkpoints hold tensors only, put other values in config"
            )
        if t.layout != torch.strided:
            raise InputError(
                f"state_dict[{name!r}] is a sparse tensor ({t.layout}); convert it with .to_dense() first"
            )
        if t.device.type == "meta":
            raise InputError(
                f"state_dict[{name!r}] is on the meta device and holds no data; materialise the model's weights first"
            )
        if t.dtype not in DTYPE_TO_CODE:
            raise InputError(
                f"state_dict[{name!r}] has dtype {t.dtype}, which checkpoints cannot store; cast it to one of {', '.join(dtype_name(d) for d in DTYPE_TO_CODE)}"
            )
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        out[name] = t.resolve_conj().resolve_neg().contiguous()
    # safetensors refuses tensors that share memory (tied weights): store a copy per name.
    seen: set[int] = set()
    for name, t in out.items():
        if t.numel() == 0:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            out[name] = t.clone()
        else:
            seen.add(ptr)
    return out


def _hash_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """The content hash (see :func:`content_hash`) of contiguous CPU tensors."""
    h = hashlib.sha256(_HASH_DOMAIN)
    for name in sorted(tensors):
        t = tensors[name]
        desc = json.dumps(
            [name, DTYPE_TO_CODE[t.dtype], [int(d) for d in t.shape]],
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8")
        h.update(len(desc).to_bytes(8, "little"))
        h.update(desc)
        # Raw bytes without a copy; safetensors stores little-endian, as are the platforms torch supports.
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
        h.update(int(raw.nbytes).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def _default_provenance() -> dict:
    return {
        "nh_serve_version": package_version("nh-serve"),
        "torch_version": torch.__version__,
        "safetensors_version": getattr(safetensors, "__version__", "unknown"),
        "python_version": platform.python_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv) if sys.argv and sys.argv[0] else "",
    }


def _make_checkpoint(doc: dict, tensors: Mapping[str, torch.Tensor], path: Path | None) -> Checkpoint:
    return Checkpoint(
        state_dict=dict(sorted(tensors.items())),
        config=doc["config"],
        feature_norm=doc["feature_norm"],
        training=doc["training"],
        metrics=doc["metrics"],
        provenance=doc["provenance"],
        format_version=doc["format_version"],
        content_hash=doc["content_hash"],
        path=path,
    )


def _summary(doc: dict, tensors: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict:
    """The read_metadata dict from a document and name -> (dtype code, shape)."""
    return {
        "format_version": doc["format_version"],
        "content_hash": doc["content_hash"],
        "short_hash": short_hash(doc["content_hash"]),
        **{k: copy.deepcopy(doc[k]) for k in ("config", "feature_norm", "training", "metrics", "provenance")},
        "tensors": {
            name: {"dtype": dtype_name(CODE_TO_DTYPE[code]), "shape": list(shape)}
            for name, (code, shape) in sorted(tensors.items())
        },
        "n_elements": sum(math.prod(shape) for _, shape in tensors.values()),
    }
