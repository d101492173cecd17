"""The ``dtx.v1.Participant`` gRPC service over a :class:`Barrier`.

Maps the barrier's answers and errors to the protocol: a business refusal is a
"no" vote, a malformed request is INVALID_ARGUMENT naming the field, a commit
of an unknown branch and a refused compensation (an effect that is final) are
FAILED_PRECONDITION (no retry changes them), a branch held by a concurrent call
or a database outage is UNAVAILABLE (the coordinator retries those).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import grpc
from prometheus_client import Counter, Histogram

from dtx.v1 import participant_pb2, participant_pb2_grpc
from dtx_runtime.identifiers import InvalidIdentifier
from dtx_runtime.participant.barrier import (
    Answer,
    Barrier,
    BranchBusy,
    BranchUnknown,
    CompensationRefused,
)
from dtx_runtime.participant.manager import InvalidOperation

CALLS = Counter(
    "dtx_participant_calls_total",
    "Participant protocol calls by action and result (yes, no, ok, error).",
    ["action", "result"],
)
LATENCY = Histogram(
    "dtx_participant_call_seconds",
    "Time a participant spent on a protocol call, by action.",
    ["action"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[object, object]


async def _guarded(action: str, context: Context, call: Callable[[], Awaitable[T]]) -> T:
    start = time.perf_counter()
    try:
        result = await call()
    except (InvalidIdentifier, InvalidOperation) as exc:
        CALLS.labels(action, "invalid").inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except BranchUnknown as exc:
        CALLS.labels(action, "unknown").inc()
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    except CompensationRefused as exc:
        CALLS.labels(action, "refused").inc()
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    except BranchBusy as exc:
        CALLS.labels(action, "busy").inc()
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
        CALLS.labels(action, "error").inc()
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"database unavailable: {exc}")
    except asyncpg.PostgresError as exc:
        # Not a refusal the manager foresaw: say what PostgreSQL said, as INTERNAL.
        CALLS.labels(action, "error").inc()
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
    finally:
        LATENCY.labels(action).observe(time.perf_counter() - start)
    if isinstance(result, Answer):
        CALLS.labels(action, "yes" if result.yes else "no").inc()
    else:
        CALLS.labels(action, "ok").inc()
    return result


class ParticipantServicer(participant_pb2_grpc.ParticipantServicer):
    def __init__(self, barrier: Barrier) -> None:
        self._barrier = barrier

    async def Prepare(
        self, request: participant_pb2.PrepareRequest, context: Context
    ) -> participant_pb2.PrepareResponse:
        answer = await _guarded(
            "prepare",
            context,
            lambda: self._barrier.prepare(request.gid, request.branch, request.operation),
        )
        return participant_pb2.PrepareResponse(
            vote=participant_pb2.VOTE_COMMIT if answer.yes else participant_pb2.VOTE_ABORT,
            reason=answer.reason,
        )

    async def Commit(
        self, request: participant_pb2.CommitRequest, context: Context
    ) -> participant_pb2.CommitResponse:
        await _guarded("commit", context, lambda: self._barrier.commit(request.gid, request.branch))
        return participant_pb2.CommitResponse()

    async def Abort(
        self, request: participant_pb2.AbortRequest, context: Context
    ) -> participant_pb2.AbortResponse:
        await _guarded("abort", context, lambda: self._barrier.abort(request.gid, request.branch))
        return participant_pb2.AbortResponse()

    async def Execute(
        self, request: participant_pb2.ExecuteRequest, context: Context
    ) -> participant_pb2.ExecuteResponse:
        answer = await _guarded(
            "execute",
            context,
            lambda: self._barrier.execute(request.gid, request.branch, request.operation),
        )
        return participant_pb2.ExecuteResponse(succeeded=answer.yes, reason=answer.reason)

    async def Compensate(
        self, request: participant_pb2.CompensateRequest, context: Context
    ) -> participant_pb2.CompensateResponse:
        await _guarded(
            "compensate", context, lambda: self._barrier.compensate(request.gid, request.branch)
        )
        return participant_pb2.CompensateResponse()
