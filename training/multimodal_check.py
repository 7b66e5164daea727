"""Does behaviour / image input help? Train nh-tiny with and without it on the same data and compare.

    python -m training.multimodal_check --steps 800 --seed 0

Writes four multimodal synthetic recordings (:func:`nh_serve.synth.write_synthetic_sessions`,
40 units x 180 s; three train, one held out), trains ``nh-tiny`` twice with
:func:`training.train.train` (same seed, steps and data): once with
``behavior_dim=2, image_dim=32`` (the widths synth writes) and once without,
then prints bits/spike of both on the validation-in-time windows of the
training recordings (the last 30%, never trained on) with a paired test over
windows, and on the held-out recording (zero-shot). docs/multimodal.md quotes
its output.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from nh_serve.checkpoint import load_model
from nh_serve.metrics import bits_per_spike, poisson_nll
from nh_serve.model import collate
from nh_serve.synth import write_synthetic_sessions
from training.data import apply_norm, load_session, window_item
from training.train import make_train_config, train, validation_windows

N_UNITS = 40
DURATION_S = 180.0
VAL_TIME_FRACTION = 0.3
MULTIMODAL = {"behavior_dim": 2, "image_dim": 32}


def train_pair(root: Path, *, steps: int, seed: int = 0) -> dict[str, Path]:
    """Write the recordings under ``root`` and train both models; returns their checkpoints."""
    torch.set_num_threads(1)
    write_synthetic_sessions(
        root / "train", n_sessions=3, seed=11, duration=DURATION_S, multimodal=True, n_units=N_UNITS
    )
    write_synthetic_sessions(
        root / "heldout", n_sessions=1, seed=12, duration=DURATION_S, multimodal=True, n_units=N_UNITS
    )
    ckpts = {}
    for name, overrides in (("multimodal", MULTIMODAL), ("plain", {})):
        cfg = make_train_config(
            {
                "name": f"mm-check-{name}",
                "model": "nh-tiny",
                "model_overrides": overrides,
                "steps": steps,
                "batch_size": 16,
                "lr": 1e-2,
                "warmup_steps": min(10, steps),
                "val_every": steps,
                "ckpt_every": steps,
                "val_windows": 4,
                "reference_s": 60.0,
                "val_time_fraction": VAL_TIME_FRACTION,
                "seed": seed,
                "threads": 1,
            }
        )
        out = root / f"out_{name}"
        train(cfg, data=[root / "train"], val_data=[root / "heldout"], out=out, device="cpu", progress=False)
        ckpts[name] = out / "last.safetensors"
    return ckpts


@torch.no_grad()
def score(ckpt: Path, files: list[Path], *, in_time: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-window mean Poisson NLL (nats), the context starts, and bits/spike over all windows."""
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
        got = [window_item(s, c, cfg) for c in cs]
        rates = torch.exp(model(**collate([g[0] for g in got]))).numpy() * cfg.bin_size_s  # (W, U, T) counts
        counts = np.stack([g[1] for g in got])  # (W, U, T)
        nll += [poisson_nll(r, y) for r, y in zip(rates, counts)]
        starts += [(i, c) for c in cs]
        bps.append(bits_per_spike(rates, counts))
    return np.array(nll), np.array(starts), float(np.mean(bps))


def compare(root: Path, ckpts: dict[str, Path]) -> dict:
    """Bits/spike of both models on the same windows, and the paired per-window NLL test."""
    files = sorted((root / "train").glob("*.h5"))
    nll_mm, w_mm, bps_mm = score(ckpts["multimodal"], files, in_time=True)
    nll_pl, w_pl, bps_pl = score(ckpts["plain"], files, in_time=True)
    assert np.array_equal(w_mm, w_pl)  # the same windows
    diff = nll_pl - nll_mm  # > 0 where the multimodal model is better
    t = float(diff.mean() / (diff.std(ddof=1) / math.sqrt(diff.size)))
    held = sorted((root / "heldout").glob("*.h5"))
    _, _, h_mm = score(ckpts["multimodal"], held, in_time=False)
    _, _, h_pl = score(ckpts["plain"], held, in_time=False)
    return {
        "windows": int(diff.size),
        "bps_multimodal": bps_mm,
        "bps_plain": bps_pl,
        "paired_t": t,
        "better_fraction": float(np.mean(diff > 0)),
        "heldout_bps_multimodal": h_mm,
        "heldout_bps_plain": h_pl,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.multimodal_check", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        r = compare(Path(d), train_pair(Path(d), steps=args.steps, seed=args.seed))
    print(
        f"in-time windows ({r['windows']}): bits/spike multimodal {r['bps_multimodal']:+.4f}, plain {r['bps_plain']:+.4f}, "
        f"gain {r['bps_multimodal'] - r['bps_plain']:+.4f} (paired t = {r['paired_t']:.1f}, better in "
        f"{r['better_fraction']:.0%} of windows)\nheld-out recording (zero-shot): bits/spike multimodal "
        f"{r['heldout_bps_multimodal']:+.4f}, plain {r['heldout_bps_plain']:+.4f}, "
        f"gain {r['heldout_bps_multimodal'] - r['heldout_bps_plain']:+.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
