"""ASGI middleware of the service: who may ask, how much, and what a refusal looks like.

:class:`RequestGuard` (added with ``NHServe.add_asgi_middleware``) sees every request before
BentoML does. In order:

1. a request id (the caller's ``X-Request-Id`` when it is short and plain, else a new one),
   sent back in the ``X-Request-Id`` header and in every error answer;
2. the ``Host`` header must be one the server answers to (``NH_SERVE_ALLOWED_HOSTS``), and a
   browser's ``Origin`` the server's own or an allowed one (``NH_SERVE_ALLOWED_ORIGINS``): 403
   otherwise, against cross-origin requests from web pages and DNS rebinding (health probes
   ``/livez`` and ``/readyz`` are exempt);
3. with ``NH_SERVE_API_KEY`` set, ``Authorization: Bearer <key>`` (or ``X-API-Key``), compared
   in constant time: 401 otherwise (health probes and the OpenAPI page are exempt);
4. for the API (``POST /register``, ``/predict``, ``/predict_batch``): ``Content-Type:
   application/json`` (415 otherwise), at most ``NH_SERVE_MAX_CONCURRENCY`` requests in progress
   (429 with ``Retry-After`` otherwise), the body within ``NH_SERVE_MAX_BODY_MB`` (413, from
   ``Content-Length`` before reading anything, or while reading a chunked body) and within
   ``NH_SERVE_BODY_TIMEOUT_S`` (408), then validated against the endpoint's request model: 400
   listing the first few problems, never one line per array element;
5. ``GET /docs`` serves the OpenAPI page itself and ``GET /docs.json`` BentoML's OpenAPI
   document with ``GET /model`` added.

A refusal is one JSON object ``{"error": "<field>: <reason>", "request_id": ...}`` and one log
line (status, method, path, request id, the message); answers to a request whose body was not
read close the connection.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable

from pydantic import ValidationError

from service.metrics import ServiceMetrics

log = logging.getLogger("bentoml.nh_serve")

#: Problems a validation error lists (the count of the rest follows).
MAX_LISTED_PROBLEMS = 5
HEALTH_PATHS = frozenset({"/livez", "/readyz"})
DOCS_PATHS = frozenset({"/", "/docs", "/docs.json"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_JSON_TYPE = re.compile(r"^application/([a-z0-9.+-]+\+)?json$")

DOCS_PAGE = b"""<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>nh-serve API</title>
    <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css" />
    <link rel="stylesheet" type="text/css" href="./static_content/index.css" />
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="./static_content/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
    <script src="./static_content/swagger-initializer.js" charset="UTF-8"></script>
  </body>
</html>
"""


def log_refusal(status: int, method: str, path: str, request_id: str, message: str) -> None:
    """One log line for a refused request: status, endpoint, request id and the (shortened) message."""
    text = " ".join(str(message).split())
    if len(text) > 300:
        text = text[:297] + "..."
    log.warning("refused %d %s %s request_id=%s: %s", status, method, path, request_id, text)


def _count_rejected(path: str, status: int) -> None:
    try:
        ServiceMetrics.get().rejected.labels(endpoint=path.strip("/") or "/", status=str(status)).inc()
    except Exception:  # metrics must never break a response
        pass


def validation_message(detail: list, *, max_listed: int = MAX_LISTED_PROBLEMS) -> str:
    """One line naming the first few invalid fields of a pydantic ``errors()`` list."""
    by_field: dict[str, list[str]] = {}
    for err in detail:
        if not isinstance(err, dict):
            continue
        parts = []
        for p in err.get("loc", ()):
            if isinstance(p, int):
                parts.append(f"[{p}]")
            elif isinstance(p, str) and "[" not in p and not p[:1].isupper():  # skip union-branch tags
                parts.append(("." if parts else "") + p)
        field = "".join(parts)
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "json_invalid" or not field:
            field = "body"
            if err.get("type") == "json_invalid":
                msg = f"is not valid JSON ({msg})"
        msgs = by_field.setdefault(field, [])
        if msg not in msgs:
            msgs.append(msg)
    items = [f"{f}: {' or '.join(m)}" for f, m in by_field.items()]
    more = f" (and {len(items) - max_listed} more)" if len(items) > max_listed else ""
    return "invalid request: " + "; ".join(items[:max_listed]) + more


def _host_name(value: str) -> str:
    """The name part of a Host header or an origin's authority (no port, no IPv6 brackets), lower case."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[1 : v.find("]")] if "]" in v else v
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


