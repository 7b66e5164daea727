"""The BentoML service: ``bentoml serve service.service:NHServe``.

Endpoints (the OpenAPI page at ``/`` or ``/docs`` documents every field with units):

* ``POST /register`` -- reference spikes -> session token (unit features and embeddings cached);
* ``POST /predict`` -- a token (or a new session's reference) + one context window -> rates in Hz;
* ``POST /predict_batch`` -- a token (or reference) + many context windows at once;
* ``GET /model`` -- model name, hash, config, training summary and metrics, the server's limits;
* ``GET /livez``, ``GET /readyz`` (ready once the model is loaded and warmed up), ``GET /metrics``;
* ``GET /`` (also ``/docs``): the OpenAPI page; ``GET /docs.json``: the OpenAPI document.

Bad input gets 400 (400 also for malformed JSON and wrong types), an unknown or
expired token 404, a body or a request over the limits 413; the answer is ``{"error": "<message naming the field>"}``.
Settings come from ``NH_SERVE_*`` environment variables (:mod:`service.settings`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import bentoml
from starlette.applications import Starlette
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import Route

from nh_serve.errors import CheckpointError, InputError
from service.handlers import ApiError, Handlers
from service.metrics import ServiceMetrics
from service.middleware import RequestGuard
from service.schemas import (
    BatchPrediction,
    PredictBatchRequest,
    Prediction,
    PredictRequest,
    RegisterRequest,
    RegisterResponse,
)
from service.settings import Settings

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
log = logging.getLogger("bentoml.nh_serve")  # BentoML prints its own loggers
SETTINGS = Settings.from_env()
if SETTINGS.checkpoint != "default" and not os.path.isfile(SETTINGS.checkpoint):
    # Checked here too, in the `bentoml serve` process itself, so that it exits at once with an error.
    raise CheckpointError(
        f"NH_SERVE_CHECKPOINT={SETTINGS.checkpoint!r} is not a file; point it at a checkpoint "
        "(written by nh_serve.inference.model_io.save_model) or unset it to use the built-in default"
    )
API_PATHS = ("/register", "/predict", "/predict_batch")
_INSTANCE: dict[str, object] = {}  # the running NHServe, for the plain Starlette routes


async def _model_info(request) -> JSONResponse:
    svc = _INSTANCE.get("svc")
    if svc is None:
        return JSONResponse(
            {"error": "the model is still loading; retry when /readyz answers 200"}, status_code=503
        )
    return JSONResponse(svc.handlers.info())


async def _docs(request) -> RedirectResponse:
    return RedirectResponse(
        "/", status_code=307
    )  # BentoML serves its OpenAPI page at / and the spec at /docs.json


_extra_routes = Starlette(
    routes=[Route("/model", _model_info, methods=["GET"]), Route("/docs", _docs, methods=["GET"])]
)


def _fail_start(msg: str) -> None:
    """Stop the whole server (not just this worker, which BentoML would restart every 10 s forever)."""
    log.critical(msg)
    print(msg, file=sys.stderr, flush=True)
    os.kill(os.getppid(), signal.SIGTERM)  # the worker's parent is the `bentoml serve` process
    raise SystemExit(msg) from None


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status)


@bentoml.asgi_app(_extra_routes, path="/", name="model_info")
@bentoml.service(
    name="nh_serve",
    workers=1,  # sessions live in this process's memory: one worker, or tokens would not be found
    threads=SETTINGS.threads,
    traffic={"timeout": 60},
    metrics={"enabled": True},
    logging={"access": {"enabled": SETTINGS.access_log}},
)
class NHServe:
    """NeuroHorizon: predict every unit's firing rate (Hz) over the next second from its last second of spikes.

    Register a recording's units once with its reference spikes (POST /register, at least 10 s,
    60 s recommended), then send one second of context spikes per prediction (POST /predict).
    Times are seconds, rates are Hz, predictions come in 20 ms bins.
    """

    def __init__(self) -> None:
        # torch comes with these two: imported in the worker only, so the `bentoml serve` supervisor stays small
        from nh_serve.inference.model_io import resolve_checkpoint
        from nh_serve.inference.predictor import Predictor

        self.ready = False
        t0 = time.perf_counter()
        try:
            path = Path(resolve_checkpoint(SETTINGS.checkpoint))
            if not path.is_file():
                raise CheckpointError(f"checkpoint {path} does not exist")
            self.predictor = Predictor.load(
                str(path),
                backend=SETTINGS.backend,
                threads=SETTINGS.torch_threads,
                max_sessions=SETTINGS.max_sessions,
                session_ttl_s=SETTINGS.session_ttl_s,
            )
            self.handlers = Handlers(self.predictor, settings=SETTINGS, metrics=ServiceMetrics.get())
            warm = self.handlers.warm_up()
        except InputError as e:  # CheckpointError included: a missing, damaged or unusable file
            _fail_start(
                f"nh-serve cannot start: {e}. Set NH_SERVE_CHECKPOINT to a checkpoint file (written by "
                "nh_serve.inference.model_io.save_model) or an exported artifact, or install the default one in nh_serve/models/."
            )
        except Exception as e:  # a broken installation: say what, and stop instead of restarting forever
            log.exception("start-up failed")
            _fail_start(f"nh-serve cannot start: {type(e).__name__}: {e}")
        self.handlers.sync_cache_metrics()
        log.info(
            "nh-serve ready: model %s (%s) from %s, backend %s, loaded and warmed up in %.2f s (warm-up %.2f s)",
            self.predictor.cfg.name,
            self.predictor.model_hash,
            path,
            self.predictor.backend_name,
            time.perf_counter() - t0,
            warm,
        )
        _INSTANCE["svc"] = self
        self.ready = True

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.api(input_spec=RegisterRequest, output_spec=RegisterResponse)
    def register(self, **fields) -> RegisterResponse:
        """Register a recording's units from its reference spikes (seconds); returns a session token.

        The 33 reference features and unit embeddings are computed once and cached (LRU, with a
        time limit). adapt_steps > 0 refines the embeddings by test-time adaptation.
        """
        try:
            return self.handlers.register(RegisterRequest.model_construct(**fields))
        except ApiError as e:
            return _error(e)

    @bentoml.api(input_spec=PredictRequest, output_spec=Prediction)
    def predict(self, **fields) -> Prediction:
        """Predict every registered unit's firing rate (Hz) in 20 ms bins over the second after a
        1 s context window. Send a session token, or a new session's reference spikes (the answer then
        carries the new token)."""
        try:
            return self.handlers.predict(PredictRequest.model_construct(**fields))
        except ApiError as e:
            return _error(e)

    @bentoml.api(input_spec=PredictBatchRequest, output_spec=BatchPrediction)
    def predict_batch(self, **fields) -> BatchPrediction:
        """Predict many context windows of one session at once (rates in Hz, windows x units x bins)."""
        try:
            return self.handlers.predict_batch(PredictBatchRequest.model_construct(**fields))
        except ApiError as e:
            return _error(e)


NHServe.add_asgi_middleware(RequestGuard, max_body_bytes=SETTINGS.max_body_bytes, api_paths=API_PATHS)
