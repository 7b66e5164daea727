"""Parity of an exported model against eager PyTorch: what an export must pass before it is written.

Two kinds of cases (errors as in :mod:`nh_serve.inference.backends.parity`):

* **random**: :func:`~nh_serve.inference.backends.parity.compare_backends` on random
  windows of assorted sizes (the check every backend passes when it is built);
* **recording**: a real recording (``<data>/<name>/spikes_flat.npz`` with
  ``spike_times`` (s) and ``unit_ids``), or a synthetic one
  (:func:`nh_serve.data.synth.make_session`) when none is available. Both models go
  through :class:`~nh_serve.inference.predictor.Predictor` (the same reference
  features, window pipeline and batching code): register a 60 s reference, predict
  a few context windows after it (with and without ``history_counts``), compare.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nh_serve.data.features import reference_rate_hz
from nh_serve.data.spikes import units_to_index
from nh_serve.data.synth import make_session
from nh_serve.data.windows import Window, cut_windows
from nh_serve.errors import InputError
from nh_serve.inference.backends.parity import (
    DEFAULT_TOLERANCE,
    ParityCase,
    ParityError,
    ParityReport,
    compare_backends,
    embed_error,
)

__all__ = [
    "DEFAULT_TOLERANCE",
    "REAL_DATA_ENV",
    "ParityError",
    "ParityReport",
    "check_predictor_parity",
    "compare_predictors",
    "load_recordings",
    "recording_windows",
    "synthetic_recording",
]

REAL_DATA_ENV = "NH_SERVE_REAL_DATA"
"""Environment variable naming the folder of real recordings used by the export parity check."""


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
    m = (times >= r0) & (times < r1)
    ref_rate = reference_rate_hz(times[m], uidx[m], n_units=units.size, start=r0, end=r1)
    cut = cut_windows(times, uidx, starts, n_units=units.size, cfg=cfg, history_start=r0, ref_rate_hz=ref_rate)
    return [
        w if i % 2 == 1 else dataclasses.replace(w, history_counts=None, history_duration_s=None, history_rates=None)
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
        # the candidate runs the network with the reference's registration (an artifact cannot fit
        # read-outs itself: parity is about the network)
        tok_test = candidate.register(times[m], ids[m], reference_window=(t0, r1), units=units, fit="none")
        candidate.session(tok_test).take_fit(reference.session(tok_ref))
        e_err = embed_error(candidate.session(tok_test).embeddings, reference.session(tok_ref).embeddings)
        windows = recording_windows(times, ids, units, cfg=cfg, reference=(t0, r1))
        with warnings.catch_warnings():  # windows 7 s apart: the sessions' streams have gaps, by design here
            warnings.simplefilter("ignore", UserWarning)
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
