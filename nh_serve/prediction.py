"""The result of one prediction, and unit ids, shared by the local Predictor and the HTTP client (no torch here).

Unit ids keep the type the user gave them: integer ids stay integers (``int64``) and are sorted
numerically (0, 1, 2, ..., 10), string ids stay strings and are sorted as text; ``units=`` at
registration gives the order (and the type) instead. :attr:`Prediction.unit_ids` is that order:
row ``i`` of ``rates_hz`` is unit ``unit_ids[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from nh_serve.errors import InputError


@dataclass(frozen=True)
class Prediction:
    """Predicted rates for one context window."""

    rates_hz: np.ndarray  # (U, T) float32 firing rate in Hz per future bin
    bin_edges: np.ndarray  # (T + 1,) float64 absolute seconds
    unit_ids: np.ndarray  # (U,) int64 or str: the registered unit order (row i is unit_ids[i])
    model: str  # model config name
    model_hash: str  # short content hash of the checkpoint weights

    @property
    def bin_size(self) -> float:
        return float(self.bin_edges[1] - self.bin_edges[0])

    @property
    def expected_counts(self) -> np.ndarray:
        """(U, T) expected spike counts per bin (rate x bin width)."""
        return self.rates_hz * np.diff(self.bin_edges).astype(np.float32)[None, :]


class IndexedIds(NamedTuple):
    """Per-spike unit ids in compact form: spike ``k`` belongs to unit ``table[index[k]]``.

    What the HTTP API carries (``unit_table`` + ``unit_ids`` indices); the Predictor accepts it
    wherever it takes one unit id per spike, without building the per-spike id array (which,
    for 2 M spikes of 200-character ids, is 1.6 GB).
    """

    table: np.ndarray  # (K,) int64 or str, distinct ids
    index: np.ndarray  # (N,) int64 in [0, K)


def unit_id_array(ids, *, name: str, max_chars: int | None = None) -> np.ndarray:
    """1-D unit ids as ``int64`` (integers) or ``str`` (strings; a list mixing both becomes strings).

    Raises InputError naming ``name`` for other dtypes (floats, booleans) and, with ``max_chars``,
    for string ids longer than that.
    """
    a = np.asarray(ids)
    if a.ndim != 1:
        raise InputError(f"{name}: must be a 1-D list of unit ids, got shape {a.shape}")
    if a.size == 0:
        return a.astype(np.int64) if a.dtype.kind in "iuf" or a.dtype == object else a.astype(str)
    kind = a.dtype.kind
    if kind in "iu":
        if kind == "u" and a.max() > np.iinfo(np.int64).max:
            raise InputError(f"{name}: integer unit ids must fit in 64 bits")
        return a.astype(np.int64, copy=False)
    if kind == "O":
        items = a.tolist()
        if any(isinstance(x, (bool, np.bool_, float, np.floating)) or x is None for x in items):
            raise InputError(f"{name}: unit ids must be integers or strings, got numbers, true/false or null")
        if all(isinstance(x, (int, np.integer)) for x in items):
            return np.asarray(items, dtype=np.int64)
        a = np.asarray([str(x) for x in items], dtype=str)
        kind = "U"
    if kind == "S":
        a = a.astype(str)
        kind = "U"
    if kind != "U":
        raise InputError(f"{name}: unit ids must be integers or strings, got dtype {a.dtype}")
    if max_chars is not None and a.dtype.itemsize // 4 > max_chars:
        longest = int(np.char.str_len(a).max())
        if longest > max_chars:
            raise InputError(
                f"{name}: a unit id of {longest} characters is longer than the limit of {max_chars}; "
                "use shorter ids"
            )
    return a


def unit_id_list(ids) -> list:
    """Unit ids as a JSON-ready list of Python ints or strs."""
    return np.asarray(ids).tolist()
