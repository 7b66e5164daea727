"""Training data: recordings held in memory and (session, window) samples.

Every training recording is a session file (:mod:`nh_serve.data.session`). Training
recordings are small, so :func:`load_session` reads each one's spikes into
memory once; a window is then cut and tokenized by the window pipeline,
:mod:`nh_serve.data.windows` (cheap, done per step).

Per recording (times in seconds):

- **reference window** ``[start, start + ref)`` with
  ``ref = auto_reference_s(duration, reference_s)`` (60 s, or a quarter of a
  short recording, at least 10 s; the 2-minute IBL recording gets 30 s). The 33
  reference features and the reference rates come from it, exactly as
  :meth:`nh_serve.inference.predictor.Predictor.register` computes them.
- **windows**: a context ``[c, c + context_s)``, the target = spike counts in the
  ``n_bins`` bins of ``bin_size_s`` after it, the slow-rate input = counts in
  ``[max(start, c - history_s), c)`` (history models: each unit's smoothed rates at the
  context end, from the recording start, :mod:`nh_serve.data.history`; stored every
  10 s so a window needs only the spikes since), cut by :func:`nh_serve.data.windows.cut_window`,
  the same window pipeline the Predictor, evaluation and scoring use. Contexts
  start after the reference window, as in evaluation.
- **time split** (training recordings): contexts of training windows start in
  ``[ref_end, split - span]``, validation-in-time windows in ``[split, end - span]``
  with ``split = end - val_time_fraction * (end - ref_end)`` and
  ``span = context_s + horizon``; when the last part is shorter than one span
  the recording has no validation-in-time windows.

:func:`split_sessions` splits a list of recordings into train / validation /
test by whole recordings. :func:`npz_to_session` converts a flat
``spikes_flat.npz`` (``spike_times``, ``unit_ids``) into a session file.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from nh_serve.core.config import ModelConfig
from nh_serve.data.coupling import unit_descriptors
from nh_serve.data.features import FeatureNorm, auto_reference_s, reference_rate_hz
from nh_serve.data.history import ema_rates
from nh_serve.data.session import open_session, write_session
from nh_serve.data.session.files import SESSION_SUFFIXES, find_sessions, session_name  # noqa: F401 (re-exported)
from nh_serve.data.windows import cut_window, target_counts, tokenize_window
from nh_serve.errors import InputError

ANCHOR_S = 10.0  # spacing of the stored smoothed-rate states of a history model's training recording


@dataclass
class TrainSession:
    """One recording in memory, with its reference statistics (times in seconds)."""

    name: str  # "<folder>/<file>" (no absolute path)
    unit_ids: np.ndarray  # (U,) str
    times: np.ndarray  # (N,) float64 sorted spike times
    units: np.ndarray  # (N,) int64 unit row of each spike
    start: float
    end: float
    reference: tuple[float, float]  # [r0, r1)
    features: np.ndarray  # (U, F) raw unit descriptors (33 statistics, + population coupling)
    ref_rate_hz: np.ndarray  # (U,) Hz
    train_range: tuple[float, float]  # context starts of training windows, [lo, hi]
    val_range: tuple[float, float] | None  # context starts of validation-in-time windows, or None
    behavior: tuple[np.ndarray, np.ndarray] | None = None  # (times (Nb,), values (Nb, D_b))
    images: tuple[np.ndarray, np.ndarray] | None = None  # (times (Ni,), emb (Ni, D_img))
    unit_features: np.ndarray | None = field(default=None, repr=False)  # (U, F) z-scored
    history_anchors: np.ndarray | None = field(default=None, repr=False)  # (A,) s: smoothed-rate states every ANCHOR_S
    history_states: np.ndarray | None = field(default=None, repr=False)  # (A, U, K) the states there (history models)

    @property
    def n_units(self) -> int:
        return int(self.unit_ids.shape[0])

    @property
    def duration(self) -> float:
        return self.end - self.start


def load_session(
    path: str | Path,
    *,
    cfg: ModelConfig,
    reference_s: float = 60.0,
    val_time_fraction: float = 0.0,
) -> TrainSession:
    """Read a session file into memory and compute its reference statistics.

    Raises :class:`InputError` when the recording cannot give one window after
    its reference window, when no unit spikes in the reference window, or when
    the model takes behaviour / images that the file lacks.
    """
    path = Path(path)
    name = session_name(path)
    with open_session(path) as s:
        start, end = float(s.start), float(s.end)
        times, units = s.spikes(start, end)
        unit_ids = np.asarray(s.unit_ids).astype(str)
        behavior = s.behavior(start, end) if cfg.behavior_dim > 0 else None
        images = s.image_events(start, end) if cfg.image_dim > 0 else None
        b_dim, i_dim = s.behavior_dim, s.image_dim
    for kind, want, have, got in (
        ("behaviour", cfg.behavior_dim, b_dim, behavior),
        ("image embeddings", cfg.image_dim, i_dim, images),
    ):
        if want > 0 and (got is None or have != want):
            raise InputError(
                f"{name}: the model takes {kind} of width {want} but the file has "
                f"{'none' if got is None else f'width {have}'}; train on files with that input or set the "
                "model's width to 0"
            )
    duration = end - start
    ref = auto_reference_s(duration, reference_s)
    span = cfg.context_s + cfg.horizon_s
    r0, r1 = start, start + ref
    if end - r1 < span:
        raise InputError(
            f"{name}: is {duration:.3g} s long; training needs the {ref:g} s reference window plus at least "
            f"{span:g} s (context {cfg.context_s:g} s + horizon {cfg.horizon_s:g} s) after it. "
            "Drop this file or use a longer recording."
        )
    a, b = np.searchsorted(times, [r0, r1])
    if b == a:
        raise InputError(
            f"{name}: no unit fires in the reference window [{r0:g}, {r1:g}) s, so the units have no "
            "reference statistics; drop this file or pass a recording whose units fire"
        )
    ref_rate = reference_rate_hz(times[a:b], units[a:b], n_units=unit_ids.shape[0], start=r0, end=r1)
    feats = unit_descriptors(
        times[a:b], units[a:b], n_units=unit_ids.shape[0], start=r0, end=r1, ref_rate_hz=ref_rate,
        components=cfg.coupling_components,
    )
    anchors = states = None
    if cfg.history_taus:  # smoothed-rate states every ANCHOR_S from the recording start (the reference start)
        anchors = np.arange(start, end, ANCHOR_S)
        states = ema_rates(times, units, n_units=unit_ids.shape[0], t_eval=anchors, start=start,
                           ref_rate_hz=ref_rate, taus=cfg.history_taus).astype(np.float32)
    split = end - val_time_fraction * (end - r1)
    if val_time_fraction > 0 and end - split >= span and split - r1 >= span:
        train_range, val_range = (r1, split - span), (split, end - span)
    else:
        train_range, val_range = (r1, end - span), None
    return TrainSession(
        name=name,
        unit_ids=unit_ids,
        times=times,
        units=units,
        start=start,
        end=end,
        reference=(r0, r1),
        features=feats,
        ref_rate_hz=ref_rate.astype(np.float32),
        train_range=train_range,
        val_range=val_range,
        behavior=behavior,
        images=images,
        history_anchors=anchors,
        history_states=states,
    )


def history_at(s: TrainSession, t: float, taus) -> np.ndarray:
    """``(U, K)`` smoothed rates at time ``t`` (from the nearest earlier anchor state; exact)."""
    a = int(np.searchsorted(s.history_anchors, t, side="right")) - 1
    t0 = float(s.history_anchors[a])
    i, j = np.searchsorted(s.times, [t0, t])
    return ema_rates(s.times[i:j], s.units[i:j], n_units=s.n_units, t_eval=[t], start=t0, ref_rate_hz=s.ref_rate_hz,
                     taus=taus, init=s.history_states[a])[0]


def load_sessions(
    paths: list[Path],
    *,
    cfg: ModelConfig,
    reference_s: float,
    val_time_fraction: float,
    progress: bool = False,
) -> list[TrainSession]:
    """:func:`load_session` for every path; every problem is reported before training starts."""
    return [
        load_session(p, cfg=cfg, reference_s=reference_s, val_time_fraction=val_time_fraction)
        for p in tqdm(paths, desc="loading sessions", unit="session", disable=not progress, leave=False)
    ]


def apply_norm(sessions: list[TrainSession], norm: FeatureNorm) -> None:
    """Store each recording's z-scored features (``unit_features``)."""
    for s in sessions:
        s.unit_features = norm.apply(s.features)


