"""Does behaviour / image input help? Train nh-tiny with and without it on the same data and compare.

    python -m training.multimodal_check --steps 300 --seed 0

Writes four multimodal synthetic recordings (:func:`nh_serve.data.synth.write_synthetic_sessions`,
40 units x 180 s; three train, one held out) and trains ``nh-tiny`` with
:func:`training.train.train` once per variant (same seed, steps and data):
``multimodal`` (``behavior_dim=2, image_dim=32``, the widths synth writes),
``images`` only, ``behavior`` only and ``plain`` (spikes only). For each
variant it prints bits/spike on the validation-in-time windows of the training
recordings (the last 30%, never trained on), the gain over ``plain`` with a
paired test over windows, and the same on the held-out recording (zero-shot).
The multimodal model is also scored with images only up to the context end
(``no schedule``: the stimulus sequence of the next second unknown).
docs/multimodal.md quotes its output; tests/test_multimodal.py asserts the gain.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nh_serve.data.synth import write_synthetic_sessions
from nh_serve.data.windows import collate
from nh_serve.evaluation.metrics import bits_per_spike, poisson_nll
from nh_serve.inference.model_io import load_model
from nh_serve.util import help_text
from training.data import apply_norm, load_session, window_item
from training.train import make_train_config, train, validation_windows

N_UNITS = 40
DURATION_S = 180.0
VAL_TIME_FRACTION = 0.3
#: Model widths of each variant (the widths synth writes: 2-D behaviour, 32-D image embeddings).
VARIANTS = {
    "multimodal": {"behavior_dim": 2, "image_dim": 32},
    "images": {"image_dim": 32},
    "behavior": {"behavior_dim": 2},
    "plain": {},
}


def train_variants(
    root: Path,
    *,
    steps: int,
    seed: int = 0,
    lr: float = 3e-3,
    variants: tuple[str, ...] = tuple(VARIANTS),
    schedule_dropout: float = 0.5,
) -> dict[str, Path]:
    """Write the recordings under ``root`` and train each variant; returns their checkpoints.

    ``schedule_dropout`` is the training config's ``image_schedule_dropout``.
    """
    torch.set_num_threads(1)
    write_synthetic_sessions(
        root / "train", n_sessions=3, seed=11, duration=DURATION_S, multimodal=True, n_units=N_UNITS
    )
    write_synthetic_sessions(
        root / "heldout", n_sessions=1, seed=12, duration=DURATION_S, multimodal=True, n_units=N_UNITS
    )
    ckpts = {}
    for name in variants:
        cfg = make_train_config(
            {
                "name": f"mm-check-{name}",
                "model": "nh-tiny",
                "model_overrides": VARIANTS[name],
                "steps": steps,
                "batch_size": 16,
                "lr": lr,
                "warmup_steps": min(10, steps),
                "val_every": steps,
                "ckpt_every": steps,
                "val_windows": 4,
                "reference_s": 60.0,
                "val_time_fraction": VAL_TIME_FRACTION,
                "seed": seed,
                "threads": 1,
                "image_schedule_dropout": schedule_dropout,
            }
        )
        out = root / f"out_{name}"
        train(cfg, data=[root / "train"], val_data=[root / "heldout"], out=out, device="cpu", progress=False)
        ckpts[name] = out / "last.safetensors"
    return ckpts


@torch.no_grad()
def score(
    ckpt: Path, files: list[Path], *, in_time: bool, schedule: bool = True
) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-window mean Poisson NLL (nats), the context starts, and bits/spike over all windows.

    ``schedule=False`` passes only the images shown in the context (``image_schedule_s=0``).
    """
    model, norm, _ = load_model(ckpt)
    cfg = model.cfg
    sessions = [
        load_session(f, cfg=cfg, reference_s=60.0, val_time_fraction=VAL_TIME_FRACTION if in_time else 0.0)
        for f in files
    ]
    apply_norm(sessions, norm)
    windows = validation_windows(sessions, n=200, in_time=in_time)
    nll, starts, bps = [], [], []
    for i, s in enumerate(sessions):
        cs = [c for j, c in windows if j == i]
        sched = None if schedule or cfg.image_dim == 0 else 0.0
        got = [window_item(s, c, cfg, image_schedule_s=sched) for c in cs]
        rates = torch.exp(model(**collate([g[0] for g in got]))).numpy() * cfg.bin_size_s  # (W, U, T) counts
        counts = np.stack([g[1] for g in got])  # (W, U, T)
        nll += [poisson_nll(r, y) for r, y in zip(rates, counts)]
        starts += [(i, c) for c in cs]
        bps.append(bits_per_spike(rates, counts))
    return np.array(nll), np.array(starts), float(np.mean(bps))


