"""Request handling of the HTTP API, independent of BentoML.

:class:`Handlers` turns the validated request models of :mod:`service.schemas`
into :class:`~nh_serve.inference.predictor.Predictor` calls and the results into response
models. Every user mistake becomes an :class:`ApiError` with an HTTP status and
a message naming the field:

* 400 -- bad values (:class:`~nh_serve.errors.InputError` from the Predictor or the decoders);
* 404 -- unknown or expired session token (the token itself is not repeated in the answer);
* 413 -- more units, spikes or windows than the configured limits
  (:class:`~nh_serve.client.wire.TooLarge` from the decoders,
  :class:`~nh_serve.inference.limits.LimitExceeded` from the Predictor).

The Predictor is built with the service's :class:`~nh_serve.inference.limits.Limits`, so every
size and value is checked before the work it would cost; the decoders check what they can
before allocating (spike counts, unit tables, id lengths). Each operation takes ``owner`` (the
client, for per-client session quotas) and ``should_stop`` (the request was abandoned: stop,
keep nothing).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import numpy as np

from nh_serve.client.wire import TooLarge, decode_array, decode_spikes, encode_array
from nh_serve.errors import InputError
from nh_serve.inference.limits import Cancelled, LimitExceeded
from nh_serve.prediction import unit_id_list
from service import schemas
from service.settings import Settings


class ApiError(Exception):
    """A request the service refuses: HTTP ``status``, a message for the caller, and for 429/503
    the seconds after which to retry."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = str(message)
        self.retry_after = retry_after


