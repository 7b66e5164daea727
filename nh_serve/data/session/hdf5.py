"""Low-level reading of session files: string columns, the sampled index of sorted timestamps."""

from __future__ import annotations

import math

import h5py
import numpy as np

from nh_serve.errors import InputError

#: Spikes between two sampled timestamps of the coarse search index.
INDEX_STRIDE = 4096


def decode_strings(values: np.ndarray) -> np.ndarray:
    """Turn a stored id/string column into a numpy ``str`` array."""
    if values.dtype.kind == "S":
        return np.array([v.decode("utf-8", errors="replace") for v in values.tolist()], dtype=str)
    if values.dtype.kind == "O":
        return np.array(
            [
                v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
                for v in values.tolist()
            ],
            dtype=str,
        )
    if values.dtype.kind == "U":
        return values
    return np.array([str(v) for v in values.tolist()], dtype=str)


def read_column(ds: h5py.Dataset) -> np.ndarray:
    """Read a whole small dataset, turning byte strings into ``str``."""
    values = ds[()]
    values = np.asarray(values)
    if values.dtype.kind in "SO":
        return decode_strings(values)
    return values


class SortedIndex:
    """Binary search over a sorted 1-D timestamps dataset without reading it whole.

    Holds every ``stride``-th timestamp (plus the last) in memory; a lookup reads
    at most one block of ``stride`` timestamps from the file.
    """

    def __init__(self, ds: h5py.Dataset, *, stride: int = INDEX_STRIDE):
        self.ds = ds
        self.n = int(ds.shape[0])
        self.stride = int(stride)
        if self.n:
            coarse = np.asarray(ds[:: self.stride], dtype=np.float64)  # (ceil(n / stride),)
            self.positions = np.arange(coarse.shape[0], dtype=np.int64) * self.stride
            if self.positions[-1] != self.n - 1:
                coarse = np.append(coarse, float(ds[self.n - 1]))
                self.positions = np.append(self.positions, self.n - 1)
            self.coarse = coarse
        else:
            self.positions = np.zeros(0, dtype=np.int64)
            self.coarse = np.zeros(0, dtype=np.float64)
        self._cache: tuple[int, np.ndarray] | None = None

    def coarse_ok(self) -> str | None:
        """Return a problem description if the sampled timestamps are not finite and sorted."""
        c = self.coarse
        if c.size == 0:
            return None
        if not np.all(np.isfinite(c)):
            bad = int(self.positions[np.flatnonzero(~np.isfinite(c))[0]])
            return f"timestamp #{bad} is {float(self.ds[bad])}; timestamps must be finite seconds"
        d = np.diff(c)
        if np.any(d < 0):
            k = int(np.flatnonzero(d < 0)[0])
            return (
                f"timestamps are not sorted (#{int(self.positions[k + 1])} = {c[k + 1]:.6g} s comes after "
                f"#{int(self.positions[k])} = {c[k]:.6g} s); rewrite the file with sorted timestamps"
            )
        return None

    def _block(self, lo: int, hi: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == lo and self._cache[1].shape[0] == hi - lo:
            return self._cache[1]
        block = np.asarray(self.ds[lo:hi], dtype=np.float64)
        self._cache = (lo, block)
        return block

    def find(self, t: float) -> int:
        """Index of the first timestamp ``>= t`` (``n`` if none), like ``np.searchsorted(ts, t, 'left')``."""
        if self.n == 0:
            return 0
        k = int(np.searchsorted(self.coarse, t, side="left"))
        if k == 0:
            return 0
        if k == self.coarse.shape[0]:
            return self.n
        # answer lies in (positions[k-1], positions[k]]
        lo = int(self.positions[k - 1]) + 1
        hi = int(self.positions[k])
        if hi <= lo:
            return hi
        block = self._block(lo, hi)
        return lo + int(np.searchsorted(block, t, side="left"))


def check_window(t0, t1, what: str) -> tuple[float, float]:
    try:
        a, b = float(t0), float(t1)
    except (TypeError, ValueError):
        raise InputError(f"{what}: window bounds must be numbers in seconds, got {t0!r} and {t1!r}") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise InputError(f"{what}: window [{a}, {b}) must have finite bounds in seconds")
    if b < a:
        raise InputError(f"{what}: window end {b} s is before its start {a} s; pass t0 <= t1")
    return a, b
