"""The orchestrator's rules, free of I/O: validation, which step runs next, what to compensate.

Everything here is decided from values, so the saga's corner cases are
unit-tested without a database or a network. The engine only calls
participants and writes down what these functions decide.

Step states (``StepRecord.state``):

``pending``      not run yet (or run by a driver that died before logging it)
``done``         Execute answered succeeded=true
``refused``      Execute answered succeeded=false, or refused the request as
                 malformed (INVALID_ARGUMENT/FAILED_PRECONDITION): the
                 participant changed nothing, so it is **not** compensated
``failed``       the call failed or timed out: the outcome is unknown, so it is
                 re-executed when the saga goes on and compensated when it
                 turns back (the barrier makes both safe)
``compensated``  Compensate acknowledged (a recorded no-op if it never ran)
``skipped``      never run: the saga turned back before reaching it (only an
                 exact state says so; see :func:`begin_compensation`)

A refused step is excluded from compensation on purpose: the protocol
promises that a refusal changed nothing, the barrier has recorded the "no"
(a late duplicate Execute gets the same answer), and leaving it out means a
refusing participant that is down a moment later cannot park the saga.

The pivot. A saga's steps are compensatable steps followed by one *pivot*:
its **last step**, the point of no return (for an order, ``confirm_order``:
a customer told "confirmed" must never see the order cancelled). Once every
step before the pivot is done (:func:`at_pivot`), the saga only goes forward:

* an unknown outcome of the pivot (the call failed or timed out, the driver
  died after sending it) is answered by executing it again — each round the
  step's retries, rounds up to ``recovery.maxAttempts`` — whether or not the
  saga's deadline has passed, since the barrier answers a repeated Execute
  with its first answer; when the rounds run out the saga is parked as
  NEEDS_INTERVENTION *heading forward*, whatever ``recovery.onExhausted``
  says (:func:`forward_verdict`);
* a definitive refusal of the pivot (succeeded=false, or a malformed-request
  code) still turns the saga back: the earlier steps are compensated, the
  pivot itself is not (it said no, so it changed nothing).

Before the pivot, the deadline passing or the rounds running out with
``onExhausted=Abort`` turn the saga back as usual. Only a person's AbortSaga
can turn back a saga at its pivot; the pivot is then owed a Compensate like
any step whose outcome is unknown. A participant whose effect is final
refuses it (FAILED_PRECONDITION): the pivot ran, so every step before it had
run, and compensation goes in reverse, so nothing was undone yet — the saga's
effects stand, and it goes forward to COMPLETED (:func:`effects_stand`,
:func:`complete_past_pivot`) rather than waiting for a person who could only
choose the same.

A saga read back from the log (``Saga.may_lag``) may be more than one step
behind its participants: a step's *done* is a lazy write, and a PostgreSQL
crash can lose several. Turning back, such a saga owes every pending step a
Compensate, the pivot's first (:func:`begin_compensation`).
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from dtx.v1 import common_pb2, transactions_pb2
from dtx_runtime.coordination.records import Attempt
from dtx_runtime.errors import FailedPrecondition, InvalidArgument
from dtx_runtime.identifiers import BRANCH_PATTERN, check_gid
from dtx_runtime.policy import OnExhausted

MAX_STEPS = 16


class State(enum.StrEnum):
    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    NEEDS_INTERVENTION = "NEEDS_INTERVENTION"

    @property
    def finished(self) -> bool:
        return self in (State.COMPLETED, State.COMPENSATED)


UNFINISHED = (State.RUNNING, State.COMPENSATING)


class Direction(enum.StrEnum):
    """Where the saga is heading; kept while it is parked, so a retry knows the way back."""

    FORWARD = "forward"
    BACKWARD = "backward"


class StepState(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    REFUSED = "refused"
    FAILED = "failed"
    COMPENSATED = "compensated"
    SKIPPED = "skipped"


# Steps whose effect may exist: what a turning-back saga owes a Compensate.
OWES_COMPENSATION = (StepState.DONE, StepState.FAILED)


class Verdict(enum.Enum):
    """What a round that could not finish leads to."""

    RETRY = "retry"  # another round after a backoff (inline or by recovery)
    COMPENSATE = "compensate"  # turn back now
    PARK = "park"  # NEEDS_INTERVENTION: a person decides


@dataclass
class StepRecord:
    """One step as the log keeps it."""

    step: str
    participant: str
    operation: bytes
    state: StepState = StepState.PENDING
    reason: str = ""
    attempts: int = 0  # participant calls made for this step, both directions

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "participant": self.participant,
            "operation": base64.b64encode(self.operation).decode(),
            "state": self.state.value,
            "reason": self.reason,
            "attempts": self.attempts,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepRecord:
        return cls(
            step=data["step"],
            participant=data["participant"],
            operation=base64.b64decode(data["operation"]),
            state=StepState(data["state"]),
            reason=data.get("reason", ""),
            attempts=int(data.get("attempts", 0)),
        )


@dataclass
class Saga:
    gid: str
    state: State
    steps: list[StepRecord]
    direction: Direction = Direction.FORWARD
    # Why it turned back: the first failing step's "step: reason" (the final reason).
    reason: str = ""
    # Why it is parked, while it is NEEDS_INTERVENTION.
    parked_reason: str = ""
    # Rounds that could not finish in the current direction (reset when it changes).
    attempts: int = 0
    timeout_ms: int = 0
    # Seconds left to the deadline when the row was read (the database's clock).
    remaining_s: float | None = None
    # Read back from the log, not the inline driver's memory: steps it shows
    # pending may have run (lazy saves lost in a database crash).
    may_lag: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shown_reason(self) -> str:
        if self.state is State.NEEDS_INTERVENTION and self.parked_reason:
            return self.parked_reason
        return self.reason


def validate_steps(
    gid: str, steps: Sequence[transactions_pb2.Branch], known: Iterable[str]
) -> None:
    """Refuse a malformed RunSaga before anything is logged; the message names the field."""
    check_gid(gid)
    if not steps:
        raise InvalidArgument("steps: a saga needs at least one step")
    if len(steps) > MAX_STEPS:
        raise InvalidArgument(f"steps: at most {MAX_STEPS} steps")
    participants = set(known)
    seen: set[str] = set()
    for i, step in enumerate(steps):
        if not BRANCH_PATTERN.match(step.branch):
            raise InvalidArgument(
                f"steps[{i}].branch: {step.branch!r} must match [a-z0-9_-]{{1,40}}"
            )
        if step.branch in seen:
            raise InvalidArgument(f"steps[{i}].branch: {step.branch!r} appears twice")
        seen.add(step.branch)
        if step.participant not in participants:
            raise InvalidArgument(
                f"steps[{i}].participant: unknown participant {step.participant!r}"
                f" (known: {', '.join(sorted(participants)) or 'none'})"
            )
        if not step.operation.WhichOneof("kind"):
            raise InvalidArgument(f"steps[{i}].operation: no operation given")
        if step.prepared_by_caller:
            raise InvalidArgument(
                f"steps[{i}].prepared_by_caller: only a two-phase-commit branch can be"
            )


def records_of(steps: Sequence[transactions_pb2.Branch]) -> list[StepRecord]:
    return [StepRecord(s.branch, s.participant, s.operation.SerializeToString()) for s in steps]


# -- forward --------------------------------------------------------------


def next_forward(steps: Sequence[StepRecord]) -> int | None:
    """The step a forward saga runs next: the first not done (None: all done)."""
    for i, step in enumerate(steps):
        if step.state is not StepState.DONE:
            return i
    return None


def at_pivot(steps: Sequence[StepRecord]) -> bool:
    """Whether the saga's cursor is at its pivot (the last step): every step before it is done.

    From here the saga only goes forward (see the module docstring). A saga
    of one step is at its pivot from the start.
    """
    return next_forward(steps) == len(steps) - 1


def forward_verdict(
    attempts: int,
    max_attempts: int,
    on_exhausted: OnExhausted,
    *,
    deadline_passed: bool,
    pivot: bool,
) -> Verdict:
    """After a forward round ended on a step whose outcome is unknown.

    Before the pivot, the saga's deadline always turns it back. Otherwise it
    is retried until ``recovery.maxAttempts`` rounds failed, and then
    ``recovery.onExhausted`` says whether to compensate (Abort) or leave it
    to a person (Park).

    At the pivot (``pivot``: the step is the last one and every step before
    it is done) the saga never turns back by itself: neither the deadline nor
    ``onExhausted=Abort`` count; it is retried for ``recovery.maxAttempts``
    rounds and then parked, still heading forward.
    """
    if pivot:
        return Verdict.RETRY if attempts < max_attempts else Verdict.PARK
    if deadline_passed:
        return Verdict.COMPENSATE
    if attempts < max_attempts:
        return Verdict.RETRY
    return Verdict.COMPENSATE if on_exhausted is OnExhausted.ABORT else Verdict.PARK


# -- backward -------------------------------------------------------------


def compensation_plan(steps: Sequence[StepRecord]) -> list[int]:
    """The steps still owed a Compensate, in the order to call them: reverse of execution."""
    return [i for i in reversed(range(len(steps))) if steps[i].state in OWES_COMPENSATION]


def begin_compensation(saga: Saga, reason: str) -> None:
    """Turn the saga back.

    The step at the cursor (the first not done) may have reached its
    participant even if nothing says so — a driver that died, an abort that
    came while the call was in flight — so a pending one there is counted as
    *failed* (compensated; the barrier makes that a no-op if it never ran).

    Steps after it: a saga driven from memory (an inline RunSaga) knows they
    were never sent, so they are skipped and cost no call. A saga read back
    from the log (``saga.may_lag``: recovery, an intervention) cannot know:
    a step's *done* is a lazy write, and a PostgreSQL crash can lose several,
    so steps the log shows pending may have run. Every pending step is then
    counted as failed and compensated, in reverse order as always; for one
    that never ran the Compensate is a recorded no-op, which also refuses its
    late Execute.

    That includes the pivot. A lagging log can show the cursor before the
    pivot — so the deadline or exhausted rounds may turn the saga back — when
    the pivot did run. No caller was told it completed (COMPLETED is a durable
    write, which would have flushed the lost ones), and the pivot's Compensate
    goes out first, before any earlier step is undone: a pivot that never ran
    acknowledges it as a no-op and the rest is compensated; a pivot whose
    effect is final (a confirmed order) is refused with FAILED_PRECONDITION
    and the saga parks at once with nothing undone, for a person. Either the
    saga ends compensated with every effect undone, or it waits for a person;
    never compensated around an effect that stays.

    The engine never calls this for an unknown outcome at the pivot (see
    :func:`forward_verdict`); at the pivot it turns back only on the pivot's
    refusal (the pivot then stays *refused*, owed nothing) or on a person's
    AbortSaga.
    """
    cursor = next_forward(saga.steps)
    if cursor is not None:
        for i in range(cursor, len(saga.steps)):
            step = saga.steps[i]
            if step.state is not StepState.PENDING:
                continue
            if i == cursor:
                step.state = StepState.FAILED
                step.reason = step.reason or "outcome unknown when the saga turned back"
            elif saga.may_lag:
                step.state = StepState.FAILED
                step.reason = step.reason or "may have run: the log read back may lag"
            else:
                step.state = StepState.SKIPPED
    saga.state = State.COMPENSATING
    saga.direction = Direction.BACKWARD
    saga.reason = saga.reason or reason
    saga.parked_reason = ""
    saga.attempts = 0


def effects_stand(saga: Saga, index: int) -> bool:
    """Whether a *final* refusal to compensate step ``index`` means the saga must complete.

    Only the pivot's: a participant refuses to undo it only when it ran and its
    effect is final, it was only sent once every step before it was done, and
    the reverse order compensates it first, so none of those was undone yet.
    """
    return index == len(saga.steps) - 1 and all(
        step.state in OWES_COMPENSATION for step in saga.steps[:index]
    )


def complete_past_pivot(saga: Saga, why: str) -> None:
    """Turn a saga whose pivot's effect stands forward again: every step is done."""
    for step in saga.steps:
        step.state, step.reason = StepState.DONE, ""
    turned_back = saga.reason
    saga.state = State.RUNNING
    saga.direction = Direction.FORWARD
    saga.reason = f"{why}; it completes" + (
        f" (it had turned back: {turned_back})" if turned_back else ""
    )
    saga.parked_reason = ""
    saga.attempts = 0


