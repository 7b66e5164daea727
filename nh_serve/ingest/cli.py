"""``nh-serve ingest <format>`` and ``nh-serve embed-images``.

::

    nh-serve ingest ibl   --cache-dir ROOT [--eid EID] [--probe probe00] --out s.h5
    nh-serve ingest ibl   --base-url https://openalyx.internationalbrainlab.org --eid EID --probe probe00 --out s.h5
    nh-serve ingest allen --nwb session_715093703.nwb --out s.h5
    nh-serve ingest nwb   recording.nwb [--trials-table NAME] --out s.h5
    nh-serve ingest phy   kilosort_output/ [--include-mua] --out s.h5
    nh-serve ingest npz   spikes.npz --out s.h5
    nh-serve embed-images --frames FRAMES --presentations TABLE --session s.h5 --weights clip.pt

Every ``ingest`` command takes ``--min-rate HZ`` (default 0.1), ``--all-units``
and ``--overwrite``; see ``docs/ingest.md``.
"""

from __future__ import annotations

import argparse

from nh_serve.data.session import open_session
from nh_serve.ingest.allen import read_allen
from nh_serve.ingest.common import (
    DEFAULT_MIN_RATE,
    GOOD,
    Recording,
    UnitFilter,
    check_output_path,
    describe_filter,
    write_recording,
)
from nh_serve.ingest.ibl import make_one, read_ibl
from nh_serve.ingest.images import embed_images
from nh_serve.ingest.npz import read_npz
from nh_serve.ingest.nwb import read_nwb
from nh_serve.ingest.phy import read_phy


def _filters(p: argparse.ArgumentParser, *, mua: bool) -> None:
    g = p.add_argument_group("unit filters and output")
    g.add_argument("--out", required=True, help="session file to write (.h5)")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g.add_argument(
        "--min-rate",
        type=float,
        default=DEFAULT_MIN_RATE,
        metavar="HZ",
        help=f"drop units firing below this rate over the whole recording (default {DEFAULT_MIN_RATE} Hz)",
    )
    g.add_argument("--all-units", action="store_true", help="keep every unit, whatever its label or rate")
    if mua:
        g.add_argument("--include-mua", action="store_true", help="keep units labelled mua as well as good ones")


def _flt(args) -> UnitFilter:
    keep = (GOOD, "mua") if getattr(args, "include_mua", False) else (GOOD,)
    return UnitFilter(min_rate=args.min_rate, keep_labels=keep, all_units=args.all_units)


def _finish(rec: Recording, args) -> int:
    path = write_recording(rec, args.out, flt=_flt(args))

    with open_session(path, full_check=False) as s:
        f = s.provenance.get("filters", {})
        parts = [
            f"{s.n_units} units (of {f.get('n_units_source', '?')})",
            f"{s.n_spikes} spikes",
            f"{s.duration:.1f} s",
        ]
        if s.behavior_dim:
            parts.append(f"behaviour ({', '.join(s.provenance.get('behavior_columns') or [str(s.behavior_dim) + ' columns'])})")
        if s.trials is not None:
            parts.append(f"{len(s.trials['start'])} trials")
    print(f"wrote {path}: {', '.join(parts)}")
    print(describe_filter(f))
    return 0


def _run_ibl(args) -> int:
    check_output_path(args.out, overwrite=args.overwrite)
    one = make_one(cache_dir=args.cache_dir, base_url=args.base_url, build_cache=args.build_cache)
    rec = read_ibl(one=one, eid=args.eid, probe=args.probe, collection=args.collection, wheel_rate=args.wheel_rate)
    return _finish(rec, args)


def _run_allen(args) -> int:
    check_output_path(args.out, overwrite=args.overwrite)
    print(f"reading {args.nwb} with allensdk in its own environment (a full session takes a minute or two)", flush=True)
    rec = read_allen(args.nwb, all_units=args.all_units, python=args.allen_python)
    return _finish(rec, args)


def _run_nwb(args) -> int:
    check_output_path(args.out, overwrite=args.overwrite)
    rec = read_nwb(args.nwb, trials_table=args.trials_table, behavior_series=args.behavior_series)
    return _finish(rec, args)


def _run_phy(args) -> int:
    check_output_path(args.out, overwrite=args.overwrite)
    rec = read_phy(args.folder, sample_rate=args.sample_rate)
    return _finish(rec, args)


def _run_npz(args) -> int:
    check_output_path(args.out, overwrite=args.overwrite)
    rec = read_npz(args.npz)
    return _finish(rec, args)


def _run_embed(args) -> int:
    path = embed_images(
        frames=args.frames,
        session=args.session,
        presentations=args.presentations,
        out=args.out,
        model_name=args.model,
        weights=args.weights,
        random_weights=args.random_weights,
        frame_column=args.frame_column,
        time_column=args.time_column,
        batch_size=args.batch_size,
        device=args.device,
        overwrite=args.overwrite,
    )

    with open_session(path, full_check=False) as s:
        n = s.image_events(s.start, s.end)
        print(f"wrote {path}: {0 if n is None else len(n[0])} image presentations, {s.image_dim}-d embeddings")
    return 0


