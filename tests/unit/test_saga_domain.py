"""The orchestrator's pure rules: validation, what to compensate and in which order, verdicts,
interventions and the Transaction view."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dtx.v1 import common_pb2, participant_pb2, transactions_pb2
from dtx_runtime.coordination.records import Attempt
from dtx_runtime.errors import FailedPrecondition, InvalidArgument
from dtx_runtime.identifiers import InvalidIdentifier
from dtx_runtime.policy import OnExhausted
from dtx_saga.domain import (
    MAX_STEPS,
    OWES_COMPENSATION,
    Direction,
    Saga,
    State,
    StepRecord,
    StepState,
    Verdict,
    abort,
    at_pivot,
    backward_verdict,
    begin_compensation,
    compensation_plan,
    complete_past_pivot,
    cursor,
    effects_stand,
    finish_state,
    forward_verdict,
    next_forward,
    outcome_of,
    park,
    records_of,
    retry,
    to_proto,
    tombstone,
    validate_steps,
)

pytestmark = pytest.mark.unit

KNOWN = ["orders", "payments", "inventory"]


def step(name: str, participant: str = "payments") -> transactions_pb2.Branch:
    return transactions_pb2.Branch(
        branch=name,
        participant=participant,
        operation=participant_pb2.BranchOperation(
            charge=participant_pb2.ChargeOperation(account_id="a", amount_minor=1)
        ),
    )


def saga_of(*states: StepState, state: State = State.RUNNING) -> Saga:
    steps = [StepRecord(f"s{i}", "payments", b"", s) for i, s in enumerate(states)]
    return Saga("g", state, steps)


# -- validation -------------------------------------------------------------


def _own(branch: transactions_pb2.Branch) -> transactions_pb2.Branch:
    branch.prepared_by_caller = True
    return branch


def test_a_valid_request_passes() -> None:
    validate_steps("g-1", [step("charge"), step("reserve", "inventory")], KNOWN)


@pytest.mark.parametrize(
    ("gid", "steps", "message"),
    [
        ("g 1", [step("a")], "gid"),
        ("x" * 101, [step("a")], "gid"),
        ("g", [], "steps: a saga needs at least one step"),
        ("g", [step(f"b{i}") for i in range(MAX_STEPS + 1)], "steps: at most 16"),
        ("g", [step("a"), step("a")], "steps[1].branch: 'a' appears twice"),
        ("g", [step("Bad")], "steps[0].branch"),
        ("g", [step("a", "bank")], "steps[0].participant: unknown participant 'bank'"),
        ("g", [transactions_pb2.Branch(branch="a", participant="orders")], "steps[0].operation"),
        ("g", [_own(step("a"))], "steps[0].prepared_by_caller: only a two-phase-commit branch"),
    ],
)
def test_malformed_requests_name_the_field(
    gid: str, steps: list[transactions_pb2.Branch], message: str
) -> None:
    with pytest.raises((InvalidArgument, InvalidIdentifier)) as caught:
        validate_steps(gid, steps, KNOWN)
    assert message in str(caught.value)


def test_sixteen_steps_are_allowed() -> None:
    validate_steps("g", [step(f"b{i}") for i in range(MAX_STEPS)], KNOWN)


def test_records_keep_the_order_and_the_operation() -> None:
    records = records_of([step("one"), step("two", "inventory")])
    assert [(r.step, r.participant, r.state) for r in records] == [
        ("one", "payments", StepState.PENDING),
        ("two", "inventory", StepState.PENDING),
    ]
    operation = participant_pb2.BranchOperation.FromString(records[0].operation)
    assert operation.charge.amount_minor == 1


# -- forward ----------------------------------------------------------------


def test_forward_runs_the_first_step_not_done() -> None:
    assert next_forward(saga_of(StepState.DONE, StepState.FAILED, StepState.PENDING).steps) == 1
    assert next_forward(saga_of(StepState.DONE, StepState.DONE).steps) is None
    assert next_forward(saga_of(StepState.PENDING).steps) == 0


@pytest.mark.parametrize(
    ("attempts", "on_exhausted", "late", "verdict"),
    [
        (1, OnExhausted.PARK, False, Verdict.RETRY),
        (2, OnExhausted.ABORT, False, Verdict.RETRY),
        (3, OnExhausted.ABORT, False, Verdict.COMPENSATE),
        (3, OnExhausted.PARK, False, Verdict.PARK),
        (9, OnExhausted.PARK, False, Verdict.PARK),
        # Before the pivot, the deadline turns a saga back whatever the policy says.
        (1, OnExhausted.PARK, True, Verdict.COMPENSATE),
        (3, OnExhausted.PARK, True, Verdict.COMPENSATE),
    ],
)
def test_forward_verdict_before_the_pivot(
    attempts: int, on_exhausted: OnExhausted, late: bool, verdict: Verdict
) -> None:
    assert forward_verdict(attempts, 3, on_exhausted, deadline_passed=late, pivot=False) is verdict


@pytest.mark.parametrize(
    ("attempts", "on_exhausted", "late", "verdict"),
    [
        (1, OnExhausted.ABORT, False, Verdict.RETRY),
        (2, OnExhausted.PARK, False, Verdict.RETRY),
        # The deadline passed at the pivot: retried, never compensated.
        (1, OnExhausted.ABORT, True, Verdict.RETRY),
        (2, OnExhausted.PARK, True, Verdict.RETRY),
        # Exhausted at the pivot: parked (heading forward) even when the policy says Abort.
        (3, OnExhausted.ABORT, False, Verdict.PARK),
        (3, OnExhausted.ABORT, True, Verdict.PARK),
        (3, OnExhausted.PARK, True, Verdict.PARK),
        (9, OnExhausted.ABORT, True, Verdict.PARK),
    ],
)
def test_forward_verdict_at_the_pivot_never_compensates(
    attempts: int, on_exhausted: OnExhausted, late: bool, verdict: Verdict
) -> None:
    assert forward_verdict(attempts, 3, on_exhausted, deadline_passed=late, pivot=True) is verdict


@given(
    st.integers(1, 1000),
    st.integers(1, 1000),
    st.sampled_from(list(OnExhausted)),
    st.booleans(),
)
def test_no_verdict_at_the_pivot_turns_the_saga_back(
    attempts: int, max_attempts: int, on_exhausted: OnExhausted, late: bool
) -> None:
    verdict = forward_verdict(
        attempts, max_attempts, on_exhausted, deadline_passed=late, pivot=True
    )
    assert verdict is (Verdict.RETRY if attempts < max_attempts else Verdict.PARK)


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        # The cursor at the last step with everything before it done: the pivot.
        ((StepState.DONE, StepState.DONE, StepState.PENDING), True),
        ((StepState.DONE, StepState.DONE, StepState.FAILED), True),
        ((StepState.PENDING,), True),  # one step: the pivot from the start
        ((StepState.FAILED,), True),
        # Before it: a compensatable step still to run (or of unknown outcome).
        ((StepState.DONE, StepState.PENDING, StepState.PENDING), False),
        ((StepState.DONE, StepState.FAILED, StepState.PENDING), False),
        ((StepState.PENDING, StepState.PENDING), False),
        # Past it: all done (completed), or turned back.
        ((StepState.DONE, StepState.DONE), False),
        ((StepState.DONE, StepState.REFUSED, StepState.SKIPPED), False),
        ((StepState.COMPENSATED, StepState.REFUSED), False),
    ],
)
def test_at_pivot(states: tuple[StepState, ...], expected: bool) -> None:
    assert at_pivot(saga_of(*states).steps) is expected


def test_a_refusal_at_the_pivot_compensates_the_earlier_steps_only() -> None:
    saga = saga_of(StepState.DONE, StepState.DONE, StepState.REFUSED)
    saga.steps[2].reason = "order is REJECTED, not PENDING"
    assert at_pivot(saga.steps)  # the cursor is at the refused pivot
    begin_compensation(saga, "s2: order is REJECTED, not PENDING")
    assert [s.state for s in saga.steps] == [StepState.DONE, StepState.DONE, StepState.REFUSED]
    assert compensation_plan(saga.steps) == [1, 0]
    assert saga.reason == "s2: order is REJECTED, not PENDING"


# -- compensation -----------------------------------------------------------


def test_refusal_at_step_two_compensates_step_one_only() -> None:
    saga = saga_of(StepState.DONE, StepState.REFUSED, StepState.PENDING)
    saga.steps[1].reason = "insufficient funds"
    begin_compensation(saga, "s1: insufficient funds")
    assert saga.state is State.COMPENSATING
    assert saga.direction is Direction.BACKWARD
    assert [s.state for s in saga.steps] == [StepState.DONE, StepState.REFUSED, StepState.SKIPPED]
    assert compensation_plan(saga.steps) == [0]
    assert saga.reason == "s1: insufficient funds"


def test_a_step_with_unknown_outcome_is_compensated_too() -> None:
    saga = saga_of(StepState.DONE, StepState.DONE, StepState.FAILED, StepState.PENDING)
    begin_compensation(saga, "s2: execute failed: UNAVAILABLE")
    assert compensation_plan(saga.steps) == [2, 1, 0]
    assert saga.steps[3].state is StepState.SKIPPED


def test_a_pending_step_at_the_cursor_may_have_run_and_is_compensated() -> None:
    # A driver died (or an abort came) while the call for s1 was in flight.
    saga = saga_of(StepState.DONE, StepState.PENDING, StepState.PENDING)
    begin_compensation(saga, "s1: the saga's deadline passed")
    assert [s.state for s in saga.steps] == [StepState.DONE, StepState.FAILED, StepState.SKIPPED]
    assert saga.steps[1].reason
    assert compensation_plan(saga.steps) == [1, 0]


def test_the_first_failure_stays_the_reason() -> None:
    saga = saga_of(StepState.DONE, StepState.REFUSED)
    saga.reason = "s1: out of stock"
    begin_compensation(saga, "aborted by ops: later")
    assert saga.reason == "s1: out of stock"


def test_turning_back_resets_the_rounds() -> None:
    saga = saga_of(StepState.DONE, StepState.FAILED)
    saga.attempts = 5
    begin_compensation(saga, "s1: x")
    assert saga.attempts == 0


@pytest.mark.parametrize(
    ("attempts", "definitive", "verdict"),
    [
        (1, False, Verdict.RETRY),
        (2, False, Verdict.RETRY),
        (3, False, Verdict.PARK),
        (1, True, Verdict.PARK),
    ],
)
def test_a_compensation_that_keeps_failing_is_parked(
    attempts: int, definitive: bool, verdict: Verdict
) -> None:
    assert backward_verdict(attempts, 3, definitive=definitive) is verdict


OUTCOMES = st.lists(st.sampled_from(["done", "refused", "failed"]), min_size=1, max_size=MAX_STEPS)


def run_forward(saga: Saga, outcomes: list[str]) -> list[int]:
    """Give the steps these answers until the first that is not "done"; the steps that ran."""
    ran: list[int] = []
    for i, outcome in enumerate(outcomes):
        saga.steps[i].state = StepState(outcome)
        ran.append(i)
        if outcome != "done":
            break
    return ran


@given(OUTCOMES)
def test_compensation_covers_exactly_the_done_and_unknown_steps_in_reverse(
    outcomes: list[str],
) -> None:
    """Run the saga forward with these answers until the first one that is not "done"."""
    saga = saga_of(*[StepState.PENDING] * len(outcomes))
    ran = run_forward(saga, outcomes)
    if next_forward(saga.steps) is None:
        assert finish_state(saga) is State.COMPLETED
        return
    begin_compensation(saga, "cause")
    failed_at = ran[-1]
    expected = [i for i in reversed(ran) if outcomes[i] in ("done", "failed")]
    assert compensation_plan(saga.steps) == expected
    assert failed_at not in expected or outcomes[failed_at] == "failed"
    assert all(s.state is StepState.SKIPPED for s in saga.steps[failed_at + 1 :])
    assert finish_state(saga) is None or expected == []


STATES = st.lists(st.sampled_from(list(StepState)), max_size=MAX_STEPS)


@given(STATES)
def test_the_plan_is_the_owing_steps_strictly_in_reverse(states: list[StepState]) -> None:
    steps = saga_of(*states).steps
    plan = compensation_plan(steps)
    assert sorted(plan, reverse=True) == plan
    assert len(set(plan)) == len(plan)
    assert set(plan) == {i for i, s in enumerate(states) if s in OWES_COMPENSATION}


@given(STATES)
def test_compensating_along_the_plan_ends_compensated(states: list[StepState]) -> None:
    saga = saga_of(*states)
    begin_compensation(saga, "cause")
    plan = compensation_plan(saga.steps)
    for done, index in enumerate(plan):
        # A crash after each step: what is left is the rest of the same plan.
        assert compensation_plan(saga.steps) == plan[done:]
        saga.steps[index].state = StepState.COMPENSATED
    assert finish_state(saga) is State.COMPENSATED
    assert cursor(saga) == -1


@given(
    st.builds(
        StepRecord,
        step=st.from_regex(r"[a-z0-9_-]{1,40}", fullmatch=True),
        participant=st.sampled_from(KNOWN),
        operation=st.binary(max_size=64),
        state=st.sampled_from(list(StepState)),
        reason=st.text(max_size=50),
        attempts=st.integers(0, 1000),
    )
)
def test_step_records_survive_the_log(record: StepRecord) -> None:
    assert StepRecord.from_json(record.to_json()) == record


# -- a log that may lag (a saga read back from it) ----------------------------


def lagging(*states: StepState) -> Saga:
    """A saga as storage reads it back: lazy saves lost in a crash may hide steps that ran."""
    saga = saga_of(*states)
    saga.may_lag = True
    return saga


def test_a_saga_driven_from_memory_is_exact_by_default() -> None:
    assert not saga_of(StepState.PENDING).may_lag


@pytest.mark.parametrize(
    ("may_lag", "after", "plan"),
    [
        # Inline: the steps after the cursor were never sent; no call for them.
        (False, [StepState.FAILED, StepState.SKIPPED, StepState.SKIPPED], [1, 0]),
        # From the log: any of them may have run; all are owed a Compensate, last first.
        (True, [StepState.FAILED, StepState.FAILED, StepState.FAILED], [3, 2, 1, 0]),
    ],
)
def test_pending_steps_after_the_cursor_by_mode(
    may_lag: bool, after: list[StepState], plan: list[int]
) -> None:
    saga = saga_of(StepState.DONE, StepState.PENDING, StepState.PENDING, StepState.PENDING)
    saga.may_lag = may_lag
    begin_compensation(saga, "s1: the saga's deadline passed")
    assert [s.state for s in saga.steps] == [StepState.DONE, *after]
    assert compensation_plan(saga.steps) == plan
    assert all(s.reason for s in saga.steps[1:] if s.state is StepState.FAILED)
    assert (saga.state, saga.direction) == (State.COMPENSATING, Direction.BACKWARD)


@pytest.mark.parametrize(
    ("may_lag", "last", "plan"),
    [(False, StepState.SKIPPED, [0]), (True, StepState.FAILED, [2, 0])],
)
def test_a_refusal_at_the_cursor_leaves_the_refused_step_out_in_both_modes(
    may_lag: bool, last: StepState, plan: list[int]
) -> None:
    saga = saga_of(StepState.DONE, StepState.REFUSED, StepState.PENDING)
    saga.may_lag = may_lag
    begin_compensation(saga, "s1: insufficient funds")
    assert [s.state for s in saga.steps] == [StepState.DONE, StepState.REFUSED, last]
    assert compensation_plan(saga.steps) == plan


def test_a_lagging_log_before_the_pivot_asks_the_pivot_first() -> None:
    # The log shows the cursor at s1, the pivot (s2) possibly run: its Compensate
    # goes out before anything is undone, so a final pivot leaves the saga untouched.
    saga = lagging(StepState.DONE, StepState.PENDING, StepState.PENDING)
    assert not at_pivot(saga.steps)
    begin_compensation(saga, "s1: the saga's deadline passed")
    assert compensation_plan(saga.steps) == [2, 1, 0]
    assert cursor(saga) == 2


def test_a_lagging_log_at_the_pivot_changes_nothing() -> None:
    # Nothing follows the pivot: a person's abort there owes the same in both modes.
    exact = saga_of(StepState.DONE, StepState.DONE, StepState.PENDING)
    from_log = lagging(StepState.DONE, StepState.DONE, StepState.PENDING)
    for saga in (exact, from_log):
        assert abort(saga, "aborted by ops: x")
        assert compensation_plan(saga.steps) == [2, 1, 0]
    assert [s.state for s in exact.steps] == [s.state for s in from_log.steps]


def test_abort_of_a_saga_read_from_the_log_compensates_every_pending_step() -> None:
    saga = lagging(StepState.DONE, StepState.FAILED, StepState.PENDING, StepState.PENDING)
    assert abort(saga, "aborted by ops: stuck")
    assert compensation_plan(saga.steps) == [3, 2, 1, 0]
    assert StepState.SKIPPED not in [s.state for s in saga.steps]


@given(OUTCOMES, st.integers(0, MAX_STEPS))
def test_a_lagging_log_compensates_every_step_that_may_have_run(
    outcomes: list[str], hidden: int
) -> None:
    """Run forward with these answers; the log then lost the last ``hidden`` steps' results."""
    saga = lagging(*[StepState.PENDING] * len(outcomes))
    ran = run_forward(saga, outcomes)
    truth = [s.state for s in saga.steps]
    for i in ran[len(ran) - min(hidden, len(ran)) :]:
        saga.steps[i].state = StepState.PENDING  # a lost lazy save
    if next_forward(saga.steps) is None:
        return  # nothing lost and all done: it completes, nothing to compensate
    begin_compensation(saga, "cause")
    plan = compensation_plan(saga.steps)
    assert sorted(plan, reverse=True) == plan
    # Whatever ran with an effect (done, or unknown) is compensated.
    assert {i for i in ran if truth[i] in OWES_COMPENSATION} <= set(plan)
    assert StepState.SKIPPED not in [s.state for s in saga.steps]


