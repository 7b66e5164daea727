"""Score one recording: model and baselines on every prediction window, metrics per unit and bin.

:func:`score_recording` opens a session file, plans the windows
(:func:`nh_serve.evaluation.sliding.plan_windows`: reference window first, then one
window every ``stride_s`` seconds), registers the recording's units with the
:class:`~nh_serve.inference.predictor.Predictor` from the reference window, and then,
one block of windows at a time (:func:`nh_serve.evaluation.sliding.iter_spike_blocks`):

- bins the observed horizon counts and runs every baseline
  (:func:`~nh_serve.evaluation.sliding.horizon_counts`, :class:`~nh_serve.evaluation.baselines.BaselineSet`);
- predicts the model's rates with :meth:`Predictor.predict_batch` from each window's
  context spikes and the history inputs the model takes (:mod:`nh_serve.data.windows`);
- reads the true rates of synthetic recordings (the oracle,
  :func:`~nh_serve.evaluation.sliding.oracle_rates`);
- adds everything to :class:`~nh_serve.evaluation.sliding.StreamingMetrics`, so memory
  does not grow with the recording's length.

A helper thread prepares the next block and accumulates the previous one's metrics
while the model runs, so the stage times in ``timing`` overlap (``total_s`` is the wall time).

The result is a :class:`RecordingResult`: a JSON-ready record (one entry of
``scores.json``, see :mod:`nh_serve.evaluation.score`) and the PNG plots.
"""

from __future__ import annotations

import hashlib
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from nh_serve.data.features import DEFAULT_REFERENCE_S, reference_rate_hz
from nh_serve.data.history import HistoryTrack
from nh_serve.data.session import open_session
from nh_serve.data.windows import cut_windows, recorded_input_notes, recorded_inputs
from nh_serve.errors import InputError
from nh_serve.evaluation.baselines import (
    DEFAULT_HISTORY_S,
    FULL_BASELINES,
    baseline_names,
    checkpoint_univariate_glm,
)
from nh_serve.evaluation.insample import seen_as
from nh_serve.evaluation.metrics import DEFAULT_BANDS_MS
from nh_serve.evaluation.score.report import render_recording_plots
from nh_serve.evaluation.sliding import (
    StreamingMetrics,
    WindowPlan,
    horizon_counts,
    iter_spike_blocks,
    make_baseline_set,
    oracle_rates,
    plan_windows,
)
from nh_serve.inference.backends import default_threads
from nh_serve.inference.predictor import Predictor
from nh_serve.inference.runtime import tune_malloc_once
from nh_serve.settings import Settings, settings

SCHEMA = "nh-serve/scores/v1"
MODEL = "model"
ORACLE = "oracle"
PREDICTORS = (MODEL, *FULL_BASELINES, ORACLE)  # report order; the oracle only where the file has true rates
SESSION_SUFFIXES = (".h5", ".hdf5")
SAMPLE_S = 20.0  # seconds of prediction time shown in the heatmap
BLOCK_WINDOWS = 128  # windows read and scored together (memory ~ 6 x windows x units x bins x 4 bytes)


