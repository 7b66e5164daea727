"""Throughput of batch scoring (``nh-serve bench score``).

Scores synthetic recordings (:func:`nh_serve.data.synth.make_session`, about 6 Hz
per unit) of several lengths and unit counts with
:func:`nh_serve.evaluation.score.core.score_recording`, each in a fresh process so that
its peak resident memory is its own, and reports windows per second, peak
memory and where the time goes: reading spikes, observed counts + baselines
(+ oracle), tokenizing windows, the model, metrics, plots. A straight line
through ``seconds = a + b * windows`` per unit count extrapolates to a
recording-hour (3539 windows at a 1 s stride after the 60 s reference).

``--checkpoint auto`` (default) uses the built-in checkpoint when it is
installed, else nh-small with random weights (same cost as trained weights).
``--backend best`` first times every available Predictor backend with 1
and 2 threads on 96 windows of the largest unit count (model time only; at
most 150 s each, which leaves out backends that compile for minutes) and
uses the fastest.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nh_serve.core.config import get_config
from nh_serve.core.model import NeuroHorizon
from nh_serve.data.features import FeatureNorm
from nh_serve.data.session import write_session
from nh_serve.data.synth import make_session
from nh_serve.errors import InputError
from nh_serve.evaluation.reporting import machine_line, markdown_table, write_doc_section
from nh_serve.evaluation.score.core import ScoreSettings, load_predictor, score_recording
from nh_serve.inference.backends import available_backends
from nh_serve.inference.checkpoint import read_metadata
from nh_serve.inference.model_io import default_checkpoint_path, resolve_checkpoint, save_model
from nh_serve.util import help_text

HOUR_WINDOWS = 3539  # 1 s stride, 60 s reference, 1 s context + 1 s horizon in 3600 s
WRITE_KEYS = ("spike_times", "unit_index", "unit_ids", "start", "end", "true_rates", "provenance")


def synthetic_recording(folder: Path, *, n_units: int, minutes: float, seed: int = 0) -> Path:
    """``folder/synth_<units>u_<minutes>min.h5`` (made once, reused)."""
    path = folder / f"synth_{n_units}u_{minutes:g}min.h5"
    if not path.exists():
        d = make_session(seed=[seed, n_units, int(minutes * 60)], n_units=n_units, duration=minutes * 60.0)
        write_session(path, **{k: d[k] for k in WRITE_KEYS})
    return path


def random_checkpoint(folder: Path, config: str = "nh-small", seed: int = 0) -> Path:
    """A checkpoint of ``config`` with random weights (identity feature normalisation)."""
    path = folder / f"{config}-random-{seed}.safetensors"
    if not path.exists():
        torch.manual_seed(seed)
        model = NeuroHorizon(get_config(config))
        save_model(
            path,
            model,
            feature_norm=FeatureNorm.identity(model.cfg.n_features),
            training={"note": "random weights, for benchmarks"},
        )
    return path


def _peak_rss_mib() -> float:
    """This process's peak resident memory, MiB (VmHWM; ru_maxrss would include the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(path: str, checkpoint: str, settings: dict, queue) -> None:
    """Score one recording in this (fresh) process; put timings and peak memory on ``queue``."""
    try:
        st = ScoreSettings(**settings)
        t0 = time.perf_counter()
        p = load_predictor(checkpoint, st)
        load_s = time.perf_counter() - t0
        rss_loaded = _peak_rss_mib()
        tok = {"s": 0.0}
        orig = p.tokenize

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                tok["s"] += time.perf_counter() - t

        p.tokenize = timed  # time the tokenizer inside predict_windows
        res = score_recording(path, predictor=p, settings=st, progress=False)
        r = res.record
        queue.put(
            {
                "ok": True,
                "backend": p.backend_name,
                "windows": r["windows"]["n"],
                "units": r["recording"]["n_units"],
                "duration_s": r["recording"]["duration_s"],
                "load_s": load_s,
                "tokenize_s": tok["s"],
                **r["timing"],
                "rss_loaded_mib": rss_loaded,
                "peak_rss_mib": _peak_rss_mib(),
                "model_bps": r["predictors"]["model"]["bits_per_spike"],
            }
        )
    except BaseException as e:  # reported by the parent
        queue.put({"ok": False, "error": f"{type(e).__name__}: {e}"})


