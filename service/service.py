"""The BentoML service: ``bentoml serve service.service:NHServe`` (``bash scripts/serve.sh`` binds 127.0.0.1).

Endpoints (the OpenAPI page at ``/docs`` documents every field with units):

* ``POST /register`` -- reference spikes -> session token (unit features and embeddings cached);
* ``POST /predict`` -- a token (or a new session's reference) + one context window -> rates in Hz;
* ``POST /predict_batch`` -- a token (or reference) + many context windows at once;
* ``GET /model`` -- model name, hash, config, training summary and metrics, the server's limits;
* ``GET /livez``, ``GET /readyz`` (ready once the model is loaded and warmed up), ``GET /metrics``;
* ``GET /docs``: the OpenAPI page (also at ``/``); ``GET /docs.json``: the OpenAPI document.

Bad input gets 400 (also malformed JSON, wrong types, NaN or true/false for a number), a body
that is not JSON 415, an unknown or expired token 404, a body or a request over the limits 413,
a body that does not arrive in time 408, a busy server 429, a request whose work outlived the
time limit 503 (the work is stopped, nothing kept); with ``NH_SERVE_API_KEY`` set, a request
without the key 401, and a request from a foreign web page or host name 403. The answer is
``{"error": "<message naming the field>", "request_id": ...}`` and one log line, never a
traceback. Settings come from ``NH_SERVE_*`` environment variables (:mod:`service.settings`);
docs/service.md states the limits and the security stance.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time
from pathlib import Path

import bentoml
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from nh_serve.errors import CheckpointError, InputError
from nh_serve.inference.limits import Cancelled
from service.handlers import ApiError, Handlers
from service.jobs import Jobs
from service.lifecycle import tie_to_parent
from service.metrics import ServiceMetrics
from service.middleware import RequestGuard, log_refusal
from service.schemas import (
    BatchPrediction,
    ModelInfo,
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
API_MODELS = {"/register": RegisterRequest, "/predict": PredictRequest, "/predict_batch": PredictBatchRequest}
_INSTANCE: dict[str, object] = {}  # the running NHServe, for the plain Starlette routes


async def _model_info(request) -> JSONResponse:
    svc = _INSTANCE.get("svc")
    if svc is None:
        return JSONResponse(
            {"error": "the model is still loading; retry when /readyz answers 200"}, status_code=503
        )
    return JSONResponse(svc.handlers.info())


_extra_routes = Starlette(routes=[Route("/model", _model_info, methods=["GET"])])


def _fail_start(msg: str) -> None:
    """Stop the whole server (not just this worker, which BentoML would restart every 10 s forever),
    with the message and no traceback."""
    log.critical(msg)
    print(msg, file=sys.stderr, flush=True)
    os.kill(os.getppid(), signal.SIGTERM)  # the worker's parent is the `bentoml serve` process
    os._exit(3)


def _error(ctx, e: ApiError, request_id: str) -> JSONResponse:
    """The JSON answer to a refused request (BentoML takes an API's status and headers from ``ctx.response``)."""
    ctx.response.status_code = e.status
    if e.retry_after is not None:
        ctx.response.headers["retry-after"] = str(e.retry_after)
    return JSONResponse({"error": e.message, "request_id": request_id}, status_code=e.status)


@bentoml.asgi_app(_extra_routes, path="/", name="model_info")
@bentoml.service(
    name="nh_serve",
    workers=1,  # sessions live in this process's memory: one worker, or tokens would not be found
    threads=SETTINGS.threads,
    traffic={"timeout": SETTINGS.request_timeout_s + 30},  # a last resort: the service's own limit comes first
    metrics={"enabled": True},
    logging={"access": {"enabled": SETTINGS.access_log}},
    http={"host": "127.0.0.1"},  # `bentoml serve` without --host answers this machine only
)
class NHServe:
    """NeuroHorizon: predict every unit's firing rate (Hz) over the next second from its last second of spikes.

    Register a recording's units once with its reference spikes (POST /register, at least 10 s,
    60 s recommended), then send one second of context spikes per prediction (POST /predict).
    Times are seconds, rates are Hz, predictions come in 20 ms bins. A session token is a bearer
    token: whoever holds it can use the session.
    """

    def __init__(self) -> None:
        # torch comes with these two: imported in the worker only, so the `bentoml serve` supervisor stays small
        from nh_serve.inference.model_io import resolve_checkpoint
        from nh_serve.inference.predictor import Predictor

        tie_to_parent()  # a kill -9 of `bentoml serve` must not leave this worker holding the port
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
                limits=SETTINGS.limits,
                max_sessions_per_owner=SETTINGS.max_sessions_per_client,
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
        self.jobs = Jobs(
            threads=SETTINGS.threads,
            fit_threads=SETTINGS.fit_threads,
            max_queued_fits=SETTINGS.max_queued_fits,
            timeout_s=SETTINGS.request_timeout_s,
        )
        self.handlers.sync_cache_metrics()
        log.info(
            "nh-serve ready: model %s (%s) from %s, backend %s, loaded and warmed up in %.2f s (warm-up %.2f s)",
            self.predictor.cfg.name,
            self.predictor.model_hash,
            path.name,
            self.predictor.backend_name,
            time.perf_counter() - t0,
            warm,
        )
        _INSTANCE["svc"] = self
        self.ready = True

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.api(input_spec=RegisterRequest, output_spec=RegisterResponse)
    async def register(self, ctx: bentoml.Context, **fields) -> RegisterResponse:
        """Register a recording's units from its reference spikes (seconds); returns a session token.

        The 33 reference features and unit embeddings are computed once and cached (LRU, with a
        time limit, a number per client). fit='reference' (default) fits each unit's population
        read-out on the reference window ('reference-dense': on windows twice as dense, about twice the
        time); fit='none' is zero-shot. adapt_steps > 0 refines the
        embeddings by test-time adaptation, within the server's time budget for the whole
        registration. Fits run in their own pool: predictions never wait behind them.
        """
        req = RegisterRequest.model_construct(**fields)
        return await self._run(
            ctx, "/register", lambda stop, owner: self.handlers.register(req, owner=owner, should_stop=stop),
            fit=int(req.adapt_steps or 0) > 0 or (req.fit or "reference") != "none",
        )

    @bentoml.api(input_spec=PredictRequest, output_spec=Prediction)
    async def predict(self, ctx: bentoml.Context, **fields) -> Prediction:
        """Predict every registered unit's firing rate (Hz) in 20 ms bins over the second after a
        1 s context window. Send a session token, or a new session's reference spikes (the answer then
        carries the new token)."""
        req = PredictRequest.model_construct(**fields)
        return await self._run(
            ctx, "/predict", lambda stop, owner: self.handlers.predict(req, owner=owner, should_stop=stop)
        )

    @bentoml.api(input_spec=PredictBatchRequest, output_spec=BatchPrediction)
    async def predict_batch(self, ctx: bentoml.Context, **fields) -> BatchPrediction:
        """Predict many context windows of one session at once (rates in Hz, windows x units x bins)."""
        req = PredictBatchRequest.model_construct(**fields)
        return await self._run(
            ctx, "/predict_batch", lambda stop, owner: self.handlers.predict_batch(req, owner=owner, should_stop=stop)
        )

    async def _run(self, ctx, path: str, job, *, fit: bool = False):
        """Run ``job(should_stop, owner)`` in the service's pools; a refusal becomes its JSON answer and one log line."""
        info = ctx.request.scope.get("nh_serve") or {}
        rid, owner = info.get("request_id", "-"), info.get("client")
        try:
            return await self.jobs.run(
                lambda stop: job(stop, owner), fit=fit, disconnected=ctx.request.is_disconnected
            )
        except ApiError as e:
            log_refusal(e.status, "POST", path, rid, e.message)
            return _error(ctx, e, rid)
        except Cancelled:  # the job saw its stop flag after the answer was given up
            e = ApiError(503, "timeout: the work was stopped and nothing was kept; retry later", retry_after=1)
            log_refusal(e.status, "POST", path, rid, e.message)
            return _error(ctx, e, rid)


@functools.lru_cache(maxsize=1)
def openapi_document() -> dict:
    """BentoML's OpenAPI document of the service with ``GET /model`` (and the API key, when one is set) added."""
    spec = NHServe.openapi_spec.asdict()
    ref = "#/components/schemas/{model}"
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["ModelInfo"] = ModelInfo.model_json_schema(ref_template=ref)
    spec.setdefault("paths", {})["/model"] = {
        "get": {
            "tags": ["Service APIs"],
            "summary": "The served model and this server's limits",
            "description": ModelInfo.__doc__,
            "operationId": "nh_serve__model",
            "responses": {
                "200": {
                    "description": "Model name, hash, config, training summary, metrics, limits and session counts.",
                    "content": {"application/json": {"schema": {"$ref": ref.format(model="ModelInfo")}}},
                },
                "503": {"description": "The model is still loading; retry when /readyz answers 200."},
            },
        }
    }
    if SETTINGS.api_key:
        spec["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"apiKey": []}]
    return spec


NHServe.add_asgi_middleware(RequestGuard, settings=SETTINGS, api_models=API_MODELS, openapi=openapi_document)
