"""Request and response bodies of the REST API.

Money is an integer in minor units of its currency (cents); quantities are
whole units. Requests are strict: an unknown field, a string where a number
belongs or a number out of range is refused with 422 naming the field. The
bounds are the backends' own, so a request the gateway accepts is not refused
later for its shape.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_BALANCE_MINOR = 10**15
MAX_PRICE_MINOR = 10**12
MAX_STOCK = 10**12
MAX_ITEMS = 50
MAX_QUANTITY = 10_000
MAX_REASON_CHARS = 500

SKU_PATTERN = r"^[A-Z0-9][A-Z0-9-]{0,63}$"
GID_PATTERN = r"^[A-Za-z0-9_-]{1,100}$"
CURRENCY_PATTERN = r"^[A-Z]{3}$"
TEXT_PATTERN = r"^[^\x00]*[^\s\x00][^\x00]*$"
"""Free text: not blank, and no NUL (PostgreSQL text cannot hold one)."""


def _whole(value: object) -> object:
    """``3.0`` is an integer to JSON Schema, so it is accepted as 3; ``"3"``, ``3.5`` and
    ``true`` stay refused (the models are strict)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WHOLE = BeforeValidator(_whole)


def _text(max_length: int, example: str) -> Any:
    """A free-text field: 1 to ``max_length`` characters, not blank, no NUL. (Lone
    surrogates, which protobuf cannot encode, pydantic refuses by itself.)"""
    return Field(min_length=1, max_length=max_length, pattern=TEXT_PATTERN, examples=[example])


Owner = Annotated[str, _text(200, "Ada")]
ProductName = Annotated[str, _text(200, "Widget")]
Reason = Annotated[str, _text(MAX_REASON_CHARS, "payments fixed")]

Sku = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        pattern=SKU_PATTERN,
        description="1-64 of A-Z, 0-9 and '-', not starting with '-'.",
        examples=["WIDGET-1"],
    ),
]
Gid = Annotated[str, Field(pattern=GID_PATTERN, examples=["order-1f0c2a"])]
ProtocolName = Literal["2pc", "saga"]
OrderStatus = Literal["pending", "confirmed", "rejected", "failed", "cancelled"]
TransactionGroup = Literal["in_flight", "in_doubt", "retrying", "needs_intervention", "done"]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- errors ---------------------------------------------------------------


class ErrorBody(Response):
    code: str = Field(description="Stable, machine-readable: invalid_request, not_found, ...")
    message: str = Field(description="For people; names the field or the object at fault.")


class ErrorResponse(Response):
    error: ErrorBody


# -- accounts -------------------------------------------------------------


class NewAccount(Request):
    owner: Owner
    currency: str = Field(
        pattern=CURRENCY_PATTERN, description="ISO 4217, e.g. EUR.", examples=["EUR"]
    )
    balance_minor: Annotated[int, Field(ge=0, le=MAX_BALANCE_MINOR, examples=[10_000]), WHOLE]


class Account(Response):
    id: uuid.UUID
    owner: str
    currency: str
    balance_minor: int
    created_at: datetime


# -- products -------------------------------------------------------------


class NewProduct(Request):
    sku: Sku
    name: ProductName
    price_minor: Annotated[int, Field(ge=1, le=MAX_PRICE_MINOR, examples=[250]), WHOLE]
    stock: Annotated[int, Field(ge=0, le=MAX_STOCK, examples=[10]), WHOLE]


class Restock(Request):
    quantity: Annotated[int, Field(ge=1, le=MAX_STOCK, examples=[5]), WHOLE]


class Product(Response):
    sku: str
    name: str
    price_minor: int = Field(description="Unit price in minor units of `currency`.")
    currency: str
    available: int = Field(description="Free to order.")
    reserved: int = Field(description="Held by transactions that are not finished yet.")


# -- orders ---------------------------------------------------------------


class LineItem(Request):
    sku: Sku
    quantity: Annotated[int, Field(ge=1, le=MAX_QUANTITY), WHOLE]


class NewOrder(Request):
    # FastAPI validates the parsed JSON in Python mode, where a strict UUID would
    # have to be a UUID object: the text form is what a client sends.
    account_id: Annotated[uuid.UUID, Field(strict=False)]
    items: list[LineItem] = Field(
        min_length=1, max_length=MAX_ITEMS, description="Each sku at most once."
    )
    protocol: ProtocolName = Field(
        default="2pc", description="`2pc`: two-phase commit; `saga`: a saga with compensations."
    )


class OrderItem(Response):
    sku: str
    quantity: int
    unit_price_minor: int


class Order(Response):
    id: uuid.UUID
    account_id: uuid.UUID
    items: list[OrderItem]
    total_minor: int = Field(description="Computed from the products' prices, never the caller's.")
    currency: str
    protocol: Literal["2pc", "saga", "uncoordinated"]
    status: OrderStatus
    reason: str = Field(description="Why it was rejected, failed or cancelled; empty otherwise.")
    gid: str = Field(description="The global transaction, for GET /v1/transactions/{gid}.")
    created_at: datetime
    updated_at: datetime


class OrderList(Response):
    orders: list[Order]


# -- notifications -------------------------------------------------------


class Notification(Response):
    id: str
    account_id: str
    order_id: str
    event_type: str = Field(examples=["order.confirmed"])
    message: str
    created_at: datetime
    delivered_at: datetime | None = Field(
        description="When the webhook accepted it; null when not (yet) delivered."
    )


class NotificationList(Response):
    notifications: list[Notification]


# -- transactions --------------------------------------------------------


class Intervention(Request):
    reason: Reason


class BranchAttempt(Response):
    action: str = Field(description="prepare, commit, abort, execute or compensate.")
    attempt: int
    result: str = Field(description="ok, no or error.")
    detail: str
    at: datetime | None


class BranchStatus(Response):
    branch: str
    participant: str
    state: str
    reason: str
    attempts: list[BranchAttempt]


class Transaction(Response):
    gid: str
    kind: Literal["2pc", "saga"] = Field(
        description="Who runs it: the coordinator or the saga orchestrator."
    )
    protocol: Literal["2pc", "saga", "uncoordinated", "unspecified"]
    state: str = Field(
        description="The engine's own state, lower case: preparing, committing, aborting,"
        " committed, aborted, running, compensating, completed, compensated,"
        " needs_intervention."
    )
    group: TransactionGroup = Field(description="The state group `?state=` filters on.")
    retrying: bool = Field(description="Unfinished and recovery has already retried it.")
    outcome: Literal["pending", "committed", "aborted", "unspecified"]
    reason: str
    attempts: int = Field(description="Recovery rounds so far.")
    created_at: datetime | None
    updated_at: datetime | None
    deadline: datetime | None
    branches: list[BranchStatus]


class TransactionList(Response):
    transactions: list[Transaction]
    unavailable: list[Literal["coordinator", "saga"]] = Field(
        description="Sources that did not answer: the list is partial when not empty."
    )


# -- operations -----------------------------------------------------------


class Liveness(Response):
    alive: bool
    phase: str


class Readiness(Response):
    ready: bool
    phase: str
    failures: dict[str, str] = Field(description="Required dependencies that did not answer.")
    backends: dict[str, str] = Field(
        description="Every backend's gRPC health: SERVING, or why not."
    )