def add_cli(subparsers) -> None:
    """Register ``ingest`` (with one sub-command per format) and ``embed-images``."""
    ing = subparsers.add_parser(
        "ingest",
        help="convert a recording (IBL, Allen, NWB, Kilosort/phy, npz) into a session file",
        description="Convert a spike-sorted recording into an nh-serve session file. See docs/ingest.md.",
    )
    sub = ing.add_subparsers(dest="format", metavar="<format>")
    ing.set_defaults(func=lambda args: (ing.print_help(), 2)[1])

    p = sub.add_parser("ibl", help="an IBL session probe through ONE (local cache or online)")
    p.add_argument("--eid", help="experiment id (UUID) or session path lab/Subjects/SUBJECT/DATE/NUMBER")
    p.add_argument("--probe", default="probe00", help="probe name (default probe00)")
    p.add_argument("--collection", help="ALF collection with the spikes (default: the probe's, e.g. alf/probe00/pykilosort)")
    p.add_argument("--cache-dir", help="ONE cache folder (offline use, or where online downloads go)")
    p.add_argument("--base-url", help="ONE database URL for online use, e.g. https://openalyx.internationalbrainlab.org")
    p.add_argument("--build-cache", action="store_true", help="build ONE's cache tables for --cache-dir from its ALF folders")
    p.add_argument("--wheel-rate", type=float, default=100.0, metavar="HZ", help="grid for the wheel velocity (default 100 Hz)")
    _filters(p, mua=False)
    p.set_defaults(func=_run_ibl)

    p = sub.add_parser("allen", help="an Allen Brain Observatory Neuropixels session NWB file (needs .venv-allen)")
    p.add_argument("--nwb", required=True, help="the session's NWB file (session_<id>.nwb)")
    p.add_argument("--allen-python", help="python of the Allen SDK environment (default .venv-allen/bin/python)")
    _filters(p, mua=False)
    p.set_defaults(func=_run_allen)

    p = sub.add_parser("nwb", help="any NWB 2 file with a units table")
    p.add_argument("nwb", help="the .nwb file")
    p.add_argument("--trials-table", help="table under /intervals to use as trials (default: trials, if present)")
    p.add_argument("--behavior-series", help="HDF5 path of a TimeSeries to keep as behaviour")
    _filters(p, mua=True)
    p.set_defaults(func=_run_nwb)

    p = sub.add_parser("phy", help="a Kilosort / phy output folder")
    p.add_argument("folder", help="folder with spike_times.npy, spike_clusters.npy, params.py")
    p.add_argument("--sample-rate", type=float, metavar="HZ", help="sampling rate, if params.py does not give it")
    _filters(p, mua=True)
    p.set_defaults(func=_run_phy)

    p = sub.add_parser("npz", help="an .npz with spike_times and unit_ids (and optional extras)")
    p.add_argument("npz", help="the .npz file")
    _filters(p, mua=True)
    p.set_defaults(func=_run_npz)

    e = subparsers.add_parser(
        "embed-images",
        help="add CLIP embeddings of stimulus frames to a session file",
        description="Compute CLIP image embeddings (open_clip, local weights) of stimulus frames and write them, "
        "aligned to the presentation times, into a session file.",
    )
    e.add_argument("--frames", required=True, help="folder of .png/.jpg/.npy frames, or one .npy stack (N, H, W[, C])")
    e.add_argument("--presentations", help="csv/tsv/npz with start_time and frame columns (default: the session's trials)")
    e.add_argument("--session", required=True, help="session file to add the embeddings to")
    e.add_argument("--out", help="write a new session file here instead of replacing --session")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.add_argument("--model", default="ViT-L-14", help="open_clip architecture (default ViT-L-14)")
    e.add_argument("--weights", help="local checkpoint file for --model (required unless --random-weights)")
    e.add_argument("--random-weights", action="store_true", help="random initialisation instead of weights (testing only)")
    e.add_argument("--frame-column", help="column of the presentations naming the frame (default: auto)")
    e.add_argument("--time-column", help="column of the presentations with start times (default start_time)")
    e.add_argument("--batch-size", type=int, default=32, help="frames per forward pass (default 32)")
    e.add_argument("--device", default="cpu", help="torch device (default cpu)")
    e.set_defaults(func=_run_embed)


def run(argv: list[str]) -> int:
    """Run ``ingest ...`` / ``embed-images ...`` from an argument list (as ``nh-serve`` would).

    :class:`~nh_serve.errors.InputError` propagates to the caller; ``nh-serve``
    itself prints it as a one-line error.
    """
    parser = argparse.ArgumentParser(prog="nh-serve")
    add_cli(parser.add_subparsers(dest="command", metavar="<command>"))
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)
