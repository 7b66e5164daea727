"""Python client of the nh-serve HTTP service, with the local Predictor's call signature.

Switch between local and remote inference with one line::

    from nh_serve.client import Client
    p = Client("http://127.0.0.1:3000")          # or: p = Predictor.load()
    token = p.register(ref_times, ref_unit_ids, reference_window=(0.0, 60.0))
    pred = p.predict(token, ctx_times, ctx_unit_ids, context_start=120.0)
    pred.rates_hz   # (U, 50) Hz, the same Prediction dataclass the Predictor returns

Arrays go out and come back in the compact base64 form of :mod:`nh_serve.client.wire`
by default (``encoding="json"`` sends and asks for JSON lists instead). The
client keeps one keep-alive connection, retries connection failures, timeouts
and 503 answers with exponential backoff (never a 4xx), and raises:

* :class:`RequestRejected` (an :class:`~nh_serve.errors.InputError`) on 4xx, carrying the
  server's message and status; :class:`SessionNotFound` (a subclass) for an unknown or expired token;
* :class:`ServerError` on 5xx or when the server cannot be reached after the retries.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from nh_serve.client.wire import decode_array, encode_array, encode_spikes
from nh_serve.errors import InputError
from nh_serve.prediction import Prediction

__all__ = ["Client", "RequestRejected", "SessionNotFound", "ServerError"]


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


_RETRY_STATUS = {502, 503, 504}


class Client:
    """Talk to an nh-serve server with :class:`~nh_serve.inference.predictor.Predictor`'s methods.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:3000``.
        timeout: seconds per request (connect, read and write each).
        retries: extra attempts after a connection error, a timeout or a 502/503/504.
        backoff_s: first retry delay in seconds, doubled after every attempt (capped at 5 s).
        encoding: ``"base64"`` (default, compact) or ``"json"`` for arrays in both directions.
        transport: an ``httpx`` transport to send requests through (default: plain HTTP).
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
    ):
        if encoding not in ("base64", "json"):
            raise InputError(f"encoding: must be 'base64' or 'json', got {encoding!r}")
        if int(retries) < 0:
            raise InputError(f"retries: must be >= 0, got {retries}")
        self.url = str(url).rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.encoding = encoding
        self._http = httpx.Client(base_url=self.url, timeout=self.timeout, transport=transport)
        self._units: dict[str, np.ndarray] = {}  # token -> unit ids, from /register

    # ------------------------------------------------------------------ Predictor API
    def register(
        self,
        spike_times,
        unit_ids,
        *,
        reference_window: tuple[float, float] | None = None,
        units: Sequence | None = None,
        adapt_steps: int = 0,
    ) -> str:
        """Register a recording's units from its reference spikes; returns the session token.

        Same arguments as :meth:`nh_serve.inference.predictor.Predictor.register`: ``spike_times``
        (N,) seconds, ``unit_ids`` (N,) the unit of each spike, ``reference_window``
        ``(start, end)`` seconds (at least 10 s), ``units`` the row order of predictions.
        """
        body: dict[str, Any] = {
            "reference": self._spikes(spike_times, unit_ids),
            "adapt_steps": int(adapt_steps),
        }
        if reference_window is not None:
            body["reference_start"], body["reference_end"] = (float(x) for x in reference_window)
        if units is not None:
            body["units"] = [str(u) for u in np.asarray(units).tolist()]
        out = self._post("/register", body)
        self._units[out["token"]] = np.asarray(out["unit_ids"], dtype=str)
        return out["token"]

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
            "token": session,
            **self._window(
                spike_times, unit_ids, context_start, behavior, images, history_counts, history_duration_s,
                image_schedule_s,
            ),
            "encoding": self.encoding,
        }
        if horizon_s is not None:
            body["horizon_s"] = float(horizon_s)
        out = self._post("/predict", body)
        return Prediction(
            rates_hz=decode_array(out["rates_hz"], name="rates_hz", kinds="f", ndim=2).astype(np.float32),
            bin_edges=decode_array(out["bin_edges"], name="bin_edges", kinds="f"),
            unit_ids=np.asarray(out["unit_ids"], dtype=str),
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
        body: dict[str, Any] = {"token": session, "windows": items, "encoding": self.encoding}
        if horizon_s is not None:
            body["horizon_s"] = float(horizon_s)
        out = self._post("/predict_batch", body)
        rates = decode_array(out["rates_hz"], name="rates_hz", kinds="f", ndim=3).astype(
            np.float32
        )  # (W, U, T)
        edges = decode_array(out["bin_edges"], name="bin_edges", kinds="f", ndim=2)  # (W, T + 1)
        ids = np.asarray(out["unit_ids"], dtype=str)
        return [
            Prediction(
                rates_hz=r, bin_edges=e, unit_ids=ids, model=out["model"], model_hash=out["model_hash"]
            )
            for r, e in zip(rates, edges)
        ]

    def unit_ids(self, session: str) -> np.ndarray:
        """The unit ids of a session this client registered (the row order of its predictions)."""
        if session not in self._units:
            raise InputError(f"session: {session!r} was not registered by this client")
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
        delay = self.backoff_s
        last: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            try:
                resp = self._http.request(method, path, json=body)
            except httpx.TransportError as e:  # connection refused/reset, timeouts, protocol errors
                last = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code in _RETRY_STATUS:
                last = f"HTTP {resp.status_code}: {_message(resp)}"
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
