"""Inventory's pure rules: product and reservation validation, refusal reasons."""

from __future__ import annotations

import pytest

from dtx.v1 import common_pb2, inventory_pb2, participant_pb2
from dtx_inventory import domain
from dtx_runtime.errors import InvalidArgument
from dtx_runtime.participant import InvalidOperation

pytestmark = pytest.mark.unit


def product_request(**overrides: object) -> inventory_pb2.CreateProductRequest:
    fields: dict[str, object] = {
        "sku": "WIDGET-1",
        "name": "Widget",
        "price_minor": 250,
        "stock": 10,
    }
    fields.update(overrides)
    return inventory_pb2.CreateProductRequest(**fields)  # type: ignore[arg-type]


def reserve_op(
    items: list[tuple[str, int]], order_id: str = "o-1"
) -> participant_pb2.BranchOperation:
    return participant_pb2.BranchOperation(
        reserve=participant_pb2.ReserveOperation(
            order_id=order_id,
            items=[common_pb2.LineItem(sku=s, quantity=q) for s, q in items],
        )
    )


def test_valid_product() -> None:
    assert domain.validate_new_product(product_request()) == domain.NewProduct(
        "WIDGET-1", "Widget", 250, 10
    )


@pytest.mark.parametrize("sku", ["A", "0", "A-B-C", "X" * 64, "9-"])
def test_good_skus(sku: str) -> None:
    assert domain.check_sku(sku) == sku


@pytest.mark.parametrize("sku", ["", "-A", "a", "A_B", "X" * 65, "A B", "A\n"])
def test_bad_skus(sku: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^sku: "):
        domain.check_sku(sku)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"sku": "bad sku"}, "sku:"),
        ({"name": ""}, "name:"),
        ({"name": "n" * 201}, "name:"),
        ({"price_minor": 0}, "price_minor:"),
        ({"price_minor": 10**12 + 1}, "price_minor:"),
        ({"stock": -1}, "stock:"),
        ({"stock": 10**12 + 1}, "stock:"),
    ],
)
def test_bad_product_names_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"^{field}"):
        domain.validate_new_product(product_request(**overrides))


def test_product_bounds_are_inclusive() -> None:
    p = domain.validate_new_product(product_request(price_minor=10**12, stock=0, name="n" * 200))
    assert (p.price_minor, p.stock) == (10**12, 0)


def test_batch_skus() -> None:
    assert domain.validate_skus(["B", "A", "B"]) == ["B", "A"]
    with pytest.raises(InvalidArgument, match=r"^skus\[1\]: "):
        domain.validate_skus(["A", "a"])
    with pytest.raises(InvalidArgument, match=r"^skus: at most 100"):
        domain.validate_skus([f"S{i}" for i in range(101)])


def test_restock() -> None:
    assert domain.validate_restock(
        inventory_pb2.RestockRequest(sku="A", quantity=3)
    ) == domain.Line("A", 3)
    with pytest.raises(InvalidArgument, match=r"^quantity: "):
        domain.validate_restock(inventory_pb2.RestockRequest(sku="A", quantity=0))


def test_reservation_items_are_sorted_by_sku() -> None:
    reservation = domain.parse_reserve(reserve_op([("C", 1), ("A", 2), ("B", 3)]))
    assert reservation.order_id == "o-1"
    assert reservation.skus == ["A", "B", "C"]
    assert reservation.quantities == [2, 3, 1]


def test_reserve_of_another_kind_is_refused() -> None:
    charge = participant_pb2.BranchOperation(charge=participant_pb2.ChargeOperation())
    with pytest.raises(
        InvalidOperation, match=r"^operation: inventory accepts reserve, got charge$"
    ):
        domain.parse_reserve(charge)


@pytest.mark.parametrize(
    ("items", "order_id", "message"),
    [
        ([("A", 1)], "", r"^reserve\.order_id: "),
        ([], "o", r"^reserve\.items: a reservation needs at least one item"),
        ([(f"S{i}", 1) for i in range(51)], "o", r"^reserve\.items: at most 50 items"),
        ([("A", 1), ("B", 0)], "o", r"^reserve\.items\[1\]\.quantity: must be at least 1"),
        ([("A", 1), ("A", 2)], "o", r"^reserve\.items\[1\]\.sku: A appears twice"),
        ([("a", 1)], "o", r"^reserve\.items\[0\]\.sku: "),
    ],
)
def test_bad_reservation_names_the_field(
    items: list[tuple[str, int]], order_id: str, message: str
) -> None:
    with pytest.raises(InvalidOperation, match=message):
        domain.parse_reserve(reserve_op(items, order_id))


def test_refusal_reasons_first_problem_in_sku_order() -> None:
    lines = [domain.Line("B", 5), domain.Line("A", 1)]
    assert domain.refusal_reason(lines, {"A": 1, "B": 5}) is None
    assert (
        domain.refusal_reason(lines, {"A": 1, "B": 3}) == "out of stock: B has 3 available, needs 5"
    )
    assert domain.refusal_reason(lines, {"B": 0}) == "unknown sku A"


def test_reservation_carries_the_prices_the_order_was_priced_at() -> None:
    operation = reserve_op([("B", 1), ("A", 2)])
    operation.reserve.unit_price_minor["A"] = 250
    reservation = domain.parse_reserve(operation)
    assert reservation.expected_prices == {"A": 250}
    assert reservation.prices == [250, None]  # item order: A, B; B is not checked


@pytest.mark.parametrize(
    ("sku", "price", "message"),
    [
        ("Z", 100, r"^reserve\.unit_price_minor\[Z\]: Z is not an item$"),
        ("A", 0, r"^reserve\.unit_price_minor\[A\]: must be between 1 and "),
    ],
)
def test_bad_expected_price_names_the_field(sku: str, price: int, message: str) -> None:
    operation = reserve_op([("A", 1)])
    operation.reserve.unit_price_minor[sku] = price
    with pytest.raises(InvalidOperation, match=message):
        domain.parse_reserve(operation)


def test_a_changed_price_is_a_refusal_that_names_both_prices() -> None:
    lines = [domain.Line("A", 1), domain.Line("B", 1)]
    stock = {"A": 5, "B": 5}
    now = {"A": 250, "B": 300}
    assert domain.refusal_reason(lines, stock, prices=now, expected_prices={"A": 250}) is None
    assert (
        domain.refusal_reason(lines, stock, prices=now, expected_prices={"A": 250, "B": 280})
        == "price changed: B costs 300 now, the order was priced at 280"
    )
