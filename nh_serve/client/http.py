"""Python client of the nh-serve HTTP service, with the local Predictor's call signature.

Switch between local and remote inference with one line::

    from nh_serve.client import Client
    p = Client("http://127.0.0.1:3000")          # or: p = Predictor.load()
    token = p.register(ref_times, ref_unit_ids, reference_window=(0.0, 60.0))
    pred = p.predict(token, ctx_times, ctx_unit_ids, context_start=120.0)
    pred.rates_hz   # (U, 50) Hz, the same Prediction dataclass the Predictor returns

Arrays go out and come back in the compact base64 form of :mod:`nh_serve.client.wire`
by default (``encoding="json"`` sends and asks for JSON lists instead). Unit ids keep their
type: integer ids come back as integers (see :mod:`nh_serve.prediction`). The client keeps one
keep-alive connection, retries connection failures, timeouts, 429 (busy; after its
``Retry-After``) and 502/503/504 answers with exponential backoff (never another 4xx), and raises:

* :class:`RequestRejected` (an :class:`~nh_serve.errors.InputError`) on 4xx, carrying the
  server's message and status; :class:`SessionNotFound` (a subclass) for an unknown or expired token;
* :class:`ServerError` on 5xx or when the server cannot be reached after the retries.

Sessions survive a server restart or an eviction: the client keeps the encoded reference of the
sessions it registered (the last ``keep_references`` of them), and when ``predict`` or
``predict_batch`` gets :class:`SessionNotFound` for one of them it registers that reference again,
once, and repeats the request under the new token (``client.current_token(old)`` tells which;
the old token keeps working through this client). ``Client(..., reregister=False)`` turns this
off and raises :class:`SessionNotFound` instead.

Every request carries an ``X-Client-Id`` header (random per Client unless ``client_id`` is given):
the server counts sessions per client, so one busy client cannot evict another's sessions. With
``api_key`` (default: the ``NH_SERVE_API_KEY`` environment variable) it sends
``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from nh_serve.client.wire import decode_array, encode_array, encode_spikes
from nh_serve.errors import InputError
from nh_serve.prediction import Prediction, unit_id_array, unit_id_list

__all__ = ["Client", "RequestRejected", "SessionNotFound", "ServerError"]


#: Seconds a /register request may take (the reference fit of a large recording takes a while).
REGISTER_TIMEOUT_S = 120.0

class RequestRejected(InputError):
    """The server refused the request (HTTP 4xx); ``str(e)`` is its message naming the field."""

    def __init__(self, status_code: int, message: str, *, endpoint: str = ""):
        self.status_code = int(status_code)
        self.message = message
        self.endpoint = endpoint
        super().__init__(f"{endpoint}: {message} (HTTP {status_code})" if endpoint else message)


class SessionNotFound(RequestRejected):
    """HTTP 404: the session token is unknown or expired; register the reference again."""


class ServerError(RuntimeError):
    """The server failed (HTTP 5xx) or could not be reached after the retries."""

    def __init__(self, message: str, *, status_code: int | None = None):
        self.status_code = status_code
        super().__init__(message)


_RETRY_STATUS = {429, 502, 503, 504}
_MAX_RETRY_AFTER_S = 5.0


class Client:
    """Talk to an nh-serve server with :class:`~nh_serve.inference.predictor.Predictor`'s methods.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:3000``.
        timeout: seconds per request (connect, read and write each).
        retries: extra attempts after a connection error, a timeout or a 502/503/504.
        backoff_s: first retry delay in seconds, doubled after every attempt (capped at 5 s).
        encoding: ``"base64"`` (default, compact) or ``"json"`` for arrays in both directions.
        transport: an ``httpx`` transport to send requests through (default: plain HTTP).
        api_key: the server's key (``NH_SERVE_API_KEY`` on the server); default: this process's
            ``NH_SERVE_API_KEY`` environment variable, if set.
        client_id: this client's name in the server's per-client session quota (default: random).
        reregister: register a session's reference again, once, when the server no longer knows
            its token (see the module docstring); False raises :class:`SessionNotFound`.
        keep_references: how many of the latest sessions' encoded references are kept for that.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:3000",
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.1,
        encoding: str = "base64",
        transport: httpx.BaseTransport | None = None,
        api_key: str | None = None,
        client_id: str | None = None,
        reregister: bool = True,
        keep_references: int = 32,
    ):
        if encoding not in ("base64", "json"):
            raise InputError(f"encoding: must be 'base64' or 'json', got {encoding!r}")
        if int(retries) < 0:
            raise InputError(f"retries: must be >= 0, got {retries}")
        if int(keep_references) < 0:
            raise InputError(f"keep_references: must be >= 0, got {keep_references}")
        self.url = str(url).rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.encoding = encoding
        self.reregister = bool(reregister)
        self.keep_references = int(keep_references)
        self.client_id = client_id or secrets.token_hex(8)
        headers = {"X-Client-Id": self.client_id}
        key = api_key if api_key is not None else os.environ.get("NH_SERVE_API_KEY") or None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.Client(base_url=self.url, timeout=self.timeout, transport=transport, headers=headers)
        self._units: dict[str, np.ndarray] = {}  # token -> unit ids, from /register
        self._references: OrderedDict[str, dict] = OrderedDict()  # token -> its /register body (latest last)
        self._renamed: dict[str, str] = {}  # token the caller holds -> the token it was registered again under
        self.last_registration: dict | None = None  # the last /register answer (its ``fit`` says what the fit did)

    # ------------------------------------------------------------------ Predictor API
    def register(
        self,
        spike_times,
        unit_ids,
        *,
        reference_window: tuple[float, float] | None = None,
        units: Sequence | None = None,
        adapt_steps: int = 0,
        fit: str = "reference",
        refit_every_s: float | None = None,
        refit_window_s: float | None = None,
    ) -> str:
        """Register a recording's units from its reference spikes; returns the session token.

        Same arguments as :meth:`nh_serve.inference.predictor.Predictor.register`: ``spike_times``
        (N,) seconds, ``unit_ids`` (N,) the unit of each spike, ``reference_window``
        ``(start, end)`` seconds (at least 10 s), ``units`` the row order of predictions,
        ``fit`` ``"reference"`` (fit each unit's read-out on the reference window), ``"reference-dense"``
        (the same on windows twice as dense, about twice the time) or ``"none"`` (zero-shot), ``refit_every_s`` (refit while streaming; off by default) on the last ``refit_window_s`` seconds. What the fit did
        is in :attr:`last_registration`.
        """
        body: dict[str, Any] = {
            "reference": self._spikes(spike_times, unit_ids),
            "adapt_steps": int(adapt_steps),
            "fit": str(fit),
        }
        if refit_every_s is not None:
            body["refit_every_s"] = float(refit_every_s)
        if refit_window_s is not None:
            body["refit_window_s"] = float(refit_window_s)
        if reference_window is not None:
            body["reference_start"], body["reference_end"] = (float(x) for x in reference_window)
        if units is not None:
            body["units"] = unit_id_list(unit_id_array(units, name="units"))
        return self._register_body(body)

    def _register_body(self, body: dict) -> str:
        out = self._post("/register", body)
        self.last_registration = out
        token = out["token"]
        self._units[token] = np.asarray(out["unit_ids"])
        if self.reregister and self.keep_references:
            self._references[token] = body
            while len(self._references) > self.keep_references:
                old, _ = self._references.popitem(last=False)
                self._units.pop(old, None)
        return token

    def current_token(self, session: str) -> str:
        """The token ``session`` is served under now: itself, or the one it was registered again under."""
        return self._renamed.get(session, session)

    def _post_session(self, path: str, session: str, body: dict) -> dict:
        """POST a request about a session; on SessionNotFound register its kept reference again, once."""
        token = self.current_token(session)
        try:
            return self._post(path, {**body, "token": token})
        except SessionNotFound:
            ref = self._references.get(token)
            if not self.reregister or ref is None:
                raise
        new = self._register_body(ref)
        self._references.pop(token, None)
        self._units[session] = self._units[new]
        self._renamed[session] = new
        for k, v in self._renamed.items():  # tokens renamed before point at the newest one
            if v == token:
                self._renamed[k] = new
        return self._post(path, {**body, "token": new})

    def predict(
        self,
        session: str,
        spike_times,
        unit_ids,
        *,
        context_start: float,
        behavior=None,
        images=None,
        image_schedule_s: float | None = None,
        history_counts=None,
        history_duration_s: float | None = None,
        horizon_s: float | None = None,
    ) -> Prediction:
        """Predict the rates of every registered unit after one context window (see ``Predictor.predict``).

        With images: send ``image_schedule_s`` (up to the horizon) when the list of coming images is
        complete, also when none is coming; by default a list without a coming image means "unknown".
        """
        body = {
            **self._window(
                spike_times, unit_ids, context_start, behavior, images, history_counts, history_duration_s,
                image_schedule_s,
            ),
            "encoding": self.encoding,
        }
        if horizon_s is not None:
            body["horizon_s"] = float(horizon_s)
        out = self._post_session("/predict", session, body)
        return Prediction(
            rates_hz=decode_array(out["rates_hz"], name="rates_hz", kinds="f", ndim=2).astype(np.float32),
            bin_edges=decode_array(out["bin_edges"], name="bin_edges", kinds="f"),
            unit_ids=np.asarray(out["unit_ids"]),
            model=out["model"],
            model_hash=out["model_hash"],
        )

    def predict_batch(
        self, session: str, windows: Sequence[dict], *, horizon_s: float | None = None
    ) -> list[Prediction]:
        """Predict many windows of one session in one request (see ``Predictor.predict_batch``).

        ``windows``: dicts with ``spike_times``, ``unit_ids``, ``context_start`` and optional
        ``behavior``, ``images``, ``image_schedule_s``, ``history_counts``, ``history_duration_s``.
        """
        allowed = {
            "spike_times",
            "unit_ids",
            "context_start",
            "behavior",
            "images",
            "image_schedule_s",
            "history_counts",
            "history_duration_s",
        }
        items = []
        for i, w in enumerate(windows):
            extra = set(w) - allowed
            if extra:
                raise InputError(f"windows[{i}]: unknown field(s) {', '.join(sorted(extra))}")
            missing = {"spike_times", "unit_ids", "context_start"} - set(w)
            if missing:
                raise InputError(f"windows[{i}]: missing field(s) {', '.join(sorted(missing))}")
            items.append(
                self._window(
                    w["spike_times"],
                    w["unit_ids"],
                    w["context_start"],
                    w.get("behavior"),
                    w.get("images"),
                    w.get("history_counts"),
                    w.get("history_duration_s"),
                    w.get("image_schedule_s"),
                )
            )
        body: dict[str, Any] = {"windows": items, "encoding": self.encoding}
        if horizon_s is not None:
            body["horizon_s"] = float(horizon_s)
        out = self._post_session("/predict_batch", session, body)
        rates = decode_array(out["rates_hz"], name="rates_hz", kinds="f", ndim=3).astype(
            np.float32
        )  # (W, U, T)
        edges = decode_array(out["bin_edges"], name="bin_edges", kinds="f", ndim=2)  # (W, T + 1)
        ids = np.asarray(out["unit_ids"])
        return [
            Prediction(
                rates_hz=r, bin_edges=e, unit_ids=ids, model=out["model"], model_hash=out["model_hash"]
            )
            for r, e in zip(rates, edges)
        ]

    def unit_ids(self, session: str) -> np.ndarray:
        """The unit ids of a session this client registered (the row order of its predictions)."""
        if session not in self._units:
            raise InputError(f"session: {session!r} was not registered by this client (or is no longer kept)")
        return self._units[session]

    # ------------------------------------------------------------------ server
    def info(self) -> dict:
        """``GET /model``: the model's name, hash, config, training summary, metrics and the server's limits."""
        return self._request("GET", "/model")

    def ready(self) -> bool:
        """Whether ``GET /readyz`` answers 200 (model loaded and warmed up); never raises."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the server is ready; :class:`ServerError` after ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise ServerError(f"{self.url} was not ready after {timeout_s:g} s")
            time.sleep(0.2)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _spikes(self, times, unit_ids) -> dict:
        return encode_spikes(times, unit_ids, binary=self.encoding == "base64")

    def _array(self, a, dtype: str):
        a = np.asarray(a, dtype=np.float64)
        return encode_array(a, dtype=dtype) if self.encoding == "base64" else a.tolist()

    def _window(
        self, times, unit_ids, context_start, behavior, images, history_counts, history_duration_s,
        image_schedule_s=None,
    ) -> dict:
        w: dict[str, Any] = {"context": self._spikes(times, unit_ids), "context_start": float(context_start)}
        for key, ev in (("behavior", behavior), ("images", images)):
            if ev is not None:
                try:
                    et, ev_v = ev
                except (TypeError, ValueError):
                    raise InputError(f"{key}: pass a (times, values) pair") from None
                w[key] = {"times": self._array(et, "float64"), "values": self._array(ev_v, "float32")}
        if history_counts is not None:
            w["history_counts"] = self._array(history_counts, "float64")
        if history_duration_s is not None:
            w["history_duration_s"] = float(history_duration_s)
        if image_schedule_s is not None:
            w["image_schedule_s"] = float(image_schedule_s)
        return w

    def _post(self, path: str, body: dict) -> dict:
        return self._request("POST", path, body)

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        # a registration fits every unit's read-out (seconds for hundreds of units): give it longer
        timeout = max(self.timeout, REGISTER_TIMEOUT_S) if path == "/register" else self.timeout
        delay = self.backoff_s
        wait = 0.0
        last: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(max(delay, wait))
                delay = min(delay * 2, 5.0)
            try:
                resp = self._http.request(method, path, json=body, timeout=timeout)
            except httpx.TransportError as e:  # connection refused/reset, timeouts, protocol errors
                last = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code in _RETRY_STATUS:
                last = f"HTTP {resp.status_code}: {_message(resp)}"
                wait = _retry_after(resp)
                continue
            if 400 <= resp.status_code < 500:
                cls = SessionNotFound if resp.status_code == 404 and path != "/model" else RequestRejected
                raise cls(resp.status_code, _message(resp), endpoint=path)
            if resp.status_code >= 500:
                raise ServerError(
                    f"{path}: the server failed: {_message(resp)} (HTTP {resp.status_code})",
                    status_code=resp.status_code,
                )
            try:
                return resp.json()
            except ValueError:
                raise ServerError(f"{path}: the answer is not JSON (HTTP {resp.status_code})") from None
        raise ServerError(f"{method} {self.url}{path} failed after {self.retries + 1} attempt(s): {last}")


def _retry_after(resp: httpx.Response) -> float:
    """Seconds the server asks to wait (``Retry-After``), capped; 0 without one."""
    try:
        return min(max(float(resp.headers.get("retry-after", 0)), 0.0), _MAX_RETRY_AFTER_S)
    except ValueError:
        return 0.0


def _message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    if isinstance(data, dict) and "error" in data:
        return str(data["error"])
    return str(data)[:500]
