"""Inventory's rules, free of I/O: valid products and reservations, why a reservation is refused."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dtx.v1 import inventory_pb2, participant_pb2
from dtx_runtime.errors import InvalidArgument
from dtx_runtime.participant import InvalidOperation

SKU = re.compile(r"^[A-Z0-9][A-Z0-9-]{0,63}\Z")
MAX_NAME_CHARS = 200
MAX_PRICE_MINOR = 10**12
MAX_STOCK = 10**12
MAX_BATCH_SKUS = 100
MAX_RESERVE_ITEMS = 50
MAX_ORDER_ID_CHARS = 200


@dataclass(frozen=True)
class NewProduct:
    sku: str
    name: str
    price_minor: int
    stock: int


@dataclass(frozen=True)
class Line:
    sku: str
    quantity: int


@dataclass(frozen=True)
class Reservation:
    """A reserve operation, its items sorted by SKU: the order rows are locked in."""

    order_id: str
    items: tuple[Line, ...]
    # SKU -> the unit price the order was priced at (checked); a SKU not here is not checked.
    expected_prices: Mapping[str, int] = field(default_factory=dict)

    @property
    def skus(self) -> list[str]:
        return [line.sku for line in self.items]

    @property
    def quantities(self) -> list[int]:
        return [line.quantity for line in self.items]

    @property
    def prices(self) -> list[int | None]:
        """The expected unit price of each item (None: not checked), in item order."""
        return [self.expected_prices.get(line.sku) for line in self.items]


def sku_problem(sku: str) -> str | None:
    """What is wrong with a SKU's shape, or None."""
    if not sku:
        return "must not be empty"
    if not SKU.match(sku):
        return f"{sku[:80]!r} must be 1-64 of A-Z, 0-9 and '-', not starting with '-'"
    return None


def check_sku(sku: str, field: str = "sku") -> str:
    problem = sku_problem(sku)
    if problem:
        raise InvalidArgument(f"{field}: {problem}")
    return sku


def validate_new_product(request: inventory_pb2.CreateProductRequest) -> NewProduct:
    check_sku(request.sku)
    if not request.name.strip():
        raise InvalidArgument("name: must not be empty")
    if len(request.name) > MAX_NAME_CHARS:
        raise InvalidArgument(f"name: at most {MAX_NAME_CHARS} characters, got {len(request.name)}")
    if not 1 <= request.price_minor <= MAX_PRICE_MINOR:
        raise InvalidArgument(
            f"price_minor: must be between 1 and {MAX_PRICE_MINOR}, got {request.price_minor}"
        )
    if not 0 <= request.stock <= MAX_STOCK:
        raise InvalidArgument(f"stock: must be between 0 and {MAX_STOCK}, got {request.stock}")
    return NewProduct(request.sku, request.name, request.price_minor, request.stock)


def validate_skus(skus: Sequence[str]) -> list[str]:
    """The SKUs of a batch read, deduplicated in their order."""
    if len(skus) > MAX_BATCH_SKUS:
        raise InvalidArgument(f"skus: at most {MAX_BATCH_SKUS} per call, got {len(skus)}")
    for i, sku in enumerate(skus):
        check_sku(sku, f"skus[{i}]")
    return list(dict.fromkeys(skus))


def validate_restock(request: inventory_pb2.RestockRequest) -> Line:
    check_sku(request.sku)
    if not 1 <= request.quantity <= MAX_STOCK:
        raise InvalidArgument(
            f"quantity: must be between 1 and {MAX_STOCK}, got {request.quantity}"
        )
    return Line(request.sku, request.quantity)


def parse_reserve(operation: participant_pb2.BranchOperation) -> Reservation:
    """The reservation of a branch operation; :class:`InvalidOperation` names the bad field."""
    kind = operation.WhichOneof("kind")
    if kind != "reserve":
        raise InvalidOperation(f"operation: inventory accepts reserve, got {kind or 'nothing'}")
    reserve = operation.reserve
    if not reserve.order_id:
        raise InvalidOperation("reserve.order_id: must not be empty")
    if len(reserve.order_id) > MAX_ORDER_ID_CHARS:
        raise InvalidOperation(f"reserve.order_id: at most {MAX_ORDER_ID_CHARS} characters")
    if not reserve.items:
        raise InvalidOperation("reserve.items: a reservation needs at least one item")
    if len(reserve.items) > MAX_RESERVE_ITEMS:
        raise InvalidOperation(
            f"reserve.items: at most {MAX_RESERVE_ITEMS} items, got {len(reserve.items)}"
        )
    seen: set[str] = set()
    lines = []
    for i, item in enumerate(reserve.items):
        problem = sku_problem(item.sku)
        if problem:
            raise InvalidOperation(f"reserve.items[{i}].sku: {problem}")
        if item.sku in seen:
            raise InvalidOperation(f"reserve.items[{i}].sku: {item.sku} appears twice")
        seen.add(item.sku)
        if item.quantity < 1:
            raise InvalidOperation(
                f"reserve.items[{i}].quantity: must be at least 1, got {item.quantity}"
            )
        if item.quantity > MAX_STOCK:
            raise InvalidOperation(f"reserve.items[{i}].quantity: at most {MAX_STOCK}")
        lines.append(Line(item.sku, item.quantity))
    for sku, price in reserve.unit_price_minor.items():
        if sku not in seen:
            raise InvalidOperation(f"reserve.unit_price_minor[{sku}]: {sku} is not an item")
        if not 1 <= price <= MAX_PRICE_MINOR:
            raise InvalidOperation(
                f"reserve.unit_price_minor[{sku}]: must be between 1 and {MAX_PRICE_MINOR},"
                f" got {price}"
            )
    return Reservation(
        reserve.order_id,
        tuple(sorted(lines, key=lambda line: line.sku)),
        dict(reserve.unit_price_minor),
    )


def refusal_reason(
    items: Sequence[Line],
    available: Mapping[str, int],
    *,
    prices: Mapping[str, int] | None = None,
    expected_prices: Mapping[str, int] | None = None,
) -> str | None:
    """The first item (in SKU order) that cannot be reserved, given what is available; or None.

    ``prices`` are the products' unit prices now, ``expected_prices`` those the
    order was priced at: an order must not go through at a price that changed.
    """
    for line in sorted(items, key=lambda line: line.sku):
        have = available.get(line.sku)
        if have is None:
            return f"unknown sku {line.sku}"
        expected = (expected_prices or {}).get(line.sku)
        now = (prices or {}).get(line.sku)
        if expected is not None and now is not None and expected != now:
            return f"price changed: {line.sku} costs {now} now, the order was priced at {expected}"
        if have < line.quantity:
            return f"out of stock: {line.sku} has {have} available, needs {line.quantity}"
    return None
