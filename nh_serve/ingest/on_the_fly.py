"""Lab files where a session file is expected: ``nh-serve score`` and ``nh-serve eval`` take them too.

:func:`resolve_recordings` goes through the recordings given on the command line:

* an ``.npz`` (spike_times + unit_ids, :mod:`nh_serve.ingest.npz`) or an NWB file
  (``.nwb``, :mod:`nh_serve.ingest.nwb`) is ingested on the fly, exactly as
  ``nh-serve ingest npz|nwb FILE`` would with its default unit filter (units
  labelled ``good`` where the file labels its units, firing at least
  :data:`~nh_serve.ingest.common.DEFAULT_MIN_RATE` Hz over the recording), into a
  cached session file; a note says so, which filter applied and how many units it
  kept, and which ``nh-serve ingest`` command chooses the units instead;
* a Kilosort/phy folder is not: which clusters to keep (phy's curation labels,
  ``--include-mua``) is a choice to make once, and its sampling rate may have to be
  given, so the command stops with the ``nh-serve ingest phy`` command to run;
* anything else (session files, folders of them) passes through unchanged.

The cache is ``$NH_SERVE_CACHE_DIR/sessions`` (``~/.cache/nh-serve/sessions``
without it), one entry per source path: it is used again while the source file has
the same size and modification time, and replaced when the source changes. A
stable cached path lets ``nh-serve score`` skip recordings it has already scored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path

from nh_serve.data.session import open_session
from nh_serve.errors import InputError, SessionFileError
from nh_serve.ingest.common import DEFAULT_MIN_RATE, UnitFilter, describe_filter, write_recording
from nh_serve.ingest.npz import read_npz
from nh_serve.ingest.nwb import read_nwb
from nh_serve.util import atomic_write

CACHE_ENV = "NH_SERVE_CACHE_DIR"
"""Environment variable naming nh-serve's cache folder (on-the-fly exports, and sessions/ below it)."""

CACHE_VERSION = 1
"""Bumped when a cached session would no longer match what ``nh-serve ingest`` writes."""

READERS = {".npz": ("npz", read_npz), ".nwb": ("nwb", read_nwb)}
"""File suffix -> (``nh-serve ingest`` format, reader) of the formats ingested on the fly."""


def sessions_cache_dir() -> Path:
    """Folder of session files ingested on the fly: ``$NH_SERVE_CACHE_DIR/sessions`` or ``~/.cache/nh-serve/sessions``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser() / "sessions"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nh-serve" / "sessions"


def is_phy_folder(path: Path) -> bool:
    """Whether ``path`` is a Kilosort/phy output folder (spike_times.npy beside spike_clusters or spike_templates)."""
    return (
        path.is_dir()
        and (path / "spike_times.npy").is_file()
        and ((path / "spike_clusters.npy").is_file() or (path / "spike_templates.npy").is_file())
    )


def _filter_words(summary: dict) -> str:
    rate = f"{float(summary.get('min_rate_hz', 0.0)):g} Hz over the recording"
    if summary.get("labels_used"):
        return f"units labelled {'/'.join(summary.get('keep_labels') or [])} that fire at least {rate}"
    return f"units firing at least {rate}"


def _source_state(path: Path, fmt: str, flt: UnitFilter) -> dict:
    st = path.stat()
    return {
        "cache_version": CACHE_VERSION,
        "source": str(path),
        "format": fmt,
        "size_bytes": int(st.st_size),
        "mtime_ns": int(st.st_mtime_ns),
        "filter": flt.to_dict(),
    }


def _cached_summary(session: Path, meta: Path, state: dict) -> dict | None:
    """The cached session's filter summary when it is still the ingest of ``state``'s source, else None."""
    try:
        if json.loads(meta.read_text()) != state:
            return None
        with open_session(session, full_check=False) as s:
            return dict(s.provenance.get("filters") or {})
    except (OSError, ValueError, SessionFileError):
        return None


def ingest_cached(
    path, *, command: str, echo: Callable[[str], None] = print, cache: Path | None = None
) -> Path:
    """The session file of an ``.npz`` or NWB file, ingested now or earlier (see the module docstring).

    ``command`` (``"nh-serve score"``) names the command in the note printed through ``echo``.
    Raises :class:`InputError` when the file cannot be ingested (the reader's message).
    """
    src = Path(path).expanduser().resolve()
    fmt, reader = READERS[src.suffix.lower()]
    flt = UnitFilter()
    state = _source_state(src, fmt, flt)
    key = hashlib.sha1(json.dumps([str(src), fmt, flt.to_dict(), CACHE_VERSION]).encode()).hexdigest()[:16]
    # The folder above the file is named as the source's, so a table that names a recording by its
    # folder and file (nh-serve eval) shows the source's.
    folder = (cache or sessions_cache_dir()) / key / (src.parent.name or "recording")
    session = folder / f"{src.stem}.h5"
    meta = folder / f"{src.stem}.source.json"
    summary = _cached_summary(session, meta, state)
    out = shlex.quote(f"{src.stem}.h5")
    if summary is not None:
        what = "ingested on the fly earlier"
    else:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(
                f"{src}: cannot write the session file ingested from it under {folder} ({e.strerror or e}); "
                f"set {CACHE_ENV} to a folder you can write to, or run nh-serve ingest {fmt} yourself"
            ) from None
        try:
            write_recording(reader(src), session, flt=flt)
        except InputError as e:
            raise InputError(
                f"{e} (options of: nh-serve ingest {fmt} {shlex.quote(str(path))} --out {out})"
            ) from None
        atomic_write(meta, (json.dumps(state, indent=1) + "\n").encode())
        with open_session(session, full_check=False) as s:
            summary = dict(s.provenance.get("filters") or {})
        what = "ingested on the fly"
    echo(
        f"{command}: {src.name}: {what} with nh-serve ingest {fmt}'s default unit filter "
        f"({_filter_words(summary)}) into {session}"
    )
    echo(f"{command}: {src.name}: {describe_filter(summary)}")
    echo(
        f"{command}: {src.name}: to choose the units yourself: nh-serve ingest {fmt} {shlex.quote(str(path))} "
        f"--out {out} [--min-rate HZ | --all-units], then {command} {out}"
    )
    return session


def resolve_recordings(inputs, *, command: str, echo: Callable[[str], None] = print) -> list[str]:
    """``inputs`` with ``.npz`` and NWB files replaced by their session files (ingested on the fly).

    Raises :class:`InputError` for a Kilosort/phy folder, with the ``nh-serve ingest phy``
    command to run first, and when an ``.npz`` or NWB file cannot be ingested.
    """
    out = []
    for arg in inputs:
        p = Path(str(arg)).expanduser()
        if p.suffix.lower() in READERS and p.is_file():
            out.append(str(ingest_cached(p, command=command, echo=echo)))
        elif is_phy_folder(p):
            name = shlex.quote(f"{p.resolve().name}.h5")
            raise InputError(
                f"{p}: is a Kilosort/phy folder, not a session file; convert it first (its good units, firing "
                f">= {DEFAULT_MIN_RATE:g} Hz; --include-mua keeps mua units too): nh-serve ingest phy {shlex.quote(str(arg))} "
                f"--out {name}, then {command} {name}"
            )
        else:
            out.append(str(arg))
    return out