class Handlers:
    """The API's operations on one Predictor, with limits and metrics."""

    def __init__(self, predictor, *, settings: Settings, metrics=None):
        self.predictor = predictor
        self.settings = settings
        self.metrics = metrics
        self._adapt_lock = threading.Lock()  # test-time adaptation toggles requires_grad on shared weights
        self._cache_seen = (0, 0, 0)
        self._own_hits = 0  # cache lookups of sessions this service just registered: not client hits
        self._cache_lock = threading.Lock()

    # ------------------------------------------------------------------ operations
    def register(self, req: schemas.RegisterRequest, *, owner=None, should_stop=None) -> schemas.RegisterResponse:
        with self._errors("register"):
            t0 = time.perf_counter()
            token = self._register(req, owner=owner, should_stop=should_stop)
            s = self._own_lookup(token)
            if self.metrics is not None:
                self.metrics.registration_seconds.observe(time.perf_counter() - t0)
            return schemas.RegisterResponse.model_construct(
                token=token,
                unit_ids=unit_id_list(s.unit_ids),
                n_units=s.n_units,
                reference_start=s.reference[0],
                reference_end=s.reference[1],
                adaptation=s.adaptation,
                fit=_json_ready(s.fit),
                model=self.predictor.cfg.name,
                model_hash=self.predictor.model_hash,
            )

    def predict(self, req: schemas.PredictRequest, *, owner=None, should_stop=None) -> schemas.Prediction:
        with self._errors("predict"):
            session, new_token = self._session_of(req, owner=owner, should_stop=should_stop)
            window = self._window(req, "")
            t0 = time.perf_counter()
            pred = self.predictor.predict(session, **window, horizon_s=req.horizon_s)
            _check_finite(pred.rates_hz, "")
            if self.metrics is not None:
                self.metrics.prediction_seconds.labels(endpoint="predict").observe(time.perf_counter() - t0)
                self.metrics.windows.inc()
            binary = req.encoding == "base64"
            return schemas.Prediction.model_construct(
                rates_hz=_out(schemas.FloatMatrix, pred.rates_hz, "float32", binary),
                bin_edges=_out(schemas.Float64Array, pred.bin_edges, "float64", binary),
                unit_ids=unit_id_list(session.unit_ids),
                model=pred.model,
                model_hash=pred.model_hash,
                token=new_token,
            )

    def predict_batch(
        self, req: schemas.PredictBatchRequest, *, owner=None, should_stop=None
    ) -> schemas.BatchPrediction:
        with self._errors("predict_batch"):
            if not req.windows:
                raise InputError("windows: the list is empty; send at least one context window")
            limit = self.settings.limits.max_windows
            if len(req.windows) > limit:
                raise ApiError(
                    413,
                    f"windows: {len(req.windows)} windows is more than the limit of {limit} "
                    "per request (max_windows); split them over several requests",
                )
            session, new_token = self._session_of(req, owner=owner, should_stop=should_stop)
            windows = [self._window(w, f"windows[{i}].") for i, w in enumerate(req.windows)]
            t0 = time.perf_counter()
            preds = []
            for group in _token_groups(windows, self.settings.limits.max_context_spikes):
                if should_stop is not None and should_stop():
                    raise Cancelled("stopped: the result is no longer wanted")
                try:
                    preds += self.predictor.predict_batch(session, group, horizon_s=req.horizon_s)
                except InputError as e:  # name the window by its place in the request, not in the group
                    cls = LimitExceeded if isinstance(e, LimitExceeded) else InputError
                    raise cls(_shift_window(str(e), len(preds))) from None
            for i, p in enumerate(preds):
                _check_finite(p.rates_hz, f"windows[{i}].")
            if self.metrics is not None:
                self.metrics.prediction_seconds.labels(endpoint="predict_batch").observe(
                    time.perf_counter() - t0
                )
                self.metrics.windows.inc(len(preds))
            binary = req.encoding == "base64"
            rates = np.stack([p.rates_hz for p in preds])  # (W, U, T) Hz
            edges = np.stack([p.bin_edges for p in preds])  # (W, T + 1) s
            return schemas.BatchPrediction.model_construct(
                rates_hz=_out(schemas.FloatTensor, rates, "float32", binary),
                bin_edges=_out(schemas.FloatMatrix, edges, "float64", binary),
                unit_ids=unit_id_list(session.unit_ids),
                model=preds[0].model,
                model_hash=preds[0].model_hash,
                token=new_token,
            )

    def info(self) -> dict:
        """``Predictor.info()`` plus the service's limits and session-cache counters."""
        p = self.predictor
        cache = p.sessions
        return {
            **public_info(p.info()),
            "limits": self.settings.public(),
            "sessions": {
                "active": len(cache),
                "hits": cache.hits,
                "misses": cache.misses,
                "evictions": cache.evictions,
            },
        }

    def warm_up(self, *, n_units: int = 100, seconds: float = 60.0, repeats: int = 3) -> float:
        """Register a synthetic Poisson session and predict a few windows; returns seconds taken.

        Call it before serving: the session goes to a throw-away cache, so it never
        takes a slot of the real one or shows up in the metrics.
        """
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        n = rng.poisson(5.0 * seconds * n_units)
        times = np.sort(rng.uniform(0.0, seconds, n))
        ids = rng.integers(0, n_units, n).astype(str)
        p = self.predictor
        real, limits = p.sessions, p.limits
        p.sessions = type(real)(max_sessions=1, ttl_s=real.ttl_s)  # a throw-away cache for the warm-up session
        p.limits = None  # the warm-up is the server's own work, whatever the request limits are
        try:
            token = p.register(times, ids, reference_window=(0.0, seconds))
            c = (times >= seconds - 1.0) & (times < seconds)
            for _ in range(repeats):
                p.predict(token, times[c], ids[c], context_start=seconds - 1.0)
        finally:
            p.sessions, p.limits = real, limits
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ helpers
    def _errors(self, endpoint: str):
        return _ErrorScope(self, endpoint)

    def _register(self, req, *, owner=None, should_stop=None) -> str:
        lim = self.settings.limits
        units = getattr(req, "units", None)
        if units is not None and len(units) > lim.max_units:
            raise LimitExceeded(f"units: {len(units)} units is more than the limit of {lim.max_units} (max_units)")
        times, ids = decode_spikes(
            req.reference,
            name="reference",
            max_spikes=lim.max_spikes,
            max_units=lim.max_units,
            max_id_chars=lim.max_unit_id_chars,
            compact=True,
        )
        if times.size == 0:
            raise InputError(
                "reference.times: no spikes; send the spikes of the reference window (at least 10 s)"
            )
        window = _reference_window(req.reference_start, req.reference_end, times)
        steps = int(getattr(req, "adapt_steps", 0) or 0)
        refit = getattr(req, "refit_every_s", None)
        refit_window = getattr(req, "refit_window_s", None)
        kwargs: dict[str, Any] = dict(
            reference_window=window,
            units=units,
            adapt_steps=steps,
            fit=getattr(req, "fit", None) or None,  # None: the Predictor's default
            refit_every_s=float(refit) if refit is not None else None,
            refit_window_s=float(refit_window) if refit_window is not None else None,
            adapt_time_budget_s=lim.adapt_budget_s,
            owner=owner,
            should_stop=should_stop,
        )
        if steps > 0:
            with self._adapt_lock:
                token = self.predictor.register(times, ids, **kwargs)
        else:
            token = self.predictor.register(times, ids, **kwargs)
        if should_stop is not None and should_stop():  # abandoned while it was being stored
            self.predictor.sessions.discard(token)
            raise Cancelled("stopped: the result is no longer wanted")
        return token

    def _session_of(self, req, *, owner=None, should_stop=None):
        """The RegisteredSession of a request (token or inline reference) and the new token, if any."""
        has_ref = req.reference is not None
        if (req.token is None) == (not has_ref):
            raise InputError(
                "token/reference: send exactly one of them: a session token from /register, "
                "or the reference spikes of a new session"
            )
        if has_ref:
            token = self._register(req, owner=owner, should_stop=should_stop)
            return self._own_lookup(token), token
        try:
            return self.predictor.session(req.token), None
        except InputError:
            c = self.predictor.sessions
            raise ApiError(
                404,
                f"token: the session token is unknown or expired (sessions expire {c.ttl_s:g} s after their "
                f"last use, and at most {c.max_sessions} are kept, {self.settings.max_sessions_per_client} per "
                "client); register the reference again",
            ) from None

    def _window(self, w: schemas.WindowInputs, prefix: str) -> dict:
        lim = self.settings.limits
        times, ids = decode_spikes(
            w.context,
            name=f"{prefix}context",
            max_spikes=lim.max_context_spikes,
            max_units=lim.max_units,
            max_id_chars=lim.max_unit_id_chars,
            compact=True,
        )
        out: dict[str, Any] = {"spike_times": times, "unit_ids": ids, "context_start": w.context_start}
        cfg = self.predictor.cfg
        for key, width in (("behavior", cfg.behavior_dim), ("images", cfg.image_dim)):
            ev = getattr(w, key)
            if ev is not None:
                n = lim.max_context_spikes  # each event is a token of the model, like a spike
                et = decode_array(ev.times.root, name=f"{prefix}{key}.times", kinds="f", max_items=n)
                ev_v = decode_array(
                    ev.values.root, name=f"{prefix}{key}.values", kinds="f", ndim=2, max_items=n * max(1, width)
                )
                out[key] = (et, ev_v)
        if w.history_counts is not None:
            out["history_counts"] = decode_array(
                w.history_counts.root, name=f"{prefix}history_counts", kinds="f", max_items=lim.max_units
            )
        if w.history_duration_s is not None:
            out["history_duration_s"] = w.history_duration_s
        if w.image_schedule_s is not None:
            out["image_schedule_s"] = w.image_schedule_s
        return out

    def _own_lookup(self, token: str):
        """The session just registered under ``token`` (a cache hit that the metrics do not count)."""
        with self._cache_lock:
            self._own_hits += 1
        return self.predictor.session(token)

    def sync_cache_metrics(self) -> None:
        """Copy the session cache's counters into the Prometheus metrics (deltas since the last call)."""
        if self.metrics is None:
            return
        c = self.predictor.sessions
        with self._cache_lock:
            now = (c.hits - self._own_hits, c.misses, c.evictions)
            h, m, e = (max(0, a - b) for a, b in zip(now, self._cache_seen))
            self._cache_seen = now
            if h:
                self.metrics.cache_hits.inc(h)
            if m:
                self.metrics.cache_misses.inc(m)
            if e:
                self.metrics.cache_evictions.inc(e)
            self.metrics.sessions.set(len(c))