def backward_verdict(attempts: int, max_attempts: int, *, definitive: bool) -> Verdict:
    """After a compensation round ended on a step that did not acknowledge.

    A compensation is never given up silently: it is retried for
    ``recovery.maxAttempts`` rounds, then parked. An answer no retry can
    change (the participant refuses the request) parks at once.
    """
    if definitive or attempts >= max_attempts:
        return Verdict.PARK
    return Verdict.RETRY


# -- either direction -----------------------------------------------------


def park(saga: Saga, reason: str) -> None:
    saga.state = State.NEEDS_INTERVENTION
    saga.parked_reason = reason


def driving_state(direction: Direction) -> State:
    return State.RUNNING if direction is Direction.FORWARD else State.COMPENSATING


def cursor(saga: Saga) -> int:
    """The step the saga is at: next to run (forward), next to compensate (backward), else -1."""
    if saga.direction is Direction.FORWARD:
        index = next_forward(saga.steps)
        return len(saga.steps) if index is None else index
    plan = compensation_plan(saga.steps)
    return plan[0] if plan else -1


def finish_state(saga: Saga) -> State | None:
    """The final state the saga has reached in its direction, or None while work is left."""
    if saga.direction is Direction.FORWARD:
        return State.COMPLETED if next_forward(saga.steps) is None else None
    return State.COMPENSATED if not compensation_plan(saga.steps) else None


