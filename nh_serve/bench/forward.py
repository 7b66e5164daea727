"""Forward-pass latency of a NeuroHorizon model on CPU (``nh-serve bench forward``).

Builds a model with random weights, draws one window of synthetic spikes (unit
rates log-normal with a mean of ``rate_hz``, Poisson spikes over a 1 s context)
for each unit count, and times ``tokenize + collate`` and the forward pass under
``torch.inference_mode`` (median / p90 / p99 over ``runs`` calls after
``warmup`` calls). Prints a table with the CPU model, torch version and thread count.

Allocator note: the forward pass allocates a few tensors of 0.1-4 MB (keys and
values of every spike token, the ``(U, T, H)`` hidden layer of the per-neuron
head). With glibc's default thresholds every such buffer is ``mmap``-ed and
released again, and its pages fault in on each call: about half of the CPU
time at 300 units. :func:`tune_malloc` (on by default here, ``--no-tune-malloc``
to measure without it) raises glibc's mmap and trim thresholds so that freed
buffers are reused; serving processes should do the same (or set
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, or use jemalloc).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from nh_serve.core.config import CONFIGS, get_config
from nh_serve.core.model import NeuroHorizon, count_parameters
from nh_serve.errors import InputError
from nh_serve.evaluation.reporting import cpu_model
from nh_serve.inference.runtime import tune_malloc
from nh_serve.util import help_text


def synthetic_window(
    *, n_units: int, n_features: int, context_s: float, rate_hz: float, seed: int
) -> dict[str, np.ndarray | float]:
    """Random tokenize() arguments for one window: log-normal rates (mean ``rate_hz``), Poisson spikes."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    rates = np.exp(rng.normal(np.log(rate_hz) - sigma**2 / 2, sigma, size=n_units))  # (U,) Hz, mean rate_hz
    ctx_start = 100.0
    counts = rng.poisson(rates * context_s)  # (U,)
    unit_index = np.repeat(np.arange(n_units), counts)
    times = ctx_start + rng.uniform(0.0, context_s, size=unit_index.shape[0])
    order = np.argsort(times, kind="stable")
    return {
        "unit_features": rng.normal(size=(n_units, n_features)).astype(np.float32),
        "spike_times": times[order],
        "spike_unit_index": unit_index[order],
        "ctx_start": ctx_start,
        "ref_rate_hz": rates.astype(np.float32),
    }


def _percentiles_ms(samples: list[float]) -> tuple[float, float, float]:
    a = np.asarray(samples) * 1e3
    return float(np.median(a)), float(np.percentile(a, 90)), float(np.percentile(a, 99))


def run(
    config: str = "nh-small",
    units: tuple[int, ...] = (100, 300),
    *,
    runs: int = 50,
    warmup: int = 10,
    rate_hz: float = 5.0,
    batch: int = 1,
    threads: int | None = None,
    seed: int = 0,
    malloc_tuning: bool = True,
) -> list[dict[str, float]]:
    """Time the forward pass of ``config`` for each unit count; print and return the rows.

    Each row: ``units``, ``tokens`` (spike + start/end tokens per window), ``tokenize_ms``
    (median tokenize + collate), ``median_ms``, ``p90_ms``, ``p99_ms`` (forward only).
    ``malloc_tuning`` applies :func:`tune_malloc` first (it stays applied for the process).
    """
    if config not in CONFIGS:
        raise InputError(f"unknown config {config!r}; choose one of {', '.join(CONFIGS)}")
    if runs < 1 or warmup < 0 or batch < 1 or any(u < 1 for u in units):
        raise InputError("runs, batch and every unit count must be >= 1, warmup >= 0")
    if threads is not None:
        torch.set_num_threads(int(threads))
    tuned = tune_malloc() if malloc_tuning else False
    cfg = get_config(config)
    torch.manual_seed(seed)
    model = NeuroHorizon(cfg).eval()

    rows = []
    for n_units in units:
        window = synthetic_window(
            n_units=n_units, n_features=cfg.n_features, context_s=cfg.context_s, rate_hz=rate_hz, seed=seed
        )
        tok_times = []
        for _ in range(max(5, min(runs, 20))):
            t0 = time.perf_counter()
            batch_dict = model.collate([model.tokenize(**window)] * batch)
            tok_times.append(time.perf_counter() - t0)
        fwd_times = []
        with torch.inference_mode():
            for i in range(warmup + runs):
                t0 = time.perf_counter()
                model(**batch_dict)
                if i >= warmup:
                    fwd_times.append(time.perf_counter() - t0)
        med, p90, p99 = _percentiles_ms(fwd_times)
        rows.append(
            {
                "units": n_units,
                "tokens": int(batch_dict["spike_mask"].shape[1]),
                "tokenize_ms": _percentiles_ms(tok_times)[0],
                "median_ms": med,
                "p90_ms": p90,
                "p99_ms": p99,
            }
        )

    print(
        f"NeuroHorizon forward, config {config} ({count_parameters(model):,} params), batch {batch}, "
        f"{cfg.context_s:g} s context, {cfg.n_bins} x {cfg.bin_size_s * 1e3:g} ms bins, mean rate {rate_hz:g} Hz"
    )
    print(
        f"CPU: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {runs} runs, "
        f"glibc malloc thresholds raised: {'yes' if tuned else 'no'}"
    )
    print(f"{'units':>6} {'tokens':>7} {'tokenize ms':>12} {'median ms':>10} {'p90 ms':>8} {'p99 ms':>8}")
    for r in rows:
        print(
            f"{r['units']:>6} {r['tokens']:>7} {r['tokenize_ms']:>12.2f} {r['median_ms']:>10.2f} "
            f"{r['p90_ms']:>8.2f} {r['p99_ms']:>8.2f}"
        )
    return rows


def add_cli(bench_subparsers) -> None:
    """Register ``forward`` under ``nh-serve bench``."""
    p = bench_subparsers.add_parser(
        "forward",
        help="CPU forward-pass latency of a model with random weights",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", default="nh-small", choices=sorted(CONFIGS), help="model config (default nh-small)"
    )
    p.add_argument("--units", type=int, nargs="+", default=[100, 300], help="unit counts (default 100 300)")
    p.add_argument("--runs", type=int, default=50, help="timed calls per unit count (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls first (default 10)")
    p.add_argument("--rate", type=float, default=5.0, help="mean firing rate, Hz (default 5)")
    p.add_argument("--batch", type=int, default=1, help="windows per forward call (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-tune-malloc", action="store_true", help="keep glibc's default malloc thresholds (see the notes)"
    )
    p.set_defaults(func=_main)


def _main(args) -> int:
    run(
        args.config,
        tuple(args.units),
        runs=args.runs,
        warmup=args.warmup,
        rate_hz=args.rate,
        batch=args.batch,
        threads=args.threads,
        seed=args.seed,
        malloc_tuning=not args.no_tune_malloc,
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m nh_serve.bench.forward")
    add_cli(parser.add_subparsers(dest="bench", required=True))
    ns = parser.parse_args(["forward", *sys.argv[1:]])
    raise SystemExit(ns.func(ns))
