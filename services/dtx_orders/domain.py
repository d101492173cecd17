"""Orders' rules, free of I/O: request validation, the status state machine, pricing, outcomes.

Everything here is decided from values (requests, products, the coordinator's
view of a transaction), so it is unit-tested without a database or a network.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dtx.v1 import common_pb2, orders_pb2, participant_pb2, transactions_pb2
from dtx_runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from dtx_runtime.participant import InvalidOperation

SKU = re.compile(r"^[A-Z0-9][A-Z0-9-]{0,63}\Z")
MAX_ITEMS = 50
MAX_QUANTITY = 10_000
MAX_IDEMPOTENCY_KEY_CHARS = 200
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 500


# -- status -------------------------------------------------------------


class Status(enum.StrEnum):
    PENDING = "PENDING"
    CONFIRMED = "CONFIRMED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        return not TRANSITIONS[self]


TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.PENDING: frozenset({Status.CONFIRMED, Status.REJECTED, Status.FAILED, Status.CANCELLED}),
    # Final: a customer told "confirmed" never sees the order cancelled. In a
    # saga, confirm_order is the pivot: the orchestrator never compensates it by
    # itself, and the orders participant refuses to (see dtx_orders.participant).
    Status.CONFIRMED: frozenset(),
    Status.REJECTED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELLED: frozenset(),
}

STATUS_TO_PROTO: Mapping[Status, orders_pb2.OrderStatus.ValueType] = {
    Status.PENDING: orders_pb2.ORDER_STATUS_PENDING,
    Status.CONFIRMED: orders_pb2.ORDER_STATUS_CONFIRMED,
    Status.REJECTED: orders_pb2.ORDER_STATUS_REJECTED,
    Status.FAILED: orders_pb2.ORDER_STATUS_FAILED,
    Status.CANCELLED: orders_pb2.ORDER_STATUS_CANCELLED,
}


def can_transition(current: Status, target: Status) -> bool:
    return target in TRANSITIONS[current]


def check_transition(current: Status, target: Status) -> None:
    """Refuse a move the state machine does not allow, naming both states."""
    if not can_transition(current, target):
        raise FailedPrecondition(f"order status cannot go from {current.value} to {target.value}")


# -- protocol -----------------------------------------------------------


class Protocol(enum.StrEnum):
    """How an order's global transaction runs; the value is what the database stores."""

    TWO_PHASE_COMMIT = "2pc"
    SAGA = "saga"
    # The benchmark's baseline: the same writes, uncoordinated and not atomic.
    UNCOORDINATED = "direct"


PROTOCOL_TO_PROTO: Mapping[Protocol, common_pb2.Protocol.ValueType] = {
    Protocol.TWO_PHASE_COMMIT: common_pb2.PROTOCOL_TWO_PHASE_COMMIT,
    Protocol.SAGA: common_pb2.PROTOCOL_SAGA,
    Protocol.UNCOORDINATED: common_pb2.PROTOCOL_UNCOORDINATED,
}


def protocol_from_proto(value: int) -> Protocol:
    """Unspecified means two-phase commit."""
    if value in (common_pb2.PROTOCOL_UNSPECIFIED, common_pb2.PROTOCOL_TWO_PHASE_COMMIT):
        return Protocol.TWO_PHASE_COMMIT
    if value == common_pb2.PROTOCOL_SAGA:
        return Protocol.SAGA
    if value == common_pb2.PROTOCOL_UNCOORDINATED:
        return Protocol.UNCOORDINATED
    raise InvalidArgument(f"protocol: unknown protocol {value}")


# -- requests -----------------------------------------------------------


@dataclass(frozen=True)
class Line:
    sku: str
    quantity: int


@dataclass(frozen=True)
class OrderRequest:
    """A validated PlaceOrder request; ``items`` keep the caller's order."""

    account_id: uuid.UUID
    items: tuple[Line, ...]
    protocol: Protocol
    idempotency_key: str | None

    @property
    def request_hash(self) -> str:
        """sha256 of the canonical request: the same order in any item order hashes the same.

        The idempotency key is not part of it: it is what the hash is compared under.
        """
        canonical = {
            "account_id": str(self.account_id),
            "items": sorted([line.sku, line.quantity] for line in self.items),
            "protocol": self.protocol.value,
        }
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def parse_uuid(value: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"{field}: {value[:80]!r} is not a UUID") from None