class _ErrorScope:
    """Turn InputError into ApiError(400); refresh the cache metrics on the way out."""

    def __init__(self, handlers: Handlers, endpoint: str):
        self.h = handlers
        self.endpoint = endpoint

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.h.sync_cache_metrics()
        if exc is None:
            return False
        if isinstance(exc, InputError):
            status = 413 if isinstance(exc, (TooLarge, LimitExceeded)) else 400
            raise ApiError(status, api_field_names(str(exc))) from None
        return False  # ApiError and Cancelled go up as they are; anything else is a bug: logged, 500


def _token_groups(windows: list[dict], max_tokens: int) -> list[list[dict]]:
    """Consecutive windows in groups of at most ``max_tokens`` context spikes (one window at least), so
    that one model call never holds more tokens than one window may carry."""
    groups: list[list[dict]] = [[]]
    n = 0
    for w in windows:
        k = int(np.asarray(w["spike_times"]).shape[0])
        if groups[-1] and n + k > max_tokens:
            groups.append([])
            n = 0
        groups[-1].append(w)
        n += k
    return groups


def _shift_window(message: str, offset: int) -> str:
    """``windows[i]: ...`` -> ``windows[i + offset]: ...``."""
    return re.sub(r"^windows\[(\d+)\]", lambda m: f"windows[{int(m.group(1)) + offset}]", message)


