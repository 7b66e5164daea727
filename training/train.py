"""Train a NeuroHorizon model: ``python -m training.train --config NAME|FILE --data ... --out DIR``.

A compact plain-PyTorch loop (also ``nh-serve train``): :func:`train` runs the phases of a
:class:`Trainer` top to bottom (set-up, data, model and optimiser, the loop of steps with
validation and checkpoints, the end).

- **Samples**: each step draws ``batch_size`` (recording, window) pairs from the
  training recordings (recording by ``session_weights``, context start uniform
  in its training range, see :mod:`training.data`), cuts and tokenizes them with
  the window pipeline (:mod:`nh_serve.data.windows`) and pads them with its ``collate``.
  Target: the spike counts of the ``n_bins`` bins after the context.
- **Loss**: :func:`nh_serve.core.model.poisson_loss` (mean Poisson NLL per unit and bin).
- **Optimiser**: AdamW (weight decay on matrices only), linear warm-up for
  ``warmup_steps`` then cosine decay to ``min_lr_ratio * lr``; gradient-norm
  clipping at ``grad_clip``; bf16 autocast on CUDA, float32 on CPU.
- **Seeding**: the weights start from ``torch.manual_seed(seed)``; the windows
  of step ``k`` on rank ``r`` come from ``Generator(PCG64([seed, r, k]))`` and
  dropout from ``torch.manual_seed`` of the same triple, so the data order is a
  function of the step alone and ``--resume`` continues it exactly.
- **Splits**: whole recordings go to train / validation / test (``--val-data`` /
  ``--test-data``, or a seeded split of ``--data`` by ``val_fraction`` /
  ``test_fraction``); inside training recordings the last ``val_time_fraction``
  of the time after the reference window is validation-in-time. The feature
  normalisation is fitted on the training recordings only and travels in the
  checkpoint.
- **Validation** every ``val_every`` steps: Poisson loss and bits/spike over the
  1 s horizon (:func:`nh_serve.evaluation.metrics.bits_per_spike`, per recording, then
  averaged) on validation recordings (``val_sessions``) and on the
  validation-in-time windows (``val_time``).
- **Checkpoints** every ``ckpt_every`` steps, all written atomically into
  ``--out``: ``last.safetensors`` and ``best.safetensors`` (best validation
  bits/spike; :func:`nh_serve.inference.model_io.save_model` files that
  ``Predictor.load`` reads) and ``train_state.safetensors`` (weights, AdamW
  moments, step and bookkeeping; no pickle). ``--resume`` continues from it
  with the same optimiser state, schedule and data order; a killed run loses at
  most the steps since the last checkpoint.
- **Distributed**: under ``torchrun`` the model is wrapped in
  DistributedDataParallel (gloo on CPU, nccl on CUDA), every rank draws its own
  windows (``batch_size`` is the global batch, split evenly), rank 0 validates
  and writes checkpoints; at the end the ranks compare weight hashes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from nh_serve.core.config import CONFIGS, ModelConfig, get_config
from nh_serve.core.model import poisson_loss
from nh_serve.data.features import MIN_REFERENCE_S, FeatureNorm
from nh_serve.data.spikes import spikes_fingerprint
from nh_serve.data.windows import collate
from nh_serve.errors import CheckpointError, InputError
from nh_serve.evaluation.metrics import bits_per_spike
from nh_serve.inference.checkpoint import content_hash, load_checkpoint, save_checkpoint
from nh_serve.inference.model_io import HEAD_ABLATIONS, build_model, save_model
from nh_serve.settings import Settings, settings
from nh_serve.util import help_text
from training.data import (
    TrainSession,
    apply_norm,
    evenly_spaced,
    find_sessions,
    load_sessions,
    pad_targets,
    sample_image_schedules,
    sample_windows,
    session_weights,
    split_sessions,
    window_item,
)
from training.harness import Harness, fit_univariate_start, init_model_univariate, validate_registered
from training.harness import loss as harness_loss

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
STATE_FILE = "train_state.safetensors"
STATE_KIND = "nh-serve-train-state"


# ================================================================================================
# Training configuration
# ================================================================================================


@settings(where="training config", error=InputError)
class TrainConfig(Settings):
    """Everything a training run depends on besides its data (times in seconds).

    Attributes:
        name: label of the run configuration.
        model: registered model config (``nh-tiny``, ``nh-small``, ``nh-base``).
        model_overrides: fields of :class:`~nh_serve.core.config.ModelConfig` to change.
        head_ablation: ``none`` or ``no_activity`` (the head gets no per-unit
            activity input and no baseline offset: an ablation).
        steps: optimiser steps.
        batch_size: windows per step over all ranks.
        lr: peak learning rate; min_lr_ratio: final lr as a fraction of ``lr``.
        warmup_steps: linear warm-up steps (< steps).
        weight_decay: AdamW weight decay on weight matrices; betas: AdamW betas.
        grad_clip: max global gradient norm (0 = no clipping).
        reference_s: reference-window length (short recordings use a quarter of their length, >= 10 s).
        val_time_fraction: last fraction of each training recording (after its reference) kept for validation.
        val_fraction, test_fraction: recordings held out when ``--val-data`` / ``--test-data`` are not given.
        val_every: steps between validations (and the end).
        ckpt_every: steps between checkpoints (and the end).
        val_windows: validation windows per recording (evenly spaced).
        session_weights: ``{substring of a recording name: sampling weight}`` (default weight 1).
        image_schedule_dropout: image models: fraction of training windows whose coming images are
            hidden past a random point of the forecast window (so the model also predicts without a
            stimulus schedule); validation always passes the whole schedule.
        seed: random seed.
        threads: torch CPU threads (0 = leave torch's default).
        zero_shot_weight: history models with a read-out: weight of the zero-shot loss (no per-unit
            read-out) beside the loss with each training unit's learned read-out.
        readout_l2: penalty on the mean square of the learned read-outs.
        readout_lr_mult: learning rate of the read-out tables as a multiple of ``lr``.
        head_units: units forecast (and scored by the loss) per window, a random subset of larger
            recordings (the encoder still reads every unit); 0 = all.
    """

    name: str = "custom"
    model: str = "nh-small"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    head_ablation: str = "none"
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    reference_s: float = 60.0
    val_time_fraction: float = 0.2
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    val_every: int = 200
    ckpt_every: int = 50
    val_windows: int = 12
    session_weights: dict[str, float] = field(default_factory=dict)
    image_schedule_dropout: float = 0.5
    seed: int = 0
    threads: int = 0
    zero_shot_weight: float = 0.5
    readout_l2: float = 1e-2
    readout_lr_mult: float = 10.0
    head_units: int = 0

    def __post_init__(self) -> None:
        fail = self.fail
        rules = [
            ("steps", self.steps >= 1, f"must be >= 1, got {self.steps}"),
            ("batch_size", self.batch_size >= 1, f"must be >= 1, got {self.batch_size}"),
            (
                "warmup_steps",
                0 <= self.warmup_steps < self.steps,
                f"({self.warmup_steps}) must be in [0, steps = {self.steps})",
            ),
            ("lr", self.lr > 0, f"must be > 0, got {self.lr}"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, f"must be in [0, 1], got {self.min_lr_ratio}"),
            ("weight_decay", self.weight_decay >= 0, f"must be >= 0, got {self.weight_decay}"),
            ("betas", all(0 <= b < 1 for b in self.betas), f"must be in [0, 1), got {self.betas}"),
            ("grad_clip", self.grad_clip >= 0, f"must be >= 0 (0 = off), got {self.grad_clip}"),
            (
                "reference_s",
                self.reference_s >= MIN_REFERENCE_S,
                f"must be >= {MIN_REFERENCE_S:g} s, got {self.reference_s}",
            ),
            ("val_time_fraction", 0 <= self.val_time_fraction < 1, f"must be in [0, 1), got {self.val_time_fraction}"),
            (
                "image_schedule_dropout",
                0 <= self.image_schedule_dropout <= 1,
                f"must be in [0, 1], got {self.image_schedule_dropout}",
            ),
            ("val_fraction", 0 <= self.val_fraction < 1, f"must be in [0, 1), got {self.val_fraction}"),
            ("test_fraction", 0 <= self.test_fraction < 1, f"must be in [0, 1), got {self.test_fraction}"),
            ("val_every", self.val_every >= 1, f"must be >= 1, got {self.val_every}"),
            ("ckpt_every", self.ckpt_every >= 1, f"must be >= 1, got {self.ckpt_every}"),
            ("val_windows", self.val_windows >= 1, f"must be >= 1, got {self.val_windows}"),
            ("threads", self.threads >= 0, f"must be >= 0, got {self.threads}"),
            ("zero_shot_weight", self.zero_shot_weight >= 0, f"must be >= 0, got {self.zero_shot_weight}"),
            ("readout_l2", self.readout_l2 >= 0, f"must be >= 0, got {self.readout_l2}"),
            ("readout_lr_mult", self.readout_lr_mult > 0, f"must be > 0, got {self.readout_lr_mult}"),
            ("head_units", self.head_units >= 0, f"must be >= 0 (0 = all units), got {self.head_units}"),
            (
                "head_ablation",
                self.head_ablation in HEAD_ABLATIONS,
                f"must be one of {', '.join(HEAD_ABLATIONS)}, got {self.head_ablation!r}",
            ),
        ]
        for key, ok, problem in rules:
            if not ok:
                fail(key, problem)
        self.model_config()  # inconsistent model sizes fail here, before any data is read

    def model_config(self) -> ModelConfig:
        """The validated model config (InputError on inconsistent sizes)."""
        if self.model not in CONFIGS:
            self.fail("model", f"{self.model!r} is not one of {', '.join(CONFIGS)}")
        try:
            return get_config(self.model, **self.model_overrides)
        except ValueError as e:
            self.fail("model_overrides", f"do not give a valid {self.model} model: {e}")


def make_train_config(d: dict[str, Any], *, where: str = "training config") -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a dict (InputError saying what to fix)."""
    return TrainConfig.from_dict(d, where=where)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_train_config(spec: str, overrides: list[str] | None = None) -> TrainConfig:
    """A config from a JSON file or a name in ``training/configs/``, with ``key=value`` overrides.

    Override keys may be dotted (``model_overrides.unit_embedding_mode=random``);
    values are parsed as JSON where possible.
    """
    path = Path(spec)
    if not path.is_file():
        path = CONFIG_DIR / f"{spec}.json"
        if not path.is_file():
            names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
            raise InputError(f"--config: {spec!r} is neither a file nor a named config ({', '.join(names)})")
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"--config: cannot read {path.name} as JSON ({e}); fix the file") from None
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"--set: expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        target = d
        parts = key.split(".")
        for p in parts[:-1]:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise InputError(f"--set: {key} does not name a field inside an object")
        target[parts[-1]] = _parse_value(value)
    return make_train_config(d, where=f"training config {path.name}")


