"""Serving a model: the :class:`~nh_serve.inference.predictor.Predictor`, checkpoint files,
model loading, exported artifacts and the inference backends."""
