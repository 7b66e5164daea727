"""International Brain Laboratory sessions through ONE (ONE-api).

One probe of one session (experiment id ``eid``) is read from the session's
ALF datasets:

* ``spikes.times`` (S,) seconds and ``spikes.clusters`` (S,) cluster ids from
  the probe's collection (``alf/<probe>/pykilosort``, ``alf/<probe>/iblsorter``
  or ``alf/<probe>``, whichever has spikes, unless ``collection`` is given);
* ``clusters.metrics`` (optional): IBL's quality ``label`` column, 1 for a
  unit that passes all of IBL's single-unit metrics (a "good" unit), and other
  numeric metrics kept per unit. Rows are cluster ids (or the ``cluster_id``
  column where there is one);
* ``_ibl_wheel.position`` (radians) with ``_ibl_wheel.timestamps`` (optional):
  behaviour is the wheel velocity (rad/s), position linearly interpolated to
  ``wheel_rate`` Hz (default 100) and differentiated;
* ``_ibl_trials`` (optional; ``_ibl_trials.table.pqt`` or one file per
  attribute): ``intervals`` become the trial ``start``/``end`` and every other
  one-value-per-trial attribute (``stimOn_times``, ``choice``,
  ``contrastLeft``, ``feedbackType``, ...) a trial column.

Unit ids are the cluster ids. Times are seconds from the session start.

Where the data come from is ONE's business: a local cache folder
(``ONE(mode='local', cache_dir=...)``, no network; the folder needs ONE's
cache tables, which ``build_cache`` makes with
``one.alf.cache.make_parquet_db``), or a database such as IBL's public
OpenAlyx (``base_url``; ONE downloads what it needs into its cache).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from nh_serve.errors import InputError
from nh_serve.ingest.common import GOOD, Recording, spikes_from_ids, table_columns, velocity_from_position
from nh_serve.util import package_version

DEFAULT_WHEEL_RATE = 100.0
"""Hz: the grid on which the wheel position is differentiated."""


def make_one(*, cache_dir=None, base_url: str | None = None, build_cache: bool = False):
    """Create a ONE instance: local (offline) on ``cache_dir``, or online on ``base_url``.

    Local mode needs ONE's cache tables (``sessions.pqt``, ``datasets.pqt``) in
    ``cache_dir``; ``build_cache=True`` makes them from the ALF folders there.
    """
    try:
        from one.api import ONE
    except ImportError:  # pragma: no cover - the ingest extra is not installed
        raise InputError("reading IBL data needs ONE-api: pip install 'nh-serve[ingest]'") from None
    if base_url:
        kwargs = {"base_url": base_url, "silent": True}
        if cache_dir is not None:
            kwargs["cache_dir"] = str(Path(cache_dir).expanduser())
        try:
            return ONE(**kwargs)
        except Exception as exc:  # noqa: BLE001 - ONE raises many kinds when offline or unauthorised
            raise InputError(
                f"cannot connect to {base_url} with ONE ({type(exc).__name__}: {exc}); check the network and run "
                f"`python -c \"from one.api import ONE; ONE.setup(base_url='{base_url}')\"` once to log in"
            ) from None
    if cache_dir is None:
        raise InputError("pass --cache-dir (a local ONE cache folder) or --base-url (a ONE database) to read IBL data")
    root = Path(cache_dir).expanduser()
    if not root.is_dir():
        raise InputError(f"ONE cache folder {root}: not found; check --cache-dir")
    root = root.resolve()
    if build_cache:
        from one.alf.cache import make_parquet_db

        make_parquet_db(root, hash_files=False)
    if not (root / "sessions.pqt").is_file() or not (root / "datasets.pqt").is_file():
        raise InputError(
            f"ONE cache folder {root}: no cache tables (sessions.pqt, datasets.pqt); pass --build-cache to make "
            "them from the ALF folders inside it"
        )
    try:
        return ONE(mode="local", cache_dir=root)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"ONE cache folder {root}: ONE cannot open it ({type(exc).__name__}: {exc})") from None


def _eid(one, eid) -> str:
    """Resolve ``eid`` (UUID, or a session path such as ``lab/Subjects/subject/2024-01-02/001``).

    Offline, the session must be in the cache; without ``eid`` a cache holding
    a single session is read.
    """
    local = getattr(one, "mode", None) == "local" or getattr(one, "offline", False)
    sessions = [str(s) for s in one.search()] if (local or eid is None) else None
    listing = ", ".join((sessions or [])[:5]) or "none"
    if eid is None:
        if len(sessions) == 1:
            return sessions[0]
        raise InputError(f"pass --eid: ONE finds {len(sessions)} sessions (e.g. {listing})")
    try:
        resolved = one.to_eid(str(eid))
    except Exception:  # noqa: BLE001 - ONE raises ValueError/ALFError/HTTP errors for unknown ids
        resolved = None
    if resolved is None or (sessions is not None and str(resolved) not in sessions):
        raise InputError(f"--eid {eid}: no such session (sessions in the ONE cache include: {listing})")
    return str(resolved)


def _collection(one, eid: str, probe: str, collection: str | None) -> str:
    datasets = [str(d) for d in one.list_datasets(eid)]
    with_spikes = sorted({d.rsplit("/", 1)[0] for d in datasets if d.rsplit("/", 1)[-1].startswith("spikes.times")})
    if collection is not None:
        if collection not in with_spikes:
            raise InputError(
                f"session {eid}: collection {collection} has no spikes.times "
                f"(collections with spikes: {', '.join(with_spikes) or 'none'})"
            )
        return collection
    for cand in (f"alf/{probe}/pykilosort", f"alf/{probe}/iblsorter", f"alf/{probe}"):
        if cand in with_spikes:
            return cand
    probe_cols = [c for c in with_spikes if c.startswith(f"alf/{probe}")]
    if len(probe_cols) == 1:
        return probe_cols[0]
    raise InputError(
        f"session {eid}: no spikes (spikes.times + spikes.clusters) for probe {probe} "
        f"(collections with spikes: {', '.join(with_spikes) or 'none'}); check --probe or pass --collection"
    )


def _load(one, eid: str, obj: str, collection: str, *, required: bool):
    from one.alf.exceptions import ALFObjectNotFound

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ALFWarning about default revisions
            return one.load_object(eid, obj, collection=collection)
    except ALFObjectNotFound:
        if required:
            raise InputError(f"session {eid}: no `{obj}` object in collection {collection}") from None
        return None


def _labels_and_metrics(clusters, unit_ids: np.ndarray, where: str) -> tuple[np.ndarray | None, dict]:
    metrics = None if clusters is None else clusters.get("metrics")
    if metrics is None:
        return None, {}
    df = metrics
    if "cluster_id" in df.columns:
        keys = np.asarray(df["cluster_id"]).astype(np.int64)
    else:
        keys = np.asarray(df.index).astype(np.int64)
    row = {int(k): i for i, k in enumerate(keys.tolist())}
    rows = np.asarray([row.get(int(u), -1) for u in unit_ids.tolist()], dtype=np.int64)
    cols = {c: df[c].to_numpy() for c in df.columns if c != "cluster_id"}
    cols = table_columns(cols, n_rows=len(df))
    extra = {}
    for name, vals in cols.items():
        if vals.dtype.kind == "U":
            out = np.where(rows >= 0, vals[np.clip(rows, 0, None)], "")
        else:
            out = np.where(rows >= 0, vals[np.clip(rows, 0, None)].astype(np.float64), np.nan)
        extra[name] = out
    labels = None
    if "label" in extra and extra["label"].dtype.kind == "f":
        labels = np.where(extra["label"] == 1.0, GOOD, "not_good").astype(str)
    elif "label" in df.columns:
        raise InputError(f"{where}: clusters.metrics `label` must be numbers (1 = good unit)")
    return labels, extra


def _trials(trials, eid: str) -> dict | None:
    if trials is None:
        return None
    trials = dict(trials)
    if "intervals" in trials:
        iv = np.asarray(trials.pop("intervals"), dtype=np.float64)
    elif "intervals_0" in trials and "intervals_1" in trials:
        iv = np.stack([np.asarray(trials.pop("intervals_0")), np.asarray(trials.pop("intervals_1"))], axis=1)
    else:
        return None
    if iv.ndim != 2 or iv.shape[1] != 2:
        raise InputError(f"session {eid}: trials.intervals must be (n_trials, 2) seconds, got shape {iv.shape}")
    ok = np.all(np.isfinite(iv), axis=1)
    cols = table_columns({k: np.asarray(v) for k, v in trials.items()}, n_rows=iv.shape[0])
    out = {"start": iv[ok, 0], "end": iv[ok, 1]}
    out.update({k: v[ok] for k, v in cols.items()})
    return out


def read_ibl(
    *,
    one,
    eid=None,
    probe: str = "probe00",
    collection: str | None = None,
    wheel_rate: float = DEFAULT_WHEEL_RATE,
) -> Recording:
    """Read one probe of one IBL session through ``one`` (see :func:`make_one`).

    ``eid``: the session's UUID or ALF path (optional when the cache holds a
    single session). Raises :class:`InputError` when the session or its spikes
    cannot be found.
    """
    eid = _eid(one, eid)
    col = _collection(one, eid, probe, collection)
    spikes = _load(one, eid, "spikes", col, required=True)
    for attr in ("times", "clusters"):
        if attr not in spikes:
            raise InputError(f"session {eid}: collection {col} has no spikes.{attr}; both spikes.times and spikes.clusters are needed")
    where = f"session {eid} {col}"
    times, unit_index, unit_ids = spikes_from_ids(spikes["times"], spikes["clusters"], name=f"{where} spikes")
    clusters = _load(one, eid, "clusters", col, required=False)
    labels, extra = _labels_and_metrics(clusters, unit_ids, where)

    behavior = None
    wheel = _load(one, eid, "wheel", "alf", required=False)
    if wheel is not None and "position" in wheel and "timestamps" in wheel:
        behavior = velocity_from_position(wheel["timestamps"], wheel["position"], rate=wheel_rate, name=f"session {eid} wheel")
    trials = _trials(_load(one, eid, "trials", "alf", required=False), eid)

    try:
        session_path = str(one.eid2path(eid))
    except Exception:  # noqa: BLE001
        session_path = None
    return Recording(
        times=times,
        unit_index=unit_index,
        unit_ids=unit_ids,
        labels=labels,
        units_extra=extra,
        behavior=behavior,
        behavior_names=["wheel_velocity_rad_per_s"] if behavior is not None else None,
        trials=trials,
        start=0.0,
        provenance={
            "source": {"format": "ibl", "path": session_path, "one_mode": getattr(one, "mode", None)},
            "ids": {"eid": eid, "probe": probe, "collection": col},
            "wheel_rate_hz": wheel_rate if behavior is not None else None,
            "software": {"ONE-api": package_version("ONE-api")},
        },
    )
