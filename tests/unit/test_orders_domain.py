"""Orders' pure rules: validation, the status state machine, pricing, hashes, outcomes."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dtx.v1 import common_pb2, orders_pb2, participant_pb2, transactions_pb2
from dtx_orders import domain
from dtx_orders.domain import Price, Protocol, Settlement, Status
from dtx_runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from dtx_runtime.participant import InvalidOperation

pytestmark = pytest.mark.unit

ACCOUNT = "6f1f8e4e-4b7e-4c59-9a53-0d5f0b2f6f1a"


def place(
    items: list[tuple[str, int]] | None = None,
    *,
    account_id: str = ACCOUNT,
    protocol: int = common_pb2.PROTOCOL_UNSPECIFIED,
    key: str = "",
) -> orders_pb2.PlaceOrderRequest:
    items = [("A", 1), ("B", 2)] if items is None else items
    return orders_pb2.PlaceOrderRequest(
        account_id=account_id,
        items=[common_pb2.LineItem(sku=s, quantity=q) for s, q in items],
        protocol=protocol,  # type: ignore[arg-type]
        idempotency_key=key,
    )


# -- state machine --------------------------------------------------------

ALLOWED = {
    (Status.PENDING, Status.CONFIRMED),
    (Status.PENDING, Status.REJECTED),
    (Status.PENDING, Status.FAILED),
    (Status.PENDING, Status.CANCELLED),
}


@pytest.mark.parametrize(("current", "target"), sorted(ALLOWED))
def test_allowed_transitions(current: Status, target: Status) -> None:
    assert domain.can_transition(current, target)
    domain.check_transition(current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (Status.CONFIRMED, Status.PENDING),
        # A confirmed order is final: not even a saga's compensation cancels it.
        (Status.CONFIRMED, Status.CANCELLED),
        (Status.CONFIRMED, Status.REJECTED),
        (Status.CONFIRMED, Status.FAILED),
        (Status.REJECTED, Status.CONFIRMED),
        (Status.FAILED, Status.PENDING),
        (Status.CANCELLED, Status.CONFIRMED),
        (Status.PENDING, Status.PENDING),
        (Status.CANCELLED, Status.CANCELLED),
    ],
)
def test_refused_transitions_name_both_states(current: Status, target: Status) -> None:
    assert not domain.can_transition(current, target)
    with pytest.raises(FailedPrecondition, match=f"from {current.value} to {target.value}"):
        domain.check_transition(current, target)


def test_every_pair_is_allowed_exactly_when_listed() -> None:
    for current in Status:
        for target in Status:
            assert domain.can_transition(current, target) == ((current, target) in ALLOWED)


def test_final_states() -> None:
    assert {s for s in Status if s.final} == {
        Status.CONFIRMED,
        Status.REJECTED,
        Status.FAILED,
        Status.CANCELLED,
    }
    assert not Status.PENDING.final


def test_a_confirmed_order_has_no_transition_at_all() -> None:
    assert domain.TRANSITIONS[Status.CONFIRMED] == frozenset()
    for target in Status:
        with pytest.raises(FailedPrecondition, match="from CONFIRMED to"):
            domain.check_transition(Status.CONFIRMED, target)


@given(st.lists(st.sampled_from(list(Status)), max_size=30))
def test_any_sequence_of_transitions_stays_in_the_machine(targets: list[Status]) -> None:
    """Apply arbitrary attempted moves: refused ones change nothing, allowed ones are edges."""
    current = Status.PENDING
    visited = [current]
    for target in targets:
        try:
            domain.check_transition(current, target)
        except FailedPrecondition:
            assert (current, target) not in ALLOWED
            continue
        assert (current, target) in ALLOWED
        current = target
        visited.append(current)
    # A PENDING order moves at most once, to a final status, never back.
    assert len(visited) <= 2
    assert visited.count(Status.PENDING) == 1
    assert current in Status
    if len(visited) == 2:
        assert visited[1].final


# -- validation -----------------------------------------------------------


def test_valid_request_defaults_to_two_phase_commit() -> None:
    request = domain.validate_place_order(place())
    assert request.account_id == uuid.UUID(ACCOUNT)
    assert request.items == (domain.Line("A", 1), domain.Line("B", 2))
    assert request.protocol is Protocol.TWO_PHASE_COMMIT
    assert request.idempotency_key is None


def test_protocols() -> None:
    saga = domain.validate_place_order(place(protocol=common_pb2.PROTOCOL_SAGA))
    assert saga.protocol is Protocol.SAGA
    tpc = domain.validate_place_order(place(protocol=common_pb2.PROTOCOL_TWO_PHASE_COMMIT))
    assert tpc.protocol is Protocol.TWO_PHASE_COMMIT
    with pytest.raises(InvalidArgument, match=r"^protocol: "):
        domain.validate_place_order(place(protocol=7))


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (place(account_id="nope"), "^account_id: 'nope' is not a UUID"),
        (place([]), "^items: an order needs at least one item$"),
        (place([(f"S{i}", 1) for i in range(51)]), "^items: at most 50 items"),
        (place([("A", 1), ("bad", 1)]), r"^items\[1\]\.sku: "),
        (place([("A", 1), ("B", 1), ("C", 0)]), r"^items\[2\]\.quantity: must be between 1"),
        (place([("A", 10_001)]), r"^items\[0\]\.quantity: "),
        (place([("A", -1)]), r"^items\[0\]\.quantity: "),
        (place([("A", 1), ("A", 2)]), r"^items\[1\]\.sku: A is already items\[0\]"),
        (place(key="k" * 201), "^idempotency_key: at most 200"),
    ],
)
def test_bad_requests_name_the_field(request_: orders_pb2.PlaceOrderRequest, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        domain.validate_place_order(request_)


def test_bounds_are_inclusive() -> None:
    request = domain.validate_place_order(
        place([(f"S{i}", 10_000) for i in range(50)], key="k" * 200)
    )
    assert len(request.items) == 50
    assert request.idempotency_key == "k" * 200


def test_list_limit() -> None:
    assert domain.validate_list_limit(0) == 50
    assert domain.validate_list_limit(1) == 1
    assert domain.validate_list_limit(500) == 500
    for bad in (-1, 501):
        with pytest.raises(InvalidArgument, match=r"^limit: "):
            domain.validate_list_limit(bad)


# -- request hash ---------------------------------------------------------


def test_hash_ignores_item_order_and_key() -> None:
    one = domain.validate_place_order(place([("A", 1), ("B", 2), ("C", 3)], key="k1"))
    two = domain.validate_place_order(place([("C", 3), ("A", 1), ("B", 2)], key="k2"))
    assert one.request_hash == two.request_hash
    assert len(one.request_hash) == 64


def test_hash_of_unspecified_protocol_is_two_phase_commit() -> None:
    default = domain.validate_place_order(place())
    explicit = domain.validate_place_order(place(protocol=common_pb2.PROTOCOL_TWO_PHASE_COMMIT))
    assert default.request_hash == explicit.request_hash


@pytest.mark.parametrize(
    "other",
    [
        place([("A", 1), ("B", 3)]),
        place([("A", 1)]),
        place(protocol=common_pb2.PROTOCOL_SAGA),
        place(account_id=str(uuid.UUID(int=1))),
    ],
)
def test_hash_differs_for_a_different_request(other: orders_pb2.PlaceOrderRequest) -> None:
    assert (
        domain.validate_place_order(other).request_hash
        != domain.validate_place_order(place()).request_hash
    )


@given(
    st.dictionaries(
        st.from_regex(r"\A[A-Z0-9][A-Z0-9-]{0,5}\Z"),
        st.integers(1, 10_000),
        min_size=1,
        max_size=20,
    ),
    st.randoms(use_true_random=False),
)
def test_hash_is_stable_under_any_permutation(items: dict[str, int], rnd: object) -> None:
    pairs = list(items.items())
    shuffled = pairs[:]
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    a = domain.validate_place_order(place(pairs)).request_hash
    b = domain.validate_place_order(place(shuffled)).request_hash
    assert a == b


def test_hash_is_stable_across_versions() -> None:
    """A stored hash must keep matching after a deploy: the canonical form is pinned."""
    request = domain.validate_place_order(place([("B", 2), ("A", 1)]))
    canonical = json.dumps(
        {"account_id": ACCOUNT, "items": [["A", 1], ["B", 2]], "protocol": "2pc"},
        sort_keys=True,
        separators=(",", ":"),
    )
    assert request.request_hash == hashlib.sha256(canonical.encode()).hexdigest()
    assert request.request_hash == (
        "40bb4c4f49dfe678795d9e6d00ea0919ddf75e0e77bf619ef8f55799d11f46b7"
    )


# -- pricing --------------------------------------------------------------


def test_prices_come_from_inventory_and_total_is_their_sum() -> None:
    items = (domain.Line("A", 3), domain.Line("B", 2))
    prices = {"A": Price(250, "EUR"), "B": Price(1000, "EUR"), "C": Price(1, "EUR")}
    lines = domain.price_items(items, prices, "EUR")
    assert [(li.sku, li.quantity, li.unit_price_minor) for li in lines] == [
        ("A", 3, 250),
        ("B", 2, 1000),
    ]
    assert domain.order_total(lines) == 3 * 250 + 2 * 1000


def test_largest_order_fits_a_bigint() -> None:
    items = tuple(domain.Line(f"S{i}", 10_000) for i in range(50))
    prices = {f"S{i}": Price(10**12, "EUR") for i in range(50)}
    total = domain.order_total(domain.price_items(items, prices, "EUR"))
    assert total == 50 * 10_000 * 10**12 < 2**63


def test_unknown_sku_names_the_item() -> None:
    items = (domain.Line("A", 1), domain.Line("X", 1))
    with pytest.raises(NotFound, match=r"^items\[1\]\.sku: unknown sku X$"):
        domain.price_items(items, {"A": Price(1, "EUR")}, "EUR")


def test_currency_mismatch_is_a_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition, match=r"^items\[0\]\.sku: A is priced in EUR.*USD"):
        domain.price_items((domain.Line("A", 1),), {"A": Price(1, "EUR")}, "USD")


# -- the global transaction -------------------------------------------------


def new_order() -> domain.NewOrder:
    request = domain.validate_place_order(place([("B", 2), ("A", 1)]))
    lines = domain.price_items(request.items, {"A": Price(100, "EUR"), "B": Price(7, "EUR")}, "EUR")
    return domain.new_order(request, lines, "EUR")


def test_new_order_gid_is_its_id_hex() -> None:
    order = new_order()
    assert order.gid == order.id.hex
    assert order.total_minor == 114


def test_two_phase_branches() -> None:
    order = new_order()
    branches = domain.two_phase_branches(order)
    assert [(b.branch, b.participant) for b in branches] == [
        ("order", "orders"),
        ("payment", "payments"),
        ("stock", "inventory"),
    ]
    assert branches[0].operation.confirm_order.order_id == str(order.id)
    # Orders prepares its own branch; the coordinator prepares the others.
    assert [b.prepared_by_caller for b in branches] == [True, False, False]
    assert domain.own_branch(order).operation == branches[0].operation
    charge = branches[1].operation.charge
    assert (charge.account_id, charge.amount_minor, charge.currency, charge.order_id) == (
        ACCOUNT,
        114,
        "EUR",
        str(order.id),
    )
    reserve = branches[2].operation.reserve
    assert reserve.order_id == str(order.id)
    assert [(i.sku, i.quantity) for i in reserve.items] == [("B", 2), ("A", 1)]


def test_saga_steps_confirm_last() -> None:
    steps = domain.saga_steps(new_order())
    assert [s.branch for s in steps] == ["stock", "payment", "order"]


def test_parse_confirm() -> None:
    order_id = uuid.uuid4()
    op = participant_pb2.BranchOperation(
        confirm_order=participant_pb2.ConfirmOrderOperation(order_id=str(order_id))
    )
    assert domain.parse_confirm(op) == order_id
    with pytest.raises(
        InvalidOperation, match=r"^operation: orders accepts confirm_order, got charge"
    ):
        domain.parse_confirm(
            participant_pb2.BranchOperation(charge=participant_pb2.ChargeOperation())
        )
    bad = participant_pb2.BranchOperation(
        confirm_order=participant_pb2.ConfirmOrderOperation(order_id="x")
    )
    with pytest.raises(InvalidOperation, match=r"^confirm_order\.order_id: "):
        domain.parse_confirm(bad)


def transaction(
    outcome: int, branch_states: list[str], reason: str = "", state: int = 0
) -> transactions_pb2.Transaction:
    return transactions_pb2.Transaction(
        outcome=outcome,  # type: ignore[arg-type]
        state=state,  # type: ignore[arg-type]
        reason=reason,
        branches=[
            transactions_pb2.BranchStatus(branch=f"b{i}", state=s)
            for i, s in enumerate(branch_states)
        ],
    )


def test_settle_two_phase() -> None:
    committed = transaction(transactions_pb2.OUTCOME_COMMITTED, ["committed"] * 3)
    assert domain.settle_two_phase(committed) == Settlement(Status.CONFIRMED)
    refused = transaction(transactions_pb2.OUTCOME_ABORTED, ["aborted", "no"], "payment: poor")
    assert domain.settle_two_phase(refused) == Settlement(Status.REJECTED, "payment: poor")
    failed = transaction(transactions_pb2.OUTCOME_ABORTED, ["aborted", "failed"], "stock: timeout")
    assert domain.settle_two_phase(failed) == Settlement(Status.FAILED, "stock: timeout")
    assert domain.settle_two_phase(transaction(transactions_pb2.OUTCOME_PENDING, [])) is None
    bare = domain.settle_two_phase(transaction(transactions_pb2.OUTCOME_ABORTED, []))
    assert bare is not None
    assert bare.status is Status.FAILED
    assert bare.reason


def test_settle_saga() -> None:
    done = transaction(0, [], state=transactions_pb2.TRANSACTION_STATE_COMPLETED)
    assert domain.settle_saga(done) == Settlement(Status.CONFIRMED)
    undone = transaction(
        0, [], "payment: insufficient funds", state=transactions_pb2.TRANSACTION_STATE_COMPENSATED
    )
    assert domain.settle_saga(undone) == Settlement(Status.CANCELLED, "payment: insufficient funds")
    for state in (
        transactions_pb2.TRANSACTION_STATE_RUNNING,
        transactions_pb2.TRANSACTION_STATE_COMPENSATING,
        transactions_pb2.TRANSACTION_STATE_NEEDS_INTERVENTION,
    ):
        assert domain.settle_saga(transaction(0, [], state=state)) is None


def test_account_currencies_are_bounded_oldest_out_first() -> None:
    from dtx_orders.lookups import AccountCurrencies

    known = AccountCurrencies(capacity=2)
    a, b, c = (uuid.UUID(int=i) for i in (1, 2, 3))
    assert known.get(a) is None
    known.put(a, "EUR")
    known.put(b, "USD")
    known.put(a, "EUR")  # already known: nothing is evicted
    assert (known.get(a), known.get(b)) == ("EUR", "USD")
    known.put(c, "GBP")
    assert known.get(a) is None
    assert (known.get(b), known.get(c)) == ("USD", "GBP")


def test_confirmed_rows_are_taken_once_and_bounded() -> None:
    from dtx_orders.lookups import ConfirmedRows

    rows = ConfirmedRows(capacity=2)
    first: Any = {"status": "CONFIRMED", "id": 1}  # stands in for an asyncpg.Record
    rows.put("g1", first)
    assert rows.take("g1") is first
    assert rows.take("g1") is None  # an answer is built from it once
    later: list[Any] = [{"id": 2}, {"id": 3}, {"id": 4}]
    for gid, row in zip(("g2", "g3", "g4"), later, strict=True):
        rows.put(gid, row)  # nobody takes g2 (say, recovery confirmed it): evicted
    assert rows.take("g2") is None
    assert rows.take("g4") is later[2]


def test_product_prices_are_trusted_for_their_ttl_then_asked_again() -> None:
    from dtx_orders.domain import Price
    from dtx_orders.lookups import ProductPrices

    now = [100.0]
    prices = ProductPrices(ttl_s=30, clock=lambda: now[0])
    eur = {"A": Price(250, "EUR"), "B": Price(300, "EUR")}
    assert prices.get_all(["A"]) is None
    prices.put_all(eur)
    assert prices.get_all(["A", "B"]) == eur
    assert prices.get_all(["A", "C"]) is None  # one unknown: ask for all
    now[0] += 29.9
    assert prices.get_all(["B"]) == {"B": eur["B"]}
    now[0] += 0.1
    assert prices.get_all(["B"]) is None  # too old
    prices.put_all(eur)
    prices.forget(["A"])
    assert prices.get_all(["A"]) is None
    assert prices.get_all(["B"]) == {"B": eur["B"]}


def test_product_prices_with_no_ttl_remember_nothing() -> None:
    from dtx_orders.domain import Price
    from dtx_orders.lookups import ProductPrices

    prices = ProductPrices(ttl_s=0)
    prices.put_all({"A": Price(250, "EUR")})
    assert prices.get_all(["A"]) is None
