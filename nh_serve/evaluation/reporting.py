"""Shared helpers for benchmark and result reports.

Benchmarks write their tables into ``docs/benchmarks.md`` or
``docs/results.md``, each into its own section between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers, so several
benchmarks share one file without overwriting each other. Every section
states the machine and the software versions that produced it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from nh_serve.util import atomic_write, package_version


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else the platform string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(packages: tuple[str, ...] = ("nh-serve", "torch", "numpy")) -> dict[str, str]:
    """CPU model, logical cores, OS, Python and package versions, as strings."""
    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    for name in packages:
        info[name] = package_version(name, "not installed")
    try:
        import torch  # the report writers themselves run without torch

        info["torch_threads"] = str(torch.get_num_threads())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def machine_line(packages: tuple[str, ...] = ("nh-serve", "torch", "numpy")) -> str:
    """One Markdown line describing the machine and versions."""
    i = machine_info(packages)
    parts = [f"CPU: {i.pop('cpu')} ({i.pop('cores')} logical cores)"]
    if "gpu" in i:
        parts.append(f"GPU: {i.pop('gpu')}")
    parts += [f"{k} {v}" for k, v in i.items()]
    return "Machine: " + "; ".join(parts)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (dicts), floats shown with 4 significant digits."""
    if not rows:
        return "(no rows)"
    cols = columns or list(rows[0])

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def write_doc_section(path: str | os.PathLike, name: str, markdown: str, *, title: str | None = None) -> Path:
    """Replace the ``name`` section of a Markdown file (created if missing) with ``markdown``.

    The section lives between ``<!-- name:start -->`` and ``<!-- name:end -->``;
    a missing section is appended at the end. The write is atomic.
    """
    p = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = f"{start}\n{markdown.strip()}\n{end}"
    text = p.read_text() if p.exists() else f"# {title or p.stem.replace('-', ' ').capitalize()}\n"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + body + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    atomic_write(p, text, make_parents=True)
    return p
