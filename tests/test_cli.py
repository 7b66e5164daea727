"""The ``nh-serve`` command line itself: --version and the help of every command."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from nh_serve import __version__
from nh_serve.cli import build_parser, main
from nh_serve.util import help_text

# Documentation markup that must not reach a terminal: Sphinx roles, double backticks, literal blocks.
MARKUP = re.compile(r":[a-z]+:`|``|::")


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every command path of ``parser``: (), ("demo",), ("bench",), ("bench", "forward"), ..."""
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = sorted(set(_commands(build_parser())) | {("score", "merge")})


def test_command_walk_finds_nested_commands():
    for path in [("ingest", "npz"), ("ingest", "phy"), ("bench", "kernels"), ("bench", "score"), ("export",)]:
        assert path in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "nh-serve")
def test_help_has_no_doc_markup(path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    bad = [line for line in out.splitlines() if MARKUP.search(line)]
    assert not bad, f"nh-serve {' '.join(path)} --help shows documentation markup:\n" + "\n".join(bad)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"nh-serve {__version__}"


def test_help_text_plain():
    doc = (
        "Uses :func:`nh_serve.data.synth.make_demo` and :meth:`~nh_serve.inference.predictor.Predictor.predict`\n"
        "(:class:`~nh_serve.errors.InputError`, :ref:`the guide <guide>`), ``--tolerance`` and **bold**.\n"
        "\n"
        "Examples::\n"
        "\n"
        "    nh-serve demo\n"
    )
    assert help_text(doc) == (
        "Uses nh_serve.data.synth.make_demo and Predictor.predict\n"
        "(InputError, the guide), --tolerance and bold.\n"
        "\n"
        "Examples:\n"
        "\n"
        "    nh-serve demo"
    )
    assert help_text(None) is None


def test_scripts_share_one_export_cache():
    """run.sh, serve.sh and test.sh keep on-the-fly exports in the same place inside the clone."""
    root = Path(__file__).resolve().parents[1]
    line = 'export NH_SERVE_CACHE_DIR="${NH_SERVE_CACHE_DIR:-$PWD/.cache/nh-serve}"'
    for name in ("run.sh", "serve.sh", "test.sh"):
        assert line in (root / "scripts" / name).read_text().splitlines(), (
            f"scripts/{name} sets another cache"
        )
    assert ".cache/" in (root / ".gitignore").read_text().splitlines()
