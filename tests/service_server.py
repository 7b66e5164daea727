"""A real ``bentoml serve`` of the nh-serve service for the service, client and fuzz tests.

:func:`shared_server` starts one server per test session (on 127.0.0.1, a free
port, a tiny random-weight checkpoint, BENTOML_HOME in a temporary folder) and
stops it at exit; every test module that needs it asks for it through its own
session-scoped fixture, so all of them share the same process. Startup waits
for ``/readyz`` and fails with the server's log.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the top-level ``service`` package, also under a bare ``pytest``
    sys.path.insert(0, str(REPO))

from service.launcher import ServeProcess, bentoml_env, free_port  # noqa: E402

__all__ = [
    "TEST_LIMITS",
    "ServeProcess",
    "bentoml_env",
    "free_port",
    "make_tiny_checkpoint",
    "shared_server",
    "stop_shared_server",
]

# Small limits, so that every limit can be crossed cheaply in the tests.
TEST_LIMITS = {
    "NH_SERVE_MAX_UNITS": "64",
    "NH_SERVE_MAX_SPIKES": "40000",
    "NH_SERVE_MAX_CONTEXT_SPIKES": "40000",
    "NH_SERVE_MAX_BODY_MB": "1",
    "NH_SERVE_MAX_SESSIONS": "24",
    "NH_SERVE_MAX_SESSIONS_PER_CLIENT": "24",
    "NH_SERVE_MAX_WINDOWS": "16",
    "NH_SERVE_MAX_ADAPT_STEPS": "3",
    "NH_SERVE_ADAPT_BUDGET_S": "3",
}


def make_tiny_checkpoint(path: Path, *, seed: int = 0, **overrides) -> Path:
    """An ``nh-tiny`` model (config ``overrides`` applied) with random weights and identity feature
    normalisation, saved at ``path``."""
    import torch

    from nh_serve.core.config import get_config
    from nh_serve.core.model import NeuroHorizon
    from nh_serve.data.features import FeatureNorm
    from nh_serve.inference.model_io import save_model

    torch.manual_seed(seed)
    model = NeuroHorizon(get_config("nh-tiny", **overrides))
    save_model(
        path, model, feature_norm=FeatureNorm.identity(model.cfg.n_features), training={"note": "random weights for tests"}
    )
    return path


class SharedServer:
    """The shared server: its URL, process and the checkpoint it serves."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="nh-serve-test-"))
        self.checkpoint = make_tiny_checkpoint(self.tmp / "nh-tiny.safetensors")
        env = bentoml_env(
            self.tmp / "bentoml",
            NH_SERVE_CHECKPOINT=str(self.checkpoint),
            NH_SERVE_CACHE_DIR=str(self.tmp / "export-cache"),  # the backend's on-the-fly exports
            NH_SERVE_BACKEND="torch",  # the tests compare it with a local eager Predictor
            **TEST_LIMITS,
        )
        self.process = ServeProcess(env=env, log_path=self.tmp / "serve.log")
        self.url = self.process.url
        try:
            self.process.wait_ready()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.process.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


_SERVER: SharedServer | None = None


def shared_server() -> SharedServer:
    """Start the session's server on first use (stopped at interpreter exit, even after failures)."""
    global _SERVER
    if _SERVER is None:
        _SERVER = SharedServer()
        atexit.register(stop_shared_server)
    return _SERVER


def stop_shared_server() -> None:
    global _SERVER
    if _SERVER is not None:
        _SERVER.close()
        _SERVER = None
