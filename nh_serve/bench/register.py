"""How long registration takes (``nh-serve bench register``).

For each unit count (default 100 and 1000) a synthetic recording
(:func:`nh_serve.data.synth.make_session`) gives a 60 s reference window, registered
``--repeats`` times in one Predictor with ``fit="none"`` (descriptors, embeddings, the
history stream) and with ``fit="reference"`` (the same plus each unit's read-out and
population correction and the recording's calibration fitted on the reference window,
:mod:`nh_serve.inference.reference_fit`), and
with ``fit="reference-dense"`` (the same on windows twice as dense).
Reported: median and slowest wall time of the whole ``register`` call, the fit's own seconds,
and how many units kept each fit. Torch uses ``--threads`` threads (default 2, the target machine's cores).
Results go to the ``register`` section of ``docs/benchmarks.md`` (``--no-doc`` to skip).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from nh_serve.data.synth import make_session
from nh_serve.evaluation.reporting import machine_line, markdown_table, write_doc_section
from nh_serve.inference.predictor import Predictor

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def measure(p: Predictor, n_units: int, *, repeats: int, seed: int) -> list[dict]:
    d = make_session(seed=seed, n_units=n_units, duration=62.0)
    ids = np.asarray(d["unit_ids"]).astype(str)
    t, u = d["spike_times"], d["unit_index"]
    m = t < 60.0
    rows = []
    for fit in ("none", "reference", "reference-dense"):
        secs, fit_secs, kept = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            tok = p.register(t[m], ids[u[m]], reference_window=(0.0, 60.0), units=ids, fit=fit)
            secs.append(time.perf_counter() - t0)
            info = p.session(tok).fit or {}
            fit_secs.append(float(info.get("seconds", 0.0)))
            kept.append((int(info.get("units_fitted", 0)), int(info.get("population_units_corrected", 0)),
                         f"{info.get('floor_beta', 0.0):.2f}, {info.get('shrink_gamma', 0.0):.2f}"))
            p.sessions.discard(tok)
        rows.append(
            {
                "units": n_units,
                "fit": fit,
                "reference spikes": int(m.sum()),
                "register median (s)": float(np.median(secs)),
                "register max (s)": float(np.max(secs)),
                "of which the fit (s)": float(np.median(fit_secs)),
                "units kept a read-out fit": kept[-1][0] if fit != "none" else "",
                "units kept a population correction": kept[-1][1] if fit != "none" else "",
                "calibration (floor, departures)": kept[-1][2] if fit != "none" else "",
                "load": round(os.getloadavg()[0], 2),
            }
        )
    return rows


def _run(args: argparse.Namespace) -> int:
    torch.set_num_threads(int(args.threads))
    p = Predictor.load(args.checkpoint, backend="torch")
    rows = []
    for n in args.units:
        rows += measure(p, int(n), repeats=int(args.repeats), seed=int(args.seed))
    table = markdown_table(rows)
    print(table)
    if not args.no_doc:
        text = (
            "## Registration\n\n"
            f"`nh-serve bench register --checkpoint {args.checkpoint}` ({p.cfg.name} {p.model_hash}, "
            f"{args.threads} torch threads, {args.repeats} registrations each, 60 s reference): the whole "
            "`Predictor.register` call zero-shot (`fit=\"none\"`), with the reference fit "
            "(`fit=\"reference\"`, the default) and with the fit on windows twice as dense "
            "(`fit=\"reference-dense\"`).\n\n" + table + "\n\n" + machine_line()
        )
        print(f"wrote the register section of {write_doc_section(args.doc, 'register', text)}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("register", help="registration time with and without the reference fit",
                              description="Time Predictor.register with fit='none', 'reference' and 'reference-dense'.")
    p.add_argument("--checkpoint", default="default", help="checkpoint file or 'default'")
    p.add_argument("--units", nargs="+", type=int, default=[100, 1000], help="unit counts (default 100 1000)")
    p.add_argument("--repeats", type=int, default=3, help="registrations per setting (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc", default=str(DOC_PATH), help="Markdown file whose 'register' section is rewritten")
    p.add_argument("--no-doc", action="store_true", help="print only; do not write the Markdown file")
    p.set_defaults(func=_run)
