"""Small helpers every layer uses: atomic file writes, installed package versions, help texts.

:func:`atomic_path` / :func:`atomic_write` write a file through a temporary
file beside it and ``os.replace`` it into place, so a reader never sees a
half-written file and an interrupted write leaves the old file (or nothing).
:func:`package_version` reads a distribution's version from its installed
metadata. :func:`help_text` turns a docstring into plain text for ``--help``.
Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from importlib import metadata as _metadata
from pathlib import Path

#: Permissions of a new file written by :func:`atomic_path` (an existing file keeps its own).
NEW_FILE_MODE = 0o644


def package_version(name: str = "nh-serve", default: str | None = "unknown") -> str | None:
    """Installed version of distribution ``name``, or ``default`` when it is not installed."""
    try:
        return _metadata.version(name)
    except _metadata.PackageNotFoundError:
        return default


_ROLE = re.compile(r":([a-z]+)(?::[a-z]+)?:`([^`]*)`")


def _role_text(m: re.Match) -> str:
    role, target = m.group(1), m.group(2).strip()
    if target.endswith(">") and "<" in target:  # :role:`shown text <target>`
        return target[: target.index("<")].strip()
    if target.startswith("~"):  # Sphinx shows the last component (Class.method for methods)
        parts = target[1:].split(".")
        return ".".join(parts[-2:] if role in ("meth", "attr") else parts[-1:])
    return target


def help_text(doc: str | None) -> str | None:
    """A docstring as plain text for an argparse ``description``.

    Sphinx roles (:func:`x`) become their text, double backticks and bold
    markers are dropped, and a literal-block marker (``Examples::``) becomes a
    single colon, so ``--help`` shows no documentation markup.
    """
    if not doc:
        return doc
    text = _ROLE.sub(_role_text, doc)
    text = text.replace("``", "")
    text = re.sub(r"\*\*([^*\n]+)\*\*", r"\1", text)
    lines = []
    for line in text.splitlines():
        stripped = line.rstrip()
        if stripped.strip() == "::":
            continue
        if stripped.endswith("::"):
            line = stripped[:-1]
        lines.append(line)
    return "\n".join(lines)


def _write_all(f, data: bytes) -> None:
    f.write(data)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); not possible everywhere, so errors are ignored."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike,
    *,
    durable: bool = False,
    make_parents: bool = False,
    keep_suffix: bool = False,
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an exception it replaces ``path``.

    Write the new file to the yielded path (by name, e.g. with h5py or ``onnx.save``). On
    any exception (KeyboardInterrupt included) the temporary file is removed and ``path``
    is left as it was. ``durable`` fsyncs the file and its folder (checkpoints);
    ``make_parents`` creates missing folders; ``keep_suffix`` ends the temporary name in
    ``path``'s suffix (for loaders that recognise a file by it). The file gets ``path``'s
    permissions if it exists, else :data:`NEW_FILE_MODE`. OSErrors propagate to the caller,
    which turns them into a message for people.
    """
    dest = Path(path)
    parent = dest.parent
    if make_parents:
        parent.mkdir(parents=True, exist_ok=True)
    mode = dest.stat().st_mode & 0o777 if dest.exists() else NEW_FILE_MODE
    suffix = f".tmp{dest.suffix}" if keep_suffix else ".tmp"
    fd, name = tempfile.mkstemp(dir=parent, prefix=f".{dest.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        _fsync_dir(parent)


def atomic_write(
    path: str | os.PathLike, data: bytes | str, *, durable: bool = False, make_parents: bool = False
) -> Path:
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    blob = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, durable=durable, make_parents=make_parents) as tmp:
        with open(tmp, "wb") as f:
            _write_all(f, blob)
    return Path(path)