def sku_problem(sku: str) -> str | None:
    if not sku:
        return "must not be empty"
    if not SKU.match(sku):
        return f"{sku[:80]!r} must be 1-64 of A-Z, 0-9 and '-', not starting with '-'"
    return None


def validate_items(items: Sequence[common_pb2.LineItem]) -> tuple[Line, ...]:
    if not items:
        raise InvalidArgument("items: an order needs at least one item")
    if len(items) > MAX_ITEMS:
        raise InvalidArgument(f"items: at most {MAX_ITEMS} items, got {len(items)}")
    seen: dict[str, int] = {}
    lines = []
    for i, item in enumerate(items):
        problem = sku_problem(item.sku)
        if problem:
            raise InvalidArgument(f"items[{i}].sku: {problem}")
        if item.sku in seen:
            raise InvalidArgument(
                f"items[{i}].sku: {item.sku} is already items[{seen[item.sku]}];"
                " give each sku once with its total quantity"
            )
        seen[item.sku] = i
        if not 1 <= item.quantity <= MAX_QUANTITY:
            raise InvalidArgument(
                f"items[{i}].quantity: must be between 1 and {MAX_QUANTITY}, got {item.quantity}"
            )
        lines.append(Line(item.sku, item.quantity))
    return tuple(lines)


def validate_place_order(request: orders_pb2.PlaceOrderRequest) -> OrderRequest:
    account_id = parse_uuid(request.account_id, "account_id")
    items = validate_items(request.items)
    protocol = protocol_from_proto(request.protocol)
    key = request.idempotency_key
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidArgument(
            f"idempotency_key: at most {MAX_IDEMPOTENCY_KEY_CHARS} characters, got {len(key)}"
        )
    return OrderRequest(account_id, items, protocol, key or None)


def validate_list_limit(limit: int) -> int:
    if limit == 0:
        return DEFAULT_LIST_LIMIT
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidArgument(f"limit: must be between 1 and {MAX_LIST_LIMIT}, got {limit}")
    return limit


# -- pricing ------------------------------------------------------------


@dataclass(frozen=True)
class Price:
    """A product's unit price as inventory states it."""

    price_minor: int
    currency: str


@dataclass(frozen=True)
class PricedLine:
    sku: str
    quantity: int
    unit_price_minor: int

    @property
    def amount_minor(self) -> int:
        return self.quantity * self.unit_price_minor

    def to_json(self) -> dict[str, object]:
        return {
            "sku": self.sku,
            "quantity": self.quantity,
            "unit_price_minor": self.unit_price_minor,
        }


def price_items(
    items: Sequence[Line], prices: Mapping[str, Price], account_currency: str
) -> tuple[PricedLine, ...]:
    """Price each line from inventory's prices; never from the caller."""
    priced = []
    for i, line in enumerate(items):
        price = prices.get(line.sku)
        if price is None:
            raise NotFound(f"items[{i}].sku: unknown sku {line.sku}")
        if price.currency != account_currency:
            raise FailedPrecondition(
                f"items[{i}].sku: {line.sku} is priced in {price.currency},"
                f" the account's currency is {account_currency}"
            )
        priced.append(PricedLine(line.sku, line.quantity, price.price_minor))
    return tuple(priced)


def order_total(lines: Sequence[PricedLine]) -> int:
    return sum(line.amount_minor for line in lines)


# -- the global transaction ---------------------------------------------


def parse_confirm(operation: participant_pb2.BranchOperation) -> uuid.UUID:
    """The order id of a confirm_order operation; :class:`InvalidOperation` otherwise."""
    kind = operation.WhichOneof("kind")
    if kind != "confirm_order":
        raise InvalidOperation(f"operation: orders accepts confirm_order, got {kind or 'nothing'}")
    try:
        return uuid.UUID(operation.confirm_order.order_id)
    except ValueError:
        raise InvalidOperation(
            f"confirm_order.order_id: {operation.confirm_order.order_id[:80]!r} is not a UUID"
        ) from None


@dataclass(frozen=True)
class Settlement:
    """Where a PENDING order goes once its transaction is decided."""

    status: Status
    reason: str = ""


