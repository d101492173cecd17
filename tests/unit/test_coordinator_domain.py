"""The coordinator's pure rules: validation, the decision, what phase two owes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dtx.v1 import participant_pb2, transactions_pb2
from dtx_coordinator.domain import (
    BranchRecord,
    BranchState,
    Decision,
    State,
    decide,
    delegate_to_caller,
    outcome_of,
    owes_phase_two,
    validate_request,
)
from dtx_runtime.errors import InvalidArgument
from dtx_runtime.identifiers import InvalidIdentifier

pytestmark = pytest.mark.unit

KNOWN = ["orders", "payments", "inventory"]


def branch(name: str, participant: str = "payments") -> transactions_pb2.Branch:
    return transactions_pb2.Branch(
        branch=name,
        participant=participant,
        operation=participant_pb2.BranchOperation(
            charge=participant_pb2.ChargeOperation(account_id="a", amount_minor=1)
        ),
    )


def test_a_valid_request_passes() -> None:
    validate_request("g-1", [branch("payment"), branch("stock", "inventory")], KNOWN)


@pytest.mark.parametrize(
    ("gid", "branches", "message"),
    [
        ("g 1", [branch("a")], "gid"),
        ("x" * 101, [branch("a")], "gid"),
        ("g\n", [branch("a")], "gid"),  # `$` would let a trailing newline through
        ("g", [], "branches: a transaction needs at least one branch"),
        ("g", [branch(f"b{i}") for i in range(17)], "branches: at most 16"),
        ("g", [branch("a"), branch("a")], "branches[1].branch: 'a' appears twice"),
        ("g", [branch("Bad")], "branches[0].branch"),
        ("g", [branch("a\n")], "branches[0].branch"),
        ("g", [branch("a", "bank")], "branches[0].participant: unknown participant 'bank'"),
        ("g", [transactions_pb2.Branch(branch="a", participant="orders")], "branches[0].operation"),
    ],
)
def test_malformed_requests_name_the_field(
    gid: str, branches: list[transactions_pb2.Branch], message: str
) -> None:
    with pytest.raises((InvalidArgument, InvalidIdentifier), match=None) as caught:
        validate_request(gid, branches, KNOWN)
    assert message in str(caught.value)


def record(state: BranchState, reason: str = "", name: str = "b") -> BranchRecord:
    return BranchRecord(name, "payments", b"", state, reason)


def test_commit_only_when_every_branch_voted_yes() -> None:
    assert decide([record(BranchState.PREPARED), record(BranchState.PREPARED)]) == (
        Decision.COMMIT,
        "",
    )


def test_a_no_vote_aborts_with_its_reason_even_after_a_failure() -> None:
    decision, reason = decide(
        [
            record(BranchState.FAILED, "prepare failed: UNAVAILABLE", "stock"),
            record(BranchState.NO, "insufficient funds", "payment"),
        ]
    )
    assert decision is Decision.ABORT
    assert reason == "payment: insufficient funds"


branch_states = st.sampled_from(
    [BranchState.PENDING, BranchState.PREPARED, BranchState.NO, BranchState.FAILED]
)


@given(st.lists(branch_states, min_size=1, max_size=16))
def test_decision_is_commit_iff_all_prepared(states: list[BranchState]) -> None:
    decision, _ = decide([record(s, name=f"b{i}") for i, s in enumerate(states)])
    assert (decision is Decision.COMMIT) == all(s is BranchState.PREPARED for s in states)


@given(st.lists(branch_states, min_size=1, max_size=16))
def test_abort_reaches_every_branch_that_may_hold_a_prepared_transaction(
    states: list[BranchState],
) -> None:
    records = [record(s, name=f"b{i}") for i, s in enumerate(states)]
    owed = {r.branch for r in records if owes_phase_two(r, Decision.ABORT)}
    # Only a "no" vote proves nothing is held.
    assert owed == {r.branch for r in records if r.state is not BranchState.NO}


def test_a_read_only_branch_votes_yes_and_owes_no_phase_two() -> None:
    branches = [record(BranchState.PREPARED, name="a"), record(BranchState.READ_ONLY, name="b")]
    assert decide(branches) == (Decision.COMMIT, "")
    assert not owes_phase_two(branches[1], Decision.COMMIT)
    assert not owes_phase_two(branches[1], Decision.ABORT)


def test_commit_goes_to_prepared_branches_only() -> None:
    assert owes_phase_two(record(BranchState.PREPARED), Decision.COMMIT)
    assert not owes_phase_two(record(BranchState.COMMITTED), Decision.COMMIT)
    assert not owes_phase_two(record(BranchState.ABORTED), Decision.ABORT)


def test_presumed_abort_outcomes() -> None:
    assert outcome_of(State.PREPARING, None) == transactions_pb2.OUTCOME_PENDING
    assert outcome_of(State.COMMITTING, Decision.COMMIT) == transactions_pb2.OUTCOME_COMMITTED
    assert (
        outcome_of(State.NEEDS_INTERVENTION, Decision.COMMIT) == transactions_pb2.OUTCOME_COMMITTED
    )
    assert outcome_of(State.ABORTED, Decision.ABORT) == transactions_pb2.OUTCOME_ABORTED
    # Parked before any decision: nothing was logged, so abort.
    assert outcome_of(State.NEEDS_INTERVENTION, None) == transactions_pb2.OUTCOME_ABORTED


def test_branch_records_round_trip_through_the_log_json() -> None:
    original = BranchRecord("payment", "payments", b"\x00\x01op", BranchState.NO, "why", 3)
    assert BranchRecord.from_json(original.to_json()) == original


def own(name: str = "order") -> transactions_pb2.Branch:
    mine = branch(name, "orders")
    mine.prepared_by_caller = True
    return mine


def test_the_callers_own_branch_is_logged_prepared_and_at_most_one() -> None:
    validate_request("g", [own(), branch("payment")], KNOWN)
    record = BranchRecord.of_request(own())
    assert (record.state, record.by_caller) == (BranchState.PREPARED, True)
    assert BranchRecord.of_request(branch("payment")).state is BranchState.PENDING
    with pytest.raises(InvalidArgument, match=r"branches\[1\]\.prepared_by_caller: at most one"):
        validate_request("g", [own("a"), own("b")], KNOWN)


def test_a_delegated_branch_owes_the_coordinator_no_phase_two() -> None:
    records = [BranchRecord.of_request(own()), BranchRecord.of_request(branch("payment"))]
    records[1].state = BranchState.PREPARED
    assert decide(records) == (Decision.COMMIT, "")
    delegate_to_caller(records)
    assert [r.state for r in records] == [BranchState.DELEGATED, BranchState.PREPARED]
    for decision in Decision:
        assert not owes_phase_two(records[0], decision)
    assert owes_phase_two(records[1], Decision.COMMIT)
    # A log row written before delegation is driven by recovery like any branch.
    logged = BranchRecord.from_json(BranchRecord.of_request(own()).to_json())
    assert logged.by_caller
    assert owes_phase_two(logged, Decision.COMMIT)
    assert owes_phase_two(logged, Decision.ABORT)


def test_log_rows_from_before_the_caller_flag_read_as_not_the_callers() -> None:
    data = BranchRecord("payment", "payments", b"op").to_json()
    del data["by_caller"]
    assert BranchRecord.from_json(data).by_caller is False
