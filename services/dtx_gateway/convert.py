"""Protobuf messages to the REST schemas, and the transaction state groups (see
:data:`STATE_GROUPS_DOC`, which the OpenAPI description of ``GET /v1/transactions`` shows)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from dtx.v1 import (
    common_pb2,
    inventory_pb2,
    notifications_pb2,
    orders_pb2,
    payments_pb2,
    transactions_pb2,
)
from dtx_gateway import schemas

TS = transactions_pb2

STATE_GROUPS: Mapping[str, tuple[int, ...]] = {
    "in_flight": (TS.TRANSACTION_STATE_PREPARING, TS.TRANSACTION_STATE_RUNNING),
    "in_doubt": (
        TS.TRANSACTION_STATE_COMMITTING,
        TS.TRANSACTION_STATE_ABORTING,
        TS.TRANSACTION_STATE_COMPENSATING,
    ),
    "needs_intervention": (TS.TRANSACTION_STATE_NEEDS_INTERVENTION,),
    "done": (
        TS.TRANSACTION_STATE_COMMITTED,
        TS.TRANSACTION_STATE_ABORTED,
        TS.TRANSACTION_STATE_COMPLETED,
        TS.TRANSACTION_STATE_COMPENSATED,
    ),
}
UNFINISHED = STATE_GROUPS["in_flight"] + STATE_GROUPS["in_doubt"]
STATE_GROUPS = {**STATE_GROUPS, "retrying": UNFINISHED}

COORDINATOR_STATES = frozenset(
    {
        TS.TRANSACTION_STATE_PREPARING,
        TS.TRANSACTION_STATE_COMMITTING,
        TS.TRANSACTION_STATE_ABORTING,
        TS.TRANSACTION_STATE_COMMITTED,
        TS.TRANSACTION_STATE_ABORTED,
        TS.TRANSACTION_STATE_NEEDS_INTERVENTION,
    }
)
SAGA_STATES = frozenset(
    {
        TS.TRANSACTION_STATE_RUNNING,
        TS.TRANSACTION_STATE_COMPENSATING,
        TS.TRANSACTION_STATE_COMPLETED,
        TS.TRANSACTION_STATE_COMPENSATED,
        TS.TRANSACTION_STATE_NEEDS_INTERVENTION,
    }
)

STATE_GROUPS_DOC = """State groups (`?state=`), from the engines' TransactionState:

