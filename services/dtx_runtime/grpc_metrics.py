"""Prometheus metrics for every unary gRPC method a service serves."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

HANDLED = Counter(
    "dtx_grpc_server_handled_total",
    "gRPC calls completed by the server, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
DURATION = Histogram(
    "dtx_grpc_server_handling_seconds",
    "Time the server spent on a gRPC call.",
    ["grpc_service", "grpc_method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def _split(full_method: str) -> tuple[str, str]:
    _, service, method = (
        full_method.split("/", 2) if full_method.count("/") >= 2 else ("", "?", full_method)
    )
    return service, method


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts and times unary-unary calls; other kinds pass through untouched.

    The wrapped handler is built once per method and reused: the servicer's
    handlers are fixed at registration, and building one per call is waste on
    the hot path.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[object, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        cached = self._wrapped.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        service, method = _split(handler_call_details.method)
        inner = handler.unary_unary

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            start = time.perf_counter()
            code = "OK"
            try:
                return await inner(request, context)  # type: ignore[arg-type]
            except grpc.aio.AbortError:
                code = context.code().name if context.code() else "UNKNOWN"
                raise
            except Exception:
                code = "UNKNOWN"
                raise
            finally:
                if code == "OK" and context.code() not in (None, grpc.StatusCode.OK):
                    code = context.code().name
                HANDLED.labels(service, method, code).inc()
                DURATION.labels(service, method).observe(time.perf_counter() - start)

        wrapped = grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[handler_call_details.method] = (handler, wrapped)
        return wrapped
