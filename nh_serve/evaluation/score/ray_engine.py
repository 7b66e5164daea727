"""Score recordings on a Ray cluster: one Ray task per recording (``nh-serve score --engine ray``).

The driver (the machine running ``nh-serve score``) ships the checkpoint bytes
to the cluster once (``ray.put``); each task loads it into a Predictor (cached
per worker process, so a worker that gets several recordings loads it once),
scores its recording with :func:`nh_serve.evaluation.score.core.score_recording` and sends
back the record and the PNG plots. The driver writes every result into the
output folder as it arrives, so only the driver needs to see ``--out``; the
workers need to read the session files (give paths on a shared file system)
and to import ``nh_serve`` (installed on the nodes, or shipped with
``runtime_env={"py_modules": [...]}``; see docs/scoring.md).

Without ``address`` a local Ray instance is started with ``num_cpus`` CPUs
(and stopped at the end); if Ray is already initialised in this process, that
connection is used and left open.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nh_serve.errors import InputError
from nh_serve.evaluation.score.core import (
    Job,
    RecordingResult,
    ScoreSettings,
    describe_error,
    load_predictor,
    score_recording,
)

_PREDICTORS: dict[tuple[str, str], object] = {}  # (content hash, backend) -> Predictor, per worker process


def _predictor(ckpt_bytes: bytes, content_hash: str, settings: ScoreSettings, threads: int):
    """The worker's Predictor for this checkpoint (loaded from the shipped bytes once per process)."""
    key = (content_hash, settings.backend, threads)
    if key not in _PREDICTORS:
        fd, tmp = tempfile.mkstemp(suffix=".safetensors", prefix="nh-serve-ckpt-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(ckpt_bytes)
            _PREDICTORS[key] = load_predictor(tmp, settings, threads=threads)
        finally:
            os.unlink(tmp)
    return _PREDICTORS[key]


def score_task(
    path: str, key: str, ckpt_bytes: bytes, content_hash: str, settings: dict, threads: int
) -> tuple:
    """Body of one Ray task: ``("ok", record, plots)`` or ``("error", message)``."""
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    try:
        st = ScoreSettings(**{**settings, "threads": threads})  # the task's CPUs set the threads
        predictor = _predictor(ckpt_bytes, content_hash, st, threads)
        res = score_recording(path, predictor=predictor, settings=st, key=key, progress=False)
    except Exception as e:  # reported per recording, never kills the run
        return ("error", describe_error(e))
    return ("ok", res.record, res.plots)


def local_runtime_env(extra: dict | None = None) -> dict:
    """Runtime env of a local Ray instance: workers find this nh_serve even without an install."""
    env = dict(extra or {})
    root = str(Path(__file__).resolve().parents[3])  # the folder holding the nh_serve package
    env_vars = dict(env.get("env_vars") or {})
    pp = env_vars.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    env_vars["PYTHONPATH"] = os.pathsep.join([root, *([pp] if pp else [])])
    env["env_vars"] = env_vars
    return env


def score_on_ray(
    jobs: list[Job],
    *,
    checkpoint,
    content_hash: str,
    settings: ScoreSettings,
    address: str | None = None,
    num_cpus: int = 2,
    cpus_per_task: int = 1,
    runtime_env: dict | None = None,
    progress: bool = True,
) -> Iterator[tuple[Job, RecordingResult | None, str | None]]:
    """Score ``jobs`` as Ray tasks; yields ``(job, result, None)`` or ``(job, None, error)`` as tasks finish."""
    if not jobs:
        return
    try:
        import ray
    except ImportError:
        raise InputError(
            "--engine ray needs Ray: pip install 'nh-serve[ray]' (or use --engine local)"
        ) from None
    if int(cpus_per_task) < 1:
        raise InputError(f"--ray-cpus-per-task: must be >= 1, got {cpus_per_task}")
    started = False
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=int(num_cpus),
                    include_dashboard=False,
                    log_to_driver=False,
                    runtime_env=local_runtime_env(runtime_env),
                )
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise InputError(
                f"--engine ray: cannot {'connect to ' + address if address else 'start a local Ray instance'} ({e}); "
                "check --ray-address (e.g. auto after `ray start --head`, or ray://HOST:10001)"
            ) from None
        started = True
    try:
        ckpt_ref = ray.put(Path(checkpoint).read_bytes())
        task = ray.remote(num_cpus=int(cpus_per_task), max_retries=1)(score_task)
        settings_d = asdict(settings)
        pending = {
            task.remote(str(j.path), j.key, ckpt_ref, content_hash, settings_d, int(cpus_per_task)): j
            for j in jobs
        }
        with tqdm(total=len(jobs), desc="recordings (ray)", unit="rec", disable=not progress) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    bar.update(1)
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayError as e:  # worker died, task cancelled, ...
                        yield (
                            job,
                            None,
                            f"Ray task failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                        )
                        continue
                    if out[0] == "ok":
                        yield job, RecordingResult(record=out[1], plots=out[2]), None
                    else:
                        yield job, None, out[1]
    finally:
        if started:
            ray.shutdown()