def settle_two_phase(transaction: transactions_pb2.Transaction) -> Settlement | None:
    """From the coordinator's view: CONFIRMED, REJECTED (a branch said no), FAILED; None = wait.

    A committed order is confirmed by its own branch; the caller only re-reads it.
    """
    if transaction.outcome == transactions_pb2.OUTCOME_COMMITTED:
        return Settlement(Status.CONFIRMED)
    if transaction.outcome == transactions_pb2.OUTCOME_ABORTED:
        refused = any(branch.state == "no" for branch in transaction.branches)
        reason = transaction.reason or "the transaction aborted"
        return Settlement(Status.REJECTED if refused else Status.FAILED, reason)
    return None


def settle_saga(saga: transactions_pb2.Transaction) -> Settlement | None:
    """COMPLETED → CONFIRMED (set by the confirm step), COMPENSATED → CANCELLED; None = wait."""
    if saga.state == transactions_pb2.TRANSACTION_STATE_COMPLETED:
        return Settlement(Status.CONFIRMED)
    if saga.state == transactions_pb2.TRANSACTION_STATE_COMPENSATED:
        return Settlement(Status.CANCELLED, saga.reason or "the saga was compensated")
    return None


NEVER_STARTED = "the transaction never reached the coordinator"


@dataclass(frozen=True)
class NewOrder:
    """A priced order about to be stored PENDING."""

    id: uuid.UUID
    account_id: uuid.UUID
    lines: tuple[PricedLine, ...]
    currency: str
    protocol: Protocol
    idempotency_key: str | None
    request_hash: str

    @property
    def gid(self) -> str:
        return self.id.hex

    @property
    def total_minor(self) -> int:
        return order_total(self.lines)


def new_order(request: OrderRequest, lines: Sequence[PricedLine], currency: str) -> NewOrder:
    return NewOrder(
        id=uuid.uuid4(),
        account_id=request.account_id,
        lines=tuple(lines),
        currency=currency,
        protocol=request.protocol,
        idempotency_key=request.idempotency_key,
        request_hash=request.request_hash,
    )


# Participants as the coordinator's policy names them, and the branch names.
PARTICIPANT_ORDERS = "orders"
PARTICIPANT_PAYMENTS = "payments"
PARTICIPANT_INVENTORY = "inventory"


ORDER_BRANCH = "order"


def _order_branch(order: NewOrder) -> transactions_pb2.Branch:
    return transactions_pb2.Branch(
        branch=ORDER_BRANCH,
        participant=PARTICIPANT_ORDERS,
        operation=participant_pb2.BranchOperation(
            confirm_order=participant_pb2.ConfirmOrderOperation(order_id=str(order.id))
        ),
    )


def _payment_branch(order: NewOrder) -> transactions_pb2.Branch:
    return transactions_pb2.Branch(
        branch="payment",
        participant=PARTICIPANT_PAYMENTS,
        operation=participant_pb2.BranchOperation(
            charge=participant_pb2.ChargeOperation(
                account_id=str(order.account_id),
                amount_minor=order.total_minor,
                currency=order.currency,
                order_id=str(order.id),
            )
        ),
    )


def _stock_branch(order: NewOrder) -> transactions_pb2.Branch:
    return transactions_pb2.Branch(
        branch="stock",
        participant=PARTICIPANT_INVENTORY,
        operation=participant_pb2.BranchOperation(
            reserve=participant_pb2.ReserveOperation(
                order_id=str(order.id),
                items=[common_pb2.LineItem(sku=li.sku, quantity=li.quantity) for li in order.lines],
                # Inventory checks them: the order may have been priced from a cache.
                unit_price_minor={li.sku: li.unit_price_minor for li in order.lines},
            )
        ),
    )


def two_phase_branches(order: NewOrder) -> list[transactions_pb2.Branch]:
    """The order's own confirmation, the charge and the reservation, prepared together.

    Orders prepares its own branch before it asks the coordinator
    (``prepared_by_caller``) and applies the decision to it from the answer.
    """
    own = _order_branch(order)
    own.prepared_by_caller = True
    return [own, _payment_branch(order), _stock_branch(order)]


def own_branch(order: NewOrder) -> transactions_pb2.Branch:
    """The order's confirmation: the branch orders prepares and settles itself."""
    return _order_branch(order)


def uncoordinated_branches(order: NewOrder) -> list[transactions_pb2.Branch]:
    """The charge and the reservation the baseline makes by direct calls."""
    return [_payment_branch(order), _stock_branch(order)]


def saga_steps(order: NewOrder) -> list[transactions_pb2.Branch]:
    """Reserve, then charge, then confirm: the cheapest to undo first, the order last."""
    return [_stock_branch(order), _payment_branch(order), _order_branch(order)]