# ================================================================================================
# Distributed helpers
# ================================================================================================


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def setup_dist(device: str) -> Dist:
    """Read ``torchrun``'s environment; init the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise InputError("--device cuda: this machine has no CUDA device; use --device cpu")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


# ================================================================================================
# Learning rate, optimiser, state files
# ================================================================================================


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of (0-based) ``step``: linear warm-up then cosine to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    )


def make_optimizer(model: nn.Module, cfg: TrainConfig, tables: list[nn.Parameter] = ()) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not biases, norms or embeddings); the
    read-out tables of the training units in a group of their own (no decay, ``readout_lr_mult``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "emb" not in name else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
    ]
    if tables:
        groups.append({"params": list(tables), "weight_decay": 0.0, "lr_mult": cfg.readout_lr_mult})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Flatten the AdamW state into ``optim.<param>.<key>`` tensors plus JSON param groups."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"optim.{idx}.{k}"] = t.reshape(-1) if t.ndim == 0 else t
            if t.ndim == 0:
                tensors[f"optim.{idx}.{k}"] = t.reshape(1)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _restore_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t.reshape(()) if key == "step" else t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_state(
    path: Path, *, model: nn.Module, opt: torch.optim.Optimizer, norm: FeatureNorm, info: dict, tables=()
) -> None:
    """Write the resumable training state (weights, read-out tables, AdamW moments, bookkeeping) atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"table.{i}": t.detach() for i, t in enumerate(tables)})
    opt_t, groups = _optimizer_tensors(opt)
    tensors.update(opt_t)
    save_checkpoint(
        path,
        state_dict=tensors,
        config=model.cfg.to_dict(),
        feature_norm=norm.to_dict(),
        training={"kind": STATE_KIND, "optimizer_param_groups": groups, **info},
    )


