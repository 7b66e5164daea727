"""Benchmark of reference-feature extraction: ``nh-serve bench features``.

Times :func:`nh_serve.data.features.reference_features` on synthetic Poisson spike
trains with realistic rates (log-normal around 5 Hz, capped at 50 Hz) over a
60 s reference window, for several unit counts, and reports the median time
per call (after one warm-up call) with the CPU model and core count.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from nh_serve.data.features import DEFAULT_REFERENCE_S, reference_features
from nh_serve.errors import InputError


def cpu_model() -> str:
    """CPU model name (from /proc/cpuinfo on Linux, else platform)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def realistic_spikes(
    *,
    n_units: int,
    duration_s: float,
    seed: int = 0,
    median_hz: float = 5.0,
    sigma: float = 1.0,
    max_hz: float = 50.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Homogeneous Poisson trains with log-normal rates; returns sorted (times s, unit_index)."""
    rng = np.random.default_rng(seed)
    rates = np.minimum(np.exp(rng.normal(np.log(median_hz), sigma, n_units)), max_hz)  # (U,) Hz
    n = rng.poisson(rates * duration_s)
    u = np.repeat(np.arange(n_units), n)
    t = rng.uniform(0.0, duration_s, n.sum())
    order = np.argsort(t, kind="stable")
    return t[order], u[order]


def run(
    units=(100, 300), *, duration_s: float = DEFAULT_REFERENCE_S, repeats: int = 20, seed: int = 0
) -> list[dict]:
    """Time feature extraction; one dict per unit count.

    Keys: ``units``, ``duration_s``, ``n_spikes``, ``median_ms``, ``min_ms``,
    ``repeats``, ``cpu``, ``cores``.
    """
    if repeats < 1:
        raise InputError(f"bench features: repeats must be >= 1, got {repeats}")
    out = []
    for n_units in units:
        t, u = realistic_spikes(n_units=int(n_units), duration_s=duration_s, seed=seed)
        reference_features(t, u, n_units=int(n_units), start=0.0, end=duration_s)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            reference_features(t, u, n_units=int(n_units), start=0.0, end=duration_s)
            times.append(time.perf_counter() - t0)
        out.append(
            {
                "units": int(n_units),
                "duration_s": float(duration_s),
                "n_spikes": int(t.size),
                "median_ms": float(np.median(times) * 1e3),
                "min_ms": float(np.min(times) * 1e3),
                "repeats": int(repeats),
                "cpu": cpu_model(),
                "cores": os.cpu_count() or 0,
            }
        )
    return out


def _main(args) -> int:
    rows = run(tuple(args.units), duration_s=args.duration, repeats=args.repeats, seed=args.seed)
    print(f"CPU: {rows[0]['cpu']} ({rows[0]['cores']} cores)")
    print(
        f"{'units':>6} {'spikes':>8} {'median ms':>10} {'min ms':>8}   ({args.duration:g} s window, {args.repeats} repeats)"
    )
    for r in rows:
        print(f"{r['units']:>6} {r['n_spikes']:>8} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f}")
    return 0


def add_cli(bench_subparsers) -> argparse.ArgumentParser:
    """Register ``features`` under ``nh-serve bench``."""
    p = bench_subparsers.add_parser(
        "features", help="time reference-feature extraction (33 features per unit)"
    )
    p.add_argument(
        "--units", type=int, nargs="+", default=[100, 300], help="unit counts to time (default: 100 300)"
    )
    p.add_argument(
        "--duration", type=float, default=DEFAULT_REFERENCE_S, help="reference window, seconds (default 60)"
    )
    p.add_argument("--repeats", type=int, default=20, help="timed calls per unit count (default 20)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic spikes")
    p.set_defaults(func=_main)
    return p
