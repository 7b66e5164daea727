"""Self-describing checkpoints: one ``.safetensors`` file with weights and metadata.

A checkpoint is a plain safetensors file (readable by ``safetensors.torch.load_file``
and any other safetensors reader). Its header's ``__metadata__`` map holds one key,
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
torch.Tensor]`` state dicts and JSON metadata dicts. :func:`check_state_dict`
compares a checkpoint's weights against the names, shapes and dtypes a model expects.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
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
from nh_serve.util import atomic_write, package_version

FORMAT_VERSION = 1
"""Checkpoint format version written by this nh-serve (and the newest it reads)."""

METADATA_KEY = "nh_serve"
"""Key of the JSON document inside the safetensors header's ``__metadata__`` map."""

_MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
_HASH_DOMAIN = b"nh-serve/weights/v1\n"
_SHORT_HASH_LEN = 12
_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}
_MAX_LISTED = 6  # problems listed by check_state_dict before "... and N more"

# safetensors dtype codes <-> torch dtypes (only those this torch build has).
_CODE_TO_DTYPE: dict[str, torch.dtype] = {
    code: dt
    for code, dt in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "U16": getattr(torch, "uint16", None),
        "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
        "BOOL": torch.bool,
        "C64": torch.complex64,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
    }.items()
    if dt is not None
}
_DTYPE_TO_CODE: dict[torch.dtype, str] = {dt: code for code, dt in _CODE_TO_DTYPE.items()}


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
            name: (_DTYPE_TO_CODE[t.dtype], tuple(int(d) for d in t.shape))
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
    norm = _to_json(_as_dict(feature_norm, "feature_norm"), "feature_norm")
    problem = _feature_norm_problem(norm)
    if problem is not None:
        raise InputError(f"feature_norm: {problem}")
    doc = {
        "format_version": FORMAT_VERSION,
        "content_hash": _hash_tensors(tensors),
        "config": _to_json(_as_dict(config, "config"), "config"),
        "feature_norm": norm,
        "training": _to_json(_as_dict(training, "training"), "training"),
        "metrics": _to_json(_as_dict(metrics, "metrics"), "metrics"),
        "provenance": {**_default_provenance(), **_to_json(_as_dict(provenance, "provenance"), "provenance")},
    }
    doc["metadata_hash"] = _metadata_hash(doc)
    blob = safetensors.torch.save(tensors, metadata={METADATA_KEY: _canonical_json(doc)})
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
    header = _parse_header(data, len(data), src)
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
            if 2 <= n <= _MAX_HEADER_BYTES and n + 8 <= size:
                head += _read(f, n - 1, src)
    header = _parse_header(head, size, src)
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


def check_state_dict(
    expected: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "checkpoint",
) -> None:
    """Raise :class:`CheckpointError` if ``state_dict`` does not fit a model.

    ``expected`` maps each name the model has to ``(shape, dtype)`` (or to a
    tensor, whose shape and dtype are used; ``dtype`` may be ``None`` to skip the
    dtype check), e.g. ``{k: (v.shape, v.dtype) for k, v in
    model.state_dict().items()}``. Reports, by name, weights missing from
    ``state_dict``, unexpected extra weights, shape mismatches and dtype-kind
    mismatches (floating point vs integer vs bool vs complex; a float32/bfloat16
    difference is fine because ``load_state_dict`` casts). The message lists the
    first few problems and counts the rest; ``source`` names the weights in it.
    """
    if not isinstance(expected, Mapping) or not isinstance(state_dict, Mapping):
        raise InputError(
            "check_state_dict: pass two mappings, {name: (shape, dtype)} for the model and {name: tensor} for the weights"
        )
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = []
    for name, want in expected.items():
        if name not in state_dict:
            continue
        want_shape, want_dtype = _expected_spec(name, want)
        have = state_dict[name]
        if not isinstance(have, torch.Tensor):
            wrong.append(f"{name!r} is a {type(have).__name__} in the {source}, not a tensor")
            continue
        have_shape = tuple(int(d) for d in have.shape)
        if have_shape != want_shape:
            wrong.append(
                f"{name!r} has shape {_fmt_shape(have_shape)} in the {source} but {_fmt_shape(want_shape)} in the model"
            )
        elif want_dtype is not None and _dtype_kind(have.dtype) != _dtype_kind(want_dtype):
            wrong.append(
                f"{name!r} is {_dtype_name(have.dtype)} in the {source} but {_dtype_name(want_dtype)} in the model"
            )
    if not (missing or unexpected or wrong):
        return
    counts = []
    if missing:
        counts.append(f"{len(missing)} missing")
    if unexpected:
        counts.append(f"{len(unexpected)} unexpected")
    if wrong:
        counts.append(f"{len(wrong)} with the wrong shape or dtype")
    items = [f"missing {k!r}" for k in missing] + [f"unexpected {k!r}" for k in unexpected] + wrong
    listed = "; ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        listed += f"; ... and {len(items) - _MAX_LISTED} more"
    raise CheckpointError(
        f"the {source} weights do not fit the model ({', '.join(counts)}): {listed}. "
        "The weights were made for a different model configuration: build the model from the "
        "checkpoint's own config, or load the checkpoint that belongs to this model"
    )


