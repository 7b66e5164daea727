"""``nh-serve fit-baselines``: fit the univariate GLM baseline on training recordings.

The univariate GLM (:class:`nh_serve.core.univariate_glm.UnivariateGLM`) has 36
weights shared by every unit of every recording; it is fitted once, on recordings
the scored ones are not among, and applied zero-shot. ``nh-serve train`` fits it on
the checkpoint's own training recordings and stores it in the checkpoint, so eval
and score compare a model with the GLM fitted on the same data; this command
writes the weights as JSON for anything else (the copy shipped in
``nh_serve/models/univariate_glm.json`` is what eval and score use for checkpoints
that carry none)::

    nh-serve fit-baselines runs/data/real runs/data/synth_train --out univariate_glm.json

Every recording weighs the same in the fit, times ``--weight SUBSTRING=W`` for
recordings whose name contains ``SUBSTRING``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from nh_serve.core.glm import GLM_BANDS_MS
from nh_serve.core.univariate_glm import GLMRecording, UnivariateGLM
from nh_serve.data.features import DEFAULT_REFERENCE_S, auto_reference_s, reference_rate_hz
from nh_serve.data.session import open_session
from nh_serve.data.session.files import find_sessions, session_name
from nh_serve.errors import InputError
from nh_serve.util import atomic_write


def glm_recording(path, *, reference_s: float = DEFAULT_REFERENCE_S, weight: float = 1.0) -> GLMRecording:
    """Read a session file into what :meth:`UnivariateGLM.fit` needs (reference: its first ``reference_s``)."""
    path = Path(path)
    with open_session(path) as s:
        start, end = float(s.start), float(s.end)
        times, units = s.spikes(start, end)
        n_units = int(s.n_units)
    ref = auto_reference_s(end - start, reference_s)
    a, b = np.searchsorted(times, [start, start + ref])
    rate = reference_rate_hz(times[a:b], units[a:b], n_units=n_units, start=start, end=start + ref)
    return GLMRecording(name=session_name(path), times=times, units=units, n_units=n_units, start=start, end=end,
                        reference=(start, start + ref), ref_rate_hz=rate, weight=float(weight))


def parse_weights(items) -> dict[str, float]:
    out = {}
    for it in items or []:
        key, sep, val = str(it).partition("=")
        try:
            w = float(val)
        except ValueError:
            w = float("nan")
        if not sep or not key or not np.isfinite(w) or w < 0:
            raise InputError(f"--weight: expected SUBSTRING=WEIGHT with a weight >= 0, got {it!r}")
        out[key] = w
    return out


def fit_univariate(paths, *, reference_s: float = DEFAULT_REFERENCE_S, weights=None, progress: bool = True) -> UnivariateGLM:
    """:meth:`UnivariateGLM.fit` on session files (``weights``: ``{substring of the name: weight}``)."""
    recs = []
    for p in paths:
        w = 1.0
        for key, v in (weights or {}).items():
            if key in session_name(Path(p)):
                w = v
        recs.append(glm_recording(p, reference_s=reference_s, weight=w))
    return UnivariateGLM.fit(recs, progress=progress)


def weights_table(glm: UnivariateGLM) -> str:
    cols = glm.to_dict()["feature_order"]
    lines = ["band (ms) | " + " | ".join(cols)]
    for (a, b), row in zip(glm.bands_ms, glm.weights):
        lines.append(f"{a:g}-{b:g} | " + " | ".join(f"{x:+.4f}" for x in row))
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    paths = find_sessions(args.data, what="fit-baselines")
    glm = fit_univariate(paths, reference_s=args.reference_s, weights=parse_weights(args.weight), progress=not args.no_progress)
    print(weights_table(glm))
    atomic_write(Path(args.out), (json.dumps(glm.to_dict(), indent=1) + "\n").encode())
    print(f"wrote {args.out} ({glm.weights.size} weights, fitted on {len(paths)} recordings)")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "fit-baselines",
        help="fit the univariate GLM baseline on training recordings",
        description="Fit the univariate Poisson GLM baseline (six weights per horizon band "
        f"{', '.join(f'{a:g}-{b:g}' for a, b in GLM_BANDS_MS)} ms, shared by every unit) on session "
        "files, and write its weights as JSON.",
    )
    p.add_argument("data", nargs="+", help="session files or folders of them (training recordings)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--reference-s", type=float, default=DEFAULT_REFERENCE_S,
                   help="reference window at each recording start, seconds (default 60; a quarter of short recordings)")
    p.add_argument("--weight", action="append", default=[], metavar="SUBSTRING=W",
                   help="weight of recordings whose name contains SUBSTRING (default 1 each; repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
