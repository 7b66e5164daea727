"""Scoring on Ray (``nh-serve score --engine ray``) on a local 2-CPU Ray instance."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nh_serve.core.config import get_config
from nh_serve.core.model import NeuroHorizon
from nh_serve.data.features import FeatureNorm
from nh_serve.data.session import write_session
from nh_serve.data.synth import make_session
from nh_serve.evaluation.score import ScoreSettings, run_score
from nh_serve.evaluation.score.ray_engine import local_runtime_env
from nh_serve.evaluation.score.store import comparable
from nh_serve.inference.model_io import save_model

ray = pytest.importorskip("ray")

WRITE_KEYS = ("spike_times", "unit_index", "unit_ids", "start", "end", "true_rates", "provenance")
SETTINGS = ScoreSettings(batch_size=16, backend="torch", plots=False)


@pytest.fixture(scope="module", autouse=True)
def keep_torch_threads():
    """Scoring sets the model's thread count (process-wide for torch); restore it for other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=local_runtime_env())
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("score_ray")
    paths = []
    for i, (u, dur) in enumerate([(20, 150.0), (28, 170.0)]):
        d = make_session(seed=30 + i, n_units=u, duration=dur)
        paths.append(write_session(root / f"rec{i}.h5", **{k: d[k] for k in WRITE_KEYS}))
    torch.manual_seed(1)
    ckpt = root / "tiny.safetensors"
    m = NeuroHorizon(get_config("nh-tiny"))
    save_model(ckpt, m, feature_norm=FeatureNorm.identity(m.cfg.n_features))
    return root, paths, ckpt


def _assert_same(a, b, path="doc"):
    """Equal JSON structures; floats to 1e-5 (Ray tasks run the model on one thread)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7), (path, a, b)
    else:
        assert a == b, path


@pytest.mark.slow
def test_ray_engine_matches_local(ray_local, inputs, tmp_path):
    root, paths, ckpt = inputs
    args = [*map(str, paths), str(root / "missing.h5")]
    quiet = {"checkpoint": ckpt, "settings": SETTINGS, "progress": False, "echo": lambda s: None}
    on_ray = run_score(args, out=tmp_path / "ray", engine="ray", **quiet)
    assert ray.is_initialized()  # an existing connection is used and left open
    assert on_ray.exit_code == 1  # the missing file; both recordings scored
    assert (
        sorted(on_ray.scored) == sorted(r["key"] for r in on_ray.doc["recordings"])
        and len(on_ray.scored) == 2
    )
    assert "file not found" in on_ray.doc["failed"][0]["error"]
    assert on_ray.doc["run"]["engine"] == "ray"
    local = run_score(args, out=tmp_path / "local", **quiet)
    _assert_same(comparable(on_ray.doc), comparable(local.doc))
    for r in on_ray.doc["recordings"]:
        assert (tmp_path / "ray" / "recordings" / r["key"] / "result.json").exists()
    # resumable on Ray too: nothing left to score
    again = run_score(args, out=tmp_path / "ray", engine="ray", **quiet)
    assert again.scored == [] and len(again.skipped) == 2
    assert np.isfinite(again.doc["recordings"][0]["predictors"]["model"]["bits_per_spike"])
    assert Path(again.paths["report.html"]).exists()
