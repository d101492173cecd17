"""The coordinator's rules, free of I/O: validation, the decision, what phase two owes.

Everything here is decided from values, so the protocol's corner cases are
unit-tested without a database or a network.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dtx.v1 import transactions_pb2
from dtx_runtime.errors import InvalidArgument
from dtx_runtime.identifiers import BRANCH_PATTERN, check_gid

MAX_BRANCHES = 16


class State(enum.StrEnum):
    PREPARING = "PREPARING"
    COMMITTING = "COMMITTING"
    ABORTING = "ABORTING"
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"
    NEEDS_INTERVENTION = "NEEDS_INTERVENTION"

    @property
    def finished(self) -> bool:
        return self in (State.COMMITTED, State.ABORTED)


UNFINISHED = (State.PREPARING, State.COMMITTING, State.ABORTING)


class Decision(enum.StrEnum):
    COMMIT = "commit"
    ABORT = "abort"


class BranchState(enum.StrEnum):
    PENDING = "pending"  # prepare not answered (yet)
    PREPARED = "prepared"  # voted yes
    NO = "no"  # voted no: nothing held
    FAILED = "failed"  # prepare failed or timed out: state unknown, must be aborted
    READ_ONLY = "read_only"  # voted yes having changed nothing: owes no phase two
    COMMITTED = "committed"
    ABORTED = "aborted"
    # The caller's own branch (``prepared_by_caller``) once the decision went back
    # to the caller in RunTransaction's answer: the caller applies it, and its
    # reaper asks GetOutcome should it fail to.
    DELEGATED = "delegated"


@dataclass
class BranchRecord:
    """One branch as the log keeps it."""

    branch: str
    participant: str
    operation: bytes
    state: BranchState = BranchState.PENDING
    reason: str = ""
    attempts: int = 0
    by_caller: bool = False  # prepared by the caller before it asked (see the proto)

    def to_json(self) -> dict[str, Any]:
        return {
            "branch": self.branch,
            "participant": self.participant,
            "operation": base64.b64encode(self.operation).decode(),
            "state": self.state.value,
            "reason": self.reason,
            "attempts": self.attempts,
            "by_caller": self.by_caller,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BranchRecord:
        return cls(
            branch=data["branch"],
            participant=data["participant"],
            operation=base64.b64decode(data["operation"]),
            state=BranchState(data["state"]),
            reason=data.get("reason", ""),
            attempts=int(data.get("attempts", 0)),
            by_caller=bool(data.get("by_caller", False)),
        )

    @classmethod
    def of_request(cls, branch: transactions_pb2.Branch) -> BranchRecord:
        """A requested branch as logged; the caller's own is prepared already."""
        return cls(
            branch.branch,
            branch.participant,
            branch.operation.SerializeToString(),
            state=BranchState.PREPARED if branch.prepared_by_caller else BranchState.PENDING,
            by_caller=branch.prepared_by_caller,
        )


@dataclass
class GlobalTransaction:
    gid: str
    state: State
    decision: Decision | None
    branches: list[BranchRecord]
    reason: str = ""
    attempts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def validate_request(
    gid: str, branches: Sequence[transactions_pb2.Branch], known: Iterable[str]
) -> None:
    """Refuse a malformed RunTransaction before anything is logged."""
    check_gid(gid)
    if not branches:
        raise InvalidArgument("branches: a transaction needs at least one branch")
    if len(branches) > MAX_BRANCHES:
        raise InvalidArgument(f"branches: at most {MAX_BRANCHES} branches")
    participants = set(known)
    seen: set[str] = set()
    by_caller = 0
    for i, branch in enumerate(branches):
        by_caller += branch.prepared_by_caller
        if by_caller > 1:
            raise InvalidArgument(
                f"branches[{i}].prepared_by_caller: at most one branch, the caller's own"
            )
        if not BRANCH_PATTERN.match(branch.branch):
            raise InvalidArgument(
                f"branches[{i}].branch: {branch.branch!r} must match [a-z0-9_-]{{1,40}}"
            )
        if branch.branch in seen:
            raise InvalidArgument(f"branches[{i}].branch: {branch.branch!r} appears twice")
        seen.add(branch.branch)
        if branch.participant not in participants:
            raise InvalidArgument(
                f"branches[{i}].participant: unknown participant {branch.participant!r}"
                f" (known: {', '.join(sorted(participants)) or 'none'})"
            )
        if not branch.operation.WhichOneof("kind"):
            raise InvalidArgument(f"branches[{i}].operation: no operation given")


def decide(branches: Sequence[BranchRecord]) -> tuple[Decision, str]:
    """Commit only when every branch voted yes (or read-only); else abort, naming the first cause."""
    for branch in branches:
        if branch.state is BranchState.NO:
            return Decision.ABORT, f"{branch.branch}: {branch.reason}"
    for branch in branches:
        if branch.state not in (BranchState.PREPARED, BranchState.READ_ONLY):
            return Decision.ABORT, f"{branch.branch}: {branch.reason or 'did not prepare'}"
    return Decision.COMMIT, ""


def owes_phase_two(branch: BranchRecord, decision: Decision) -> bool:
    """Which branches still need a Commit or an Abort."""
    if decision is Decision.COMMIT:
        return branch.state is BranchState.PREPARED
    # A branch that voted no holds nothing. Any other may hold a prepared
    # transaction (even one whose prepare "failed": the reply may have been lost).
    return branch.state in (BranchState.PENDING, BranchState.PREPARED, BranchState.FAILED)


def delegate_to_caller(branches: Iterable[BranchRecord]) -> None:
    """The decision is about to go back to the caller: its own branch is its to apply.

    Only the inline run calls this, as it answers; a recovering coordinator has
    no caller to answer and drives that branch like any other.
    """
    for branch in branches:
        if branch.by_caller and branch.state is BranchState.PREPARED:
            branch.state = BranchState.DELEGATED


def settled_state(decision: Decision) -> BranchState:
    return BranchState.COMMITTED if decision is Decision.COMMIT else BranchState.ABORTED


def final_state(decision: Decision) -> State:
    return State.COMMITTED if decision is Decision.COMMIT else State.ABORTED


def driving_state(decision: Decision) -> State:
    return State.COMMITTING if decision is Decision.COMMIT else State.ABORTING


def outcome_of(state: State, decision: Decision | None) -> transactions_pb2.Outcome.ValueType:
    """What a participant in doubt is told. No decision means abort (presumed abort)."""
    if decision is Decision.COMMIT:
        return transactions_pb2.OUTCOME_COMMITTED
    if decision is Decision.ABORT:
        return transactions_pb2.OUTCOME_ABORTED
    if state is State.PREPARING:
        return transactions_pb2.OUTCOME_PENDING
    return transactions_pb2.OUTCOME_ABORTED


STATE_TO_PROTO = {
    State.PREPARING: transactions_pb2.TRANSACTION_STATE_PREPARING,
    State.COMMITTING: transactions_pb2.TRANSACTION_STATE_COMMITTING,
    State.ABORTING: transactions_pb2.TRANSACTION_STATE_ABORTING,
    State.COMMITTED: transactions_pb2.TRANSACTION_STATE_COMMITTED,
    State.ABORTED: transactions_pb2.TRANSACTION_STATE_ABORTED,
    State.NEEDS_INTERVENTION: transactions_pb2.TRANSACTION_STATE_NEEDS_INTERVENTION,
}
PROTO_TO_STATE = {v: k for k, v in STATE_TO_PROTO.items()}