# -- final states and the cursor --------------------------------------------


def test_final_states() -> None:
    assert finish_state(saga_of(StepState.DONE, StepState.DONE)) is State.COMPLETED
    assert finish_state(saga_of(StepState.DONE, StepState.PENDING)) is None
    backward = saga_of(StepState.COMPENSATED, StepState.REFUSED, StepState.SKIPPED)
    backward.direction = Direction.BACKWARD
    assert finish_state(backward) is State.COMPENSATED
    backward.steps[0].state = StepState.DONE
    assert finish_state(backward) is None
    assert State.COMPLETED.finished
    assert State.COMPENSATED.finished
    assert not State.NEEDS_INTERVENTION.finished


def test_cursor_in_both_directions() -> None:
    saga = saga_of(StepState.DONE, StepState.PENDING, StepState.PENDING)
    assert cursor(saga) == 1
    begin_compensation(saga, "x")
    assert cursor(saga) == 1
    saga.steps[1].state = StepState.COMPENSATED
    assert cursor(saga) == 0
    assert cursor(saga_of(StepState.DONE)) == 1


# -- interventions ----------------------------------------------------------


def test_retry_reopens_a_parked_saga_in_its_direction() -> None:
    forward = saga_of(StepState.DONE, StepState.FAILED)
    forward.attempts = 3
    park(forward, "s1: execute failed (after 3 rounds)")
    assert forward.state is State.NEEDS_INTERVENTION
    retry(forward)
    assert (forward.state, forward.attempts, forward.parked_reason) == (State.RUNNING, 0, "")

    backward = saga_of(StepState.DONE, StepState.REFUSED)
    begin_compensation(backward, "s1: no")
    park(backward, "s0: compensate failed")
    retry(backward)
    assert backward.state is State.COMPENSATING
    assert backward.reason == "s1: no"


