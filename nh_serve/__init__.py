"""nh-serve: inference and serving for pretrained NeuroHorizon encoders.

NeuroHorizon reads a recording's last second of spikes and predicts every
unit's firing rate over the next second in 20 ms bins. Units are described by
33 statistics from a reference window of the same recording, so a recording
the model has never seen needs no retraining.
"""

from __future__ import annotations

from nh_serve.errors import CheckpointError, InputError, SessionFileError
from nh_serve.util import package_version

__version__ = package_version("nh-serve", "0+unknown")  # "0+unknown": a source tree without install

__all__ = ["__version__", "InputError", "SessionFileError", "CheckpointError", "Predictor", "Prediction"]


def __getattr__(name: str):
    # ``from nh_serve import Predictor`` without importing torch for every ``import nh_serve``.
    if name in ("Predictor", "Prediction"):
        from nh_serve.inference import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'nh_serve' has no attribute {name!r}")