def load_state(
    path: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict, FeatureNorm, dict]:
    """Read a training state file: (model weights, optimiser tensors, model config, norm, training info)."""
    try:
        ck = load_checkpoint(path)
    except CheckpointError as e:
        raise InputError(f"--resume: {e}") from None
    if ck.training.get("kind") != STATE_KIND:
        raise InputError(f"--resume: {path} is not a training state file written by training.train")
    model_sd = {k[len("model.") :]: v for k, v in ck.state_dict.items() if k.startswith("model.")}
    model_sd.update({k: v for k, v in ck.state_dict.items() if k.startswith("table.")})
    opt_sd = {k: v for k, v in ck.state_dict.items() if k.startswith("optim.")}
    return model_sd, opt_sd, ck.config, FeatureNorm.from_dict(ck.feature_norm), ck.training


# ================================================================================================
# Validation
# ================================================================================================


def validation_windows(sessions: list[TrainSession], *, n: int, in_time: bool) -> list[tuple[int, float]]:
    """Fixed validation windows: evenly spaced context starts per recording.

    ``in_time``: inside each training recording's validation-in-time range;
    otherwise anywhere after the reference window of a validation recording.
    """
    out = []
    for i, s in enumerate(sessions):
        rng = s.val_range if in_time else s.train_range
        if rng is None:
            continue
        out.extend((i, float(c)) for c in evenly_spaced(rng[0], rng[1], n))
    return out


