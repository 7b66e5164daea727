"""ASGI middleware of the service: body-size limit, JSON bodies, readable validation errors.

BentoML 1.4 has no request-size setting, so :class:`RequestGuard` (added with
``NHServe.add_asgi_middleware``) reads every POST body itself, answers 413
when it is larger than the limit (from ``Content-Length`` before reading
anything, or while reading a chunked body), 415 for a body that is not JSON,
and hands the buffered body on. It also rewrites BentoML's 400 answers for
pydantic validation errors so that the ``error`` message names the fields
(``reference.times: Input should be a valid list``), keeping ``detail``.
"""

from __future__ import annotations

import json

from service.metrics import ServiceMetrics


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _count_rejected(path: str, status: int) -> None:
    try:
        ServiceMetrics.get().rejected.labels(endpoint=path.strip("/") or "/", status=str(status)).inc()
    except Exception:  # metrics must never break a response
        pass


def validation_message(detail: list) -> str:
    """One line naming every invalid field of a pydantic ``errors()`` list."""
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
    more = f" (and {len(items) - 6} more)" if len(items) > 6 else ""
    return "invalid request: " + "; ".join(items[:6]) + more


class RequestGuard:
    """Limit POST bodies to ``max_body_bytes`` (413); read the bodies of ``api_paths`` as JSON."""

    def __init__(self, app, *, max_body_bytes: int, api_paths: tuple[str, ...]):
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.api_paths = set(api_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        label = path if path in self.api_paths else "other"  # bounded label values for the metrics
        headers = dict(scope.get("headers") or [])
        limit = self.max_body_bytes
        too_big = {
            "error": f"body: the request body is larger than this server's limit of {limit} bytes "
            f"({limit / 2**20:g} MiB); send fewer spikes per request or use the base64 encoding"
        }
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                _count_rejected(label, 400)
                return await _send_json(
                    send, 400, {"error": "body: the Content-Length header is not a number"}
                )
            if n > limit:
                _count_rejected(label, 413)
                return await _send_json(send, 413, too_big)
        if path in self.api_paths:
            # Every API body is JSON, whatever Content-Type says (curl -d sends a form type): BentoML
            # would otherwise pick its multipart or pickle decoder for it.
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope.get("headers") or [] if k.lower() != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                _count_rejected(label, 413)
                return await _send_json(send, 413, too_big)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if path not in self.api_paths:
            return await self.app(scope, replay, send)
        await self.app(scope, replay, _ValidationRewrite(send, path))


class _ValidationRewrite:
    """A ``send`` that rewrites BentoML's 400 validation answers into a message naming the fields."""

    def __init__(self, send, path: str):
        self.send = send
        self.path = path
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
                body = json.dumps(data).encode()
            elif isinstance(data, list) and data and isinstance(data[0], dict) and "error" in data[0]:
                body = json.dumps(data[0]).encode()  # BentoML wraps some 4xx answers in a list
        except ValueError:
            pass
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})