class RequestGuard:
    """The checks of the module docstring, around the BentoML app."""

    def __init__(
        self,
        app,
        *,
        settings,
        api_models: dict[str, type],
        openapi: Callable[[], dict] | None = None,
    ):
        self.app = app
        self.settings = settings
        self.api_models = dict(api_models)
        self.openapi = openapi
        self.in_flight = 0
        self._api_key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope.get("method", ""), scope.get("path", "")
        headers = {k.lower(): v for k, v in scope.get("headers") or []}
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = rid if _REQUEST_ID.match(rid) else secrets.token_hex(8)
        send = _with_request_id(send, rid)
        label = path if path in self.api_models else "other"  # bounded label values for the metrics

        async def refuse(status: int, message: str, *, extra_headers=(), close: bool = True, **fields):
            _count_rejected(label, status)
            log_refusal(status, method, path, rid, message)
            await _send_json(send, status, {"error": message, "request_id": rid, **fields},
                             headers=extra_headers, close=close)

        if path not in HEALTH_PATHS:
            problem = self._origin_problem(headers)
            if problem:
                return await refuse(403, problem)
            if self._api_key is not None and path not in DOCS_PATHS and not path.startswith("/static_content/"):
                if not self._authorized(headers):
                    return await refuse(
                        401,
                        "authorization: this server needs its API key; send 'Authorization: Bearer <key>' "
                        "(the Python client reads NH_SERVE_API_KEY)",
                        extra_headers=[(b"www-authenticate", b'Bearer realm="nh-serve"')],
                    )
        if method == "GET" and path == "/docs":
            return await _send_bytes(send, 200, DOCS_PAGE, b"text/html; charset=utf-8")
        if method == "GET" and path == "/docs.json" and self.openapi is not None:
            return await _send_bytes(send, 200, json.dumps(self.openapi()).encode(), b"application/json")
        if method != "POST":
            return await self.app(scope, receive, send)
        model = self.api_models.get(path)
        if model is not None:
            ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if not _JSON_TYPE.match(ctype):
                return await refuse(
                    415,
                    f"content-type: {ctype or 'none'} is not accepted; send the body as JSON with "
                    "'Content-Type: application/json' (curl: -H 'Content-Type: application/json')",
                )
            if self.in_flight >= self.settings.max_concurrency:
                return await refuse(
                    429,
                    f"busy: {self.in_flight} requests are in progress, this server's limit "
                    f"(NH_SERVE_MAX_CONCURRENCY); retry in a moment",
                    extra_headers=[(b"retry-after", b"1")],
                )
        self.in_flight += 1
        try:
            body, problem = await self._read_body(headers, receive)
            if problem is not None:
                return await refuse(*problem)
            if model is not None:
                try:
                    model.model_validate_json(body)
                except ValidationError as e:
                    detail = e.errors(include_url=False, include_context=False, include_input=False)
                    n = e.error_count()
                    return await refuse(
                        400, validation_message(detail), close=False,
                        detail=detail[:MAX_LISTED_PROBLEMS], problems=n,
                    )
            scope = dict(scope)
            scope["nh_serve"] = {"request_id": rid, "client": _client_key(scope, headers)}
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            if model is None:
                return await self.app(scope, replay, send)
            await self.app(scope, replay, _ValidationRewrite(send, path, rid))
        finally:
            self.in_flight -= 1

    # ------------------------------------------------------------------ checks
    def _origin_problem(self, headers: dict) -> str | None:
        host = headers.get(b"host", b"").decode("latin-1")
        allowed = self.settings.allowed_hosts
        if "*" not in allowed and _host_name(host) not in allowed:
            return (
                f"host: {host or 'none'!r} is not a name this server answers to; set NH_SERVE_ALLOWED_HOSTS "
                "(comma-separated) to the names clients use"
            )
        origin = headers.get(b"origin")
        if origin is None:
            return None
        o = origin.decode("latin-1").strip().lower()
        authority = o.split("://", 1)[1] if "://" in o else ""
        if authority and authority == host.strip().lower():
            return None  # the server's own page (/docs)
        if "*" in self.settings.allowed_origins or o in self.settings.allowed_origins:
            return None
        return (
            f"origin: requests from web pages at {o!r} are not accepted; set NH_SERVE_ALLOWED_ORIGINS "
            "to allow that origin"
        )

    def _authorized(self, headers: dict) -> bool:
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"").strip()
        return hmac.compare_digest(given, self._api_key)

    async def _read_body(self, headers: dict, receive):
        """``(body, None)``, or ``(None, (status, message))`` for a body too large, too slow or malformed."""
        limit = self.settings.max_body_bytes
        too_big = (
            413,
            f"body: the request body is larger than this server's limit of {limit} bytes "
            f"({limit / 2**20:g} MiB, NH_SERVE_MAX_BODY_MB); send fewer spikes per request or use the base64 encoding",
        )
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return None, (400, "body: the Content-Length header is not a number")
            if n > limit:
                return None, too_big
        deadline = time.monotonic() + self.settings.body_timeout_s
        chunks, size = [], 0
        while True:
            try:
                msg = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return None, (
                    408,
                    f"body: the request body did not arrive within {self.settings.body_timeout_s:g} s "
                    "(NH_SERVE_BODY_TIMEOUT_S); send the whole body at once",
                )
            if msg["type"] == "http.disconnect":
                return None, (400, "body: the client went away before sending the whole body")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None, too_big
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks), None