def compare(root: Path, ckpts: dict[str, Path]) -> dict[str, dict]:
    """Each variant against ``plain`` on the same windows: bits/spike, gain and the paired NLL test."""
    files = sorted((root / "train").glob("*.h5"))
    held = sorted((root / "heldout").glob("*.h5"))
    nll_pl, w_pl, bps_pl = score(ckpts["plain"], files, in_time=True)
    _, _, h_pl = score(ckpts["plain"], held, in_time=False)
    runs = [(name, ckpt, True) for name, ckpt in ckpts.items() if name != "plain"]
    if "multimodal" in ckpts:
        runs.append(("multimodal, no schedule", ckpts["multimodal"], False))
    out = {"plain": {"bps": bps_pl, "heldout_bps": h_pl, "windows": int(nll_pl.size)}}
    for name, ckpt, schedule in runs:
        nll, w, bps = score(ckpt, files, in_time=True, schedule=schedule)
        assert np.array_equal(w, w_pl)  # the same windows
        diff = nll_pl - nll  # > 0 where this variant is better
        _, _, h = score(ckpt, held, in_time=False, schedule=schedule)
        out[name] = {
            "bps": bps,
            "gain": bps - bps_pl,
            "paired_t": float(diff.mean() / (diff.std(ddof=1) / math.sqrt(diff.size))),
            "better_fraction": float(np.mean(diff > 0)),
            "heldout_bps": h,
            "heldout_gain": h - h_pl,
            "windows": int(diff.size),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.multimodal_check", description=help_text(__doc__.split("\n\n")[0])
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
        help="which models to train (plain is always trained: the others are compared with it)",
    )
    ap.add_argument(
        "--schedule-dropout", type=float, default=0.5,
        help="image_schedule_dropout of the training config (fraction of windows whose coming images are hidden)",
    )
    args = ap.parse_args(argv)
    variants = tuple(dict.fromkeys([*args.variants, "plain"]))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.monotonic()
        ckpts = train_variants(
            Path(d), steps=args.steps, seed=args.seed, lr=args.lr, variants=variants,
            schedule_dropout=args.schedule_dropout,
        )
        train_s = time.monotonic() - t0
        r = compare(Path(d), ckpts)
    pl = r.pop("plain")
    print(
        f"nh-tiny, {args.steps} steps, lr {args.lr:g}, seed {args.seed}, image_schedule_dropout "
        f"{args.schedule_dropout:g}; {len(ckpts)} models trained in {train_s:.0f} s on one CPU thread "
        f"({train_s / len(ckpts):.0f} s each, data included); {pl['windows']} validation-in-time windows "
        "of the 3 training recordings, and the held-out recording (zero-shot)"
    )
    print(f"{'variant':<26}{'in-time b/s':>12}{'gain':>9}{'paired t':>10}{'better':>8}{'held-out b/s':>14}{'gain':>9}")
    print(f"{'plain':<26}{pl['bps']:>+12.4f}{'':>9}{'':>10}{'':>8}{pl['heldout_bps']:>+14.4f}")
    for name, v in r.items():
        print(
            f"{name:<26}{v['bps']:>+12.4f}{v['gain']:>+9.4f}{v['paired_t']:>10.1f}{v['better_fraction']:>8.0%}"
            f"{v['heldout_bps']:>+14.4f}{v['heldout_gain']:>+9.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
