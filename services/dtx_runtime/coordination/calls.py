"""One participant call with bounded retries: each attempt its own timeout, backoff between.

Both drivers use it. The coordinator gives all attempts of one call a shared
budget (``deadline``); a saga step gives *each* attempt the step timeout and
also retries DEADLINE_EXCEEDED: the answer is ambiguous, and since Execute
and Compensate are idempotent behind the barrier, asking again is safe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

import grpc

from dtx_runtime.policy import Retries

T = TypeVar("T")

# Transient: the call did not happen, or may be repeated.
TRANSIENT: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
)
# Transient, plus the ambiguous timeout: for calls that are safe to repeat.
RETRYABLE: frozenset[grpc.StatusCode] = TRANSIENT | {grpc.StatusCode.DEADLINE_EXCEEDED}
# A participant that answers one of these will answer it again: no retry.
REFUSALS: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
)

OnError = Callable[[int, grpc.aio.AioRpcError], Awaitable[None]]


class DeadlinePassed(TimeoutError):
    """The caller's overall deadline left no time for (another) attempt."""


async def call_with_retries(
    call: Callable[[float], Awaitable[T]],
    *,
    retries: Retries,
    timeout_s: float,
    retryable: Collection[grpc.StatusCode] = RETRYABLE,
    deadline: float | None = None,
    on_error: OnError | None = None,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """``call(timeout)`` up to ``retries.max_attempts`` times while it fails with a retryable code.

    ``deadline`` (``time.monotonic()``) caps every attempt's timeout and stops
    the retries early. The last error is raised as it came; no attempt at all
    (the deadline had passed) raises :class:`DeadlinePassed`.
    """
    attempt = 0
    while True:
        attempt += 1
        timeout = timeout_s
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise DeadlinePassed(f"deadline passed before attempt {attempt}")
        try:
            return await call(timeout)
        except grpc.aio.AioRpcError as exc:
            if on_error is not None:
                await on_error(attempt, exc)
            delay = retries.backoff_ms(attempt) / 1000
            if (
                exc.code() not in retryable
                or attempt >= retries.max_attempts
                or (deadline is not None and time.monotonic() + delay >= deadline)
            ):
                raise
            if on_retry is not None:
                on_retry()
            await asyncio.sleep(delay)
