"""Kilosort / phy output folders.

A phy folder holds:

* ``spike_times.npy``: (S,) or (S, 1) integer spike times in **samples** from
  the start of the recording;
* ``spike_clusters.npy``: (S,) cluster id of each spike (after manual
  curation); when it is absent, ``spike_templates.npy`` (Kilosort's template
  of each spike) is used instead;
* ``params.py``: ``sample_rate = 30000.0`` (Hz) among other settings;
* labels, any of ``cluster_group.tsv`` (phy's curation, column ``group``),
  ``cluster_info.tsv`` (column ``group``) and ``cluster_KSLabel.tsv``
  (Kilosort's automatic label, column ``KSLabel``), in that order of
  precedence for each cluster: ``good``, ``mua``, ``noise``; a cluster with
  no label anywhere is ``unsorted``;
* per-cluster metrics in other ``cluster_<name>.tsv`` files (numeric columns
  are kept as per-unit metrics).

Spike times become seconds as ``samples / sample_rate``. The recording starts
at 0 s; it ends at the length of the raw data file named in ``params.py``
where that file is present, otherwise just after the last spike.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from nh_serve.errors import InputError
from nh_serve.ingest.common import Recording, format_unit_ids, source_path, spikes_from_ids

LABEL_FILES = (("cluster_group.tsv", "group"), ("cluster_info.tsv", "group"), ("cluster_KSLabel.tsv", "KSLabel"))


def read_params(folder: Path) -> dict:
    """The literal assignments of ``params.py`` (``sample_rate``, ``dat_path``, ...).

    Parsed, never executed. Returns ``{}`` when the file is absent.
    """
    path = folder / "params.py"
    if not path.is_file():
        return {}
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"), filename=str(path))
    except SyntaxError as exc:
        raise InputError(f"{path}: not valid Python ({exc.msg}, line {exc.lineno}); fix the file or pass --sample-rate") from None
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, RecursionError):
                continue
    return out


def _sample_rate(folder: Path, params: dict, override: float | None) -> float:
    if override is not None:
        rate = override
        where = "--sample-rate"
    else:
        if not (folder / "params.py").is_file():
            raise InputError(
                f"{folder}: cannot find the sampling rate: params.py is missing; "
                "pass --sample-rate HZ (e.g. --sample-rate 30000)"
            )
        if "sample_rate" not in params:
            raise InputError(
                f"{folder / 'params.py'}: cannot find the sampling rate (no `sample_rate = ...` line); "
                "add it or pass --sample-rate HZ"
            )
        rate = params["sample_rate"]
        where = f"{folder / 'params.py'} sample_rate"
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {rate!r} is not a number of Hz") from None
    if not np.isfinite(rate) or rate <= 0:
        raise InputError(f"{where}: sampling rate must be a positive number of Hz, got {rate}")
    return rate


def _read_tsv(path: Path):
    import pandas as pd  # only for phy's TSV tables

    try:
        df = pd.read_csv(path, sep="\t")
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise InputError(f"{path}: cannot read it as a tab-separated table ({exc})") from None
    if "cluster_id" in df.columns:
        return df, "cluster_id"
    if df.shape[1] and df.columns[0] == "id":
        return df, "id"
    raise InputError(f"{path}: no cluster_id column; phy tables start with a cluster_id column")


def _labels(folder: Path, unit_ids: np.ndarray) -> tuple[np.ndarray | None, list[str]]:
    """Per-unit labels from the label files (first file that labels a cluster wins)."""
    labels: dict[str, str] = {}
    used = []
    for name, column in LABEL_FILES:
        path = folder / name
        if not path.is_file():
            continue
        df, key = _read_tsv(path)
        if column not in df.columns:
            if name == "cluster_info.tsv":
                continue
            raise InputError(f"{path}: no `{column}` column; expected columns cluster_id and {column}")
        used.append(name)
        ids = format_unit_ids(df[key].to_numpy())
        for cid, lab in zip(ids.tolist(), df[column].tolist()):
            if cid in labels or lab is None or (isinstance(lab, float) and np.isnan(lab)) or str(lab).strip() == "":
                continue
            labels[cid] = str(lab).strip().lower()
    if not used:
        return None, used
    return np.asarray([labels.get(u, "unsorted") for u in unit_ids.tolist()], dtype=str), used


def _metrics(folder: Path, unit_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Numeric per-cluster columns of the ``cluster_*.tsv`` files, NaN where a cluster is missing."""
    out: dict[str, np.ndarray] = {}
    row = {u: i for i, u in enumerate(unit_ids.tolist())}
    for path in sorted(folder.glob("cluster_*.tsv")):
        df, key = _read_tsv(path)
        ids = format_unit_ids(df[key].to_numpy())
        rows = np.asarray([row.get(c, -1) for c in ids.tolist()], dtype=np.int64)
        for col in df.columns:
            if col == key or col in out or col in ("group", "KSLabel"):
                continue
            vals = df[col].to_numpy()
            if vals.dtype == bool or not np.issubdtype(vals.dtype, np.number):
                continue
            arr = np.full(len(unit_ids), np.nan, dtype=np.float64)
            arr[rows[rows >= 0]] = vals[rows >= 0].astype(np.float64)
            out[str(col)] = arr
    return out