@pytest.mark.parametrize("state", [State.RUNNING, State.COMPENSATING, State.COMPLETED])
def test_only_a_parked_saga_can_be_retried(state: State) -> None:
    with pytest.raises(FailedPrecondition, match="only NEEDS_INTERVENTION"):
        retry(saga_of(StepState.DONE, state=state))


def test_abort_turns_a_running_or_forward_parked_saga_back() -> None:
    running = saga_of(StepState.DONE, StepState.PENDING)
    assert abort(running, "aborted by ops: stuck")
    assert running.state is State.COMPENSATING
    assert compensation_plan(running.steps) == [1, 0]

    parked = saga_of(StepState.DONE, StepState.FAILED)
    park(parked, "s1: down")
    assert abort(parked, "aborted by ops: give up")
    assert parked.state is State.COMPENSATING
    assert parked.parked_reason == ""
    assert parked.reason == "aborted by ops: give up"


def test_abort_of_a_saga_on_its_way_back_changes_nothing() -> None:
    saga = saga_of(StepState.DONE, StepState.REFUSED)
    begin_compensation(saga, "s1: no")
    assert not abort(saga, "aborted by ops: x")
    park(saga, "s0: compensate failed")
    assert not abort(saga, "aborted by ops: x")
    assert saga.state is State.NEEDS_INTERVENTION