# ----------------------------------------------------------------------------- header parsing


@dataclass(frozen=True)
class _Header:
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype code, shape)
    doc: dict  # the validated nh_serve metadata document


def _parse_header(head: bytes, size: int, path: Path) -> _Header:
    """Validate a checkpoint file from its first bytes and total size (bytes).

    ``head`` holds at least the 8-byte length and the JSON header when the file
    has them (it may hold the whole file). Raises CheckpointError on any problem.
    """
    where = f"checkpoint {path}"
    if size == 0:
        raise CheckpointError(
            f"{where}: the file is empty (0 bytes); the save was interrupted or the copy failed; copy or export it again"
        )
    if size < 8:
        raise CheckpointError(
            f"{where}: the file is only {size} bytes, too short for a safetensors header; "
            "it is truncated or not a checkpoint; copy or export it again"
        )
    n = int.from_bytes(head[:8], "little")
    looks_safetensors = 2 <= n <= _MAX_HEADER_BYTES and (len(head) == 8 or head[8:9] == b"{")
    if not looks_safetensors:
        if _looks_pickled(head):
            raise CheckpointError(
                f"{where}: this looks like a pickled PyTorch file (torch.save output); nh-serve loads only "
                ".safetensors checkpoints because unpickling can run arbitrary code. If you trust the file, "
                "convert it: state = torch.load(path, weights_only=True), then "
                "nh_serve.inference.checkpoint.save_checkpoint('model.safetensors', state_dict=state, config=..., feature_norm=...)"
            )
        hint = (
            " (its name suggests a pickled PyTorch file)" if path.suffix.lower() in _PICKLE_SUFFIXES else ""
        )
        raise CheckpointError(
            f"{where}: not a safetensors file{hint}: it does not start with a safetensors header "
            "(8-byte length + JSON); pass a .safetensors checkpoint written by nh-serve"
        )
    if n + 8 > size:
        raise CheckpointError(
            f"{where}: the file is truncated: its header length field says {n + 8} bytes of header "
            f"but the whole file is {size} bytes; the copy or save was cut short; copy or export it again"
        )
    try:
        header = json.loads(bytes(head[8 : 8 + n]).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{where}: the safetensors header is corrupt (not valid JSON: {exc}); the file is damaged, copy or export it again"
        ) from exc
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{where}: the safetensors header is corrupt (not a JSON object); the file is damaged, copy or export it again"
        )

    doc = _read_doc(header.get("__metadata__"), where)
    tensors = _check_layout(header, size - 8 - n, where)
    _check_doc(doc, where)
    return _Header(tensors=tensors, doc=doc)


