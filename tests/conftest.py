"""Fixtures shared by the test files: one torch thread, tiny random-weight checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and steadiest when other processes load the CPU) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def make_tiny_checkpoint():
    """``make(path, *, seed=0, norm_seed=None, **metadata)``: save a random-weight nh-tiny checkpoint.

    ``norm_seed`` draws a random (non-identity) feature normalisation, so code
    that forgets to apply it gives different rates; ``None`` stores the identity.
    """
    from nh_serve.core.config import get_config
    from nh_serve.core.model import NeuroHorizon
    from nh_serve.data.features import FeatureNorm
    from nh_serve.inference.model_io import save_model

    def make(path, *, seed: int = 0, norm_seed: int | None = None, config: str = "nh-tiny", overrides=None, **metadata):
        torch.manual_seed(seed)
        model = NeuroHorizon(get_config(config, **(overrides or {})))
        F = model.cfg.n_features
        if norm_seed is None:
            norm = FeatureNorm.identity(F)
        else:
            rng = np.random.default_rng(norm_seed)
            norm = FeatureNorm(mean=rng.normal(size=F), std=rng.uniform(0.5, 2.0, F))
        save_model(path, model, feature_norm=norm, **metadata)
        return path

    return make
