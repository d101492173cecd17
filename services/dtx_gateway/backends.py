"""The gRPC services behind the gateway, and how their statuses become HTTP errors.

Channels come from :class:`dtx_runtime.channels.Channels`, so the trace
context of the HTTP request travels on every call. Each call has a deadline;
a backend that is down or slow is a 503 with ``Retry-After``, never a 500.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dtx.v1 import (
    coordinator_pb2_grpc,
    inventory_pb2_grpc,
    notifications_pb2_grpc,
    orders_pb2_grpc,
    payments_pb2_grpc,
    saga_pb2_grpc,
)
from dtx_gateway.errors import RETRY_AFTER_SECONDS, ApiError, unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

HEALTH_TIMEOUT_S = 1.0

# Status -> (HTTP status, error code). Anything not listed is a 502.
_STATUS_MAP: Mapping[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (422, "invalid_request"),
    grpc.StatusCode.OUT_OF_RANGE: (422, "invalid_request"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "already_exists"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "failed_precondition"),
    grpc.StatusCode.ABORTED: (409, "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limited"),
    grpc.StatusCode.UNAVAILABLE: (503, "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (503, "unavailable"),
    grpc.StatusCode.CANCELLED: (503, "unavailable"),
}


def to_api_error(backend: str, exc: grpc.aio.AioRpcError) -> ApiError:
    """The HTTP error for a failed call; the backend's message is kept (it names the field)."""
    code = exc.code()
    details = exc.details() or ""
    status, name = _STATUS_MAP.get(code, (502, "backend_error"))
    if status == 503:
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return unavailable(f"{backend} did not answer in time; retry")
        return unavailable(f"{backend} is unavailable; retry ({details or code.name})")
    if status == 429:
        return ApiError(
            429,
            name,
            details or f"{backend} is over capacity",
            {"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if status == 502:
        log.error("%s answered %s: %s", backend, code.name, details)
        return ApiError(502, name, f"{backend} failed: {code.name}")
    return ApiError(status, name, details or f"{backend} answered {code.name}")


async def call(backend: str, awaitable: Awaitable[T]) -> T:
    """Await one RPC, turning its failure into an :class:`ApiError`."""
    try:
        return await awaitable
    except grpc.aio.AioRpcError as exc:
        raise to_api_error(backend, exc) from None


@dataclass(frozen=True)
class Backends:
    """One stub per backend over shared channels, plus the deadlines of the calls."""

    orders: orders_pb2_grpc.OrdersAsyncStub
    payments: payments_pb2_grpc.PaymentsAsyncStub
    inventory: inventory_pb2_grpc.InventoryAsyncStub
    coordinator: coordinator_pb2_grpc.CoordinatorAsyncStub
    saga: saga_pb2_grpc.SagaOrchestratorAsyncStub
    notifications: notifications_pb2_grpc.NotificationsAsyncStub
    health: Mapping[str, Any]
    call_timeout_s: float = 5.0
    order_timeout_s: float = 30.0

    @classmethod
    def over(
        cls,
        channels: Mapping[str, grpc.aio.Channel],
        *,
        call_timeout_s: float = 5.0,
        order_timeout_s: float = 30.0,
    ) -> Backends:
        """Stubs on ``channels`` (backend name -> channel)."""
        return cls(
            orders=orders_pb2_grpc.OrdersStub(channels["orders"]),
            payments=payments_pb2_grpc.PaymentsStub(channels["payments"]),
            inventory=inventory_pb2_grpc.InventoryStub(channels["inventory"]),
            coordinator=coordinator_pb2_grpc.CoordinatorStub(channels["coordinator"]),
            saga=saga_pb2_grpc.SagaOrchestratorStub(channels["saga"]),
            notifications=notifications_pb2_grpc.NotificationsStub(channels["notifications"]),
            health={
                name: health_pb2_grpc.HealthStub(channel) for name, channel in channels.items()
            },
            call_timeout_s=call_timeout_s,
            order_timeout_s=order_timeout_s,
        )

    async def check(self, backend: str) -> None:
        """Raise unless ``backend``'s gRPC health answers SERVING in time."""
        try:
            response = await self.health[backend].Check(
                health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise ConnectionError(f"{exc.code().name} {exc.details() or ''}".strip()) from None
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            raise ConnectionError(
                health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            )

    async def report(self) -> dict[str, str]:
        """Every backend's health: ``SERVING`` or why not."""
        names = list(self.health)
        results = await asyncio.gather(*(self.check(n) for n in names), return_exceptions=True)
        return {
            name: "SERVING" if result is None else (str(result) or type(result).__name__)
            for name, result in zip(names, results, strict=True)
        }