def _client_key(scope, headers: dict) -> str:
    """Who a request comes from, for the per-client session quota: its address and X-Client-Id."""
    peer = (scope.get("client") or ("?", 0))[0]
    cid = headers.get(b"x-client-id", b"").decode("latin-1")
    return f"{peer}/{cid}" if _CLIENT_ID.match(cid) else str(peer)


def _with_request_id(send, rid: str):
    async def wrapped(msg):
        if msg["type"] == "http.response.start":
            hdrs = [(k, v) for k, v in msg.get("headers", []) if k.lower() != b"x-request-id"]
            msg = {**msg, "headers": [*hdrs, (b"x-request-id", rid.encode())]}
        await send(msg)

    return wrapped


async def _send_bytes(send, status: int, body: bytes, ctype: bytes, *, headers=(), close: bool = False) -> None:
    hdrs = [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *headers]
    if close:
        hdrs.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send, status: int, payload: dict, *, headers=(), close: bool = False) -> None:
    await _send_bytes(send, status, json.dumps(payload).encode(), b"application/json", headers=headers, close=close)


class _ValidationRewrite:
    """A ``send`` that rewrites a 400 answer of BentoML's own validation into a message naming the fields.

    The guard validates every API body first, so this is a second line only.
    """

    def __init__(self, send, path: str, request_id: str):
        self.send = send
        self.path = path
        self.request_id = request_id
        self.start = None
        self.chunks: list[bytes] = []

    async def __call__(self, msg):
        if msg["type"] == "http.response.start":
            if 400 <= msg["status"] < 500:
                _count_rejected(self.path, msg["status"])
            if msg["status"] == 400:
                self.start = msg
                return None
            return await self.send(msg)
        if self.start is None or msg["type"] != "http.response.body":
            return await self.send(msg)
        self.chunks.append(msg.get("body", b""))
        if msg.get("more_body", False):
            return None
        body = b"".join(self.chunks)
        start = self.start
        try:
            data = json.loads(body)
            if isinstance(data, dict) and isinstance(data.get("detail"), list):
                data["error"] = validation_message(data["detail"])
                data["detail"] = data["detail"][:MAX_LISTED_PROBLEMS]
                data["request_id"] = self.request_id
                body = json.dumps(data).encode()
            elif isinstance(data, list) and data and isinstance(data[0], dict) and "error" in data[0]:
                body = json.dumps(data[0]).encode()  # BentoML wraps some 4xx answers in a list
        except ValueError:
            pass
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})