# -- interventions --------------------------------------------------------


def retry(saga: Saga) -> None:
    """RetrySaga: a parked saga goes back to driving in its direction, with fresh attempts."""
    if saga.state is not State.NEEDS_INTERVENTION:
        raise FailedPrecondition(
            f"saga {saga.gid} is {saga.state.value}; only NEEDS_INTERVENTION can be retried"
        )
    saga.state = driving_state(saga.direction)
    saga.parked_reason = ""
    saga.attempts = 0


def abort(saga: Saga, reason: str) -> bool:
    """AbortSaga: turn a forward saga back; False when it is compensating already."""
    if saga.state.finished:
        raise FailedPrecondition(f"saga {saga.gid} is already {saga.state.value}")
    if saga.direction is Direction.BACKWARD:
        return False  # COMPENSATING, or parked while compensating: on its way back already
    begin_compensation(saga, reason)
    return True


def tombstone(gid: str, reason: str) -> Saga:
    """What AbortSaga of an unknown gid records: a late RunSaga of it finds it compensated."""
    return Saga(gid, State.COMPENSATED, [], Direction.BACKWARD, reason=reason)


# -- the shared Transaction view -------------------------------------------

STATE_TO_PROTO = {
    State.RUNNING: transactions_pb2.TRANSACTION_STATE_RUNNING,
    State.COMPENSATING: transactions_pb2.TRANSACTION_STATE_COMPENSATING,
    State.COMPLETED: transactions_pb2.TRANSACTION_STATE_COMPLETED,
    State.COMPENSATED: transactions_pb2.TRANSACTION_STATE_COMPENSATED,
    State.NEEDS_INTERVENTION: transactions_pb2.TRANSACTION_STATE_NEEDS_INTERVENTION,
}
PROTO_TO_STATE = {v: k for k, v in STATE_TO_PROTO.items()}


