"""ASGI middleware: request body limit, Prometheus metrics, and a server span per request."""

from __future__ import annotations

import json
import time
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "dtx_http_requests_total",
    "HTTP requests the gateway answered, by method, route template and status.",
    ["method", "route", "status"],
)
DURATION = Histogram(
    "dtx_http_request_seconds",
    "Time the gateway took to answer an HTTP request.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
UNMATCHED = "unmatched"
"""The route label of a request no route matched (keeps the label set bounded)."""

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def route_of(scope: Scope) -> str:
    """The matched route's template (``/v1/orders/{order_id}``), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


# A refused body up to this size is read to its end before the 413 goes out;
# past it the connection is simply closed.
DRAIN_LIMIT = 1 << 20


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"request body: at most {limit} bytes")


class BodyLimitMiddleware:
    """Refuse bodies over ``limit`` bytes with 413: at once by Content-Length, or when a
    chunked body grows past it (the receive channel raises while the route reads it)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.limit:
            if length <= DRAIN_LIMIT:
                # Read (and drop) what the client is sending before answering: a
                # server that answers and closes mid-upload makes the client see a
                # reset instead of the 413.
                while (await receive()).get("more_body", False):
                    pass
            await _send_error(send, 413, "payload_too_large", _too_large(self.limit).detail)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _too_large(self.limit)
            return message

        await self.app(scope, limited, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class MetricsMiddleware:
    """``dtx_http_requests_total{method,route,status}`` and ``dtx_http_request_seconds``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            method = scope.get("method", "GET")
            method = method if method in _METHODS else "OTHER"
            route = route_of(scope)
            REQUESTS.labels(method, route, str(status)).inc()
            DURATION.labels(method, route).observe(time.perf_counter() - start)


class TracingMiddleware:
    """A SERVER span per request, child of the caller's ``traceparent`` when it sent one.

    Stands in for ``opentelemetry-instrumentation-asgi`` (see :func:`tracing_middleware`).
    The span is current while the route runs, so the gRPC client interceptors
    on the backends' channels carry it to every backend call.
    """

    def __init__(self, app: ASGIApp, tracer_provider: Any = None) -> None:
        from opentelemetry import trace

        self.app = app
        self.tracer = trace.get_tracer("dtx_gateway", tracer_provider=tracer_provider)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, Status, StatusCode

        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope.get("headers", ())
        }
        method = scope.get("method", "GET")
        status = 500
        with self.tracer.start_as_current_span(
            method,
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope.get("path", "")},
        ) as span:

            async def observed(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            try:
                await self.app(scope, receive, observed)
            finally:
                route = route_of(scope)
                if route != UNMATCHED:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))


def tracing_middleware() -> Any:
    """OpenTelemetry's ASGI middleware when it is installed, else :class:`TracingMiddleware`."""
    try:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    except ImportError:
        return TracingMiddleware
    return OpenTelemetryMiddleware
