"""The checkpoint file's header: its layout, parsed and checked before any tensor byte is read.

A checkpoint (:mod:`nh_serve.inference.checkpoint`) is a safetensors file: an
8-byte little-endian header length, a JSON header (tensor names, dtypes, shapes and
data offsets, and the ``__metadata__`` map holding the ``nh_serve`` document), then
the tensor bytes. :func:`parse_header` validates all of it from the first bytes and
the file size and raises :class:`~nh_serve.errors.CheckpointError` saying what is
wrong and what to do; nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nh_serve.errors import CheckpointError, InputError

FORMAT_VERSION = 1
"""Checkpoint format version written by this nh-serve (and the newest it reads)."""

METADATA_KEY = "nh_serve"
"""Key of the JSON document inside the safetensors header's ``__metadata__`` map."""

MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}

# safetensors dtype codes <-> torch dtypes (only those this torch build has).
CODE_TO_DTYPE: dict[str, torch.dtype] = {
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
DTYPE_TO_CODE: dict[torch.dtype, str] = {dt: code for code, dt in CODE_TO_DTYPE.items()}


# ----------------------------------------------------------------------------- header parsing


@dataclass(frozen=True)
class Header:
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype code, shape)
    doc: dict  # the validated nh_serve metadata document


def parse_header(head: bytes, size: int, path: Path) -> Header:
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
    looks_safetensors = 2 <= n <= MAX_HEADER_BYTES and (len(head) == 8 or head[8:9] == b"{")
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
    return Header(tensors=tensors, doc=doc)


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
        if code not in CODE_TO_DTYPE:
            raise CheckpointError(
                f"{where}: tensor {name!r} has dtype {code!r}, which this nh-serve cannot read "
                f"(supported: {', '.join(CODE_TO_DTYPE)}); {damaged}"
            )
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: tensor {name!r} has an invalid shape {shape!r}; {damaged}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}; {damaged}")
        nbytes = math.prod(shape) * CODE_TO_DTYPE[code].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(
                f"{where}: tensor {name!r} ({code} {fmt_shape(shape)}) needs {nbytes} bytes but its data "
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
        if not is_sha256(doc.get(key)):
            raise CheckpointError(
                f"{where}: the metadata's {key} is missing or not a sha256 hex digest; {damaged}"
            )
    for key in ("config", "feature_norm", "training", "metrics", "provenance"):
        if not isinstance(doc.get(key), dict):
            raise CheckpointError(
                f"{where}: the metadata's {key!r} is missing or not a JSON object; {damaged}"
            )
    if metadata_hash(doc) != doc["metadata_hash"]:
        raise CheckpointError(
            f"{where}: the metadata is corrupt: its hash does not match metadata_hash, so the header was "
            "changed after the file was written (damaged or edited by hand); copy the file again or re-save it "
            "with nh_serve.inference.checkpoint.save_checkpoint"
        )
    problem = feature_norm_problem(doc["feature_norm"])
    if problem is not None:
        raise CheckpointError(f"{where}: feature_norm {problem}; {damaged}")


def _looks_pickled(head: bytes) -> bool:
    """True for torch.save zip archives and raw pickles (protocol 2 to 5)."""
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _reject_constant(token: str):
    raise ValueError(f"{token} is not allowed in checkpoint metadata")


def feature_norm_problem(norm: Any) -> str | None:
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


def canonical_json(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def metadata_hash(doc: dict) -> str:
    """sha256 hex of the canonical JSON of ``doc`` without its ``metadata_hash`` entry."""
    body = {k: v for k, v in doc.items() if k != "metadata_hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fmt_shape(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_sha256(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)


# ----------------------------------------------------------------------------- the metadata document as JSON


def as_dict(value: Any, name: str) -> dict:
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


def to_json(value: Any, where: str) -> Any:
    """Convert metadata to plain JSON types, naming the offending entry on failure."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if not utf8_ok(value):
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
            out[k] = to_json(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return to_json(value.tolist(), where)
    if isinstance(value, torch.Tensor):
        return to_json(value.detach().cpu().tolist(), where)
    raise InputError(
        f"{where} is a {type(value).__name__}, which checkpoint metadata (JSON) cannot hold; convert it to str, numbers, lists or dicts"
    )


def utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