def _check_finite(rates: np.ndarray, prefix: str) -> None:
    """Refuse to answer NaN/inf: only absurd inputs (e.g. a history rate of 1e300 Hz) get the model there."""
    if not np.all(np.isfinite(rates)):
        raise InputError(
            f"{prefix}history_counts/history_duration_s/behavior/images: these values are too large for the model "
            "(the predicted rates overflowed); send spike counts, seconds and feature values of realistic size"
        )


# The Predictor's names for things -> the request fields that carry them.
_FIELD_NAMES = (
    ("reference_window:", "reference_start/reference_end:"),
    ("reference spikes:", "reference:"),
    ("reference unit_ids:", "reference.unit_ids:"),
    ("context spikes:", "context:"),
    ("context unit_ids:", "context.unit_ids:"),
    ("ctx_start:", "context_start:"),
)


def api_field_names(message: str) -> str:
    """Rename the Predictor's field names at the start of a message (after any ``windows[i]: ``) to the API's."""
    head, sep, rest = message.partition(": ") if message.startswith("windows[") else ("", "", message)
    for old, new in _FIELD_NAMES:
        if rest.startswith(old):
            rest = new + rest[len(old) :]
            break
    return f"{head}.{rest}" if head else rest


#: Keys of GET /model that would tell a caller about the machine rather than the model.
_PRIVATE_KEYS = frozenset({"command", "argv", "cwd", "host", "hostname", "user", "env"})


def public_info(obj):
    """``obj`` without command lines and with every absolute path cut to its file name (for GET /model)."""
    if isinstance(obj, dict):
        return {k: public_info(v) for k, v in obj.items() if k not in _PRIVATE_KEYS}
    if isinstance(obj, (list, tuple)):
        return [public_info(v) for v in obj]
    if isinstance(obj, str) and (obj.startswith(("/", "~", "\\")) or obj[1:3] in (":\\", ":/")):
        return re.split(r"[\\/]", obj.rstrip("/\\"))[-1] or "."
    return obj


def _reference_window(start: float | None, end: float | None, times: np.ndarray):
    """``(start, end)`` of the reference window, filling a missing side from the spikes (Predictor's default)."""
    if start is None and end is None:
        return None
    finite = times[np.isfinite(times)]
    if start is None:
        start = float(finite.min()) if finite.size else 0.0
    if end is None:
        end = float(np.nextafter(finite.max(), np.inf)) if finite.size else float(start)
    return (float(start), float(end))


def _out(kind, a: np.ndarray, dtype: str, binary: bool):
    """An output array as the RootModel ``kind``, in the requested encoding.

    Exact either way: a float32 written to JSON as its float64 value parses back to the same float32.
    """
    if binary:
        return kind.model_construct(schemas.EncodedArray.model_construct(**encode_array(a, dtype=dtype)))
    return kind.model_construct(
        np.asarray(a, dtype=np.float64 if dtype == "float64" else np.float32).tolist()
    )


def _json_ready(info):
    """A fit summary with plain numbers (numpy scalars become floats / ints)."""
    if info is None:
        return None
    import numpy as np

    def conv(v):
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, np.generic):
            return v.item()
        return v

    return conv(info)

