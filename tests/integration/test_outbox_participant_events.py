"""Each participant writes its events in the transaction of the change, and only then.

Driven through the real barrier against the real PostgreSQL, as the
participant servicer drives it: a prepared branch's event is invisible until
COMMIT PREPARED and gone with ROLLBACK PREPARED; a refusal writes nothing; a
saga's compensation writes the undo's event.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

import dtx_inventory.main
import dtx_orders.main
import dtx_payments.main
from dtx.v1 import common_pb2, events_pb2
from dtx_inventory.participant import ReserveManager
from dtx_orders import storage as orders_storage
from dtx_orders.domain import Protocol, Settlement, Status
from dtx_orders.participant import ConfirmOrderManager
from dtx_orders.placement import finish_pending_order
from dtx_payments.participant import ChargeManager
from dtx_runtime.participant.barrier import CompensationRefused
from tests.integration.test_participants import (
    _pool,
    add_product,
    barrier,
    charge,
    confirm,
    gid,
    open_account,
    place_pending,
    reserve,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def payments(new_database: Callable[[str], str]) -> AsyncIterator[asyncpg.Pool]:
    definition = dtx_payments.main.SERVICE
    pool = await _pool(new_database("pay"), definition.name, dict(definition.migrations))
    yield pool
    await pool.close()


@pytest.fixture
async def inventory(new_database: Callable[[str], str]) -> AsyncIterator[asyncpg.Pool]:
    definition = dtx_inventory.main.SERVICE
    pool = await _pool(new_database("inv"), definition.name, dict(definition.migrations))
    yield pool
    await pool.close()


@pytest.fixture
async def orders(new_database: Callable[[str], str]) -> AsyncIterator[asyncpg.Pool]:
    definition = dtx_orders.main.SERVICE
    pool = await _pool(new_database("ord"), definition.name, dict(definition.migrations))
    yield pool
    await pool.close()


async def outbox(pool: asyncpg.Pool) -> list[tuple[str, str, str, events_pb2.Event]]:
    """(topic, key, type, event) of every outbox row, in write order."""
    rows = await pool.fetch("SELECT topic, key, type, payload FROM dtx_outbox ORDER BY seq")
    found = []
    for row in rows:
        event = events_pb2.Event.FromString(row["payload"])
        assert event.type == row["type"]
        assert event.aggregate_id == row["key"]
        assert event.schema_version == 1
        found.append((row["topic"], row["key"], row["type"], event))
    return found


async def test_a_charge_is_published_only_when_its_branch_commits(payments: asyncpg.Pool) -> None:
    account, other = await open_account(payments, 1_000), await open_account(payments, 1_000)
    b = barrier(payments, ChargeManager())
    committed, aborted = gid(), gid()
    assert (await b.prepare(committed, "payment", charge(account, 300))).yes
    assert (await b.prepare(aborted, "payment", charge(other, 200))).yes
    assert await outbox(payments) == []  # prepared: not visible to anyone yet
    await b.abort(aborted, "payment")
    await b.commit(committed, "payment")
    [(topic, key, event_type, event)] = await outbox(payments)
    assert (topic, key, event_type) == ("dtx.payments", "o-1", "payment.charged")
    assert event.payment == events_pb2.PaymentEvent(
        account_id=str(account), order_id="o-1", amount_minor=300, currency="EUR", gid=committed
    )


async def test_a_refused_charge_writes_nothing(payments: asyncpg.Pool) -> None:
    account = await open_account(payments, 100)
    b = barrier(payments, ChargeManager())
    assert not (await b.prepare(gid(), "payment", charge(account, 300))).yes
    assert not (await b.execute(gid(), "payment", charge(account, 300))).yes
    assert await outbox(payments) == []


async def test_a_compensated_charge_is_refunded(payments: asyncpg.Pool) -> None:
    account = await open_account(payments, 1_000)
    b = barrier(payments, ChargeManager())
    g = gid()
    assert (await b.execute(g, "payment", charge(account, 250))).yes
    await b.compensate(g, "payment")
    await b.compensate(g, "payment")  # repeated: no second refund, no second event
    types = [(t, e.payment.amount_minor, e.payment.gid) for _, _, t, e in await outbox(payments)]
    assert types == [("payment.charged", 250, g), ("payment.refunded", 250, g)]


async def test_a_charge_without_an_order_is_keyed_by_its_gid(payments: asyncpg.Pool) -> None:
    account = await open_account(payments, 1_000)
    operation = charge(account, 10)
    operation.charge.order_id = ""
    g = gid()
    assert (await barrier(payments, ChargeManager()).execute(g, "payment", operation)).yes
    [(_, key, _, event)] = await outbox(payments)
    assert key == g
    assert event.payment.order_id == ""


async def test_stock_reserved_and_released(inventory: asyncpg.Pool) -> None:
    await add_product(inventory, "B", 10)
    await add_product(inventory, "A", 10)
    b = barrier(inventory, ReserveManager())
    two_phase, saga = gid(), gid()
    assert (await b.prepare(two_phase, "stock", reserve([("B", 1), ("A", 2)], "o-2pc"))).yes
    await b.abort(two_phase, "stock")  # rolled back: no event
    assert not (await b.execute(gid(), "stock", reserve([("A", 99)], "o-big"))).yes
    assert (await b.execute(saga, "stock", reserve([("B", 3), ("A", 1)], "o-saga"))).yes
    await b.compensate(saga, "stock")
    written = await outbox(inventory)
    assert [(t, k, ty) for t, k, ty, _ in written] == [
        ("dtx.inventory", "o-saga", "stock.reserved"),
        ("dtx.inventory", "o-saga", "stock.released"),
    ]
    for _, _, _, event in written:
        assert list(event.stock.items) == [
            common_pb2.LineItem(sku="A", quantity=1),
            common_pb2.LineItem(sku="B", quantity=3),
        ]
        assert event.stock.gid == saga


async def test_order_events_follow_the_order(orders: asyncpg.Pool) -> None:
    confirmed = await place_pending(orders)
    b = barrier(orders, ConfirmOrderManager())
    assert (await b.prepare(confirmed.gid, "order", confirm(confirmed.id))).yes
    assert [ty for _, _, ty, _ in await outbox(orders)] == ["order.placed"]
    await b.commit(confirmed.gid, "order")

    rejected = await place_pending(orders)
    await finish_pending_order(
        orders, rejected.id, Settlement(Status.REJECTED, "insufficient funds")
    )
    failed = await place_pending(orders)
    await finish_pending_order(orders, failed.id, Settlement(Status.FAILED, "prepare timed out"))
    assert await finish_pending_order(orders, failed.id, Settlement(Status.FAILED, "again")) is None

    saga = await place_pending(orders, Protocol.SAGA)
    assert (await b.execute(saga.gid, "order", confirm(saga.id))).yes
    with pytest.raises(CompensationRefused, match="a confirmed order is final"):
        await b.compensate(saga.gid, "order")  # confirm is the saga's pivot: no event
    cancelled = await place_pending(orders, Protocol.SAGA)
    await finish_pending_order(
        orders, cancelled.id, Settlement(Status.CANCELLED, "stock: out of stock")
    )

    direct = await place_pending(orders, Protocol.UNCOORDINATED)
    async with orders.acquire() as conn:
        assert await orders_storage.confirm_uncoordinated(conn, direct.id) is not None
        assert await orders_storage.confirm_uncoordinated(conn, direct.id) is None

    by_order: dict[str, list[str]] = {}
    for topic, key, event_type, event in await outbox(orders):
        assert topic == "dtx.orders"
        assert event.order.order_id == key
        by_order.setdefault(key, []).append(event_type)
    assert by_order == {
        str(confirmed.id): ["order.placed", "order.confirmed"],
        str(rejected.id): ["order.placed", "order.rejected"],
        str(failed.id): ["order.placed", "order.failed"],
        str(saga.id): ["order.placed", "order.confirmed"],
        str(cancelled.id): ["order.placed", "order.cancelled"],
        str(direct.id): ["order.placed", "order.confirmed"],
    }
    events = {(e.order.order_id, e.type): e.order for _, _, _, e in await outbox(orders)}
    assert events[(str(rejected.id), "order.rejected")].reason == "insufficient funds"
    assert events[(str(cancelled.id), "order.cancelled")].reason == "stock: out of stock"
    placed = events[(str(confirmed.id), "order.placed")]
    assert (placed.total_minor, placed.currency, placed.gid) == (300, "EUR", confirmed.gid)
    assert placed.protocol == common_pb2.PROTOCOL_TWO_PHASE_COMMIT
    assert uuid.UUID(placed.account_id)


async def test_write_event_refuses_to_run_outside_a_transaction(orders: asyncpg.Pool) -> None:
    from dtx_runtime.outbox import write_event

    async with orders.acquire() as conn:
        with pytest.raises(RuntimeError, match="inside the transaction"):
            await write_event(
                conn,
                topic="dtx.orders",
                event_type="order.placed",
                aggregate_id="x",
                payload=events_pb2.OrderEvent(order_id="x"),
            )