def outcome_of(state: State) -> transactions_pb2.Outcome.ValueType:
    if state is State.COMPLETED:
        return transactions_pb2.OUTCOME_COMMITTED
    if state is State.COMPENSATED:
        return transactions_pb2.OUTCOME_ABORTED
    return transactions_pb2.OUTCOME_PENDING


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def to_proto(saga: Saga, attempts: Sequence[Attempt] = ()) -> transactions_pb2.Transaction:
    message = transactions_pb2.Transaction(
        gid=saga.gid,
        protocol=common_pb2.PROTOCOL_SAGA,
        state=STATE_TO_PROTO[saga.state],
        outcome=outcome_of(saga.state),
        reason=saga.shown_reason,
        attempts=saga.attempts,
    )
    for name in ("created_at", "updated_at", "deadline"):
        stamp = _timestamp(saga.extra.get(name))
        if stamp is not None:
            getattr(message, name).CopyFrom(stamp)
    for step in saga.steps:
        status = message.branches.add(
            branch=step.step,
            participant=step.participant,
            state=step.state.value,
            reason=step.reason,
        )
        for attempt in attempts:
            if attempt.branch != step.step:
                continue
            item = status.attempts.add(
                action=attempt.action,
                attempt=attempt.attempt,
                result=attempt.result,
                detail=attempt.detail,
            )
            stamp = _timestamp(attempt.at)
            if stamp is not None:
                item.at.CopyFrom(stamp)
    return message