def split_sessions(
    paths: list[Path], *, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[Path], list[Path], list[Path]]:
    """Split recordings into (train, validation, test) by whole recordings, reproducibly from ``seed``.

    ``round(fraction * n)`` recordings go to validation and test each (at least
    one when the fraction is positive and at least 3 recordings exist); the
    rest train. The order within each list follows ``paths``.
    """
    n = len(paths)
    n_val = int(round(val_fraction * n))
    n_test = int(round(test_fraction * n))
    if n >= 3:
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
    if n - n_val - n_test < 1:
        raise InputError(
            f"--data: {n} recording(s) cannot be split into validation ({n_val}), test ({n_test}) and at least "
            "one training recording; pass more recordings, lower val_fraction / test_fraction, or pass --val-data"
        )
    perm = np.random.Generator(np.random.PCG64([int(seed), 0x5E55])).permutation(n)
    val_idx, test_idx = set(perm[:n_val].tolist()), set(perm[n_val : n_val + n_test].tolist())
    train = [p for i, p in enumerate(paths) if i not in val_idx and i not in test_idx]
    val = [p for i, p in enumerate(paths) if i in val_idx]
    test = [p for i, p in enumerate(paths) if i in test_idx]
    return train, val, test


# ----------------------------------------------------------------------------------------- windows


