"""Unit ids at the Predictor's entry points: their type, their order and each spike's row.

Ids keep the type the caller gave: integers (``int64``, sorted numerically) or strings (sorted as
text); a session's ``unit_ids`` is its row order. Per-spike ids come as one id per spike or as an
:class:`~nh_serve.prediction.IndexedIds` (a table and each spike's index into it, the wire's form),
and are matched to a session's ids through their distinct values, so no per-spike string array is
ever built. An id of the other kind is matched by its text: the integer 7 finds the string unit
"7", and the string "7" the integer unit 7.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nh_serve.errors import InputError
from nh_serve.inference.limits import Limits
from nh_serve.prediction import IndexedIds, unit_id_array


def as_unit_ids(ids: Any, name: str, limits: Limits | None = None) -> np.ndarray | IndexedIds:
    """Per-spike unit ids as int64 or str (the type the caller gave), or a checked :class:`IndexedIds`."""
    chars = None if limits is None else limits.max_unit_id_chars
    if isinstance(ids, IndexedIds):
        table = unit_id_array(ids.table, name=f"{name} (table)", max_chars=chars)
        index = np.asarray(ids.index)
        if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
            raise InputError(f"{name}: the index must be 1-D integers, got {index.dtype} of shape {index.shape}")
        if index.size and (index.min() < 0 or index.max() >= table.size):
            raise InputError(f"{name}: an index lies outside the table of {table.size} ids")
        return IndexedIds(table, index.astype(np.int64, copy=False))
    return unit_id_array(ids, name=name, max_chars=chars)


def n_ids(ids: np.ndarray | IndexedIds) -> int:
    return int(ids.index.shape[0] if isinstance(ids, IndexedIds) else ids.shape[0])


def spike_unit_ids(ids: np.ndarray | IndexedIds) -> np.ndarray:
    """The distinct ids that have spikes, sorted (numbers numerically, strings as text)."""
    if isinstance(ids, IndexedIds):
        used = np.bincount(ids.index, minlength=ids.table.size) > 0
        return np.unique(ids.table[used])
    return np.unique(ids)


def _comparable(ids: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``ids`` in the kind of ``known`` (integers or strings) and which of them could be converted:
    integer ids sent for a string session compare as their text, the decimal text of an integer
    ("12", not "012") for an integer session as that integer."""
    if ids.dtype.kind == known.dtype.kind:
        return ids, np.ones(ids.size, bool)
    if known.dtype.kind == "U":
        return ids.astype(str), np.ones(ids.size, bool)
    out, ok = np.zeros(ids.size, np.int64), np.zeros(ids.size, bool)
    for i, x in enumerate(ids.tolist()):
        try:
            v = int(x)
        except ValueError:
            continue
        if str(v) == x and abs(v) < 2**63:
            out[i], ok[i] = v, True
    return out, ok


def unit_rows(ids: np.ndarray | IndexedIds, known: np.ndarray, name: str) -> np.ndarray:
    """``(N,)`` int64 row in ``known`` of each spike's unit id; InputError listing ids not in ``known``."""
    table, index = ids if isinstance(ids, IndexedIds) else np.unique(ids, return_inverse=True)
    index = np.asarray(index).reshape(-1)
    if table.size == 0:
        return np.zeros(0, dtype=np.int64)
    t, ok = _comparable(np.asarray(table), known)
    order = np.argsort(known, kind="stable")
    sk = known[order]
    pos = np.minimum(np.searchsorted(sk, t), sk.size - 1)
    found = ok & (sk[pos] == t)
    if not np.all(found):
        missing = table[~found].tolist()
        n = int(np.bincount(index, minlength=table.size)[~found].sum())
        raise InputError(
            f"{name}: {n} spike(s) belong to {len(missing)} unit id(s) not in the registered "
            f"reference (e.g. {', '.join(map(str, missing[:5]))}); register those units or drop their spikes"
        )
    return order[pos][index].astype(np.int64)


def unit_order(ids: np.ndarray | IndexedIds, units: Any, limits: Limits | None) -> np.ndarray:
    """A session's unit order: ``units`` as given (checked), else the spikes' distinct ids sorted."""
    if units is None:
        order = spike_unit_ids(ids)
    else:
        order = as_unit_ids(units, "units", limits)
        if order.size == 0:
            raise InputError("units: there are zero units; pass at least one unit id")
        uniq, counts = np.unique(order, return_counts=True)
        if uniq.size != order.size:
            raise InputError(f"units: unit ids must be unique; {uniq[counts > 1][:5].tolist()} appear more than once")
    if limits is not None:
        limits.check_count(order.size, "max_units", "units", "units" if units is not None else "reference unit_ids")
    return order
