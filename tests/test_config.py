"""ModelConfig validation, serialisation and the registry."""

from __future__ import annotations

import dataclasses
import json

import pytest

from nh_serve.core.config import CONFIGS, ModelConfig, get_config


def test_registry_configs_are_valid_and_named():
    assert set(CONFIGS) == {"nh-tiny", "nh-small", "nh-base"}
    for name, cfg in CONFIGS.items():
        assert cfg.name == name
        # 33 statistics, and the population-coupling descriptors of history models
        assert cfg.n_features == 33 + cfg.coupling_components + 3
        assert cfg.has_history and cfg.readout_dim > 0 and cfg.pop_tokens
        assert cfg.context_s == 1.0 and cfg.n_bins == 50 and cfg.bin_size_s == 0.02
    small = CONFIGS["nh-small"]
    assert 64 <= small.dim <= 128 and 2 <= small.depth <= 4 and 64 <= small.head_hidden <= 128
    assert CONFIGS["nh-tiny"].dim < small.dim < CONFIGS["nh-base"].dim


def test_derived_sizes():
    cfg = ModelConfig(dim=64, heads=4, latent_step=0.125, n_latents_per_step=3, activity_scales=(0.05, 0.5))
    assert cfg.dim_head == 16  # derived from dim // heads
    assert cfg.rotate_dim == 8
    assert cfg.n_latent_steps == 8
    assert cfg.n_latents == 24
    assert cfg.horizon_s == pytest.approx(1.0)
    assert cfg.n_activity == 4  # 2 scales + history + reference
    assert not cfg.is_multimodal
    assert ModelConfig(behavior_dim=2).is_multimodal


def test_get_config_overrides_and_errors():
    cfg = get_config("nh-tiny", behavior_dim=3, dropout=0.1)
    assert cfg.behavior_dim == 3 and cfg.dropout == 0.1 and cfg.dim == CONFIGS["nh-tiny"].dim
    assert get_config("nh-small") is CONFIGS["nh-small"]
    with pytest.raises(ValueError, match="unknown model config 'nh-huge'.*nh-tiny"):
        get_config("nh-huge")
    with pytest.raises(ValueError, match="unknown field.*dimm"):
        get_config("nh-tiny", dimm=3)


def test_json_round_trip():
    for cfg in [
        *CONFIGS.values(),
        get_config("nh-tiny", behavior_dim=2, image_dim=5, activity_scales=(0.1, 1.0)),
    ]:
        d = json.loads(json.dumps(cfg.to_dict()))
        back = ModelConfig.from_dict(d)
        assert back == cfg
        assert isinstance(back.activity_scales, tuple)


def test_from_dict_rejects_unknown_keys_and_fills_defaults():
    d = CONFIGS["nh-tiny"].to_dict()
    d["n_layers"] = 4
    with pytest.raises(ValueError, match="unknown field.*n_layers"):
        ModelConfig.from_dict(d)
    partial = ModelConfig.from_dict({"dim": 64, "heads": 2})
    assert partial.dim == 64 and partial.n_bins == 50
    with pytest.raises(ValueError, match="must be a dict"):
        ModelConfig.from_dict([("dim", 64)])


def test_frozen_and_keyword_only():
    cfg = CONFIGS["nh-tiny"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 3
    with pytest.raises(TypeError):
        ModelConfig("x")  # positional arguments are not accepted


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"dim": 30, "heads": 4, "dim_head": 0}, "divisible by heads"),
        ({"dim_head": 18}, "multiple of 4"),
        ({"latent_step": 0.3}, "whole multiple of latent_step"),
        ({"n_bins": 1000, "bin_size_s": 0.02}, "horizon"),
        ({"bin_size_s": 0.0}, "bin_size_s must be a positive"),
        ({"bin_size_s": 1e-4}, "at least 1 ms"),
        ({"n_bins": 0}, "n_bins must be >= 1"),
        ({"context_s": -1.0}, "context_s must be a positive"),
        ({"activity_scales": (0.05, 2.0)}, r"each be in \(0, context_s"),
        ({"activity_scales": (0.25, 0.05)}, "strictly ascending"),
        ({"activity_scales": ()}, "at least one"),
        ({"unit_embedding_mode": "lookup"}, "idencoder, random, mean"),
        ({"t_min": 2.0, "t_max": 1.0}, "t_min"),
        ({"dropout": 1.0}, "dropout"),
        ({"head_layers": 1}, "head_layers"),
        ({"behavior_dim": -1}, "behavior_dim"),
        ({"behavior_dim": 2, "multimodal_every": 5, "depth": 2}, "multimodal_every"),
        ({"dim": 64.0}, "dim must be of type int"),
        ({"depth": True}, "depth must be of type int"),
        ({"baseline_offset": 1}, "baseline_offset must be of type bool"),
        ({"context_s": "1"}, "context_s must be of type float"),
        ({"baseline_prior_s": -1.0}, "baseline_prior_s"),
    ],
)
def test_invalid_configs_raise_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        CONFIGS["nh-tiny"].replace(**overrides)


def test_float_fields_accept_ints():
    cfg = ModelConfig(context_s=2, latent_step=0.5)
    assert isinstance(cfg.context_s, float) and cfg.n_latent_steps == 4
