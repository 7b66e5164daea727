"""The import architecture of docs/architecture.md: layers, no cycles, a client without torch.

The contracts live in pyproject.toml (``[tool.importlinter]``) and are checked with
``lint-imports``; a new reverse import or a new cycle fails here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nh_serve", "training", "export", "kernels", "service")
MAX_LINES = 500


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run(
        [str(lint), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_no_module_imports_itself_through_a_cycle():
    """Strongly connected modules in the import graph (function-level imports included)."""
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    assert cycles == []


def test_the_client_and_the_package_import_without_torch():
    r = _run("import sys, nh_serve, nh_serve.client; assert 'torch' not in sys.modules, 'torch was imported'")
    assert r.returncode == 0, r.stderr
    r = _run("from nh_serve import Predictor, Prediction; import nh_serve.inference.predictor as m; assert Predictor is m.Predictor")
    assert r.returncode == 0, r.stderr


def test_no_module_of_nh_serve_is_longer_than_500_lines_without_saying_why():
    long = []
    for f in sorted((ROOT / "nh_serve").rglob("*.py")):
        lines = f.read_text().splitlines()
        if len(lines) > MAX_LINES and not any(f"over {MAX_LINES} lines" in line.lower() for line in lines[:5]):
            long.append(f"{f.relative_to(ROOT)}: {len(lines)} lines")
    assert long == [], "split these modules, or say in their first lines why they are over 500 lines"