def _read_doc(meta: Any, where: str) -> dict:
    """Extract the nh_serve document and check its format version."""
    not_ours = (
        "it is a plain safetensors file, not an nh-serve checkpoint; "
        "write checkpoints with nh_serve.inference.checkpoint.save_checkpoint"
    )
    if meta is None:
        raise CheckpointError(
            f"{where}: the file has no metadata (no __metadata__ in its header); {not_ours}"
        )
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(
            f"{where}: the header's __metadata__ is corrupt (not a string-to-string map); the file is damaged, copy or export it again"
        )
    if METADATA_KEY not in meta:
        keys = ", ".join(repr(k) for k in sorted(meta)[:5]) or "none"
        raise CheckpointError(
            f"{where}: the file has no {METADATA_KEY!r} metadata (metadata keys: {keys}); {not_ours}"
        )
    try:
        doc = json.loads(meta[METADATA_KEY], parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{where}: the {METADATA_KEY!r} metadata is not valid JSON ({exc}); the file is damaged, copy or export it again"
        ) from exc
    if not isinstance(doc, dict):
        raise CheckpointError(
            f"{where}: the {METADATA_KEY!r} metadata is not a JSON object; the file is damaged or was not written by nh-serve"
        )
    version = doc.get("format_version")
    if version is None:
        raise CheckpointError(
            f"{where}: the metadata has no format_version; the file is damaged or was not written by nh-serve"
        )
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(
            f"{where}: unknown checkpoint format version {version!r} (this nh-serve reads versions 1 to "
            f"{FORMAT_VERSION}); the file is damaged or was not written by nh-serve"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: written by a newer nh-serve (checkpoint format version {version}; this nh-serve reads "
            f"up to version {FORMAT_VERSION}); upgrade nh-serve to load it"
        )
    return doc


def _check_layout(header: dict, data_len: int, where: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Check every tensor entry and that the entries tile the ``data_len``-byte data region."""
    damaged = "the file is damaged, copy or export it again"
    spans = []
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry {name!r} is corrupt (not a JSON object); {damaged}")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if code not in _CODE_TO_DTYPE:
            raise CheckpointError(
                f"{where}: tensor {name!r} has dtype {code!r}, which this nh-serve cannot read "
                f"(supported: {', '.join(_CODE_TO_DTYPE)}); {damaged}"
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: tensor {name!r} has an invalid shape {shape!r}; {damaged}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}; {damaged}")
        nbytes = math.prod(shape) * _CODE_TO_DTYPE[code].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(
                f"{where}: tensor {name!r} ({code} {_fmt_shape(shape)}) needs {nbytes} bytes but its data "
                f"offsets span {offsets[1] - offsets[0]}; {damaged}"
            )
        spans.append((offsets[0], offsets[1], name))
        tensors[name] = (code, tuple(shape))
    if not tensors:
        raise CheckpointError(
            f"{where}: the file holds no tensors; pass a checkpoint written by nh_serve.inference.checkpoint.save_checkpoint"
        )
    spans.sort()
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            raise CheckpointError(
                f"{where}: the data of tensor {name!r} overlaps or leaves a gap after the previous tensor's; {damaged}"
            )
        end = stop
    if end > data_len:
        raise CheckpointError(
            f"{where}: the file is truncated: the header describes {end} bytes of tensor data but the file "
            f"holds only {data_len}; the copy or save was cut short; copy or export it again"
        )
    if end < data_len:
        raise CheckpointError(
            f"{where}: the file has {data_len - end} unexpected bytes after the tensor data; {damaged}"
        )
    return dict(sorted(tensors.items()))


def _check_doc(doc: dict, where: str) -> None:
    """Check the nh_serve document's fields and its metadata hash (format version already checked)."""
    damaged = "the file is damaged or was not written by nh-serve; copy or export it again"
    for key in ("content_hash", "metadata_hash"):
        if not _is_sha256(doc.get(key)):
            raise CheckpointError(
                f"{where}: the metadata's {key} is missing or not a sha256 hex digest; {damaged}"
            )
    for key in ("config", "feature_norm", "training", "metrics", "provenance"):
        if not isinstance(doc.get(key), dict):
            raise CheckpointError(
                f"{where}: the metadata's {key!r} is missing or not a JSON object; {damaged}"
            )
    if _metadata_hash(doc) != doc["metadata_hash"]:
        raise CheckpointError(
            f"{where}: the metadata is corrupt: its hash does not match metadata_hash, so the header was "
            "changed after the file was written (damaged or edited by hand); copy the file again or re-save it "
            "with nh_serve.inference.checkpoint.save_checkpoint"
        )
    problem = _feature_norm_problem(doc["feature_norm"])
    if problem is not None:
        raise CheckpointError(f"{where}: feature_norm {problem}; {damaged}")


def _looks_pickled(head: bytes) -> bool:
    """True for torch.save zip archives and raw pickles (protocol 2 to 5)."""
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _reject_constant(token: str):
    raise ValueError(f"{token} is not allowed in checkpoint metadata")


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
        if not isinstance(name, str) or not name or not _utf8_ok(name):
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
        if t.dtype not in _DTYPE_TO_CODE:
            raise InputError(
                f"state_dict[{name!r}] has dtype {t.dtype}, which checkpoints cannot store; cast it to one of {', '.join(_dtype_name(d) for d in _DTYPE_TO_CODE)}"
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
            [name, _DTYPE_TO_CODE[t.dtype], [int(d) for d in t.shape]],
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


def _as_dict(value: Any, name: str) -> dict:
    """A metadata argument as a dict: a mapping, a dataclass, or an object with to_dict()."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict) and not isinstance(value, type):
        out = to_dict()
        if isinstance(out, Mapping):
            return dict(out)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise InputError(
        f"{name} must be a dict (or an object with to_dict(), or a dataclass), got {type(value).__name__}"
    )


def _to_json(value: Any, where: str) -> Any:
    """Convert metadata to plain JSON types, naming the offending entry on failure."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if not _utf8_ok(value):
            raise InputError(
                f"{where} is a string that is not valid Unicode; remove the stray surrogate characters"
            )
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        x = float(value)
        if not math.isfinite(x):
            raise InputError(
                f"{where} is {x}; checkpoint metadata is JSON, which has no NaN or infinity; store None for an undefined value"
            )
        return x
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InputError(
                    f"{where} has key {k!r} ({type(k).__name__}); metadata dict keys must be str (JSON objects), convert it with str()"
                )
            out[k] = _to_json(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _to_json(value.tolist(), where)
    if isinstance(value, torch.Tensor):
        return _to_json(value.detach().cpu().tolist(), where)
    raise InputError(
        f"{where} is a {type(value).__name__}, which checkpoint metadata (JSON) cannot hold; convert it to str, numbers, lists or dicts"
    )


def _feature_norm_problem(norm: Any) -> str | None:
    """Describe what is wrong with a feature_norm dict, or None if it is usable."""
    if not isinstance(norm, dict):
        return "must be a dict {'mean': [...], 'std': [...]}"
    for key in ("mean", "std"):
        vals = norm.get(key)
        if not isinstance(vals, list) or not vals:
            return f"[{key!r}] must be a non-empty list of numbers (one per reference feature), got {type(vals).__name__}"
        for i, v in enumerate(vals):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                return f"[{key!r}][{i}] is {v!r}; every entry must be a finite number"
    if len(norm["mean"]) != len(norm["std"]):
        return f"has {len(norm['mean'])} means but {len(norm['std'])} stds; pass one of each per reference feature"
    bad = [i for i, v in enumerate(norm["std"]) if v <= 0]
    if bad:
        return f"['std'][{bad[0]}] is {norm['std'][bad[0]]!r}; every std must be > 0 (floor it, e.g. max(std, 1e-6), when fitting)"
    return None


def _default_provenance() -> dict:
    return {
        "nh_serve_version": package_version("nh-serve"),
        "torch_version": torch.__version__,
        "safetensors_version": getattr(safetensors, "__version__", "unknown"),
        "python_version": platform.python_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv) if sys.argv and sys.argv[0] else "",
    }


def _canonical_json(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _metadata_hash(doc: dict) -> str:
    """sha256 hex of the canonical JSON of ``doc`` without its ``metadata_hash`` entry."""
    body = {k: v for k, v in doc.items() if k != "metadata_hash"}
    return hashlib.sha256(_canonical_json(body).encode("utf-8")).hexdigest()


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
            name: {"dtype": _dtype_name(_CODE_TO_DTYPE[code]), "shape": list(shape)}
            for name, (code, shape) in sorted(tensors.items())
        },
        "n_elements": sum(math.prod(shape) for _, shape in tensors.values()),
    }


def _expected_spec(name: str, want: Any) -> tuple[tuple[int, ...], torch.dtype | None]:
    if isinstance(want, torch.Tensor):
        return tuple(int(d) for d in want.shape), want.dtype
    try:
        shape, dtype = want
        return tuple(int(d) for d in shape), dtype
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"check_state_dict: expected[{name!r}] must be (shape, dtype) or a tensor, got {want!r}"
        ) from exc


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "int"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_sha256(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