@torch.no_grad()
def validate(
    model: nn.Module,
    sessions: list[TrainSession],
    windows: list[tuple[int, float]],
    *,
    cfg: ModelConfig,
    device: torch.device,
    autocast: bool,
    batch_size: int = 16,
) -> dict | None:
    """Mean Poisson loss and bits/spike (per recording, then averaged) of ``windows``."""
    if not windows:
        return None
    was_training = model.training
    model.eval()
    by_session: dict[int, list[float]] = {}
    for i, c in windows:
        by_session.setdefault(i, []).append(c)
    losses, weights, bps = [], [], []
    for i, starts in by_session.items():
        s = sessions[i]
        preds, targets = [], []
        for j in range(0, len(starts), batch_size):
            got = [window_item(s, c, cfg) for c in starts[j : j + batch_size]]
            batch = {k: v.to(device) for k, v in collate([g[0] for g in got]).items()}
            y = torch.from_numpy(np.stack([g[1] for g in got])).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                log_rate = model(**batch)
            log_rate = log_rate.float()
            loss = poisson_loss(log_rate, y, bin_size_s=cfg.bin_size_s, unit_mask=batch["unit_mask"])
            losses.append(float(loss) * y.numel())
            weights.append(y.numel())
            preds.append((torch.exp(log_rate) * cfg.bin_size_s).cpu().numpy())
            targets.append(y.cpu().numpy())
        bps.append(bits_per_spike(np.concatenate(preds), np.concatenate(targets)))
    model.train(was_training)
    return {
        "loss": float(sum(losses) / sum(weights)),
        "bits_per_spike": float(np.mean(bps)),
        "windows": len(windows),
        "sessions": len(by_session),
    }


# ================================================================================================
# The trainer
# ================================================================================================


def _names(sessions: list[TrainSession]) -> list[dict]:
    return [
        {
            "name": s.name,
            "units": s.n_units,
            "duration_s": round(s.duration, 3),
            "reference_s": round(s.reference[1] - s.reference[0], 3),
            "spikes_sha256": spikes_fingerprint(s.times, s.units),  # how eval and score recognise it
        }
        for s in sessions
    ]


@dataclass
class TrainData:
    """The recordings of a run: training and validation in memory, test recordings only listed."""

    train: list[TrainSession]
    val: list[TrainSession]
    test_paths: list[Path]
    weights: np.ndarray  # sampling probability of each training recording


