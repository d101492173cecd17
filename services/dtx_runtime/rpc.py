"""Turn :class:`~dtx_runtime.errors.ServiceError` into gRPC statuses, in one place.

Handlers decorated with :func:`rpc` raise domain errors; the client gets the
matching status code and the message, never an opaque UNKNOWN for a client
mistake. A lost database connection is UNAVAILABLE, which callers may retry.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import grpc

from dtx_runtime.errors import ServiceError
from dtx_runtime.identifiers import InvalidIdentifier

R = TypeVar("R")
Self = TypeVar("Self")
Request = TypeVar("Request")
Context = grpc.aio.ServicerContext[Any, Any]


def rpc(
    method: Callable[[Self, Request, Context], Awaitable[R]],
) -> Callable[[Self, Request, Context], Awaitable[R]]:
    """Decorate a servicer method so domain errors become statuses with their message."""

    @functools.wraps(method)
    async def wrapper(self: Self, request: Request, context: Context) -> R:
        try:
            return await method(self, request, context)
        except ServiceError as exc:
            await context.abort(grpc.StatusCode[exc.code_name], str(exc))
        except InvalidIdentifier as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (
            OSError,
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
        ) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"database unavailable: {exc}")
        raise AssertionError("unreachable")  # pragma: no cover - abort always raises

    return wrapper


__all__ = ["rpc"]
