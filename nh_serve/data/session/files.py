"""Finding session files: folders and files on a command line -> a list of session paths."""

from __future__ import annotations

from pathlib import Path

from nh_serve.errors import InputError

SESSION_SUFFIXES = (".h5", ".hdf5", ".nwb.h5")


def find_sessions(specs, *, what: str = "--data") -> list[Path]:
    """Expand folders (their ``*.h5`` files, sorted) and files into a list of unique session paths."""
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.name.endswith(SESSION_SUFFIXES))
            if not found:
                raise InputError(
                    f"{what}: folder {p} holds no session files (*.h5); write some with `nh-serve synth` "
                    "or `nh-serve ingest`, or pass the files themselves"
                )
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"{what}: {p} does not exist; pass session files or folders that hold them")
    if not out:
        raise InputError(f"{what}: no session files given; pass at least one session file or folder")
    seen: set[Path] = set()
    uniq = []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            uniq.append(p)
    return uniq


def session_name(path: Path) -> str:
    """A short, machine-independent name: ``<parent folder>/<file name>``."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}"
