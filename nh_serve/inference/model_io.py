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

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nh_serve.core.config import ModelConfig
from nh_serve.core.model import NeuroHorizon
from nh_serve.data.features import FeatureNorm
from nh_serve.errors import CheckpointError, InputError
from nh_serve.inference.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from nh_serve.inference.checkpoint_header import dtype_name, fmt_shape

DEFAULT_CHECKPOINT_NAME = "nh-small.safetensors"  # shipped in nh_serve/models/

_MAX_LISTED = 6  # problems listed by check_state_dict before "... and N more"

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


#: Largest value of each size in a model config that a checkpoint may carry (the shipped configs use
#: a small fraction of each), and the most parameters a checkpoint's model may have.
MAX_CONFIG_SIZES = {
    "dim": 4096,
    "depth": 64,
    "heads": 64,
    "dim_head": 1024,
    "cross_heads": 64,
    "n_latents_per_step": 256,
    "n_bins": 10_000,
    "ffn_mult": 16,
    "n_features": 1024,
    "head_hidden": 4096,
    "head_layers": 16,
    "behavior_dim": 8192,
    "image_dim": 8192,
}
MAX_PARAMETERS = 1_000_000_000


def check_config_size(cfg: ModelConfig, *, source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` if a config's sizes exceed :data:`MAX_CONFIG_SIZES` (nothing is built)."""
    over = [
        f"{key} = {getattr(cfg, key)} (at most {limit})"
        for key, limit in MAX_CONFIG_SIZES.items()
        if getattr(cfg, key) > limit
    ]
    if len(cfg.activity_scales) > 16:
        over.append(f"{len(cfg.activity_scales)} activity_scales (at most 16)")
    if over:
        raise CheckpointError(
            f"{source}: its model config asks for a model larger than nh-serve builds: {'; '.join(over)}. "
            "The config is damaged or not meant for this version; use the checkpoint the model was trained into"
        )


def expected_weights(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{name: (shape, dtype)}`` of a model built from ``cfg``, found without allocating its weights
    (the model is built on torch's storage-less ``meta`` device); at most :data:`MAX_PARAMETERS` values."""
    with torch.device("meta"):
        model = NeuroHorizon(cfg)
    spec = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    n = sum(math.prod(shape) for shape, _ in spec.values())
    if n > MAX_PARAMETERS:
        raise CheckpointError(
            f"model config {cfg.name!r} has {n:,} parameters, more than the {MAX_PARAMETERS:,} nh-serve builds"
        )
    return spec


def build_model(cfg: ModelConfig, *, head_ablation: str = "none") -> NeuroHorizon:
    """A fresh model for ``cfg``; ``head_ablation="no_activity"`` also turns the baseline offset off."""
    if head_ablation == "none":
        return NeuroHorizon(cfg)
    if head_ablation == "no_activity":
        return NeuroHorizon(cfg.replace(baseline_offset=False, head_activity=False))
    raise InputError(f"unknown head ablation {head_ablation!r}; use one of {', '.join(HEAD_ABLATIONS)}")


def check_state_dict(
    expected: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "checkpoint",
) -> None:
    """Raise :class:`CheckpointError` if ``state_dict`` does not fit a model.

    ``expected`` maps each name the model has to ``(shape, dtype)`` (or to a
    tensor, whose shape and dtype are used; ``dtype`` may be ``None`` to skip the
    dtype check), e.g. ``{k: (v.shape, v.dtype) for k, v in
    model.state_dict().items()}``. Reports, by name, weights missing from
    ``state_dict``, unexpected extra weights, shape mismatches and dtype-kind
    mismatches (floating point vs integer vs bool vs complex; a float32/bfloat16
    difference is fine because ``load_state_dict`` casts). The message lists the
    first few problems and counts the rest; ``source`` names the weights in it.
    """
    if not isinstance(expected, Mapping) or not isinstance(state_dict, Mapping):
        raise InputError(
            "check_state_dict: pass two mappings, {name: (shape, dtype)} for the model and {name: tensor} for the weights"
        )
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = []
    for name, want in expected.items():
        if name not in state_dict:
            continue
        want_shape, want_dtype = _expected_spec(name, want)
        have = state_dict[name]
        if not isinstance(have, torch.Tensor):
            wrong.append(f"{name!r} is a {type(have).__name__} in the {source}, not a tensor")
            continue
        have_shape = tuple(int(d) for d in have.shape)
        if have_shape != want_shape:
            wrong.append(
                f"{name!r} has shape {fmt_shape(have_shape)} in the {source} but {fmt_shape(want_shape)} in the model"
            )
        elif want_dtype is not None and _dtype_kind(have.dtype) != _dtype_kind(want_dtype):
            wrong.append(
                f"{name!r} is {dtype_name(have.dtype)} in the {source} but {dtype_name(want_dtype)} in the model"
            )
    if not (missing or unexpected or wrong):
        return
    counts = []
    if missing:
        counts.append(f"{len(missing)} missing")
    if unexpected:
        counts.append(f"{len(unexpected)} unexpected")
    if wrong:
        counts.append(f"{len(wrong)} with the wrong shape or dtype")
    items = [f"missing {k!r}" for k in missing] + [f"unexpected {k!r}" for k in unexpected] + wrong
    listed = "; ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        listed += f"; ... and {len(items) - _MAX_LISTED} more"
    raise CheckpointError(
        f"the {source} weights do not fit the model ({', '.join(counts)}): {listed}. "
        "The weights were made for a different model configuration: build the model from the "
        "checkpoint's own config, or load the checkpoint that belongs to this model"
    )


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
    # Sizes first, then the weights' shapes against a model with no storage: a config that claims a
    # huge model is refused before anything is allocated for it.
    check_config_size(cfg, source=where)
    # derived buffers some checkpoints stored although the config gives them: not weights
    ckpt.state_dict.pop("rel_index", None)
    check_state_dict(expected_weights(cfg), ckpt.state_dict, source=where)
    model = NeuroHorizon(cfg)
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


def _expected_spec(name: str, want: Any) -> tuple[tuple[int, ...], torch.dtype | None]:
    if isinstance(want, torch.Tensor):
        return tuple(int(d) for d in want.shape), want.dtype
    try:
        shape, dtype = want
        return tuple(int(d) for d in shape), dtype
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"check_state_dict: expected[{name!r}] must be (shape, dtype) or a tensor, got {want!r}"
        ) from exc


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "int"