@pytest.mark.parametrize("state", [State.COMPLETED, State.COMPENSATED])
def test_abort_of_a_finished_saga_is_refused(state: State) -> None:
    with pytest.raises(FailedPrecondition, match="already"):
        abort(saga_of(StepState.DONE, state=state), "aborted by ops: x")


def test_a_tombstone_is_compensated_with_no_steps() -> None:
    dead = tombstone("g-9", "aborted by reconciler: never started")
    assert (dead.state, dead.steps, dead.direction) == (State.COMPENSATED, [], Direction.BACKWARD)
    assert to_proto(dead).outcome == transactions_pb2.OUTCOME_ABORTED


# -- the Transaction view ---------------------------------------------------


@pytest.mark.parametrize(
    ("state", "proto_state", "outcome"),
    [
        (
            State.RUNNING,
            transactions_pb2.TRANSACTION_STATE_RUNNING,
            transactions_pb2.OUTCOME_PENDING,
        ),
        (
            State.COMPENSATING,
            transactions_pb2.TRANSACTION_STATE_COMPENSATING,
            transactions_pb2.OUTCOME_PENDING,
        ),
        (
            State.COMPLETED,
            transactions_pb2.TRANSACTION_STATE_COMPLETED,
            transactions_pb2.OUTCOME_COMMITTED,
        ),
        (
            State.COMPENSATED,
            transactions_pb2.TRANSACTION_STATE_COMPENSATED,
            transactions_pb2.OUTCOME_ABORTED,
        ),
        (
            State.NEEDS_INTERVENTION,
            transactions_pb2.TRANSACTION_STATE_NEEDS_INTERVENTION,
            transactions_pb2.OUTCOME_PENDING,
        ),
    ],
)
def test_proto_states_and_outcomes(
    state: State,
    proto_state: transactions_pb2.TransactionState.ValueType,
    outcome: transactions_pb2.Outcome.ValueType,
) -> None:
    message = to_proto(saga_of(StepState.DONE, state=state))
    assert message.protocol == common_pb2.PROTOCOL_SAGA
    assert message.state == proto_state
    assert message.outcome == outcome == outcome_of(state)


