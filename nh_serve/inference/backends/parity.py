"""Parity of a backend against eager PyTorch on random inputs (every backend is checked when built).

Windows of random spikes with random z-scored features, built with the window
pipeline's :func:`~nh_serve.data.windows.tokenize` / :func:`~nh_serve.data.windows.collate`,
at batch, unit and token counts different from the export example (one unit with
no spikes; batches whose windows have different unit counts, so units and tokens
are padded and masked; behaviour / image events for multimodal configs, including
windows with none). Unit embeddings are compared, then both forward passes are fed
the SAME (eager) embeddings so the forward graph is checked on its own.
``export.parity`` adds the Predictor-level check on recordings that exports pass.

Errors (float32 models, computed in float64):

* rates: ``max |r_test - r_ref| / r_ref`` over every real unit and bin (rates are
  at least 1e-4 Hz), i.e. about the largest absolute log-rate difference;
* embeddings: ``max |e_test - e_ref| / max |e_ref|``.

A check fails when either exceeds the tolerance (:data:`DEFAULT_TOLERANCE`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nh_serve.data.windows import collate, tokenize
from nh_serve.errors import CheckpointError
from nh_serve.inference.artifact import forward_input_names

DEFAULT_TOLERANCE = 1e-4
"""Largest relative error accepted between an exported model and eager PyTorch (float32)."""

class ParityError(CheckpointError):
    """An exported model (or backend) does not reproduce eager PyTorch within the tolerance."""


@dataclass
class ParityCase:
    """One compared input: its description and relative errors (rates, embeddings)."""

    name: str
    kind: str  # "random", "recording" or "synthetic"
    windows: int
    units: int
    tokens: int
    rate_error: float
    embed_error: float

    @property
    def error(self) -> float:
        return max(self.rate_error, self.embed_error)


@dataclass
class ParityReport:
    """All cases of a parity check and the tolerance they were held to."""

    tolerance: float
    cases: list[ParityCase] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((c.error for c in self.cases), default=0.0)

    @property
    def worst(self) -> ParityCase | None:
        return max(self.cases, key=lambda c: c.error) if self.cases else None

    @property
    def ok(self) -> bool:
        return all(math.isfinite(c.error) and c.error <= self.tolerance for c in self.cases)

    def to_dict(self) -> dict:
        """JSON-compatible summary (stored in the artifact metadata)."""
        return {
            "tolerance": self.tolerance,
            "max_relative_error": float(self.max_error),
            "metric": "rates: max |r - r_ref| / r_ref; embeddings: max |e - e_ref| / max |e_ref|",
            "cases": [
                {
                    "name": c.name,
                    "kind": c.kind,
                    "windows": c.windows,
                    "units": c.units,
                    "tokens": c.tokens,
                    "rate_error": float(c.rate_error),
                    "embed_error": float(c.embed_error),
                }
                for c in self.cases
            ],
        }

    def summary(self) -> str:
        """One line per case plus the verdict."""
        lines = [
            f"  {c.kind:<9} {c.name:<34} B={c.windows:<3} U={c.units:<5} N={c.tokens:<6} "
            f"rates {c.rate_error:.2e}  embeddings {c.embed_error:.2e}"
            for c in self.cases
        ]
        verdict = "ok" if self.ok else "FAILED"
        lines.append(f"  max relative error {self.max_error:.2e} (tolerance {self.tolerance:g}): {verdict}")
        return "\n".join(lines)

    def raise_if_failed(self, what: str) -> None:
        """:class:`ParityError` naming the worst case if any case exceeds the tolerance."""
        if self.ok:
            return
        w = self.worst
        raise ParityError(
            f"{what} does not match eager PyTorch: relative error {w.error:.3g} > tolerance {self.tolerance:g} "
            f"on the {w.kind} case {w.name!r} (rates {w.rate_error:.3g}, embeddings {w.embed_error:.3g}); "
            "nothing was written. The exporter or runtime changed the numbers: try the other format, "
            "another opset, or report it with the model config"
        )


def rate_error(log_rate: Tensor, log_rate_ref: Tensor, unit_mask: Tensor | None = None) -> float:
    """``max |exp(a) - exp(b)| / exp(b)`` over real units (``unit_mask`` ``(B, U)``); inf for NaN / shape errors."""
    a = torch.as_tensor(log_rate).double()
    b = torch.as_tensor(log_rate_ref).double()
    if a.shape != b.shape:
        return math.inf
    d = torch.expm1(a - b).abs()  # |r_a / r_b - 1|
    if unit_mask is not None:
        d = d[unit_mask.bool()]
    if d.numel() == 0:
        return 0.0
    if not torch.isfinite(d).all():
        return math.inf
    return float(d.max())


def embed_error(emb: Tensor, emb_ref: Tensor) -> float:
    """``max |a - b| / max |b|`` (inf for NaN or shape mismatch)."""
    a = torch.as_tensor(emb).double()
    b = torch.as_tensor(emb_ref).double()
    if a.shape != b.shape:
        return math.inf
    if not torch.isfinite(a).all():
        return math.inf
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / max(scale, 1e-30) if a.numel() else 0.0


# ----------------------------------------------------------------------------- random cases


def _random_window(cfg, rng: np.random.Generator, *, n_units: int, rate_hz: float, events: bool) -> dict:
    ctx = 50.0
    counts = rng.poisson(rate_hz * cfg.context_s, size=n_units)
    counts[0] = 0  # one silent unit
    unit_index = np.repeat(np.arange(n_units), counts)
    times = np.sort(ctx + rng.uniform(0.0, cfg.context_s * 0.999, size=unit_index.size))
    unit_index = unit_index[rng.permutation(unit_index.size)]  # interleaved units
    kw: dict[str, Any] = {}
    for key, width in (("behavior", cfg.behavior_dim), ("images", cfg.image_dim)):
        if width > 0 and events:
            n = int(rng.integers(1, 12))
            span = cfg.context_s + (cfg.horizon_s if key == "images" else 0.0)  # images: also scheduled ones
            kw[key] = (np.sort(ctx + rng.uniform(0, span * 0.999, n)), rng.normal(size=(n, width)))
    if cfg.history_taus:
        kw["history_rates"] = rng.gamma(2.0, rate_hz / 2, size=(n_units, len(cfg.history_taus)))
    else:
        kw["history_counts"] = rng.poisson(rate_hz * cfg.history_s, size=n_units)
    return tokenize(
        cfg,
        unit_features=rng.normal(size=(n_units, cfg.n_features)).astype(np.float32),
        spike_times=times,
        spike_unit_index=unit_index,
        ctx_start=ctx,
        ref_rate_hz=rng.gamma(2.0, rate_hz / 2, size=n_units),
        **kw,
    )


def random_batches(cfg, *, seed: int = 0, small: bool = False) -> list[tuple[str, dict[str, Tensor]]]:
    """Named random batches (collate output, with ``unit_features``) at assorted sizes.

    Sizes differ from the export example (B=2, U=7): one window of one unit; one
    window of 64 units at 20 Hz; three windows of 5, 33 and 12 units (padding).
    ``small`` keeps only the first two (a quick check when a backend is built).
    """
    rng = np.random.default_rng(seed)
    specs = [("1 window, 1 unit", [(1, 3.0, True)]), ("1 window, 64 units, 20 Hz", [(64, 20.0, True)])]
    if not small:
        specs.append(
            ("3 windows, 5/33/12 units, padded", [(5, 8.0, True), (33, 5.0, False), (12, 30.0, True)])
        )
    out = []
    for name, windows in specs:
        items = [_random_window(cfg, rng, n_units=u, rate_hz=r, events=e) for u, r, e in windows]
        batch = collate(items)
        if cfg.readout_dim:  # a fitted read-out, as a registered session holds one
            B, U = batch["unit_mask"].shape
            batch["unit_readout"] = torch.from_numpy(rng.normal(0.0, 0.3, size=(B, U, cfg.readout_dim + 1)).astype(np.float32))
        out.append((name, batch))
    return out


def compare_backends(
    reference: Any,
    candidate: Any,
    cfg,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    small: bool = False,
) -> ParityReport:
    """Random-input parity of two backends (``embed_units(features)`` and ``(batch, embeddings) -> log-rate``)."""
    report = ParityReport(tolerance=float(tolerance))
    with torch.inference_mode():
        for name, batch in random_batches(cfg, seed=seed, small=small):
            batch = dict(batch)
            feats = batch.pop("unit_features")
            e_ref = reference.embed_units(feats)
            e_test = candidate.embed_units(feats)
            lr_ref = reference(batch, e_ref)
            lr_test = candidate(batch, e_ref)
            report.cases.append(
                ParityCase(
                    name=name,
                    kind="random",
                    windows=int(feats.shape[0]),
                    units=int(feats.shape[1]),
                    tokens=int(batch["spike_mask"].shape[1]),
                    rate_error=rate_error(lr_test, lr_ref, batch["unit_mask"]),
                    embed_error=embed_error(e_test, e_ref),
                )
            )
    return report


# ----------------------------------------------------------------------------- example inputs

# Example sizes: all different and >= 2, so that torch.export keeps every dynamic axis
# symbolic (size-0/1 axes and axes of equal size would be specialised / merged).
EX_BATCH, EX_UNITS, EX_SPIKES, EX_BEHAVIOR, EX_IMAGES = 2, 7, 9, 5, 4


def example_inputs(cfg, *, seed: int = 0) -> dict[str, Tensor]:
    """Random ``forward_with_embeddings`` inputs (``B=2, U=7``, ...), CPU: the ONNX export traces
    them and torch-compile warms up on them."""
    g = torch.Generator().manual_seed(seed)
    B, U = EX_BATCH, EX_UNITS
    N = 2 * U + EX_SPIKES
    S = len(cfg.activity_scales)
    x: dict[str, Tensor] = {
        "unit_embeddings": torch.randn(B, U, cfg.dim, generator=g),
        "unit_mask": torch.ones(B, U, dtype=torch.bool),
        "unit_counts": torch.randint(0, 5, (B, U, S), generator=g).float(),
        "history_rate_hz": torch.rand(B, U, generator=g) * 10,
        "ref_rate_hz": torch.rand(B, U, generator=g) * 10,
        "spike_unit_index": torch.randint(0, U, (B, N), generator=g),
        "spike_times": torch.rand(B, N, generator=g) * cfg.context_s,
        "spike_type": torch.randint(0, 3, (B, N), generator=g),
        "spike_mask": torch.ones(B, N, dtype=torch.bool),
    }
    x["unit_mask"][1, -1] = False
    x["spike_mask"][1, -2:] = False
    for prefix, n, width in (
        ("behavior", EX_BEHAVIOR, cfg.behavior_dim),
        ("image", EX_IMAGES, cfg.image_dim),
    ):
        if width > 0:
            # images may lie in the forecast window and carry the schedule-marker column
            span = cfg.context_s + (cfg.horizon_s if prefix == "image" else 0.0)
            x[f"{prefix}_times"] = torch.rand(B, n, generator=g) * span
            x[f"{prefix}_values"] = torch.randn(B, n, width + (prefix == "image"), generator=g)
            x[f"{prefix}_mask"] = torch.ones(B, n, dtype=torch.bool)
            x[f"{prefix}_mask"][1, -1] = False
    if cfg.history_taus:
        x["history_rates"] = torch.rand(B, U, len(cfg.history_taus), generator=g) * 10
    if cfg.readout_dim:
        x["unit_readout"] = torch.randn(B, U, cfg.readout_dim + 1, generator=g) * 0.3
    if cfg.pop_context_bins:
        x["unit_bins"] = torch.randint(0, 4, (B, U, cfg.pop_context_bins), generator=g).float()
    return {k: x[k] for k in forward_input_names(cfg)}
