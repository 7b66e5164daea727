"""Array encodings of the HTTP API, shared by the service (``service/``) and :mod:`nh_serve.client`.

An array travels in a JSON body in one of three forms:

* a JSON list (nested lists for 2-D arrays): ``[0.5, 0.51, 0.7]``;
* raw little-endian values in base64: ``{"b64": "<base64>", "dtype": "float64", "shape": [3]}``
  with ``dtype`` one of :data:`DTYPES` (``shape`` optional for 1-D arrays);
* a ``.npy`` file in base64: ``{"npy": "<base64 of the file numpy.save writes>"}``; numbers or
  fixed-width strings (``<U..``), never pickled objects.

Spike trains are two parallel arrays: ``times`` (float64 seconds) and
``unit_ids`` (the unit of each spike). ``unit_ids`` may hold the ids
themselves (strings or integers) or, with ``unit_table``, 0-based int32/int64
indices into ``unit_table`` (the compact form the client sends: a 60 s, 300-unit
reference of 180 000 spikes is 2.9 MB of base64 instead of about 5 MB of JSON).
Unit ids keep their type: integers stay integers, strings stay strings (a table or
list mixing both is read as strings); ``unit_table`` lists each id once.

Every decoding problem raises :class:`~nh_serve.errors.InputError` naming the field
(:class:`TooLarge`, a subclass, for arrays over the limit they are decoded with).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any

import numpy as np

from nh_serve.errors import InputError
from nh_serve.prediction import IndexedIds, unit_id_array

DTYPES: dict[str, str] = {"float64": "<f8", "float32": "<f4", "int32": "<i4", "int64": "<i8"}
"""dtype names accepted in ``{"b64": ..., "dtype": ...}`` -> the little-endian numpy dtype."""


class TooLarge(InputError):
    """An array or a table is larger than the limit it was decoded with (the service answers 413)."""


_KIND_WORDS = {"f": "numbers", "i": "integers", "U": "strings"}


def encode_array(a, *, dtype: str | None = None, npy: bool = False) -> dict:
    """Encode an array as ``{"b64", "dtype", "shape"}`` (or ``{"npy"}`` with ``npy=True``).

    ``dtype`` (a key of :data:`DTYPES`) casts before encoding; default: the
    array's own dtype, which must then be one of :data:`DTYPES` (``npy=True``
    also takes fixed-width strings).
    """
    arr = np.asarray(a)
    if npy:
        if dtype is not None:
            arr = arr.astype(DTYPES[dtype])
        if arr.dtype.hasobject:
            arr = arr.astype(str)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        return {"npy": base64.b64encode(buf.getvalue()).decode("ascii")}
    if dtype is None:
        dtype = next((k for k, v in DTYPES.items() if np.dtype(v) == arr.dtype.newbyteorder("<")), None)
        if dtype is None:
            raise InputError(
                f"encode_array: dtype {arr.dtype} has no raw wire form; pass dtype= one of {', '.join(DTYPES)}"
            )
    raw = np.ascontiguousarray(arr, dtype=DTYPES[dtype]).tobytes()
    return {
        "b64": base64.b64encode(raw).decode("ascii"),
        "dtype": dtype,
        "shape": [int(d) for d in arr.shape],
    }


def decode_array(
    obj: Any,
    *,
    name: str,
    kinds: str = "fi",
    ndim: int | None = 1,
    max_items: int | None = None,
) -> np.ndarray:
    """Decode a wire array (JSON list, ``{"b64", "dtype", "shape"}`` or ``{"npy"}``) into numpy.

    Args:
        obj: the decoded JSON value (list, dict, or an object with ``model_dump()``).
        name: the field's name, used in error messages.
        kinds: numpy dtype kinds accepted: ``f`` floats, ``i`` integers, ``U`` strings
            (integers are always accepted where floats are).
        ndim: required number of dimensions (``None``: any).
        max_items: refuse arrays with more elements (checked before allocating).

    Raises:
        InputError: naming ``name`` for bad base64, a dtype/shape that does not fit the
            bytes, a pickled ``.npy``, the wrong kind of values or too many values.
    """
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(exclude_none=True)
    if isinstance(obj, dict):
        arr = _decode_binary(obj, name=name, max_items=max_items)
    elif isinstance(obj, (list, tuple)):
        if max_items is not None and len(obj) > max_items:
            raise TooLarge(f"{name}: {len(obj)} values is more than the limit of {max_items}")
        arr = _from_list(obj, name=name, strings="U" in kinds)
    elif isinstance(obj, np.ndarray):
        arr = obj
    else:
        raise InputError(f"{name}: must be a JSON list or an encoded array object, got {type(obj).__name__}")
    if ndim is not None and arr.ndim != ndim and not (arr.size == 0 and ndim >= 1):
        raise InputError(f"{name}: must be a {ndim}-D array, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        if ndim is not None and arr.ndim != ndim:
            arr = arr.reshape((0,) * ndim)
        return arr.astype(np.float64 if "f" in kinds else np.int64)
    if max_items is not None and arr.size > max_items:
        raise TooLarge(f"{name}: {arr.size} values is more than the limit of {max_items}")
    kind = arr.dtype.kind
    if kind == "u":
        kind = "i"
    if kind == "b" or kind not in kinds and not (kind == "i" and "f" in kinds):
        want = " or ".join(_KIND_WORDS[k] for k in kinds)
        raise InputError(f"{name}: must hold {want}, got {_describe(arr.dtype)}")
    if kind == "f":
        return arr.astype(np.float64, copy=False)
    if kind == "i":
        return arr.astype(np.int64, copy=False)
    return arr


def encode_spikes(times, unit_ids, *, binary: bool = True) -> dict:
    """A spike train as its wire object ``{"times", "unit_ids", "unit_table"}``.

    ``unit_table`` lists each distinct id once (integers as integers, strings as strings) and
    ``unit_ids`` holds int32 indices into it; ``binary`` sends both arrays as base64 instead of
    JSON lists.
    """
    t = np.asarray(times, dtype=np.float64)
    ids = np.asarray(unit_ids)
    if t.ndim != 1 or ids.ndim != 1 or t.shape[0] != ids.shape[0]:
        raise InputError(
            f"spikes: pass 1-D spike times and one unit id per spike, got shapes {t.shape} and {ids.shape}"
        )
    ids = unit_id_array(ids, name="unit_ids")
    if ids.size:
        table, index = np.unique(ids, return_inverse=True)
    else:
        table, index = np.zeros(0, dtype=str), np.zeros(0, dtype=np.int64)
    table = table.tolist()
    index = index.astype(np.int32 if len(table) < 2**31 else np.int64)
    if binary:
        return {
            "times": encode_array(t, dtype="float64"),
            "unit_ids": encode_array(index),
            "unit_table": table,
        }
    return {"times": t.tolist(), "unit_ids": index.tolist(), "unit_table": table}


def decode_spikes(
    obj: Any,
    *,
    name: str,
    max_spikes: int | None = None,
    max_units: int | None = None,
    max_id_chars: int | None = None,
    compact: bool = False,
):
    """Decode a wire spike train into ``(times float64 (N,), unit ids (N,))``.

    The unit ids are int64 or str (the type they were sent in); with ``compact`` and a
    ``unit_table``, an :class:`~nh_serve.prediction.IndexedIds` (the table and the
    indices) instead of one id per spike. ``max_spikes``, ``max_units`` (table entries)
    and ``max_id_chars`` (characters of a string id) are checked before anything large is
    built. Validation of the times themselves (finite, sorted, inside the window) is left
    to :func:`nh_serve.data.spikes.check_spikes` downstream.
    """
    if hasattr(obj, "model_dump"):
        obj = {k: getattr(obj, k) for k in type(obj).model_fields}
    if not isinstance(obj, dict):
        raise InputError(f"{name}: must be an object with times and unit_ids")
    if "times" not in obj or obj["times"] is None:
        raise InputError(f"{name}.times: missing; send the spike times in seconds")
    if "unit_ids" not in obj or obj["unit_ids"] is None:
        raise InputError(f"{name}.unit_ids: missing; send one unit id (or unit_table index) per spike")
    table = obj.get("unit_table")
    if table is not None:  # small: checked before the (large) arrays are decoded
        table_ids = _unit_table(table, name=f"{name}.unit_table", max_units=max_units, max_chars=max_id_chars)
    times = decode_array(obj["times"], name=f"{name}.times", kinds="f", max_items=max_spikes)
    if table is None:
        raw = decode_array(obj["unit_ids"], name=f"{name}.unit_ids", kinds="iU", max_items=max_spikes)
        ids = unit_id_array(raw, name=f"{name}.unit_ids", max_chars=max_id_chars)
        n_ids = ids.shape[0]
    else:
        index = decode_array(obj["unit_ids"], name=f"{name}.unit_ids", kinds="i", max_items=max_spikes)
        if index.size:
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= len(table):
                raise InputError(
                    f"{name}.unit_ids: index {lo if lo < 0 else hi} is outside unit_table (0..{len(table) - 1}); "
                    "with unit_table, unit_ids are 0-based indices into it"
                )
        n_ids = index.shape[0]
        if compact:
            ids = IndexedIds(table_ids, index.astype(np.int64, copy=False))
        else:
            ids = table_ids[index] if index.size else table_ids[:0]
    if times.shape[0] != n_ids:
        raise InputError(
            f"{name}: {times.shape[0]} spike times but {n_ids} unit_ids; send one unit per spike"
        )
    return times, ids


def _unit_table(table: Any, *, name: str, max_units: int | None, max_chars: int | None) -> np.ndarray:
    """A ``unit_table`` as int64 or str ids: each id once, within the limits (checked before conversion)."""
    if not isinstance(table, (list, tuple)) or not all(
        isinstance(x, (str, int)) and not isinstance(x, bool) for x in table
    ):
        raise InputError(f"{name}: must be a list of unit ids (strings or integers)")
    if max_units is not None and len(table) > max_units:
        raise TooLarge(f"{name}: {len(table)} units is more than the limit of {max_units}")
    if max_chars is not None:
        longest = max((len(x) for x in table if isinstance(x, str)), default=0)
        if longest > max_chars:
            raise InputError(
                f"{name}: a unit id of {longest} characters is longer than the limit of {max_chars}; use shorter ids"
            )
    if any(isinstance(x, int) and not -(2**63) <= x < 2**63 for x in table):
        raise InputError(f"{name}: integer unit ids must fit in 64 bits")
    if all(isinstance(x, int) for x in table):
        ids = np.asarray(table, dtype=np.int64)
    else:
        ids = np.asarray([str(x) for x in table], dtype=str)
    uniq, counts = np.unique(ids, return_counts=True)
    if uniq.size != ids.size:
        dup = uniq[counts > 1][0].item()
        where = np.flatnonzero(ids == dup)[:2].tolist()
        raise InputError(
            f"{name}: {dup!r} appears more than once (entries {where[0]} and {where[1]}); list each unit once "
            "(spikes of one unit share its index)"
        )
    return ids


# ----------------------------------------------------------------------------- internals


def _b64(data: Any, name: str) -> bytes:
    if not isinstance(data, str):
        raise InputError(f"{name}: must be a base64 string, got {type(data).__name__}")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{name}: is not valid base64 (standard alphabet, with = padding)") from None


def _decode_binary(obj: dict, *, name: str, max_items: int | None) -> np.ndarray:
    obj = {k: v for k, v in obj.items() if v is not None}  # null = absent
    keys = set(obj)
    if "npy" in keys:
        if keys - {"npy"}:
            raise InputError(
                f"{name}: an .npy object takes only the key 'npy', got {', '.join(sorted(keys))}"
            )
        return _decode_npy(_b64(obj["npy"], f"{name}.npy"), name=name, max_items=max_items)
    if "b64" not in keys:
        raise InputError(f"{name}: an encoded array needs 'b64' (with 'dtype') or 'npy'")
    extra = keys - {"b64", "dtype", "shape"}
    if extra:
        raise InputError(f"{name}: unknown key(s) {', '.join(sorted(extra))}; use b64, dtype, shape")
    dtype = obj.get("dtype")
    if dtype not in DTYPES:
        raise InputError(f"{name}.dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    raw = _b64(obj["b64"], f"{name}.b64")
    dt = np.dtype(DTYPES[dtype])
    if len(raw) % dt.itemsize:
        raise InputError(
            f"{name}.b64: {len(raw)} bytes is not a whole number of {dtype} values ({dt.itemsize} bytes each)"
        )
    n = len(raw) // dt.itemsize
    if max_items is not None and n > max_items:
        raise TooLarge(f"{name}: {n} values is more than the limit of {max_items}")
    arr = np.frombuffer(raw, dtype=dt)
    shape = obj.get("shape")
    if shape is not None:
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise InputError(f"{name}.shape: must be a list of non-negative integers")
        if len(shape) > 8 or math.prod(shape) != n:
            raise InputError(f"{name}.shape: {list(shape)} does not fit the {n} values in b64")
        arr = arr.reshape(shape)
    return arr.astype(dt.newbyteorder("="), copy=False)


def _decode_npy(buf: bytes, *, name: str, max_items: int | None) -> np.ndarray:
    fmt = np.lib.format
    f = io.BytesIO(buf)
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"version {version} is not supported")
    except Exception as e:  # numpy raises ValueError / SyntaxError / others for bad headers
        raise InputError(f"{name}.npy: is not a valid .npy file ({e}); write it with numpy.save") from None
    if dtype.hasobject or dtype.names is not None or dtype.kind not in "fiuU" or dtype.subdtype is not None:
        raise InputError(
            f"{name}.npy: dtype {dtype} is not accepted; send numbers or fixed-width strings (no pickles)"
        )
    n = math.prod(shape)
    if max_items is not None and n > max_items:
        raise TooLarge(f"{name}: {n} values is more than the limit of {max_items}")
    offset = f.tell()
    if len(buf) - offset != n * dtype.itemsize:
        raise InputError(
            f"{name}.npy: header says {n} values of {dtype} ({n * dtype.itemsize} bytes) but {len(buf) - offset} bytes follow"
        )
    arr = np.frombuffer(buf, dtype=dtype, count=n, offset=offset)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def _from_list(values: list | tuple, *, name: str, strings: bool) -> np.ndarray:
    if values and isinstance(values[0], (list, tuple)):
        lens = {len(v) if isinstance(v, (list, tuple)) else -1 for v in values}
        if len(lens) != 1 or -1 in lens:
            raise InputError(f"{name}: rows must all be lists of the same length")
    nested = bool(values) and isinstance(values[0], (list, tuple))
    if any(isinstance(v, bool) for row in (values if nested else [values]) for v in row):
        raise InputError(f"{name}: must hold numbers or strings, got true/false")
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError, OverflowError) as e:
        raise InputError(f"{name}: cannot be read as an array ({e})") from None
    if arr.dtype.kind == "O" and strings and arr.ndim == 1:
        arr = np.asarray([str(v) for v in values], dtype=str)
    if arr.dtype.kind == "O":
        raise InputError(f"{name}: mixes values of different types; send all numbers or all strings")
    return arr


def _describe(dtype: np.dtype) -> str:
    return {"f": "numbers", "i": "integers", "u": "integers", "U": "strings", "b": "true/false"}.get(
        dtype.kind, str(dtype)
    )