def load_data(
    cfg: TrainConfig,
    mcfg: ModelConfig,
    *,
    data: list[str | Path],
    val_data: list[str | Path] | None,
    test_data: list[str | Path] | None,
    progress: bool,
) -> TrainData:
    """Find, split and read the recordings; every problem is reported here, before any training."""
    paths = find_sessions(data, what="--data")
    val_paths = find_sessions(val_data, what="--val-data") if val_data else None
    test_paths = find_sessions(test_data, what="--test-data") if test_data else []
    if val_paths is None:
        train_paths, val_paths, auto_test = split_sessions(
            paths,
            val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction if not test_data else 0.0,
            seed=cfg.seed,
        )
        test_paths = test_paths + auto_test
    else:
        train_paths = paths
        if test_data is None and cfg.test_fraction > 0:
            train_paths, _, auto_test = split_sessions(
                paths, val_fraction=0.0, test_fraction=cfg.test_fraction, seed=cfg.seed
            )
            test_paths = auto_test
    held = {p.resolve() for p in val_paths + test_paths}
    overlap = [p for p in train_paths if p.resolve() in held]
    if overlap:
        raise InputError(
            f"--data: {overlap[0]} is also a validation or test recording; splits must not share recordings"
        )
    train_sessions = load_sessions(
        train_paths,
        cfg=mcfg,
        reference_s=cfg.reference_s,
        val_time_fraction=cfg.val_time_fraction,
        progress=progress,
    )
    val_sessions = load_sessions(val_paths, cfg=mcfg, reference_s=cfg.reference_s, val_time_fraction=0.0)
    weights = session_weights(train_sessions, cfg.session_weights)
    return TrainData(train=train_sessions, val=val_sessions, test_paths=test_paths, weights=weights)


