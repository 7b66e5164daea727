"""The result of one prediction, shared by the local Predictor and the HTTP client (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """Predicted rates for one context window."""

    rates_hz: np.ndarray  # (U, T) float32 firing rate in Hz per future bin
    bin_edges: np.ndarray  # (T + 1,) float64 absolute seconds
    unit_ids: np.ndarray  # (U,) str, the registered unit order
    model: str  # model config name
    model_hash: str  # short content hash of the checkpoint weights

    @property
    def bin_size(self) -> float:
        return float(self.bin_edges[1] - self.bin_edges[0])

    @property
    def expected_counts(self) -> np.ndarray:
        """(U, T) expected spike counts per bin (rate x bin width)."""
        return self.rates_hz * np.diff(self.bin_edges).astype(np.float32)[None, :]
