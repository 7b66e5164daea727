"""Parity of an exported model (or any backend) against eager PyTorch.

Two kinds of cases:

* **random**: windows of random spikes with random z-scored features, built with
  the shared :func:`~nh_serve.data.windows.tokenize` / :func:`~nh_serve.data.windows.collate`,
  at batch, unit and token counts different from the export example (one unit
  with no spikes; batches whose windows have different unit counts, so units and
  tokens are padded and masked; behaviour / image events for multimodal configs,
  including windows with none). Unit embeddings are compared, then both
  forward graphs are fed the SAME (eager) embeddings so the forward graph is
  checked on its own.
* **recording**: a real recording (``<data>/<name>/spikes_flat.npz`` with
  ``spike_times`` (s) and ``unit_ids``), or a synthetic one
  (:func:`nh_serve.data.synth.make_session`) when none is available. Both models go
  through :class:`~nh_serve.inference.predictor.Predictor` (the same reference features,
  tokenization and batching code): register a 60 s reference, predict a few
  context windows after it (with and without ``history_counts``), compare.

Errors (float32 models, computed in float64):

* rates: ``max |r_test - r_ref| / r_ref`` over every real unit and bin (rates are
  at least 1e-4 Hz), i.e. about the largest absolute log-rate difference;
* embeddings: ``max |e_test - e_ref| / max |e_ref|``.

A check fails when either exceeds the tolerance (:data:`DEFAULT_TOLERANCE`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nh_serve.data.spikes import units_to_index
from nh_serve.data.windows import Window, collate, cut_windows, tokenize
from nh_serve.errors import CheckpointError, InputError

DEFAULT_TOLERANCE = 1e-4
"""Largest relative error accepted between an exported model and eager PyTorch (float32)."""

REAL_DATA_ENV = "NH_SERVE_REAL_DATA"
"""Environment variable naming the folder of real recordings used by the export parity check."""


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
    return tokenize(
        cfg,
        unit_features=rng.normal(size=(n_units, cfg.n_features)).astype(np.float32),
        spike_times=times,
        spike_unit_index=unit_index,
        ctx_start=ctx,
        ref_rate_hz=rng.gamma(2.0, rate_hz / 2, size=n_units),
        history_counts=rng.poisson(rate_hz * cfg.history_s, size=n_units),
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
        out.append((name, collate(items)))
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


# ----------------------------------------------------------------------------- recordings


def default_real_data_dir() -> Path:
    """``$NH_SERVE_REAL_DATA`` or ``shared/data/real`` beside the source tree."""
    env = os.environ.get(REAL_DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


def load_recordings(
    root: str | os.PathLike | None = None, *, limit: int = 3
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, spike_times (s), unit_ids as str)`` of up to ``limit`` real recordings under ``root``.

    Reads ``<root>/<name>/spikes_flat.npz`` (keys ``spike_times``, ``unit_ids``), sorted by
    name; unreadable files are skipped. Empty list if there is none.
    """
    base = Path(root) if root is not None else default_real_data_dir()
    out = []
    for f in sorted(base.glob("*/spikes_flat.npz")) if base.is_dir() else []:
        try:
            with np.load(f) as d:
                t = np.asarray(d["spike_times"], dtype=np.float64)
                ids = np.asarray(d["unit_ids"]).astype(str)
        except (OSError, KeyError, ValueError):
            continue
        if t.ndim == 1 and t.shape == ids.shape and t.size > 0:
            order = np.argsort(t, kind="stable")
            out.append((f.parent.name, t[order], ids[order]))
        if len(out) >= limit:
            break
    return out


def synthetic_recording(*, seed: int = 0, n_units: int = 48) -> tuple[str, np.ndarray, np.ndarray]:
    """A 90 s synthetic recording (:func:`nh_serve.data.synth.make_session`) as ``(name, times, unit ids)``."""
    from nh_serve.data.synth import make_session

    d = make_session(seed=seed, n_units=n_units, duration=90.0)
    ids = np.asarray(d["unit_ids"]).astype(str)
    return (
        f"synthetic seed {seed}",
        np.asarray(d["spike_times"], np.float64),
        ids[np.asarray(d["unit_index"])],
    )