class Trainer:
    """One training run, in the order :func:`train` calls its phases.

    1. ``__init__``: set-up (processes, threads, the model config);
    2. :meth:`load`: the data (:func:`load_data`);
    3. :meth:`build`: model and optimiser, from scratch or from the training state (``--resume``),
       and the feature normalisation (fitted on the training recordings, or the saved one);
    4. :meth:`start`: the split summary, and the untrained model's validation figures;
    5. :meth:`step`: one optimiser step on freshly drawn windows;
    6. :meth:`validate`: validation figures (and ``best.safetensors`` when they improve);
    7. :meth:`checkpoint`: ``last.safetensors`` and the resumable training state;
    8. :meth:`finish`: the ranks compare weight hashes; the final checkpoint and summary.
    """

    def __init__(self, cfg: TrainConfig, *, out: str | Path, device: str, progress: bool, command: str | None):
        self.t_setup = time.monotonic()
        self.cfg = cfg
        self.dist = setup_dist(device)
        if cfg.batch_size % self.dist.world != 0:
            raise InputError(
                f"training config: batch_size ({cfg.batch_size}) must be divisible by the number of processes "
                f"({self.dist.world}); change batch_size or --nproc_per_node"
            )
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.mcfg = cfg.model_config()
        self.out = Path(out)
        self.state_path = self.out / STATE_FILE
        self.progress = progress
        self.provenance = {"command": command} if command else {}
        self.autocast = self.dist.device.type == "cuda"

    # ---- data -------------------------------------------------------------------------------------
    def load(self, *, data, val_data, test_data) -> None:
        self.data = load_data(
            self.cfg,
            self.mcfg,
            data=data,
            val_data=val_data,
            test_data=test_data,
            progress=self.progress and self.dist.main,
        )

    # ---- model, optimiser, state ------------------------------------------------------------------
    def build(self, *, resume: bool) -> None:
        cfg, dist, data = self.cfg, self.dist, self.data
        torch.manual_seed(cfg.seed)
        self.model = build_model(self.mcfg, head_ablation=cfg.head_ablation).to(dist.device)
        self.harness = Harness(self.model, [s.n_units for s in data.train], head_units=cfg.head_units).to(dist.device)
        self.opt = make_optimizer(self.model, cfg, list(self.harness.tables))
        self.info: dict[str, Any] = {
            "step": 0,
            "best_step": None,
            "best_metric": None,
            "history": [],
            "windows_seen": 0,
            "train_seconds": 0.0,
        }
        if resume and self.state_path.is_file():
            model_sd, opt_sd, saved_cfg, norm, info = load_state(self.state_path)
            if saved_cfg != self.mcfg.to_dict() or info.get("train_config") != cfg.to_dict():
                raise InputError(
                    f"--resume: {self.state_path} was written with a different training or model config; "
                    "resume with the same --config and --set options, or start a new --out folder"
                )
            tables = {k: model_sd.pop(k) for k in list(model_sd) if k.startswith("table.")}
            self.model.load_state_dict(model_sd)
            with torch.no_grad():
                for i, t in enumerate(self.harness.tables):
                    t.copy_(tables[f"table.{i}"])
            _restore_optimizer(self.opt, opt_sd, info.pop("optimizer_param_groups"))
            info.pop("kind", None)
            self.info = info
            if dist.main:
                print(f"resuming from step {info['step']} ({self.state_path.name})", file=sys.stderr)
        else:
            if resume and dist.main:
                print(f"--resume: no {STATE_FILE} in {self.out}; starting from step 0", file=sys.stderr)
            norm = FeatureNorm.fit([s.features for s in data.train], width=self.mcfg.n_features)
            if self.mcfg.has_history:  # the GLM baseline of these recordings; the model starts from it
                t0 = time.monotonic()
                glm = fit_univariate_start(data.train, data.weights, n_bins=self.mcfg.n_bins, bin_size=self.mcfg.bin_size_s,
                                           taus=self.mcfg.history_taus)
                init_model_univariate(self.model, glm)
                self.info["univariate_glm"] = glm.to_dict()
                if dist.main and self.progress:
                    print(f"univariate GLM fitted on the training recordings in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        self.norm = norm
        apply_norm(data.train + data.val, norm)
        self.ddp_model: nn.Module = self.harness
        if dist.world > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.harness,
                device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                find_unused_parameters=self.harness.uses_tables,  # each step touches a few recordings' tables
            )
        self.val_sets = {
            "val_sessions": validation_windows(data.val, n=cfg.val_windows, in_time=False),
            "val_time": validation_windows(data.train, n=cfg.val_windows, in_time=True),
        }
        self.val_pool = {"val_sessions": data.val, "val_time": data.train}
        self.data_summary = {
            "train": _names(data.train),
            "val": _names(data.val),
            "test": [{"name": f"{p.parent.name}/{p.name}"} for p in data.test_paths],
            "val_time_windows": len(self.val_sets["val_time"]),
            "val_session_windows": len(self.val_sets["val_sessions"]),
        }
        self.step_no = int(self.info["step"])
        self.last_val = None

    def summary(self) -> dict:
        """The run so far (stored in every checkpoint's ``training`` metadata)."""
        info = self.info
        secs = float(info["train_seconds"])
        return {
            "train_config": self.cfg.to_dict(),
            "head_ablation": self.cfg.head_ablation,
            "data": self.data_summary,
            "steps_done": self.step_no,
            "windows_seen": int(info["windows_seen"]),
            "train_seconds": round(secs, 1),
            "windows_per_s": round(info["windows_seen"] / secs, 2) if secs > 0 else None,
            "world_size": self.dist.world,
            "device": str(self.dist.device.type),
            "threads": torch.get_num_threads(),
            "best_step": info["best_step"],
            "best_metric": info["best_metric"],
            "history": info["history"],
            # the baseline fitted on the same recordings, for eval and score (nh_serve.evaluation.baselines)
            **({"baselines": {"univariate_glm": info["univariate_glm"]}} if info.get("univariate_glm") else {}),
        }

    # ---- start ------------------------------------------------------------------------------------
    def start(self) -> None:
        dist = self.dist
        if dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "split.json").write_text(json.dumps(self.data_summary, indent=1) + "\n")
        if dist.main and self.progress:
            print(
                f"train: {len(self.data.train)} recordings, val: {len(self.data.val)} recordings, "
                f"test (not loaded): {len(self.data.test_paths)}; {self.mcfg.name} "
                f"({sum(p.numel() for p in self.model.parameters())} parameters), {dist.world} process(es) on "
                f"{dist.device.type}, {torch.get_num_threads()} threads; setup {time.monotonic() - self.t_setup:.1f} s",
                file=sys.stderr,
            )
        self.bar = tqdm(
            total=self.cfg.steps,
            initial=self.step_no,
            desc="train",
            unit="step",
            disable=not (self.progress and dist.main),
            dynamic_ncols=True,
        )
        self.ddp_model.train()
        if self.step_no == 0 and not self.info["history"]:  # the untrained model's figures, for reference
            if dist.main:
                self.validate()
            dist.barrier()
        self.last_val = self.info["history"][-1] if self.info["history"] else None

    # ---- one step ---------------------------------------------------------------------------------
    def step(self) -> None:
        """Draw this step's windows (a function of seed, rank and step alone), then one AdamW step."""
        cfg, mcfg, dist, data = self.cfg, self.mcfg, self.dist, self.data
        t0 = time.monotonic()
        step = self.step_no
        rng = np.random.Generator(np.random.PCG64([cfg.seed, dist.rank, step]))
        torch.manual_seed((cfg.seed * 1_000_003 + dist.rank * 7919 + step) % (2**63))
        picks = sample_windows(rng, data.train, data.weights, cfg.batch_size // dist.world)
        if mcfg.image_dim > 0:
            sched = sample_image_schedules(rng, len(picks), mcfg, dropout=cfg.image_schedule_dropout)
            got = [window_item(data.train[i], c, mcfg, image_schedule_s=h) for (i, c), h in zip(picks, sched)]
        else:
            got = [window_item(data.train[i], c, mcfg) for i, c in picks]
        batch = {k: v.to(dist.device, non_blocking=True) for k, v in collate([g[0] for g in got]).items()}
        y = pad_targets([g[1] for g in got]).to(dist.device)
        lr = lr_at(step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = harness_loss(
                self.ddp_model, batch, [i for i, _ in picks], y, bin_size_s=mcfg.bin_size_s,
                zero_shot_weight=cfg.zero_shot_weight, readout_l2=cfg.readout_l2,
                generator=torch.Generator().manual_seed(int(rng.integers(2**62))),
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = nn.utils.clip_grad_norm_(self.harness.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        self.opt.step()
        self.step_no += 1
        self.info["step"] = self.step_no
        self.info["windows_seen"] += cfg.batch_size
        dt = time.monotonic() - t0
        self.info["train_seconds"] += dt
        self._last = {"loss": loss, "lr": lr, "gnorm": gnorm, "dt": dt}

    def report(self) -> None:
        """Progress bar: this step's loss, speed, learning rate, gradient norm and validation figure."""
        if not self.dist.main:
            return
        last, cfg = self._last, self.cfg
        post = {
            "loss": f"{float(last['loss'].detach()):.4f}",
            "win/s": f"{cfg.batch_size / last['dt']:.1f}",
            "lr": f"{last['lr']:.2e}",
        }
        if last["gnorm"] is not None:
            post["gnorm"] = f"{float(last['gnorm']):.2f}"
        if self.last_val:
            key = "val_sessions" if "val_sessions" in self.last_val else "val_time"
            if key in self.last_val:
                post["val_bps"] = f"{self.last_val[key]['bits_per_spike']:+.4f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    # ---- validation -------------------------------------------------------------------------------
    def validate(self) -> dict:
        """Validation figures of the model now (rank 0); a new best is saved as ``best.safetensors``."""
        info = self.info
        rec: dict[str, Any] = {"step": self.step_no}
        for key, wins in self.val_sets.items():
            r = validate(
                self.model, self.val_pool[key], wins, cfg=self.mcfg, device=self.dist.device, autocast=self.autocast
            )
            if r is not None:
                rec[key] = r
        registered = validate_registered(self.model, self.norm, self.data.val, self._val_starts("val_sessions"))
        if registered is not None:
            rec["val_registered"] = registered
        metric_key = "val_sessions" if "val_sessions" in rec else ("val_time" if "val_time" in rec else None)
        info["history"].append(rec)
        if metric_key is not None:
            m = rec[metric_key]["bits_per_spike"]
            if registered is not None and self.mcfg.readout_dim:  # the fitted held-out figure decides
                m = registered["bits_per_spike_reference"]
            if info["best_metric"] is None or m > info["best_metric"]:
                info["best_metric"], info["best_step"] = m, self.step_no
                save_model(
                    self.out / "best.safetensors",
                    self.model,
                    feature_norm=self.norm,
                    training=self.summary(),
                    metrics=rec,
                    provenance=self.provenance,
                )
        self.last_val = rec
        return rec

    def _val_starts(self, key: str) -> dict[int, list[float]]:
        out: dict[int, list[float]] = {}
        for i, c in self.val_sets[key]:
            out.setdefault(i, []).append(c)
        return out

    # ---- checkpoints ------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """``last.safetensors`` and the resumable training state (rank 0)."""
        if not self.dist.main:
            return
        info = self.info
        save_model(
            self.out / "last.safetensors",
            self.model,
            feature_norm=self.norm,
            training=self.summary(),
            metrics=info["history"][-1] if info["history"] else {},
            provenance=self.provenance,
        )
        save_state(
            self.state_path,
            model=self.model,
            opt=self.opt,
            norm=self.norm,
            info={**info, "train_config": self.cfg.to_dict()},
            tables=list(self.harness.tables),
        )

    # ---- the end ----------------------------------------------------------------------------------
    def finish(self) -> dict:
        """The ranks must agree on the weights; the final checkpoint carries that check."""
        self.bar.close()
        dist = self.dist
        h = content_hash(self.model.state_dict())
        hashes = [h]
        if dist.world > 1:
            hashes = [None] * dist.world
            torch.distributed.all_gather_object(hashes, h)
            if len(set(hashes)) != 1:
                raise RuntimeError(f"ranks ended with different weights: {hashes}")
        self.info["rank_weight_hashes"] = hashes
        result = {**self.summary(), "rank_weight_hashes": hashes}
        if dist.main:
            save_model(
                self.out / "last.safetensors",
                self.model,
                feature_norm=self.norm,
                training=result,
                metrics=self.info["history"][-1] if self.info["history"] else {},
                provenance=self.provenance,
            )
            (self.out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
        dist.barrier()
        return result


def train(
    cfg: TrainConfig,
    *,
    data: list[str | Path],
    out: str | Path,
    val_data: list[str | Path] | None = None,
    test_data: list[str | Path] | None = None,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    stop_after_steps: int | None = None,
    command: str | None = None,
) -> dict:
    """Run (or resume) training; returns a summary dict (also stored in the checkpoints).

    ``stop_after_steps`` ends the process's loop after that many steps of this
    invocation without saving anything, as if it had been killed (for tests
    of ``resume``).
    """
    t = Trainer(cfg, out=out, device=device, progress=progress, command=command)
    t.load(data=data, val_data=val_data, test_data=test_data)
    t.build(resume=resume)
    t.start()
    done_here = 0
    while t.step_no < cfg.steps:
        if stop_after_steps is not None and done_here >= stop_after_steps:
            t.bar.close()
            return {**t.summary(), "stopped": True}
        t.step()
        done_here += 1
        if t.step_no % cfg.val_every == 0 or t.step_no == cfg.steps:
            if t.dist.main:
                t.validate()
            t.dist.barrier()
        if t.step_no % cfg.ckpt_every == 0 or t.step_no == cfg.steps:
            t.checkpoint()
            t.dist.barrier()
        t.report()
    return t.finish()


# ================================================================================================
# Command line
# ================================================================================================


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", required=True, help="training config: a JSON file or a name in training/configs/"
    )
    p.add_argument("--data", nargs="+", required=True, help="session files or folders of them (training)")
    p.add_argument(
        "--val-data",
        nargs="+",
        default=None,
        help="validation recordings (default: a seeded val_fraction of --data)",
    )
    p.add_argument(
        "--test-data",
        nargs="+",
        default=None,
        help="test recordings: only checked to be disjoint from training and listed in split.json",
    )
    p.add_argument("--out", required=True, help="output folder for checkpoints")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (dotted keys, JSON values), e.g. --set steps=500",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.safetensors")
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)


def _command_line(args: argparse.Namespace) -> str:
    parts = ["--config", args.config, "--data", *args.data]
    if args.val_data:
        parts += ["--val-data", *args.val_data]
    if args.test_data:
        parts += ["--test-data", *args.test_data]
    parts += ["--out", args.out]
    for s in args.set:
        parts += ["--set", s]
    return "python -m training.train " + shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    cfg = load_train_config(args.config, args.set)
    res = train(
        cfg,
        data=args.data,
        out=args.out,
        val_data=args.val_data,
        test_data=args.test_data,
        resume=args.resume,
        device=args.device,
        progress=not args.no_progress,
        stop_after_steps=args.stop_after_steps,
        command=_command_line(args),
    )
    if int(os.environ.get("RANK", "0")) == 0 and not res.get("stopped"):
        print(
            f"done: {res['steps_done']} steps, {res['windows_per_s']} windows/s, best validation bits/spike "
            f"{res['best_metric']} at step {res['best_step']}; checkpoints in {args.out}"
        )
    return 0


def add_cli(subparsers) -> None:
    """Register ``nh-serve train``."""
    p = subparsers.add_parser(
        "train", help="train a NeuroHorizon model", description=help_text(__doc__.split("\n\n")[0])
    )
    _add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.train", description=help_text(__doc__.split("\n\n")[0]))
    _add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
