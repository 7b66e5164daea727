"""nh-serve: inference and serving for pretrained NeuroHorizon encoders.

NeuroHorizon reads a recording's last second of spikes and predicts every
unit's firing rate over the next second in 20 ms bins. Units are described by
33 statistics from a reference window of the same recording, so a recording
the model has never seen needs no retraining.
"""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("nh-serve")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0+unknown"

from nh_serve.errors import CheckpointError, InputError, SessionFileError  # noqa: E402

__all__ = ["__version__", "InputError", "SessionFileError", "CheckpointError", "Predictor", "Prediction"]


def __getattr__(name: str):
    # ``from nh_serve import Predictor`` without importing torch for every ``import nh_serve``.
    if name in ("Predictor", "Prediction"):
        from nh_serve import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'nh_serve' has no attribute {name!r}")