def measure(path: Path, checkpoint: Path, settings: dict, *, timeout_s: float = 1800.0) -> dict:
    """Run :func:`_child` in a spawned process and return its row."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(str(path), str(checkpoint), settings, q))
    proc.start()
    row, t_end = None, time.monotonic() + timeout_s
    try:
        while row is None:
            try:
                row = q.get(timeout=1.0)
            except queue.Empty:
                if not proc.is_alive() or time.monotonic() > t_end:
                    raise RuntimeError(
                        f"scoring {path.name}: the worker process "
                        + ("timed out" if proc.is_alive() else f"died (exit code {proc.exitcode})")
                    ) from None
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    if not row.pop("ok"):
        raise RuntimeError(f"scoring {path.name} failed: {row['error']}")
    return row


def _fit(rows: list[dict]) -> tuple[float, float] | None:
    """Least-squares ``total_s = a + b * windows``; None with fewer than two lengths."""
    if len({r["windows"] for r in rows}) < 2:
        return None
    w = np.array([r["windows"] for r in rows], dtype=float)
    t = np.array([r["total_s"] for r in rows], dtype=float)
    b, a = np.polyfit(w, t, 1)
    return float(a), float(b)


def load_line() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average: unknown"
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def run(
    *,
    checkpoint: str = "auto",
    units: tuple[int, ...] = (100, 300),
    minutes: tuple[float, ...] = (5, 10, 20),
    hour_units: int | None = 300,
    backend: str = "best",
    batch_size: int = 32,
    threads: int | None = None,
    plots: bool = True,
    workdir: str | None = None,
    doc: str | None = None,
    probe_timeout_s: float = 150.0,
    echo=None,
) -> dict:
    """Run the benchmark; print the tables and (if ``doc``) write the ``score`` section of that Markdown file."""
    echo = echo or (lambda s: print(s, flush=True))
    folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="nh-serve-bench-score-"))
    folder.mkdir(parents=True, exist_ok=True)
    load_start = load_line()
    if checkpoint == "auto":
        ck = default_checkpoint_path() if default_checkpoint_path().is_file() else random_checkpoint(folder)
    elif checkpoint == "random":
        ck = random_checkpoint(folder)
    else:
        ck = resolve_checkpoint(checkpoint)

    meta = read_metadata(ck)
    weights = (
        "random weights" if "random weights" in str(meta.get("training", {}).get("note", "")) else "trained"
    )
    model_desc = f"{meta['config'].get('name')} ({weights}, {meta['short_hash']})"
    echo(f"checkpoint {ck} -> {model_desc}; recordings in {folder}; {load_start}")
    base = {"batch_size": batch_size, "threads": threads, "plots": plots, "backend": "auto"}

    backend_rows = []
    if backend == "best":
        probe = synthetic_recording(folder, n_units=max(units), minutes=5)
        best = None
        for name, why in available_backends("cpu").items():
            if why is not None:
                backend_rows.append(
                    {"backend": name, "threads": "-", "windows/s": "-", "note": f"unavailable: {why}"}
                )
                continue
            for th in [threads] if threads else [1, 2]:
                try:
                    r = measure(
                        probe,
                        ck,
                        {**base, "backend": name, "threads": th, "max_windows": 96, "plots": False},
                        timeout_s=probe_timeout_s,
                    )
                except RuntimeError as e:
                    backend_rows.append(
                        {"backend": name, "threads": th, "windows/s": "-", "note": str(e)[:90]}
                    )
                    echo(f"  backend {name}, {th} thread(s): {e}")
                    continue
                wps = round(r["windows"] / max(r["model_s"], 1e-9), 1)
                backend_rows.append({"backend": name, "threads": th, "windows/s": wps, "note": ""})
                echo(f"  backend {name}, {th} thread(s): {wps} windows/s (model only, {max(units)} units)")
                if best is None or wps > best[2]:
                    best = (name, th, wps)
        if best is None:
            raise InputError("bench score: no backend could score; see the errors above")
        backend, threads = best[0], best[1]
        base["threads"] = threads
        echo(f"best: backend {backend} with {threads} thread(s)")

    rows = []
    configs = [(u, m) for u in units for m in minutes]
    if hour_units:
        configs.append((hour_units, 60))
    for u, m in configs:
        path = synthetic_recording(folder, n_units=u, minutes=m)
        r = measure(path, ck, {**base, "backend": backend})
        r["minutes"] = m
        rows.append(r)
        echo(
            f"  {u} units, {m:g} min: {r['windows']} windows in {r['total_s']:.1f} s = {r['windows_per_s']:.1f} windows/s; "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB (model {r['model_s']:.1f} s, tokenize {r['tokenize_s']:.1f} s, "
            f"targets {r['targets_s']:.2f} s, metrics {r['metrics_s']:.2f} s, plots {r['plots_s']:.2f} s)"
        )
    load_end = load_line()

    table = []
    for r in rows:
        table.append(
            {
                "units": r["units"],
                "minutes": r["minutes"],
                "windows": r["windows"],
                "total s": round(r["total_s"], 2),
                "windows/s": round(r["windows_per_s"], 1),
                "model s": round(r["model_s"] - r["tokenize_s"], 2),
                "tokenize s": round(r["tokenize_s"], 2),
                "read s": round(r["read_s"], 3),
                "targets s": round(r["targets_s"], 2),
                "inputs s": round(r.get("inputs_s", 0.0), 2),
                "metrics s": round(r["metrics_s"], 2),
                "plots s": round(r["plots_s"], 2),
                "peak RSS MiB": round(r["peak_rss_mib"]),
                "RSS after load MiB": round(r["rss_loaded_mib"]),
            }
        )
    extrap = []
    for u in units:
        fit = _fit([r for r in rows if r["units"] == u and r["minutes"] != 60])
        measured = [r for r in rows if r["units"] == u and r["minutes"] == 60]
        extrap.append(
            {
                "units": u,
                "seconds per window": round(fit[1], 4) if fit else "-",
                "fixed s": round(fit[0], 2) if fit else "-",
                "1 h extrapolated s": round(fit[0] + fit[1] * HOUR_WINDOWS, 1) if fit else "-",
                "1 h measured s": round(measured[0]["total_s"], 1) if measured else "-",
            }
        )
    echo(markdown_table(table))
    echo(markdown_table(extrap))
    result = {"rows": rows, "backend": backend, "backends": backend_rows, "extrapolation": extrap}
    if doc:
        hour = next((r for r in rows if r["minutes"] == 60), None)
        verdict = ""
        if hour:
            ok = hour["total_s"] <= 60.0
            verdict = (
                f"\n**Target** (one recording-hour of {hour['units']} units at a 1 s stride in at most 60 s): "
                f"{hour['total_s']:.1f} s measured, {'met' if ok else 'not met'} on this run.\n"
            )
        md = [
            "## Batch scoring (`nh-serve bench score`)",
            "",
            machine_line(),
            "",
            f"Model {model_desc}, backend `{backend}`, batch {batch_size}, {threads or 'default'} model thread(s), "
            f"plots {'on' if plots else 'off'}. Synthetic recordings (~6 Hz per unit), 60 s reference, 1 s stride, "
            "every baseline and the oracle scored too. Each row runs in a fresh process; times exclude loading "
            "the checkpoint. `model s` is predict_windows minus the tokenizer; `targets s` = observed counts, "
            "baselines and true rates; peak RSS is the process's maximum resident memory.",
            "",
            f"Machine load (shared machine): {load_start} at the start, {load_end} at the end.",
            "",
        ]
        if backend_rows:
            md += [
                "Backends (96 windows of the largest unit count, model time only):",
                "",
                markdown_table(backend_rows),
                "",
            ]
        md += [markdown_table(table), ""]
        big = max(rows, key=lambda r: (r["units"], r["windows"]))
        helper = big["read_s"] + big["targets_s"] + big.get("inputs_s", 0.0) + big["metrics_s"]
        md += [
            f"Where the time goes ({big['units']} units, {big['minutes']:g} min, {big['total_s']:.1f} s wall): the model "
            f"{big['model_s'] - big['tokenize_s']:.1f} s ({(big['model_s'] - big['tokenize_s']) / big['total_s']:.0%}), "
            f"the tokenizer {big['tokenize_s']:.1f} s, plots {big['plots_s']:.1f} s; reading, counts + baselines + "
            f"oracle, model inputs and metrics ({helper:.1f} s together) run on a helper thread next to the model.",
            "",
            "Time per recording: a straight line in the number of windows.",
            "",
            markdown_table(extrap),
            verdict,
        ]
        write_doc_section(doc, "score", "\n".join(md), title="Benchmarks")
        echo(f"wrote the score section of {doc}")
    return result


def _csv_ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _csv_floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _run(args: argparse.Namespace) -> int:
    doc = args.write_doc
    if doc == "":
        doc = str(Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md")
    run(
        checkpoint=args.checkpoint,
        units=args.units,
        minutes=args.minutes,
        hour_units=None if args.no_hour else args.hour_units,
        backend=args.backend,
        batch_size=args.batch_size,
        threads=args.threads,
        plots=not args.no_plots,
        workdir=args.workdir,
        doc=doc,
    )
    return 0


def add_cli(bench_subparsers) -> None:
    """Register ``nh-serve bench score``."""
    p = bench_subparsers.add_parser(
        "score",
        help="batch-scoring throughput and memory (windows/s vs units and recording length)",
        description=help_text(__doc__.split("\n\n")[1]) if __doc__ else None,
    )
    p.add_argument(
        "--checkpoint",
        default="auto",
        help="auto (default if installed, else random nh-small), random, default or a path",
    )
    p.add_argument("--units", type=_csv_ints, default=(100, 300), help="unit counts (default 100,300)")
    p.add_argument(
        "--minutes", type=_csv_floats, default=(5.0, 10.0, 20.0), help="recording lengths (default 5,10,20)"
    )
    p.add_argument(
        "--hour-units",
        type=int,
        default=300,
        help="also score a 60 min recording of this many units (default 300)",
    )
    p.add_argument("--no-hour", action="store_true", help="skip the 60 min recording")
    p.add_argument(
        "--backend", default="best", help="best (time every available backend first), auto or a backend name"
    )
    p.add_argument("--batch-size", type=int, default=32, help="windows per model call (default 32)")
    p.add_argument("--threads", type=int, default=None, help="model threads (default: the backend's default)")
    p.add_argument("--no-plots", action="store_true", help="do not render the plots")
    p.add_argument(
        "--workdir", default=None, help="folder for the synthetic recordings (reused; default a temp folder)"
    )
    p.add_argument(
        "--write-doc",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="write the `score` section of docs/benchmarks.md (or PATH)",
    )
    p.set_defaults(func=_run)