@settings(
    error=InputError,
    names={
        "reference_s": "--reference-s",
        "reference": "--reference",
        "stride_s": "--stride",
        "max_windows": "--max-windows",
        "batch_size": "--batch-size",
        "backend": "--backend",
        "threads": "--threads",
        "plots": "--no-plots",
        "baselines": "--baselines",
    },
    where="score settings",
)
class ScoreSettings(Settings):
    """How recordings are scored (times in seconds).

    Attributes:
        reference_s: length of the reference window at the recording start.
        reference: explicit ``(t0, t1)`` reference window instead (seconds on the recording clock).
        stride_s: seconds between consecutive prediction windows.
        max_windows: score only the first N windows of each recording (None: all).
        batch_size: windows per model call.
        backend: Predictor backend (``auto``, ``torch``, ...).
        threads: intra-op threads of the model (None: the backend's default).
        baseline_history_s: history the baselines see before each prediction time.
        bands_ms: horizon bands (milliseconds after the prediction time) of the band breakdown.
        plots: render the PNG plots.
        baselines: which baselines to score: ``default`` or ``full`` (adds ``population_glm_recent``).
    """

    reference_s: float = DEFAULT_REFERENCE_S
    reference: tuple[float, float] | None = None
    stride_s: float = 1.0
    max_windows: int | None = None
    batch_size: int = 32
    backend: str = "auto"
    threads: int | None = None
    baseline_history_s: float = DEFAULT_HISTORY_S
    bands_ms: tuple[tuple[float, float], ...] = DEFAULT_BANDS_MS
    plots: bool = True
    baselines: str = "default"

    def __post_init__(self):
        if not self.reference_s > 0:
            self.fail("reference_s", f"must be a positive number of seconds, got {self.reference_s}")
        if self.reference is not None and not self.reference[1] > self.reference[0]:
            self.fail("reference", f"pass T0 T1 seconds with T1 > T0, got {self.reference}")
        if not self.stride_s > 0:
            self.fail("stride_s", f"must be a positive number of seconds, got {self.stride_s}")
        if self.max_windows is not None and self.max_windows < 1:
            self.fail("max_windows", f"must be >= 1, got {self.max_windows}")
        if self.threads is not None and self.threads < 1:
            self.fail("threads", f"must be >= 1, got {self.threads}")
        if self.batch_size < 1:
            self.fail("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.baselines not in ("default", "full"):
            self.fail("baselines", f"must be default or full, got {self.baselines!r}")

    def identity(self) -> dict:
        """The settings that change the scores (a run with other values scores again)."""
        d = asdict(self)
        for k in ("batch_size", "threads", "plots"):
            d.pop(k)
        d["reference"] = list(self.reference) if self.reference is not None else None
        d["bands_ms"] = [list(b) for b in self.bands_ms]
        return d


@dataclass(frozen=True)
class Job:
    """One input recording: its resolved path, output folder name, and any problem found before scoring."""

    path: Path  # resolved (absolute) path
    key: str  # folder name under recordings/: file stem + hash of the path
    problem: str | None = None  # why it cannot be scored (missing, not a file, ...), else None

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass
class RecordingResult:
    """What scoring one recording produced."""

    record: dict  # JSON-ready entry of scores.json
    plots: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes


def recording_key(path: Path) -> str:
    """Stable output-folder name of a recording: ``<stem>-<8 hex of sha1(resolved path)>``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:60] or "recording"
    return f"{stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def fingerprint(path: Path) -> dict:
    """Size and modification time of a file: a rescored recording must still be this file."""
    st = path.stat()
    return {"size_bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def discover(inputs) -> list[Job]:
    """Expand files and folders (``*.h5`` / ``*.hdf5`` inside, recursively) into sorted, unique jobs.

    Inputs that cannot be scored (missing paths, folders without session files)
    become jobs with a ``problem``, so they are reported next to the others.
    """
    jobs: dict[Path, Job] = {}
    for arg in inputs:
        p = Path(arg).expanduser()
        try:
            rp = p.resolve()
        except OSError as e:
            jobs[p.absolute()] = Job(p.absolute(), recording_key(p.absolute()), f"cannot be resolved ({e})")
            continue
        if rp.is_dir():
            found = sorted(
                f.resolve() for f in rp.rglob("*") if f.suffix.lower() in SESSION_SUFFIXES and f.is_file()
            )
            found = [f for f in found if not f.name.startswith(".")]
            if not found:
                jobs[rp] = Job(rp, recording_key(rp), "folder holds no session files (*.h5, *.hdf5)")
            for f in found:
                jobs.setdefault(f, Job(f, recording_key(f)))
        elif not rp.exists():
            jobs[rp] = Job(rp, recording_key(rp), "file not found; check the path")
        else:
            jobs.setdefault(rp, Job(rp, recording_key(rp)))
    return [jobs[k] for k in sorted(jobs, key=str)]


def _floats(a) -> list[float]:
    return [float(x) for x in np.asarray(a, dtype=np.float64).ravel()]


def _metrics_record(m: dict) -> dict:
    """An :func:`nh_serve.evaluation.metrics.evaluate`-shaped dict with its arrays as lists (JSON-ready)."""
    out = {
        k: float(m[k])
        for k in ("bits_per_spike", "correlation", "r2", "nll", "n_spikes", "corr_unit_mean", "r2_unit_mean")
    }
    out["per_band"] = {b: dict(v) for b, v in m["per_band"].items()}
    out["per_bin"] = {k: _floats(v) for k, v in m["per_bin"].items() if k not in ("n_spikes", "mean_count")}
    out["per_unit"] = {k: _floats(v) for k, v in m["per_unit"].items() if k not in ("n_spikes", "mean_count")}
    return out


def _sample_range(n_windows: int, stride_s: float) -> tuple[int, int]:
    """Windows ``[a, b)`` of the heatmap stretch: about SAMPLE_S seconds from the middle of the recording."""
    n = max(1, min(n_windows, int(np.ceil(SAMPLE_S / stride_s))))
    a = max(0, n_windows // 2 - n // 2)
    return a, min(n_windows, a + n)


def score_recording(
    path,
    *,
    predictor,
    settings: ScoreSettings,
    key: str | None = None,
    progress: bool = True,
    position: int = 1,
) -> RecordingResult:
    """Score one session file with ``predictor`` and every baseline (and the oracle, if the file has true rates).

    Raises :class:`InputError` (incl. :class:`~nh_serve.errors.SessionFileError`)
    when the file cannot be scored: not a session file, too short for the
    reference window plus one context and horizon, no spikes in the reference window.
    """
    t_start = time.perf_counter()
    timing = dict.fromkeys(("read_s", "targets_s", "inputs_s", "model_s", "metrics_s", "plots_s"), 0.0)
    path = Path(path).resolve()
    key = key or recording_key(path)
    cfg = predictor.cfg
    with open_session(path) as s:
        U = s.n_units
        span = cfg.context_s + cfg.n_bins * cfg.bin_size_s
        if settings.reference is None and s.duration < settings.reference_s + span:
            raise InputError(
                f"{path}: is {s.duration:.3g} s long, too short to score: it needs the {settings.reference_s:g} s "
                f"reference window plus {span:g} s (context + horizon) after it; use a longer recording or a "
                "shorter --reference-s"
            )
        plan = plan_windows(
            start=s.start,
            end=s.end,
            reference=settings.reference,
            reference_s=settings.reference_s,
            context_s=cfg.context_s,
            n_bins=cfg.n_bins,
            bin_size=cfg.bin_size_s,
            stride_s=settings.stride_s,
            max_windows=settings.max_windows,
            name=str(path),
        )
        W, T, bs = len(plan), plan.n_bins, plan.bin_size
        r0, r1 = plan.reference
        t0 = time.perf_counter()
        ref_t, ref_u = s.spikes(r0, r1)
        timing["read_s"] += time.perf_counter() - t0
        if ref_t.size == 0:
            raise InputError(
                f"{path}: no spikes in the reference window [{r0:g}, {r1:g}) s; pass --reference T0 T1 "
                "for a stretch where the units fire"
            )
        ref_rate = reference_rate_hz(ref_t, ref_u, n_units=U, start=r0, end=r1)  # (U,) Hz, float64
        all_t, all_u = s.spikes(s.start, s.end)
        in_sample = seen_as(getattr(predictor, "checkpoint", None), times=all_t, units=all_u,
                            name=f"{path.parent.name}/{path.name}")
        del all_t, all_u
        token = predictor.register(ref_t, s.unit_ids[ref_u], reference_window=(r0, r1), units=s.unit_ids)
        notes = recorded_input_notes(s, cfg)  # what the model is given, and why
        has_oracle = (
            oracle_rates(s, WindowPlan(plan.reference, plan.ctx_starts[:1], plan.context_s, T, bs))
            is not None
        )
        univariate, univariate_source = checkpoint_univariate_glm(getattr(predictor, "checkpoint", None))
        bset = make_baseline_set(
            s, plan, names=baseline_names(settings.baselines), univariate=univariate,
            history_s=settings.baseline_history_s,
        )
        baselines = list(bset.names)
        # a history model's smoothed rates at every prediction time, carried block to block
        track = (
            HistoryTrack(read=s.spikes, n_units=U, ref_rate_hz=ref_rate, start=float(s.start), taus=cfg.history_taus)
            if cfg.has_history
            else None
        )
        names = [MODEL, *baselines] + ([ORACLE] if has_oracle else [])
        acc = StreamingMetrics(names, n_units=U, n_bins=T)
        sa, sb = _sample_range(W, settings.stride_s)
        sample_pred, sample_obs, sample_oracle = [], [], []
        lookback = max(settings.baseline_history_s, cfg.history_s + cfg.context_s)
        blocks = iter_spike_blocks(s, plan, lookback_s=lookback, block_windows=BLOCK_WINDOWS)

        def prepare():
            """Read the next block; its counts, baselines, oracle and model inputs (None at the end)."""
            t0 = time.perf_counter()
            block = next(blocks, None)
            timing["read_s"] += time.perf_counter() - t0
            if block is None:
                return None
            sl = slice(block.first, block.stop)
            t0 = time.perf_counter()
            counts = horizon_counts(block, plan, n_units=U)  # (w, U, T)
            preds = bset.predict(plan.t_now[sl], block.times, block.units, t0=block.t0)
            if has_oracle:
                oracle = oracle_rates(
                    s, WindowPlan(plan.reference, plan.ctx_starts[sl], plan.context_s, T, bs)
                )
                if oracle is None:  # true rates stop short of the recording end
                    raise InputError(
                        f"{path}: its true_rates do not cover windows {block.first}-{block.stop - 1}"
                    )
                preds[ORACLE] = oracle
            timing["targets_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            ctx = plan.ctx_starts[sl]  # (w,)
            # the recorded behaviour and stimulus schedule (images shown in the context and due in the
            # forecast window; the schedule is complete: no listed image = none shown)
            inputs = recorded_inputs(s, cfg, float(ctx[0]), float(ctx[-1]) + cfg.context_s + cfg.horizon_s)
            windows = cut_windows(
                block.times,
                block.units,
                ctx,
                n_units=U,
                cfg=cfg,
                history_start=s.start,
                behavior=inputs.behavior,
                images=inputs.images,
                history_rates=track.at(plan.t_now[sl], block.times, block.units, t0=block.t0) if track else None,
            )
            timing["inputs_s"] += time.perf_counter() - t0
            return block, counts, preds, windows

        def add(block, counts, preds) -> None:
            """Accumulate one block's metrics; keep the heatmap stretch."""
            t0 = time.perf_counter()
            acc.update(counts, preds)
            if sa < block.stop and sb > block.first:
                a, b = max(sa, block.first) - block.first, min(sb, block.stop) - block.first
                sample_pred.append(preds[MODEL][a:b])
                sample_obs.append(counts[a:b])
                if has_oracle:
                    sample_oracle.append(preds[ORACLE][a:b])
            timing["metrics_s"] += time.perf_counter() - t0

        # Pipeline: one helper thread reads and prepares block i+1 and accumulates the metrics of
        # block i-1 while this thread runs the model on block i (numpy and the model release the
        # GIL), so on two cores the bookkeeping hides behind the model. Its tasks run in order.
        bar = tqdm(
            total=W, desc=path.stem[:24], unit="win", disable=not progress, leave=False, position=position
        )
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nh-score") as helper:
            done = []
            try:
                nxt = helper.submit(prepare)
                while (item := nxt.result()) is not None:
                    nxt = helper.submit(prepare)
                    block, counts, preds, windows = item
                    t0 = time.perf_counter()
                    out = predictor.predict_windows(token, windows, batch_size=settings.batch_size)
                    preds[MODEL] = np.stack(
                        [p.expected_counts for p in out]
                    )  # (w, U, T) expected counts per bin
                    timing["model_s"] += time.perf_counter() - t0
                    done.append(helper.submit(add, block, counts, preds))
                    bar.update(block.stop - block.first)
                for f in done:
                    f.result()
            finally:
                bar.close()
                for f in done:
                    f.cancel()
        t0 = time.perf_counter()
        metrics = {n: acc.result(n, bin_size=bs, bands_ms=settings.bands_ms) for n in names}
        timing["metrics_s"] += time.perf_counter() - t0

        n_spk = metrics[MODEL]["per_unit"]["n_spikes"]  # (U,) spikes in the scored horizons
        flags = [
            ";".join(
                f
                for f, on in (("no_spikes_scored", n_spk[u] == 0), ("silent_in_reference", ref_rate[u] == 0))
                if on
            )
            for u in range(U)
        ]
        baseline_bps = {n: metrics[n]["bits_per_spike"] for n in baselines}
        best = max(baseline_bps, key=baseline_bps.get)  # in hindsight
        paired = {n: acc.paired(MODEL, n) for n in baselines}
        record = {
            "key": key,
            "name": path.stem,
            "path": str(path),
            "status": "ok",
            "input": fingerprint(path),
            "recording": {
                "n_units": U,
                "n_spikes": int(s.n_spikes),
                "start_s": float(s.start),
                "end_s": float(s.end),
                "duration_s": float(s.duration),
                "has_true_rates": bool(has_oracle),
            },
            "windows": {
                "n": W,
                "reference": [r0, r1],
                "first_prediction_s": float(plan.t_now[0]),
                "last_prediction_s": float(plan.t_now[-1]),
                "context_s": plan.context_s,
                "n_bins": T,
                "bin_size_s": bs,
            },
            "model_inputs": {
                "history": (
                    f"smoothed rates at {', '.join(f'{t:g}' for t in cfg.history_taus)} s from the recording start"
                    if cfg.has_history
                    else f"spikes in the {cfg.history_s:g} s before each context"
                ),
                "fit": (getattr(predictor.session(token), "fit", None) or {}).get("mode", "none"),
                "behavior": notes["behavior"],
                "images": notes["images"],
            },
            "units": {
                "id": [str(u) for u in s.unit_ids],
                "ref_rate_hz": _floats(ref_rate),
                "n_spikes": _floats(n_spk),
                "flags": flags,
            },
            "flagged_units": {
                "no_spikes_scored": int(np.sum(n_spk == 0)),
                "silent_in_reference": int(np.sum(ref_rate == 0)),
            },
            "predictors": {n: _metrics_record(metrics[n]) for n in names},
            "in_sample": in_sample,  # "training" / "validation": the checkpoint has seen this recording
            "best_baseline": best,
            "model_minus_best_baseline_bps": metrics[MODEL]["bits_per_spike"] - baseline_bps[best],
            "model_minus_best_baseline_ci95": [paired[best]["lo"], paired[best]["hi"]],
            "model_beats_best_baseline": bool(paired[best]["lo"] > 0),
            "model_minus_baseline": {n: {k: paired[n][k] for k in ("diff", "lo", "hi")} for n in baselines},
            "univariate_glm_weights": univariate_source,
        }
    plots: dict[str, bytes] = {}
    if settings.plots:
        t0 = time.perf_counter()
        sample = None
        if sample_pred:
            sample = {
                "pred": np.concatenate(sample_pred),
                "obs": np.concatenate(sample_obs),
                "oracle": np.concatenate(sample_oracle) if sample_oracle else None,
                "t_now": plan.t_now[sa:sb],
                "stride_s": float(settings.stride_s),
                "bin_size_s": bs,
            }
        plots = render_recording_plots(record, sample)
        timing["plots_s"] = time.perf_counter() - t0
    record["plots"] = sorted(plots)
    timing = {k: round(v, 4) for k, v in timing.items()}
    timing["total_s"] = round(time.perf_counter() - t_start, 4)
    timing["windows_per_s"] = round(W / max(timing["total_s"], 1e-9), 2)
    record["timing"] = timing
    record["backend"] = getattr(predictor, "backend_name", None)
    return RecordingResult(record=record, plots=plots)


def describe_error(exc: BaseException) -> str:
    """A one-line reason a recording could not be scored."""
    if isinstance(exc, InputError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory; score it on a larger machine or with a smaller --batch-size"
    if isinstance(exc, OSError):
        return f"I/O error: {exc}"
    return f"unexpected error ({type(exc).__name__}: {exc}); please report it with the traceback above"


def load_predictor(checkpoint, settings: ScoreSettings, *, threads: int | None = None):
    """The Predictor for scoring: ``settings.backend`` with ``threads`` (default: settings.threads, else
    :func:`nh_serve.inference.backends.default_threads`, one thread on a 2-core machine) and glibc malloc tuned."""
    tune_malloc_once()
    threads = threads or settings.threads
    if threads is None:
        threads = default_threads()
    return Predictor.load(checkpoint, backend=settings.backend, **({"threads": threads} if threads else {}))