def test_proto_has_the_steps_with_their_attempts_and_times() -> None:
    at = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    saga = saga_of(StepState.COMPENSATED, StepState.REFUSED, StepState.SKIPPED)
    saga.state, saga.reason, saga.attempts = State.COMPENSATED, "s1: insufficient funds", 1
    saga.steps[1].reason = "insufficient funds"
    saga.steps[1].attempts = 2
    saga.extra = {"created_at": at, "updated_at": at, "deadline": at}
    attempts = [
        Attempt("g", "s1", "execute", 1, "error", "UNAVAILABLE: down", at),
        Attempt("g", "s1", "execute", 2, "no", "insufficient funds", at),
        Attempt("g", "s0", "compensate", 2, "error", "DEADLINE_EXCEEDED: slow", None),
    ]
    message = to_proto(saga, attempts)
    assert message.gid == "g"
    assert message.reason == "s1: insufficient funds"
    assert message.attempts == 1
    assert message.created_at.ToDatetime(tzinfo=UTC) == at
    assert message.deadline.ToDatetime(tzinfo=UTC) == at
    assert [(b.branch, b.state, b.reason) for b in message.branches] == [
        ("s0", "compensated", ""),
        ("s1", "refused", "insufficient funds"),
        ("s2", "skipped", ""),
    ]
    assert [(a.action, a.attempt, a.result) for a in message.branches[1].attempts] == [
        ("execute", 1, "error"),
        ("execute", 2, "no"),
    ]
    assert message.branches[1].attempts[0].at.ToDatetime(tzinfo=UTC) == at
    assert [a.action for a in message.branches[0].attempts] == ["compensate"]
    assert not message.branches[0].attempts[0].HasField("at")