def recording_windows(
    times: np.ndarray, ids: np.ndarray, units: np.ndarray, *, cfg, reference: tuple[float, float], n: int = 3
) -> list[Window]:
    """``n`` windows after the reference, cut by the window pipeline; every other one without history."""
    r0, r1 = reference
    last = float(times[-1]) - cfg.context_s  # latest context start inside the recording
    starts = [max(r0, min(r1 + 7.0 * i, last)) for i in range(n)]
    uidx = units_to_index(ids, units, name="recording unit_ids")
    cut = cut_windows(times, uidx, starts, n_units=units.size, cfg=cfg, history_start=r0)
    return [
        w if i % 2 == 1 else dataclasses.replace(w, history_counts=None, history_duration_s=None)
        for i, w in enumerate(cut)
    ]


def compare_predictors(
    reference,
    candidate,
    recordings: list[tuple[str, np.ndarray, np.ndarray]],
    *,
    kind: str,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ParityReport:
    """Predictor-level parity on recordings: same registration and windows through both Predictors."""
    report = ParityReport(tolerance=float(tolerance))
    cfg = reference.cfg
    for name, times, ids in recordings:
        t0 = float(times[0])
        r1 = min(t0 + 60.0, float(times[-1]) - cfg.context_s - 1.0)
        if r1 - t0 < 10.0:
            continue  # too short for a reference window
        m = times < r1
        units = np.unique(ids)
        tok_ref = reference.register(times[m], ids[m], reference_window=(t0, r1), units=units)
        tok_test = candidate.register(times[m], ids[m], reference_window=(t0, r1), units=units)
        e_err = embed_error(candidate.session(tok_test).embeddings, reference.session(tok_ref).embeddings)
        windows = recording_windows(times, ids, units, cfg=cfg, reference=(t0, r1))
        p_ref = reference.predict_windows(tok_ref, windows)
        p_test = candidate.predict_windows(tok_test, windows)
        r_ref = np.stack([p.rates_hz for p in p_ref]).astype(np.float64)
        r_test = np.stack([p.rates_hz for p in p_test]).astype(np.float64)
        with np.errstate(all="ignore"):
            r_err = float(np.max(np.abs(r_test - r_ref) / r_ref)) if np.all(np.isfinite(r_test)) else math.inf
        n_tok = max(int(w.spike_times.size) for w in windows) + 2 * units.size
        report.cases.append(
            ParityCase(
                name=name,
                kind=kind,
                windows=len(windows),
                units=int(units.size),
                tokens=n_tok,
                rate_error=r_err,
                embed_error=e_err,
            )
        )
    return report


def check_predictor_parity(
    reference,
    candidate,
    *,
    recordings: str | os.PathLike | list | None = "auto",
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> ParityReport:
    """Random-input and recording parity of ``candidate`` (a Predictor) against ``reference`` (eager Predictor).

    ``recordings``: ``"auto"`` (real recordings from :func:`default_real_data_dir`, else a synthetic
    one), a folder of real recordings, ``"synthetic"``, a list of ``(name, times, ids)``, or None (random
    cases only). Does not raise on failure: see :meth:`ParityReport.raise_if_failed`.
    """
    if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
        raise InputError(f"tolerance: must be a relative error in (0, 1), e.g. 1e-4; got {tolerance!r}")
    cfg = reference.cfg
    report = compare_backends(reference._backend, candidate._backend, cfg, tolerance=tolerance, seed=seed)
    if recordings is None:
        return report
    kind = "recording"
    if isinstance(recordings, list):
        recs = recordings
    elif recordings == "synthetic":
        recs, kind = [synthetic_recording(seed=seed)], "synthetic"
    else:
        root = None if recordings == "auto" else recordings
        recs = load_recordings(root)
        if not recs:
            if log is not None:
                where = default_real_data_dir() if root is None else root
                log(f"no real recordings under {where}; checking on a synthetic recording instead")
            recs, kind = [synthetic_recording(seed=seed)], "synthetic"
    report.cases += compare_predictors(reference, candidate, recs, kind=kind, tolerance=tolerance).cases
    return report