def _recording_end(folder: Path, params: dict, rate: float) -> float | None:
    """Length of the raw recording (seconds) from the ``.dat`` file named in params.py, if present."""
    dat = params.get("dat_path")
    if isinstance(dat, (list, tuple)):
        dat = dat[0] if len(dat) == 1 else None
    n_ch = params.get("n_channels_dat")
    if not isinstance(dat, str) or not isinstance(n_ch, int) or n_ch <= 0:
        return None
    path = Path(dat) if Path(dat).is_absolute() else folder / dat
    if not path.is_file():
        return None
    try:
        itemsize = np.dtype(params.get("dtype", "int16")).itemsize
    except TypeError:
        return None
    offset = int(params.get("offset", 0) or 0)
    n_samples = (path.stat().st_size - offset) // (itemsize * n_ch)
    return float(n_samples / rate) if n_samples > 0 else None


def read_phy(folder, *, sample_rate: float | None = None) -> Recording:
    """Read a Kilosort/phy output folder into a :class:`Recording` (all clusters, with labels).

    ``sample_rate`` (Hz) overrides ``params.py``. Raises :class:`InputError`
    naming the file for a missing folder, missing arrays, arrays of different
    lengths, or a sampling rate that cannot be found.
    """
    root = source_path(folder, what="phy folder", kind="dir")
    times_path = root / "spike_times.npy"
    if not times_path.is_file():
        raise InputError(f"{root}: no spike_times.npy; this does not look like a Kilosort/phy output folder")
    clusters_path = root / "spike_clusters.npy"
    if not clusters_path.is_file():
        clusters_path = root / "spike_templates.npy"
    if not clusters_path.is_file():
        raise InputError(
            f"{root}: neither spike_clusters.npy nor spike_templates.npy; both are missing, so spikes have no unit"
        )
    params = read_params(root)
    rate = _sample_rate(root, params, sample_rate)
    try:
        samples = np.load(times_path, mmap_mode="r")
        clusters = np.load(clusters_path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise InputError(f"{root}: cannot read spike_times.npy / {clusters_path.name} as numpy arrays ({exc})") from None
    samples = np.asarray(samples).reshape(-1) if samples.ndim == 2 and 1 in samples.shape else np.asarray(samples)
    clusters = np.asarray(clusters).reshape(-1) if clusters.ndim == 2 and 1 in clusters.shape else np.asarray(clusters)
    if samples.shape[0] != clusters.shape[0] or samples.ndim != 1 or clusters.ndim != 1:
        raise InputError(
            f"{root}: spike_times.npy has {samples.shape[0]} spikes but {clusters_path.name} has {clusters.shape[0]}; "
            "they must have one entry per spike (re-export the sorting)"
        )
    if samples.size and not np.issubdtype(samples.dtype, np.integer):
        if not (np.issubdtype(samples.dtype, np.floating) and np.all(np.isfinite(samples))):
            raise InputError(f"{times_path}: spike times must be sample numbers, got dtype {samples.dtype}")
    if clusters.size and not np.issubdtype(clusters.dtype, np.integer):
        raise InputError(f"{clusters_path}: cluster ids must be integers, got dtype {clusters.dtype}")
    times = samples.astype(np.float64) / rate
    times, unit_index, unit_ids = spikes_from_ids(times, clusters, name=str(times_path))
    labels, label_files = _labels(root, unit_ids)
    extra = _metrics(root, unit_ids)
    end = _recording_end(root, params, rate)
    if end is not None and times.size and times[-1] >= end:
        end = None  # the raw file is shorter than the sorting: trust the spikes
    return Recording(
        times=times,
        unit_index=unit_index,
        unit_ids=unit_ids,
        labels=labels,
        units_extra=extra,
        start=0.0,
        end=end,
        provenance={
            "source": {"format": "phy", "path": str(root)},
            "ids": {"folder": root.name},
            "sample_rate_hz": rate,
            "units_from": clusters_path.name,
            "label_files": label_files,
        },
    )
