"""Bounded retries of one participant call: which codes are retried, how often, until when."""

from __future__ import annotations

import time

import grpc
import pytest

from dtx_runtime.coordination.calls import RETRYABLE, DeadlinePassed, call_with_retries
from dtx_runtime.policy import Retries, TransactionPolicy
from dtx_saga.engine import Engine

pytestmark = pytest.mark.unit

FAST = Retries(maxAttempts=4, backoffInitialMs=1, backoffMaxMs=2, jitterPercent=0)


def error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "boom", None)


class Script:
    """A call that answers from a list: an exception to raise or a value to return."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.timeouts: list[float] = []
        self.errors: list[tuple[int, grpc.StatusCode]] = []

    async def __call__(self, timeout: float) -> object:
        self.timeouts.append(timeout)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def on_error(self, attempt: int, exc: grpc.aio.AioRpcError) -> None:
        self.errors.append((attempt, exc.code()))


async def test_transient_errors_are_retried_until_an_answer() -> None:
    script = Script(
        error(grpc.StatusCode.UNAVAILABLE), error(grpc.StatusCode.DEADLINE_EXCEEDED), "ok"
    )
    retried: list[int] = []
    result = await call_with_retries(
        script,
        retries=FAST,
        timeout_s=0.5,
        on_error=script.on_error,
        on_retry=lambda: retried.append(1),
    )
    assert result == "ok"
    assert script.errors == [
        (1, grpc.StatusCode.UNAVAILABLE),
        (2, grpc.StatusCode.DEADLINE_EXCEEDED),
    ]
    assert len(retried) == 2
    # Every attempt gets the whole step timeout: a timeout is ambiguous, so ask again.
    assert script.timeouts == [0.5, 0.5, 0.5]


async def test_retries_are_bounded_by_max_attempts() -> None:
    script = Script(*[error(grpc.StatusCode.UNAVAILABLE)] * 10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_with_retries(script, retries=FAST, timeout_s=0.5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(script.timeouts) == FAST.max_attempts


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INTERNAL,
    ],
)
async def test_other_errors_are_not_retried(code: grpc.StatusCode) -> None:
    script = Script(error(code), "never")
    with pytest.raises(grpc.aio.AioRpcError):
        await call_with_retries(script, retries=FAST, timeout_s=0.5)
    assert len(script.timeouts) == 1
    assert code not in RETRYABLE


async def test_the_deadline_caps_each_attempt_and_stops_retrying() -> None:
    slow = Retries(maxAttempts=10, backoffInitialMs=200, backoffMaxMs=200, jitterPercent=0)
    script = Script(*[error(grpc.StatusCode.UNAVAILABLE)] * 10)
    deadline = time.monotonic() + 0.15
    with pytest.raises(grpc.aio.AioRpcError):
        await call_with_retries(script, retries=slow, timeout_s=5, deadline=deadline)
    assert len(script.timeouts) == 1  # the next attempt would start after the deadline
    assert script.timeouts[0] <= 0.15


async def test_a_passed_deadline_makes_no_call() -> None:
    script = Script("never")
    with pytest.raises(DeadlinePassed):
        await call_with_retries(script, retries=FAST, timeout_s=1, deadline=time.monotonic() - 0.01)
    assert script.timeouts == []


def test_the_lease_covers_a_step_with_all_its_retries() -> None:
    policy = TransactionPolicy.model_validate(
        {
            "timeouts": {"stepMs": 3000, "transactionMs": 60_000},
            "retries": {"maxAttempts": 5, "backoffMaxMs": 1000},
            "participants": [{"name": "payments", "endpoint": "p:1", "timeoutMs": 4000}],
        }
    )
    assert Engine.lease_ms(policy) >= 5 * (4000 + 1000)
    assert Engine.lease_ms(TransactionPolicy()) >= 10_000