def test_a_parked_saga_shows_why_it_is_parked() -> None:
    saga = saga_of(StepState.DONE, StepState.REFUSED)
    begin_compensation(saga, "s1: no")
    park(saga, "s0: compensate failed: UNAVAILABLE (after 3 rounds)")
    assert to_proto(saga).reason == "s0: compensate failed: UNAVAILABLE (after 3 rounds)"
    retry(saga)
    assert to_proto(saga).reason == "s1: no"


# -- a pivot whose effect is final -------------------------------------------


def test_a_final_pivot_refused_first_means_the_saga_completes() -> None:
    saga = lagging(StepState.DONE, StepState.PENDING, StepState.PENDING)
    begin_compensation(saga, "s1: the saga's deadline passed")
    assert compensation_plan(saga.steps)[0] == 2
    assert effects_stand(saga, 2)
    complete_past_pivot(saga, "s2: its effect is final (FAILED_PRECONDITION: confirmed)")
    assert (saga.state, saga.direction) == (State.RUNNING, Direction.FORWARD)
    assert [s.state for s in saga.steps] == [StepState.DONE] * 3
    assert next_forward(saga.steps) is None
    assert saga.reason == (
        "s2: its effect is final (FAILED_PRECONDITION: confirmed); it completes"
        " (it had turned back: s1: the saga's deadline passed)"
    )


def test_only_the_pivot_and_only_before_anything_was_undone() -> None:
    saga = saga_of(StepState.DONE, StepState.DONE, StepState.PENDING)
    abort(saga, "aborted by ops: x")
    assert not effects_stand(saga, 1)  # not the pivot: a refusal there parks
    saga.steps[1].state = StepState.COMPENSATED
    assert not effects_stand(saga, 2)  # something was undone: a person must look
