"""Score many recordings into one output folder: resume, engines, the end-of-run summary.

:func:`run_score` is what ``nh-serve score`` calls. It expands the inputs
(:func:`nh_serve.evaluation.score.core.discover`), keeps its shard's share
(:mod:`nh_serve.evaluation.score.shard`), skips recordings whose results are already in
the output folder for the same file, checkpoint and settings (unless
``force``), scores the rest locally or on Ray (:mod:`nh_serve.evaluation.score.ray_engine`),
writes each result as soon as it is done (:mod:`nh_serve.evaluation.score.store`) and
finally rebuilds ``scores.json``, the CSV tables and ``report.html``.

A recording that cannot be scored (missing file, not a session file, too short,
...) is reported and the others are still scored; the report's
:attr:`RunReport.exit_code` is 1 then, 0 when every input was scored. Problems
with the run itself (output folder not writable, bad checkpoint, bad options)
raise :class:`~nh_serve.errors.InputError` before any scoring.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from nh_serve.errors import InputError
from nh_serve.evaluation.score.core import (
    Job,
    RecordingResult,
    ScoreSettings,
    describe_error,
    discover,
    fingerprint,
    load_predictor,
    score_recording,
)
from nh_serve.evaluation.score.ray_engine import score_on_ray
from nh_serve.evaluation.score.shard import parse_shard, select_shard
from nh_serve.evaluation.score.store import (
    RunReport,
    build_doc,
    load_recording,
    prepare_out,
    summary_table,
    write_outputs,
    write_recording,
)
from nh_serve.inference.checkpoint import read_metadata
from nh_serve.inference.model_io import resolve_checkpoint

ENGINES = ("local", "ray")


def model_info(checkpoint) -> dict:
    """Name, hashes and path of a checkpoint, from its header (no weights are loaded)."""
    path = resolve_checkpoint(checkpoint)
    meta = read_metadata(path)
    return {
        "name": meta["config"].get("name", "custom"),
        "hash": meta["short_hash"],
        "content_hash": meta["content_hash"],
        "checkpoint": str(Path(path).resolve()),
    }


def _failure(job: Job, error: str) -> dict:
    return {"key": job.key, "name": job.name, "path": str(job.path), "error": error}


def score_local(
    jobs: list[Job], *, checkpoint: str, settings: ScoreSettings, progress: bool = True
) -> Iterator[tuple[Job, RecordingResult | None, str | None]]:
    """Score ``jobs`` one after the other in this process; yields ``(job, result, None)`` or ``(job, None, error)``."""
    if not jobs:
        return
    predictor = load_predictor(checkpoint, settings)
    for job in jobs:
        try:
            res = score_recording(
                job.path, predictor=predictor, settings=settings, key=job.key, progress=progress
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # one bad recording must not stop the others
            if not isinstance(e, (InputError, OSError, MemoryError)):
                traceback.print_exc(file=sys.stderr)
            yield job, None, describe_error(e)
            continue
        yield job, res, None


def run_score(
    inputs,
    *,
    out,
    checkpoint="default",
    settings: ScoreSettings | None = None,
    shard: str | tuple[int, int] | None = None,
    engine: str = "local",
    force: bool = False,
    progress: bool = True,
    ray_address: str | None = None,
    ray_num_cpus: int = 2,
    ray_cpus_per_task: int = 1,
    ray_runtime_env: dict | None = None,
    echo: Callable[[str], None] = print,
) -> RunReport:
    """Score session files (or folders of them) into ``out``; see the module docstring.

    Args:
        inputs: session files and/or folders (searched recursively for ``*.h5``).
        out: output folder (created).
        checkpoint: checkpoint path or ``"default"``.
        settings: :class:`ScoreSettings` (reference window, stride, backend, batch size, ...).
        shard: ``"i/n"`` or ``(i, n)``: score only inputs ``i, i + n, i + 2n, ...`` of the sorted list.
        engine: ``"local"`` (this process) or ``"ray"`` (one Ray task per recording).
        force: score again recordings that already have results.
        progress: show progress bars.
        ray_address: Ray cluster to connect to (``auto``, ``ray://host:10001``); None starts a local one.
        ray_num_cpus: CPUs of a local Ray instance.
        ray_cpus_per_task: CPUs (and torch threads) per recording task.
        ray_runtime_env: Ray runtime environment for the workers (see docs/scoring.md).
        echo: where progress messages and the summary go.
    """
    t_start = time.perf_counter()
    settings = settings or ScoreSettings()
    if engine not in ENGINES:
        raise InputError(f"--engine: choose one of {', '.join(ENGINES)}, got {engine!r}")
    inputs = [str(i) for i in inputs]
    if not inputs:
        raise InputError("no recordings given; pass session files or folders holding them")
    shard_t = parse_shard(shard) if shard is not None else None
    out = prepare_out(out)
    model = model_info(checkpoint)
    jobs = discover(inputs)
    all_inputs = [str(j.path) for j in jobs]
    if shard_t is not None:
        jobs = select_shard(jobs, shard_t)
    identity = {"model_hash": model["content_hash"], "settings": settings.identity()}

    records: dict[str, dict] = {}
    failed: list[dict] = []
    todo: list[Job] = []
    skipped: list[str] = []
    for job in jobs:
        if job.problem:
            failed.append(_failure(job, f"{job.path}: {job.problem}"))
            continue
        rec = None if force else load_recording(out / "recordings" / job.key)
        if (
            rec is not None
            and rec.get("identity") == identity
            and rec.get("input") == _safe_fingerprint(job.path)
        ):
            records[job.key] = rec
            skipped.append(job.key)
        else:
            todo.append(job)
    what = f"shard {shard_t[0]}/{shard_t[1]}: " if shard_t else ""
    echo(
        f"{what}{len(jobs)} recording(s): {len(todo)} to score, {len(skipped)} already scored"
        + (" (--force scores them again)" if skipped else "")
        + (f", {len(failed)} not readable" if failed else "")
        + f"; model {model['name']} ({model['hash']}), engine {engine}"
    )

    scored: list[str] = []

    def finish(interrupted: bool = False) -> RunReport:
        run = {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "engine": engine,
            "shard": {"index": shard_t[0], "count": shard_t[1]} if shard_t else None,
            "all_inputs": all_inputs,
            "scored": sorted(scored),
            "skipped": sorted(skipped),
            "interrupted": interrupted,
            "seconds": round(time.perf_counter() - t_start, 3),
        }
        in_scope = [str(j.path) for j in jobs]
        doc = build_doc(
            inputs=in_scope,
            records=list(records.values()),
            failed=failed,
            model=model,
            settings=settings.identity(),
            run=run,
        )
        paths = write_outputs(out, doc)
        return RunReport(
            out=out,
            doc=doc,
            paths=paths,
            scored=sorted(scored),
            skipped=sorted(skipped),
            seconds=run["seconds"],
        )

    if engine == "ray":
        outcomes = score_on_ray(
            todo,
            checkpoint=model["checkpoint"],
            content_hash=model["content_hash"],
            settings=settings,
            address=ray_address,
            num_cpus=ray_num_cpus,
            cpus_per_task=ray_cpus_per_task,
            runtime_env=ray_runtime_env,
            progress=progress,
        )
    else:
        outcomes = score_local(todo, checkpoint=model["checkpoint"], settings=settings, progress=progress)
    bar = tqdm(
        total=len(todo),
        desc="recordings",
        unit="rec",
        disable=not progress or not todo or engine == "ray",
        position=0,
    )
    try:
        for job, res, err in outcomes:
            bar.update(1)
            if res is not None:
                res.record["identity"] = identity
                try:
                    write_recording(out, res)
                except OSError as e:
                    err = f"scored, but the results could not be written to {out} ({e})"
                else:
                    records[job.key] = res.record
                    scored.append(job.key)
                    continue
            failed.append(_failure(job, err))
            bar.write(f"  {job.name}: FAILED: {err}")
    except KeyboardInterrupt:
        bar.close()
        finish(interrupted=True)  # keep what is done: a rerun resumes from here
        raise
    bar.close()
    report = finish()
    echo(summary_table(report.doc))
    echo(
        f"scored {len(scored)}, skipped {len(skipped)} (already scored), failed {len(failed)} "
        f"of {len(jobs)} recording(s) in {report.seconds:.1f} s -> {report.paths['report.html']}"
    )
    return report


def _safe_fingerprint(path: Path) -> dict | None:
    try:
        return fingerprint(path)
    except OSError:
        return None


__all__ = ["RunReport", "run_score", "score_local", "summary_table"]
