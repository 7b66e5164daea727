"""Models <-> checkpoint files: where a checkpoint is, how a model is built, saved and loaded.

Every loader goes through :func:`load_model` (the Predictor, export, ``nh-serve
eval``, benchmarks), so every loader reads a checkpoint the same way: the model is
built from the config stored in the file (:func:`build_model`), its weights are
checked name by name against that architecture, and checkpoints written before
``head_activity`` existed, which record the ``no_activity`` head ablation only in
their training summary, get that switch in their config. The file format itself
(safetensors + JSON metadata + hashes) is :mod:`nh_serve.inference.checkpoint`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nh_serve.core.config import ModelConfig
from nh_serve.core.model import NeuroHorizon
from nh_serve.data.features import FeatureNorm
from nh_serve.errors import CheckpointError, InputError
from nh_serve.inference.checkpoint import Checkpoint, check_state_dict, load_checkpoint, save_checkpoint

DEFAULT_CHECKPOINT_NAME = "nh-small.safetensors"  # shipped in nh_serve/models/

HEAD_ABLATIONS = ("none", "no_activity")
"""Head ablations a model can be built with (``no_activity``: no per-unit activity input, no baseline offset)."""


def default_checkpoint_path() -> Path:
    """Where the built-in default checkpoint lives inside the installed package."""
    return Path(__file__).resolve().parents[1] / "models" / DEFAULT_CHECKPOINT_NAME


def resolve_checkpoint(spec: str | os.PathLike | None) -> Path:
    """Turn ``None`` / ``"default"`` / a path into the checkpoint file to load."""
    if spec is None or str(spec) == "default":
        path = default_checkpoint_path()
        if not path.is_file():
            raise CheckpointError(
                f"the built-in default checkpoint {path.name} is not installed with this copy of nh-serve; "
                "pass --checkpoint PATH (train one with `nh-serve train`)"
            )
        return path
    return Path(spec)


def build_model(cfg: ModelConfig, *, head_ablation: str = "none") -> NeuroHorizon:
    """A fresh model for ``cfg``; ``head_ablation="no_activity"`` also turns the baseline offset off."""
    if head_ablation == "none":
        return NeuroHorizon(cfg)
    if head_ablation == "no_activity":
        return NeuroHorizon(cfg.replace(baseline_offset=False, head_activity=False))
    raise InputError(f"unknown head ablation {head_ablation!r}; use one of {', '.join(HEAD_ABLATIONS)}")


def save_model(
    path: str | os.PathLike,
    model,
    *,
    feature_norm,
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Save a :class:`~nh_serve.core.model.NeuroHorizon` with its config and feature normalisation."""
    return save_checkpoint(
        path,
        state_dict=model.state_dict(),
        config=model.cfg.to_dict(),
        feature_norm=feature_norm,
        training=training,
        metrics=metrics,
        provenance=provenance,
    )


def load_model(path: str | os.PathLike | None, *, map_location: str | torch.device = "cpu"):
    """Load ``(model, feature_norm, checkpoint)`` from a checkpoint file (``None`` = the default).

    The model is built from the config stored in the file, its weights are
    checked name by name against that architecture, and it is returned in
    eval mode. Every problem is a :class:`CheckpointError`.
    """
    ckpt = load_checkpoint(resolve_checkpoint(path), map_location=map_location)
    where = str(ckpt.path)
    try:
        cfg = ModelConfig.from_dict(ckpt.config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: its model config does not fit this nh-serve version: {e}") from None
    ablation = (ckpt.training or {}).get("head_ablation", "none")
    if ablation == "no_activity" and cfg.head_activity:
        # checkpoints from before ``head_activity`` existed record the ablation in their training summary only
        cfg = cfg.replace(baseline_offset=False, head_activity=False)
    model = NeuroHorizon(cfg)
    check_state_dict(model.state_dict(), ckpt.state_dict, source=where)
    model.load_state_dict(ckpt.state_dict, strict=True)
    model.to(map_location).eval()
    try:
        norm = FeatureNorm.from_dict(ckpt.feature_norm)
    except InputError as e:
        raise CheckpointError(f"{where}: bad feature normalisation: {e}") from None
    if norm.mean.shape[0] != cfg.n_features:
        raise CheckpointError(
            f"{where}: feature normalisation has {norm.mean.shape[0]} entries but the model takes {cfg.n_features} features"
        )
    return model, norm, ckpt
