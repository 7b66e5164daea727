# Over 500 lines: one benchmark: its measurements, the forward-pass profile and the Markdown report.
"""Closed-loop latency of ``Predictor.predict`` for every backend (``nh-serve bench predict``).

For each unit count (default 32, 100, 300, 1000) a synthetic recording
(:func:`nh_serve.data.synth.make_session`, realistic rates: log-normal, median 4 Hz,
~6.5 Hz mean) is registered with a 60 s reference in one Predictor per backend
(all sharing one model), then:

* ``predict``: latency of one :meth:`~nh_serve.inference.predictor.Predictor.predict`
  call (unit-id lookup, validation, tokenization, collate, model, exp), cycling
  over 78 different 1 s context windows (spike counts differ from call to call,
  as in closed loop); p50 / p90 / p99 after ``warmup`` calls. The backends'
  calls are interleaved (each window goes through every backend, in a rotating
  order), so load from other processes affects them alike;
* ``model``: the bare backend call on the pre-tokenized windows (interleaved too);
* ``tokenize``: ``tokenize_window`` + ``collate`` alone (the same code for all);
* ``batch``: throughput of :meth:`~nh_serve.inference.predictor.Predictor.predict_batch`
  with 64 windows per call (windows per second);
* memory: each backend is built again in a fresh (spawned) process; the peak
  resident set size (``VmHWM``, reset between stages) over the RSS before the
  backend was built is reported for building it, serving single windows and
  serving 64-window batches. tracemalloc would miss the native allocations of
  torch and onnxruntime, so RSS is the honest figure.

Without ``--checkpoint`` the model is ``--config`` (default nh-small) with
random weights (the same cost as trained weights). The floating-point work of
one window is counted with ``torch.utils.flop_counter.FlopCounterMode``
(matrix products; attention, which the counter does not see on CPU, is added
from its shapes) and compared with this machine's measured fp32 matrix-multiply
rate (a 2048 x 2048 ``torch.mm`` on 1 core and on all cores). A profile splits
the eager forward pass at 100 units into its parts and counts operator calls.

Latency on a shared machine is noisy: the load average (``os.getloadavg``) is
recorded during every measurement and printed with the results. Results go to
the ``predict`` section of ``docs/benchmarks.md`` (``--no-doc`` to skip).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nh_serve.core.config import CONFIGS, get_config
from nh_serve.core.model import NeuroHorizon, count_parameters
from nh_serve.data.features import FeatureNorm
from nh_serve.data.synth import make_session
from nh_serve.data.windows import collate
from nh_serve.errors import InputError
from nh_serve.evaluation.reporting import machine_line, markdown_table, write_doc_section
from nh_serve.inference.backends import (
    AUTO_ORDER,
    available_backends,
    backend_names,
    choose_backend,
    default_threads,
)
from nh_serve.inference.model_io import load_model
from nh_serve.inference.predictor import MAX_UNIT_WINDOWS, Predictor
from nh_serve.inference.runtime import tune_malloc_once
from nh_serve.util import help_text

DEFAULT_UNITS = (32, 100, 300, 1000)
TARGET_P99_MS = 10.0
TARGET_UNITS = 100
REFERENCE_S = 60.0
DURATION_S = 100.0
WINDOW_STEP_S = 0.5
BATCH_WINDOWS = 64
DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


# ----------------------------------------------------------------------------- inputs


def make_recording(n_units: int, *, seed: int) -> dict:
    """A synthetic recording: reference spikes ``[0, 60)`` s and context windows after it.

    Returns ``{"ref_times", "ref_ids", "units", "windows": [{"spike_times", "unit_ids", "context_start"}]}``
    with unit ids as strings (as clients send them).
    """
    d = make_session(seed=seed, n_units=n_units, duration=DURATION_S)
    t = np.asarray(d["spike_times"], np.float64)
    ids = np.asarray(d["unit_ids"]).astype(str)[np.asarray(d["unit_index"])]
    m = t < REFERENCE_S
    windows = []
    for c in np.arange(REFERENCE_S, DURATION_S - 1.0 + 1e-9, WINDOW_STEP_S):
        a, b = np.searchsorted(t, [c, c + 1.0])
        windows.append({"spike_times": t[a:b], "unit_ids": ids[a:b], "context_start": float(c)})
    return {
        "ref_times": t[m],
        "ref_ids": ids[m],
        "units": np.asarray(d["unit_ids"]).astype(str),
        "windows": windows,
    }


def bench_model(config: str, checkpoint: str | None, *, seed: int = 0):
    """``(model, feature_norm, checkpoint or None)``: a checkpoint, or ``config`` with random weights."""
    if checkpoint is not None:
        return load_model(checkpoint)
    torch.manual_seed(seed)
    model = NeuroHorizon(get_config(config)).eval()
    return model, FeatureNorm.identity(model.cfg.n_features), None


def _pct(samples_s: list[float]) -> tuple[float, float, float]:
    a = np.asarray(samples_s) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 90)), float(np.percentile(a, 99))


def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """Peak RSS of this process image (``VmHWM``; ``ru_maxrss`` would include the parent's RSS at fork time,
    since Linux keeps resource usage across ``execve``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------- memory (child process)


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) via ``/proc/self/clear_refs`` (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(
    backend: str,
    *,
    config: str,
    checkpoint: str | None,
    units: tuple[int, ...],
    threads: int,
    seed: int,
    cache_dir: str | None = None,
) -> dict:
    """Peak memory of ``backend`` in stages: build, single-window predictions, 64-window batches.

    Meant for a fresh process. The recordings are made first; then, for each stage, the
    peak RSS is reset (``/proc/self/clear_refs``), the stage runs (every unit count: 20
    ``predict`` calls, then one ``predict_batch`` of 64 windows) and its peak is read
    (``VmHWM``). Returns MB over the RSS before the backend was built, and the process peak.
    """
    torch.set_num_threads(threads)  # this is the benchmark's own process
    tune_malloc_once()
    model, norm, ckpt = bench_model(config, checkpoint, seed=seed)
    recordings = {u: make_recording(u, seed=seed + u) for u in units}
    resettable = _reset_peak_rss()
    base = _rss_mb()
    p = Predictor(
        model=model, feature_norm=norm, checkpoint=ckpt, backend=backend, threads=threads, cache_dir=cache_dir
    )
    build_peak = _peak_rss_mb()
    tokens = {}
    _reset_peak_rss()
    for n_units in units:
        rec = recordings[n_units]
        tokens[n_units] = p.register(
            rec["ref_times"], rec["ref_ids"], reference_window=(0.0, REFERENCE_S), units=rec["units"]
        )
        for w in rec["windows"][:20]:
            p.predict(tokens[n_units], **w)
    single_peak = _peak_rss_mb()
    _reset_peak_rss()
    for n_units in units:
        p.predict_batch(tokens[n_units], recordings[n_units]["windows"][:BATCH_WINDOWS])
    batch_peak = _peak_rss_mb()
    return {
        "rss_base_mb": base,
        "build_mb": build_peak - base,
        "single_mb": single_peak - base,
        "batch_mb": batch_peak - base,
        "peak_mb": max(build_peak, single_peak, batch_peak),
        "resettable": resettable,
    }


def _child(kwargs: dict, queue) -> None:
    try:
        queue.put(("ok", measure_memory(**kwargs)))
    except BaseException as exc:  # report, never hang the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def run_isolated(backend: str, **kwargs) -> dict:
    """:func:`measure_memory` in a fresh (spawned) process, so the memory figures are the backend's own."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=({"backend": backend, **kwargs}, q))
    proc.start()
    status, value = q.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(value)
    return value


# ----------------------------------------------------------------------------- latency (interleaved)


def measure_latency(predictors: dict, rec: dict, *, runs: int, warmup: int) -> list[dict]:
    """Latency rows of every backend on one recording, calls interleaved.

    Each iteration runs the same window through every backend in a rotating order,
    so that load from other processes hits all backends alike.
    """
    names = list(predictors)
    n_units = rec["units"].size
    tokens = {
        n: p.register(
            rec["ref_times"], rec["ref_ids"], reference_window=(0.0, REFERENCE_S), units=rec["units"]
        )
        for n, p in predictors.items()
    }
    wins = rec["windows"]
    W = len(wins)
    load0 = os.getloadavg()[0]
    pred_t: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + runs):
        w = wins[i % W]
        for k in range(len(names)):
            n = names[(i + k) % len(names)]
            t = time.perf_counter()
            predictors[n].predict(
                tokens[n], w["spike_times"], w["unit_ids"], context_start=w["context_start"]
            )
            if i >= warmup:
                pred_t[n].append(time.perf_counter() - t)

    # Tokenization is the same code for every backend: time it once.
    p0 = predictors[names[0]]
    s0 = p0.session(tokens[names[0]])
    tok_t, batches = [], []
    for i in range(max(runs, W)):
        w = wins[i % W]
        t = time.perf_counter()
        batch = collate(
            [p0.tokenize_window(s0, w["spike_times"], w["unit_ids"], context_start=w["context_start"])]
        )
        tok_t.append(time.perf_counter() - t)
        if i < W:
            batch.pop("unit_features")
            if s0.readout is not None:  # what Predictor._run adds: the session's fitted read-outs
                batch["unit_readout"] = s0.readout.unsqueeze(0)
            batches.append(batch)
    emb = {n: predictors[n].session(tokens[n]).embeddings.unsqueeze(0) for n in names}
    model_t: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for i in range(warmup + runs):
            b = batches[i % W]
            for k in range(len(names)):
                n = names[(i + k) % len(names)]
                t = time.perf_counter()
                predictors[n]._backend(b, emb[n])
                if i >= warmup:
                    model_t[n].append(time.perf_counter() - t)

    chunk = wins[:BATCH_WINDOWS]
    batch_t: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        predictors[n].predict_batch(tokens[n], chunk[:4])  # warm the batched shapes
    for rep in range(4):
        for k in range(len(names)):
            n = names[(rep + k) % len(names)]
            t = time.perf_counter()
            predictors[n].predict_batch(tokens[n], chunk)
            batch_t[n].append(time.perf_counter() - t)
    load = (load0 + os.getloadavg()[0]) / 2

    rows = []
    n_tok = float(np.mean([2 * n_units + w["spike_times"].size for w in wins]))
    for n in names:
        pp, mm = _pct(pred_t[n]), _pct(model_t[n])
        rows.append(
            {
                "backend": n,
                "units": n_units,
                "tokens": n_tok,
                "predict_p50": pp[0],
                "predict_p90": pp[1],
                "predict_p99": pp[2],
                "tokenize_p50": _pct(tok_t)[0],
                "model_p50": mm[0],
                "model_p90": mm[1],
                "model_p99": mm[2],
                "batch_windows_per_s": len(chunk) / float(np.median(batch_t[n])),
                "load": load,
            }
        )
    return rows


# ----------------------------------------------------------------------------- FLOPs, matmul rate, profile


def _attention_flops(cfg, *, batch: int, units: int, tokens: int) -> int:
    """Multiply-adds x 2 of the attention products (Q K^T and A V) that FlopCounterMode misses on CPU."""
    dh, L, T = cfg.dim_head, cfg.n_latents, cfg.n_bins

    def attn(heads: int, nq: int, nk: int) -> int:
        return 4 * batch * heads * nq * nk * dh

    total = attn(cfg.cross_heads, L, tokens)  # encoder: latents -> spike tokens
    total += cfg.depth * attn(cfg.heads, L, L)  # processor self-attention
    total += attn(cfg.cross_heads, T, L) + attn(cfg.heads, T, T)  # decoder cross + causal self
    return total


def count_flops(model, window_batch: dict, unit_embeddings: torch.Tensor) -> int:
    """Floating-point operations of one ``forward_with_embeddings`` call (matmuls + attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model.forward_with_embeddings(unit_embeddings, **window_batch)
    counted = {str(k) for k in fc.get_flop_counts().get("Global", {})}
    extra = 0
    if not any("scaled_dot_product" in k for k in counted):
        B, U = unit_embeddings.shape[:2]
        extra = _attention_flops(
            model.cfg, batch=int(B), units=int(U), tokens=int(window_batch["spike_mask"].shape[1])
        )
    return int(fc.get_total_flops()) + extra


def matmul_gflops(*, threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 ``torch.mm`` rate (GFLOP/s) of an ``n x n`` product on ``threads`` threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return 2 * n**3 / best / 1e9


def profile_parts(model, batches: list[dict], unit_embeddings: torch.Tensor, *, runs: int = 60) -> dict:
    """Where the eager forward pass spends its time (median ms per window over ``runs`` windows).

    Forward pre-hooks on the model's sub-modules time-stamp the pass; a part runs from
    its module's start to the next hooked module's start, so it includes the code
    between them: the spike-token cross-attention (``enc_attn.forward_indexed``, not a
    module call) falls in the part that starts at ``latent_emb``, the unit vectors and
    baseline in the one that starts at ``dec_norm``, the ``U x T x H`` GELU of
    ``head.combine`` in the one that starts at ``head.bin_proj``. Also counts aten
    operator calls per pass (torch.profiler, averaged over 10 passes).
    """
    from torch.profiler import ProfilerActivity, profile

    labels = {
        "latent_emb": "latents + encoder cross-attention to spike tokens",
        "enc_ffn": "encoder FFN",
        "bin_emb": "bin queries",
        "dec_attn": "decoder cross-attention",
        "dec_ffn": "decoder FFN",
        "dec_self_attn": "decoder causal self-attention",
        "dec_self_ffn": "decoder FFN 2",
        "dec_norm": "final norm + unit vectors + baseline",
        "head.unit_proj": "head unit part",
        "head.bin_proj": "head bin part + U x T x H GELU",
        "head.out": "head output layer + clamp/mask",
    }
    stamps: list[tuple[str, float]] = []
    hooks = []
    named = []
    for n, m in model.named_children():
        if n in ("unit_encoder", "head", "token_type_emb"):
            continue
        if isinstance(m, torch.nn.ModuleList):
            named += [(f"{n}.{i}", sub) for i, sub in enumerate(m)]
        else:
            named.append((n, m))
    named += [
        (f"head.{n}", m) for n, m in model.head.named_children() if not isinstance(m, torch.nn.ModuleList)
    ]
    named += [(f"head.hidden_layers.{i}", m) for i, m in enumerate(model.head.hidden_layers)]
    for name, mod in named:
        label = labels.get(
            name, f"processor block {name.split('.')[1]}" if name.startswith("blocks.") else name
        )
        hooks.append(
            mod.register_forward_pre_hook(
                lambda m, a, label=label: stamps.append((label, time.perf_counter()))
            )
        )
    parts: dict[str, list[float]] = {}
    try:
        with torch.inference_mode():
            for i in range(runs + 5):
                stamps.clear()
                stamps.append(("token table", time.perf_counter()))
                model.forward_with_embeddings(unit_embeddings, **batches[i % len(batches)])
                stamps.append(("end", time.perf_counter()))
                if i < 5:
                    continue
                seen: dict[str, float] = {}
                for (label, t), (_, t_next) in zip(stamps, stamps[1:]):
                    seen[label] = seen.get(label, 0.0) + (t_next - t)
                for k, v in seen.items():
                    parts.setdefault(k, []).append(v)
    finally:
        for h in hooks:
            h.remove()
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[:10]:
            model.forward_with_embeddings(unit_embeddings, **b)
    n = min(10, len(batches))
    ka = prof.key_averages()
    n_ops = sum(k.count for k in ka if k.key.startswith("aten::")) / n
    top = sorted(ka, key=lambda k: -k.self_cpu_time_total)[:6]
    return {
        "parts_ms": {k: float(np.median(v) * 1e3) for k, v in parts.items()},
        "aten_ops": int(round(n_ops)),
        "top_ops": [(k.key, k.count / n, k.self_cpu_time_total / 1e3 / n) for k in top],
    }


# ----------------------------------------------------------------------------- report


def run(
    *,
    config: str = "nh-small",
    checkpoint: str | None = None,
    backends: tuple[str, ...] | None = None,
    units: tuple[int, ...] = DEFAULT_UNITS,
    runs: int = 200,
    warmup: int = 30,
    threads: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
    doc: str | os.PathLike | None = DOC_PATH,
    section: str = "predict",
    memory: bool = True,
) -> dict:
    """Benchmark every backend, print the report and write the ``predict`` section of ``doc``."""
    if checkpoint is None and config not in CONFIGS:
        raise InputError(f"unknown config {config!r}; choose one of {', '.join(CONFIGS)}")
    if runs < 10 or warmup < 0 or not units or any(u < 1 for u in units):
        raise InputError("runs must be >= 10, warmup >= 0, and every unit count >= 1")
    avail = available_backends("cpu")
    if backends is None:
        backends = tuple(n for n in avail if avail[n] is None)
    for b in backends:
        if b not in backend_names():
            raise InputError(f"unknown backend {b!r}; choose from {', '.join(backend_names())}")
        if avail[b] is not None:
            raise InputError(f"backend {b!r} is not available here: {avail[b]}")
    threads = threads or default_threads()
    torch.set_num_threads(threads)  # the benchmark's own process
    tune_malloc_once()  # as the Predictor's serving processes do
    load_start = os.getloadavg()
    model, norm, ckpt = bench_model(config, checkpoint, seed=seed)
    cfg = model.cfg
    what = (
        f"checkpoint {Path(checkpoint).name} ({ckpt.short_hash})"
        if ckpt is not None
        else f"{config} with random weights"
    )
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    log(
        f"bench predict: {what}, {count_parameters(model):,} parameters, {threads} thread(s), {', '.join(backends)}"
    )

    predictors, build_s, errors = {}, {}, {}
    for b in backends:
        log(f"  building {b} ...")
        t0 = time.perf_counter()
        try:
            predictors[b] = Predictor(
                model=model,
                feature_norm=norm,
                checkpoint=ckpt,
                backend=b,
                threads=threads,
                cache_dir=cache_dir,
            )
        except Exception as exc:  # report a backend that cannot be built, go on with the others
            errors[b] = f"{type(exc).__name__}: {exc}"
            log(f"  {b} failed: {errors[b]}")
            continue
        build_s[b] = time.perf_counter() - t0

    rows, flops, profiles = [], {}, []
    for n_units in tqdm(units, desc="unit counts", file=sys.stderr):
        rec = make_recording(n_units, seed=seed + n_units)
        if predictors:
            rows += measure_latency(predictors, rec, runs=runs, warmup=warmup)
        ref = Predictor(model=model, feature_norm=norm, backend="torch")
        tok = ref.register(
            rec["ref_times"], rec["ref_ids"], reference_window=(0.0, REFERENCE_S), units=rec["units"]
        )
        s = ref.session(tok)
        batches = []
        for w in rec["windows"][:40]:
            b = collate(
                [ref.tokenize_window(s, w["spike_times"], w["unit_ids"], context_start=w["context_start"])]
            )
            b.pop("unit_features")
            if s.readout is not None:
                b["unit_readout"] = s.readout.unsqueeze(0)
            batches.append(b)
        flops[n_units] = count_flops(model, batches[0], s.embeddings.unsqueeze(0))
        if n_units in (TARGET_UNITS, max(units)):
            profiles.append((n_units, profile_parts(model, batches, s.embeddings.unsqueeze(0))))

    mem = {}
    if memory:
        for b in predictors:
            log(f"  peak memory of {b} (own process) ...")
            try:
                mem[b] = run_isolated(
                    b,
                    config=config,
                    checkpoint=checkpoint,
                    units=tuple(units),
                    threads=threads,
                    seed=seed,
                    cache_dir=cache_dir,
                )
            except Exception as exc:
                mem[b] = {"error": str(exc)}
    mm1 = matmul_gflops(threads=1)
    mm_all = matmul_gflops(threads=os.cpu_count() or 1)
    load_end = os.getloadavg()
    auto = choose_backend("cpu")

    best: dict[int, dict] = {}
    for r in rows:
        if r["units"] not in best or r["model_p50"] < best[r["units"]]["model_p50"]:
            best[r["units"]] = r
    table = [
        {
            "backend": r["backend"],
            "units": r["units"],
            "tokens": round(r["tokens"]),
            "predict p50": r["predict_p50"],
            "p90": r["predict_p90"],
            "p99": r["predict_p99"],
            f"p99 <= {TARGET_P99_MS:g} ms": "yes" if r["predict_p99"] <= TARGET_P99_MS else "**no**",
            "model p50": r["model_p50"],
            "model p99": r["model_p99"],
            "tokenize p50": r["tokenize_p50"],
            "batch64 win/s": r["batch_windows_per_s"],
            "load": r["load"],
        }
        for r in sorted(rows, key=lambda r: (r["units"], r["predict_p50"]))
    ]
    mem_rows = [
        {
            "backend": b,
            "build s (this run)": build_s.get(b, float("nan")),
            "build +MB": mem.get(b, {}).get("build_mb", float("nan")),
            "single windows +MB": mem.get(b, {}).get("single_mb", float("nan")),
            "batch64 +MB": mem.get(b, {}).get("batch_mb", float("nan")),
            "process peak MB": mem.get(b, {}).get("peak_mb", float("nan")),
            "details": errors.get(b)
            or mem.get(b, {}).get("error")
            or ", ".join(
                f"{k}={Path(v).name if k == 'artifact' and v != 'in memory' else v}"
                for k, v in predictors[b]._backend.describe().items()
                if k != "name"
            ),
        }
        for b in backends
    ]
    flop_rows = []
    for u in units:
        f = flops[u]
        row = {"units": u, "MFLOP/window": f / 1e6}
        if u in best:
            rate = f / (best[u]["model_p50"] / 1e3) / 1e9
            row.update(
                {
                    "fastest model p50 ms": best[u]["model_p50"],
                    "backend": best[u]["backend"],
                    "achieved GFLOP/s": rate,
                    "% of 1-core matmul": 100 * rate / mm1,
                    f"% of {os.cpu_count()}-core matmul": 100 * rate / mm_all,
                }
            )
        flop_rows.append(row)

    bases = [m["rss_base_mb"] for m in mem.values() if "rss_base_mb" in m]
    base_mb = float(np.mean(bases)) if bases else float("nan")
    lines = [
        f"## Predictor latency per backend (`nh-serve bench predict`, {threads} thread{'s' if threads > 1 else ''})",
        "",
        f"- {machine_line(('nh-serve', 'torch', 'numpy', 'onnxruntime', 'onnx'))}",
        f"- Model: {what}, {count_parameters(model):,} parameters; {cfg.context_s:g} s context, "
        f"{cfg.n_bins} x {cfg.bin_size_s * 1e3:g} ms bins. {threads} intra-op thread(s) for every backend "
        "(`torch.set_num_threads` / onnxruntime `intra_op_num_threads`); glibc malloc thresholds raised "
        "(`nh_serve.inference.runtime.tune_malloc`).",
        f"- Inputs: synthetic recordings (`make_session`, ~6.5 Hz mean rate) registered with a 60 s reference. "
        f"{runs} timed calls after {warmup} warm-up calls per backend, cycling over {int((DURATION_S - 1 - REFERENCE_S) / WINDOW_STEP_S) + 1} "
        "different 1 s windows; the backends' calls are interleaved (same window through every backend in a "
        "rotating order) so that load from other processes hits them alike. Times in ms.",
        *(
            [
                f"- With {threads} threads per backend, the backends' thread pools (torch's OpenMP pool, "
                "onnxruntime's own) share this process and wait for each other's cores: on a loaded machine with "
                "few cores that costs far more than the parallel work gains (compare the 1-thread section)."
            ]
            if threads > 1
            else []
        ),
        f"- Load average (1 min) at start {load_start[0]:.2f}, at end {load_end[0]:.2f} on {os.cpu_count()} cores "
        "(`load` column: mean during the row; this benchmark itself accounts for about 1). "
        + (
            "Other processes shared the CPU: p90/p99 include their interference."
            if max([r["load"] for r in rows] + [load_start[0], load_end[0]]) > 1.5
            else "The machine was otherwise quiet."
        ),
        "- `predict` = `Predictor.predict` (id lookup, validation, tokenize, collate, model, exp); `model` = the bare "
        "backend call on pre-tokenized windows; `tokenize` = `tokenize_window` + `collate` (same code for every "
        f"backend); `batch64 win/s` = windows per second through `predict_batch`, {BATCH_WINDOWS} windows per call "
        f"(which runs them in chunks of at most {MAX_UNIT_WINDOWS:,} unit-windows: "
        f"{min(BATCH_WINDOWS, MAX_UNIT_WINDOWS // max(units))} windows at a time at {max(units)} units).",
        "",
        *_verdict(rows),
        markdown_table(table),
        "",
        *(
            [
                "Build time (in this process; torch-compile's depends on Inductor's cache of compiled kernels, "
                "onnxruntime's on the cached ONNX export: a first export of nh-small takes 15-30 s) and memory, "
                "measured again in a fresh process per backend: peak resident set size (`VmHWM`, reset between "
                "stages through `/proc/self/clear_refs`) over the RSS before the backend was built (Python, torch, "
                f"model and recordings already loaded, about {base_mb:.0f} MB), for: building the backend; serving "
                f"single windows at every unit count; `predict_batch` with {BATCH_WINDOWS} windows at every unit "
                "count. RSS, not tracemalloc, because torch and onnxruntime allocate natively.",
                "",
                markdown_table(mem_rows),
            ]
            if mem
            else [
                "Build time in this process (memory not measured: `--no-memory`; torch-compile's build depends on "
                "Inductor's cache of compiled kernels, onnxruntime's on the cached ONNX export):",
                "",
                markdown_table([{k: r[k] for k in ("backend", "build s (this run)", "details")} for r in mem_rows]),
            ]
        ),
        "",
        f"Floating-point work per window (`FlopCounterMode` matmuls, plus the attention products it does not see on "
        f"CPU) against this machine's fp32 matmul rate (2048 x 2048 `torch.mm`: {mm1:.1f} GFLOP/s on 1 core, "
        f"{mm_all:.1f} GFLOP/s on {os.cpu_count()}):",
        "",
        markdown_table(flop_rows),
        "",
    ]
    for u, pr in profiles:
        parts = "; ".join(f"{k} {v:.2f}" for k, v in pr["parts_ms"].items())
        top = "; ".join(f"`{k}` x{c:g} {t:.2f} ms" for k, c, t in pr["top_ops"])
        lines += [
            f"Eager forward pass at {u} units, ms per part (median; a part runs to the next module): {parts}. "
            f"{pr['aten_ops']} aten operator calls per pass; heaviest by self time per pass: {top}.",
            "",
        ]
    lines.append(
        f"`auto` picks **{auto}** on this machine: the first available backend of "
        f"`nh_serve.inference.backends.AUTO_ORDER['cpu']` = {list(AUTO_ORDER['cpu'])}."
    )
    md = "\n".join(lines)
    print(md)
    if doc is not None:
        write_doc_section(doc, section, md, title="Benchmarks")
        log(f"wrote the {section!r} section of {doc}")
    return {
        "rows": rows,
        "memory": mem,
        "build_s": build_s,
        "errors": errors,
        "flops": flops,
        "matmul_gflops": (mm1, mm_all),
        "profiles": profiles,
        "auto": auto,
        "markdown": md,
    }


def _verdict(rows: list[dict]) -> list[str]:
    """One line on the latency target (p99 <= 10 ms at 100 units) for the report, if 100 units were measured."""
    at = sorted((r for r in rows if r["units"] == TARGET_UNITS), key=lambda r: r["predict_p99"])
    if not at:
        return []
    ok = [r["backend"] for r in at if r["predict_p99"] <= TARGET_P99_MS]
    best = at[0]
    return [
        f"**Target** (closed loop: `predict` p99 <= {TARGET_P99_MS:g} ms at {TARGET_UNITS} units): "
        + (f"met by {', '.join(ok)}" if ok else "**missed by every backend**")
        + f"; best p99 {best['predict_p99']:.2f} ms ({best['backend']}).",
        "",
    ]


def add_cli(bench_subparsers) -> None:
    """Register ``predict`` under ``nh-serve bench``."""
    p = bench_subparsers.add_parser(
        "predict",
        help="Predictor latency, throughput and memory per backend",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", default=None, help="checkpoint to benchmark (default: --config with random weights)"
    )
    p.add_argument(
        "--config", default="nh-small", help="model config when no checkpoint is given (default nh-small)"
    )
    p.add_argument("--backends", nargs="+", default=None, help="backends (default: every available one)")
    p.add_argument(
        "--units",
        type=int,
        nargs="+",
        default=list(DEFAULT_UNITS),
        help="unit counts (default 32 100 300 1000)",
    )
    p.add_argument("--runs", type=int, default=200, help="timed calls per measurement (default 200)")
    p.add_argument("--warmup", type=int, default=30, help="untimed calls first (default 30)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads (default: nh_serve.inference.backends.default_threads())",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="where on-the-fly ONNX exports are cached")
    p.add_argument("--doc", default=str(DOC_PATH), help="Markdown file whose 'predict' section is rewritten")
    p.add_argument("--no-doc", action="store_true", help="print only; do not write the Markdown file")
    p.add_argument(
        "--section", default="predict", help="name of the Markdown section to write (default predict)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the per-backend memory processes")
    p.set_defaults(func=_main)


def _main(args) -> int:
    run(
        config=args.config,
        checkpoint=args.checkpoint,
        backends=tuple(args.backends) if args.backends else None,
        units=tuple(args.units),
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        seed=args.seed,
        cache_dir=args.cache_dir,
        doc=None if args.no_doc else args.doc,
        section=args.section,
        memory=not args.no_memory,
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m nh_serve.bench.predict")
    add_cli(parser.add_subparsers(dest="bench", required=True))
    ns = parser.parse_args(["predict", *sys.argv[1:]])
    raise SystemExit(ns.func(ns))
