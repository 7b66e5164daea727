"""The ``nh-serve`` command line itself: --version and the help of every command."""

from __future__ import annotations

import argparse
import re

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