def window_item(
    s: TrainSession, c: float, cfg: ModelConfig, *, image_schedule_s: float | None = None
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Tokenized inputs and target counts ``(U, n_bins)`` of the window whose context starts at ``c``.

    The window pipeline (:mod:`nh_serve.data.windows`) cuts it as the Predictor, evaluation and
    scoring do. Image models get the images shown in the context and those due in the first
    ``image_schedule_s`` seconds of the forecast window (default: all of it).
    """
    hist = history_at(s, c + cfg.context_s, cfg.history_taus)[None] if cfg.history_taus else None
    w = cut_window(
        s.times,
        s.units,
        c,
        n_units=s.n_units,
        cfg=cfg,
        history_start=s.start,
        behavior=s.behavior,
        images=s.images,
        image_schedule_s=image_schedule_s,
        history_rates=hist,
    )
    item = tokenize_window(cfg, w, unit_features=s.unit_features, ref_rate_hz=s.ref_rate_hz)
    y = target_counts(
        s.times, s.units, [c + cfg.context_s], n_units=s.n_units, bin_size=cfg.bin_size_s, n_bins=cfg.n_bins
    )[0]
    return item, y


def pad_targets(targets: list[np.ndarray]) -> torch.Tensor:
    """Stack ``(U_i, T)`` targets into ``(B, max U_i, T)`` (zeros where units are padded)."""
    U = max(y.shape[0] for y in targets)
    out = np.zeros((len(targets), U, targets[0].shape[1]), dtype=np.float32)
    for i, y in enumerate(targets):
        out[i, : y.shape[0]] = y
    return torch.from_numpy(out)


def sample_windows(
    rng: np.random.Generator, sessions: list[TrainSession], weights: np.ndarray, n: int
) -> list[tuple[int, float]]:
    """Draw ``n`` (session index, context start) pairs: sessions by ``weights``, starts uniform."""
    idx = rng.choice(len(sessions), size=n, p=weights)
    out = []
    for i in idx:
        lo, hi = sessions[i].train_range
        out.append((int(i), float(lo + rng.random() * (hi - lo))))
    return out


def sample_image_schedules(rng: np.random.Generator, n: int, cfg: ModelConfig, *, dropout: float) -> list[float]:
    """How far ahead the image schedule is known in each of ``n`` training windows: the whole
    forecast window, or with probability ``dropout`` a whole number of bins drawn uniformly from
    ``0 .. n_bins - 1`` (0 = only shown images), so a model also learns to forecast without it."""
    cut = rng.random(n) < dropout
    bins = rng.integers(0, cfg.n_bins, size=n)
    return [float(b * cfg.bin_size_s) if c else cfg.horizon_s for c, b in zip(cut, bins)]


def evenly_spaced(lo: float, hi: float, n: int) -> np.ndarray:
    """At most ``n`` context starts evenly spread over ``[lo, hi]`` (at least 1 s apart)."""
    k = min(n, int(math.floor(hi - lo)) + 1)
    return np.linspace(lo, hi, max(k, 1)) if k > 1 else np.array([lo])


def session_weights(sessions: list[TrainSession], weights: dict[str, float]) -> np.ndarray:
    """Sampling probability of each recording: 1, or ``weights[key]`` where ``key`` is a substring of its name."""
    w = np.ones(len(sessions))
    for i, s in enumerate(sessions):
        for key, v in weights.items():
            if key in s.name:
                w[i] = float(v)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise InputError(f"session_weights: weights must be >= 0 and not all 0, got {weights}")
    return w / w.sum()


# ----------------------------------------------------------------------------------------- conversion


def npz_to_session(npz_path: str | Path, out_path: str | Path, *, source: str | None = None) -> Path:
    """Write a session file from a flat ``spikes_flat.npz`` (``spike_times`` s, ``unit_ids`` per spike)."""
    npz_path = Path(npz_path)
    try:
        z = np.load(npz_path)
        t = np.asarray(z["spike_times"], dtype=np.float64)
        ids = np.asarray(z["unit_ids"])
    except (OSError, KeyError, ValueError) as e:
        raise InputError(
            f"{npz_path}: cannot read spike_times / unit_ids ({e}); pass an .npz with those two arrays"
        ) from None
    order = np.argsort(t, kind="stable")
    t, ids = t[order], ids[order]
    uniq, idx = np.unique(ids, return_inverse=True)
    return write_session(
        out_path,
        spike_times=t,
        unit_index=idx.astype(np.int64),
        unit_ids=uniq.astype(str),
        provenance={"source": source or npz_path.parent.name, "converted_from": npz_path.name},
    )


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.data",
        description="Convert flat spikes_flat.npz recordings (one per folder) into session files.",
    )
    p.add_argument("folders", nargs="+", help="folders holding spikes_flat.npz")
    p.add_argument("--out", required=True, help="output folder; writes <folder name>.h5")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in args.folders:
        src = Path(f) / "spikes_flat.npz"
        dest = npz_to_session(src, out / f"{Path(f).name}.h5", source=Path(f).name)
        print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
