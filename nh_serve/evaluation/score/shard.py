"""Split scoring over machines (``--shard i/n``) and merge the shards' outputs (``nh-serve score merge``).

Sharding is deterministic: the inputs are expanded and sorted by resolved
path (:func:`nh_serve.evaluation.score.core.discover`), and shard ``i`` of ``n`` takes
inputs ``i, i + n, i + 2n, ...`` (0-based: ``--shard 0/4`` ... ``--shard 3/4``),
so every job of a cluster job array can compute its share from the same
command line and its array index, with no coordination. Give every shard its
own ``--out`` folder; ``nh-serve score merge SHARD_DIRS... --out DIR`` then
copies the recording folders into ``DIR`` and rebuilds the combined files.
The merged ``scores.json`` equals the one an unsharded run writes except for
its ``run`` section and each recording's ``timing``; ``summary.csv`` and
``units.csv`` are identical.
"""

from __future__ import annotations

import datetime as _dt
import re
import time
from collections.abc import Callable
from pathlib import Path

from nh_serve.errors import InputError
from nh_serve.evaluation.score.core import recording_key
from nh_serve.evaluation.score.store import (
    RunReport,
    build_doc,
    copy_recording,
    load_recording,
    prepare_out,
    read_doc,
    summary_table,
    write_outputs,
)


def parse_shard(spec) -> tuple[int, int]:
    """``"i/n"`` (or ``(i, n)``) -> ``(i, n)`` with ``0 <= i < n``; InputError otherwise."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        i, n = spec
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
        if not m:
            raise InputError(
                f"--shard: expected I/N such as 0/4 (shard I of N, counting from 0), got {spec!r}"
            )
        i, n = int(m.group(1)), int(m.group(2))
    if not (isinstance(i, int) and isinstance(n, int)) or n < 1 or not 0 <= i < n:
        raise InputError(f"--shard: I/N needs N >= 1 and 0 <= I < N (shards count from 0), got {i}/{n}")
    return i, n


def select_shard(jobs: list, shard) -> list:
    """The jobs of shard ``(i, n)``: every n-th of the sorted list, starting at i."""
    i, n = parse_shard(shard)
    return list(jobs)[i::n]


def merge_outputs(shard_dirs, *, out, echo: Callable[[str], None] = print):
    """Combine the output folders of sharded runs into ``out``; returns a :class:`~nh_serve.evaluation.score.runner.RunReport`.

    Checks that every shard used the same checkpoint and settings; recordings
    no shard covered (a missing or unfinished shard) are listed as failed, so
    the exit code says the merge is incomplete.
    """

    t_start = time.perf_counter()
    dirs = [Path(d).expanduser() for d in shard_dirs]
    if not dirs:
        raise InputError(
            "merge: pass the output folders of the shards, e.g. nh-serve score merge out-0 out-1 --out all"
        )
    docs = [(d, read_doc(d)) for d in dirs]
    d0, ref = docs[0]
    for d, doc in docs[1:]:
        if doc["model"].get("content_hash") != ref["model"].get("content_hash"):
            raise InputError(
                f"merge: {d} was scored with checkpoint {doc['model'].get('hash')} but {d0} with "
                f"{ref['model'].get('hash')}; merge only shards of the same run"
            )
        if doc["settings"] != ref["settings"]:
            raise InputError(
                f"merge: {d} was scored with other settings than {d0}; merge only shards of the same run"
            )
    out = prepare_out(out)
    records: dict[str, dict] = {}
    failed: dict[str, dict] = {}
    inputs: set[str] = set()
    shards = set()
    for d, doc in docs:
        run = doc.get("run") or {}
        inputs.update(run.get("all_inputs") or doc.get("inputs") or [])
        inputs.update(doc.get("inputs") or [])
        if run.get("shard"):
            shards.add((run["shard"]["index"], run["shard"]["count"]))
        for rec in doc["recordings"]:
            if rec["path"] in records:
                continue
            src = d / "recordings" / rec["key"]
            if load_recording(src) is None:
                failed[rec["path"]] = {
                    "key": rec["key"],
                    "name": rec["name"],
                    "path": rec["path"],
                    "error": f"its result folder {src} is missing or incomplete; score that shard again",
                }
                continue
            dest = copy_recording(src, out)
            records[rec["path"]] = load_recording(dest)
            failed.pop(rec["path"], None)
        for f in doc["failed"]:
            if f["path"] not in records:
                failed[f["path"]] = f
    counts = {n for _, n in shards}
    missing_shards = sorted({(i, n) for n in counts for i in range(n)} - shards)
    for p in sorted(inputs - set(records) - set(failed)):
        hint = (
            f" (shards {', '.join(f'{i}/{n}' for i, n in missing_shards)} were not merged)"
            if missing_shards
            else ""
        )
        failed[p] = {
            "key": recording_key(Path(p)),
            "name": Path(p).stem,
            "path": p,
            "error": f"not scored by any merged shard{hint}",
        }
    run = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "merged_from": [str(d) for d in dirs],
        "shards": sorted(f"{i}/{n}" for i, n in shards),
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    doc = build_doc(
        inputs=sorted(inputs),
        records=list(records.values()),
        failed=list(failed.values()),
        model=ref["model"],
        settings=ref["settings"],
        run=run,
    )
    paths = write_outputs(out, doc)
    echo(summary_table(doc))
    echo(
        f"merged {len(dirs)} folder(s): {len(records)} recording(s) scored, {len(failed)} not"
        + (f"; missing shards {', '.join(f'{i}/{n}' for i, n in missing_shards)}" if missing_shards else "")
        + f" -> {paths['report.html']}"
    )
    return RunReport(out=out, doc=doc, paths=paths, seconds=run["seconds"])
