"""The nh-serve HTTP service (BentoML 1.4).

Start it with ``bash scripts/serve.sh`` (or ``bentoml serve service.service:NHServe``);
the OpenAPI page is at ``/docs``. Modules:

* :mod:`service.settings` -- limits and options read from ``NH_SERVE_*`` environment variables;
* :mod:`service.schemas` -- the pydantic request/response models (every field documented with units);
* :mod:`service.handlers` -- the framework-free request handling on top of :class:`nh_serve.inference.predictor.Predictor`;
* :mod:`service.middleware` -- host/origin allow-lists, the API key, JSON content type, concurrency, body
  size and read time, validation with the first few problems, one log line per refusal;
* :mod:`service.jobs` -- the thread pools (predictions apart from fits) and the time limit that stops abandoned work;
* :mod:`service.lifecycle` -- the worker ends with the ``bentoml serve`` process that started it;
* :mod:`service.metrics` -- Prometheus counters and histograms added to ``/metrics``;
* :mod:`service.launcher` -- start/stop ``bentoml serve`` from Python (tests, benchmarks);
* :mod:`service.service` -- the BentoML service class ``NHServe``.

docs/service.md states the limits, authentication, network exposure and what a session token means.

Only :mod:`service.service` imports BentoML, and none of them imports torch at
import time: the `bentoml serve` supervisor stays small, and the schemas can be
used to build requests without loading a model.
"""