| group | engine states | meaning |
|---|---|---|
| `in_flight` | PREPARING (2PC), RUNNING (saga) | no decision logged yet: voting, or running forward steps |
| `in_doubt` | COMMITTING, ABORTING (2PC), COMPENSATING (saga) | decided, but not every branch has acknowledged it yet: participants may still hold prepared transactions, or compensations are owed |
| `retrying` | any of the five above with `attempts` > 0 | unfinished, and recovery has already retried it at least once (overlaps the two groups above) |
| `needs_intervention` | NEEDS_INTERVENTION (both) | retries exhausted: parked for a person (POST `/v1/transactions/{gid}/retry` or `/abort`) |
| `done` | COMMITTED, ABORTED (2PC), COMPLETED, COMPENSATED (saga) | finished |
"""

_PROTOCOLS = {
    common_pb2.PROTOCOL_TWO_PHASE_COMMIT: "2pc",
    common_pb2.PROTOCOL_SAGA: "saga",
    common_pb2.PROTOCOL_UNCOORDINATED: "uncoordinated",
}
_ORDER_STATUS = {
    orders_pb2.ORDER_STATUS_PENDING: "pending",
    orders_pb2.ORDER_STATUS_CONFIRMED: "confirmed",
    orders_pb2.ORDER_STATUS_REJECTED: "rejected",
    orders_pb2.ORDER_STATUS_FAILED: "failed",
    orders_pb2.ORDER_STATUS_CANCELLED: "cancelled",
}
_OUTCOMES = {
    TS.OUTCOME_PENDING: "pending",
    TS.OUTCOME_COMMITTED: "committed",
    TS.OUTCOME_ABORTED: "aborted",
}
PROTOCOL_TO_PROTO = {
    "2pc": common_pb2.PROTOCOL_TWO_PHASE_COMMIT,
    "saga": common_pb2.PROTOCOL_SAGA,
}


def timestamp(stamp: Timestamp) -> datetime | None:
    """None for an unset timestamp (proto3 has no null)."""
    if stamp.seconds == 0 and stamp.nanos == 0:
        return None
    return stamp.ToDatetime(tzinfo=UTC)


def required_timestamp(stamp: Timestamp) -> datetime:
    return timestamp(stamp) or datetime.fromtimestamp(0, UTC)


def account(message: payments_pb2.Account) -> schemas.Account:
    return schemas.Account(
        id=message.id,  # type: ignore[arg-type]
        owner=message.owner,
        currency=message.currency,
        balance_minor=message.balance_minor,
        created_at=required_timestamp(message.created_at),
    )


def product(message: inventory_pb2.Product) -> schemas.Product:
    return schemas.Product(
        sku=message.sku,
        name=message.name,
        price_minor=message.price_minor,
        currency=message.currency,
        available=message.available,
        reserved=message.reserved,
    )


def order(message: orders_pb2.Order) -> schemas.Order:
    return schemas.Order(
        id=message.id,  # type: ignore[arg-type]
        account_id=message.account_id,  # type: ignore[arg-type]
        items=[
            schemas.OrderItem(
                sku=item.sku, quantity=item.quantity, unit_price_minor=item.unit_price_minor
            )
            for item in message.items
        ],
        total_minor=message.total_minor,
        currency=message.currency,
        protocol=_PROTOCOLS.get(message.protocol, "2pc"),  # type: ignore[arg-type]
        status=_ORDER_STATUS.get(message.status, "pending"),  # type: ignore[arg-type]
        reason=message.reason,
        gid=message.gid,
        created_at=required_timestamp(message.created_at),
        updated_at=required_timestamp(message.updated_at),
    )


def notification(message: notifications_pb2.Notification) -> schemas.Notification:
    return schemas.Notification(
        id=message.id,
        account_id=message.account_id,
        order_id=message.order_id,
        event_type=message.event_type,
        message=message.message,
        created_at=required_timestamp(message.created_at),
        delivered_at=timestamp(message.delivered_at),
    )


def group_of(state: int) -> str:
    for group in ("in_flight", "in_doubt", "needs_intervention", "done"):
        if state in STATE_GROUPS[group]:
            return group
    return "in_flight"  # UNSPECIFIED: an engine that says nothing is not finished


def in_group(message: transactions_pb2.Transaction, group: str) -> bool:
    if group == "retrying":
        return message.state in UNFINISHED and message.attempts > 0
    return message.state in STATE_GROUPS[group]


def transaction(message: transactions_pb2.Transaction, kind: str) -> schemas.Transaction:
    state_name = (
        TS.TransactionState.Name(message.state)
        if message.state in TS.TransactionState.values()
        else "TRANSACTION_STATE_UNSPECIFIED"
    )
    return schemas.Transaction(
        gid=message.gid,
        kind=kind,  # type: ignore[arg-type]
        protocol=_PROTOCOLS.get(message.protocol, "unspecified"),  # type: ignore[arg-type]
        state=state_name.removeprefix("TRANSACTION_STATE_").lower(),
        group=group_of(message.state),  # type: ignore[arg-type]
        retrying=message.state in UNFINISHED and message.attempts > 0,
        outcome=_OUTCOMES.get(message.outcome, "unspecified"),  # type: ignore[arg-type]
        reason=message.reason,
        attempts=message.attempts,
        created_at=timestamp(message.created_at),
        updated_at=timestamp(message.updated_at),
        deadline=timestamp(message.deadline),
        branches=[
            schemas.BranchStatus(
                branch=branch.branch,
                participant=branch.participant,
                state=branch.state,
                reason=branch.reason,
                attempts=[
                    schemas.BranchAttempt(
                        action=a.action,
                        attempt=a.attempt,
                        result=a.result,
                        detail=a.detail,
                        at=timestamp(a.at),
                    )
                    for a in branch.attempts
                ],
            )
            for branch in message.branches
        ],
    )
