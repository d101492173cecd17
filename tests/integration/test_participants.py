"""Each service's ResourceManager under the real barrier, against the real PostgreSQL.

No gRPC: the :class:`Barrier` is driven directly, the way the participant
servicer does. Every test checks what moved and that money and stock are
conserved: a balance always equals its ledger, available + reserved never
changes, and no prepared transaction is left behind.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from asyncpg.pool import PoolConnectionProxy

import dtx_inventory.main
import dtx_orders.main
import dtx_payments.main
from dtx.v1 import common_pb2, participant_pb2
from dtx_inventory.domain import NewProduct
from dtx_inventory.participant import ReserveManager
from dtx_inventory.storage import create_product
from dtx_orders import domain as orders_domain
from dtx_orders import storage as orders_storage
from dtx_orders.domain import Price, Protocol, Settlement, Status
from dtx_orders.participant import ConfirmOrderManager
from dtx_orders.placement import finish_pending_order
from dtx_orders.reconciler import reconcile_once
from dtx_payments.domain import NewAccount
from dtx_payments.participant import ChargeManager
from dtx_payments.storage import create_account
from dtx_runtime.database import create_pool, migrate
from dtx_runtime.participant import Barrier, InvalidOperation, Refusal, ResourceManager, Vote
from dtx_runtime.participant.barrier import (
    ABORTED_FIRST,
    COMPENSATED_FIRST,
    BranchUnknown,
    CompensationRefused,
)

pytestmark = pytest.mark.integration


async def _pool(dsn: str, name: str, migrations: dict[str, Path]) -> asyncpg.Pool:
    pool = await create_pool(dsn, min_size=1, max_size=10, connect_timeout_s=20)
    await migrate(pool, migrations, scope=name)
    return pool


@pytest.fixture
async def payments_db(new_database: Callable[[str], str]) -> AsyncIterator[asyncpg.Pool]:
    definition = dtx_payments.main.SERVICE
    pool = await _pool(new_database("pay"), definition.name, dict(definition.migrations))
    yield pool
    await pool.close()


@pytest.fixture
async def inventory_db(new_database: Callable[[str], str]) -> AsyncIterator[asyncpg.Pool]:
    definition = dtx_inventory.main.SERVICE
    pool = await _pool(new_database("inv"), definition.name, dict(definition.migrations))
    yield pool
    await pool.close()


@pytest.fixture
async def orders_db(new_database: Callable[[str], str]) -> AsyncIterator[asyncpg.Pool]:
    definition = dtx_orders.main.SERVICE
    pool = await _pool(new_database("ord"), definition.name, dict(definition.migrations))
    yield pool
    await pool.close()


def gid() -> str:
    return uuid.uuid4().hex


def barrier(pool: asyncpg.Pool, manager: ResourceManager) -> Barrier:
    return Barrier(pool, manager, lock_timeout_ms=500, lock_attempts=3)


async def prepared(pool: asyncpg.Pool) -> list[str]:
    rows = await pool.fetch(
        "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY gid"
    )
    return [r["gid"] for r in rows]


# -- payments ----------------------------------------------------------------


async def open_account(pool: asyncpg.Pool, balance: int, currency: str = "EUR") -> uuid.UUID:
    account_id = uuid.uuid4()
    async with pool.acquire() as conn:
        await create_account(conn, account_id, NewAccount("Ada", currency, balance))
    return account_id


def charge(
    account_id: uuid.UUID, amount: int, currency: str = "EUR"
) -> participant_pb2.BranchOperation:
    return participant_pb2.BranchOperation(
        charge=participant_pb2.ChargeOperation(
            account_id=str(account_id), amount_minor=amount, currency=currency, order_id="o-1"
        )
    )


async def balance(pool: asyncpg.Pool, account_id: uuid.UUID) -> int:
    value: int = await pool.fetchval("SELECT balance_minor FROM accounts WHERE id = $1", account_id)
    return value


async def assert_money_conserved(pool: asyncpg.Pool) -> None:
    """Every balance equals the sum of its ledger rows."""
    rows = await pool.fetch(
        "SELECT a.id, a.balance_minor, coalesce(sum(l.amount_minor), 0) AS ledger"
        " FROM accounts a LEFT JOIN ledger l ON l.account_id = a.id GROUP BY a.id"
    )
    for row in rows:
        assert row["balance_minor"] == row["ledger"], dict(row)


async def ledger_kinds(pool: asyncpg.Pool, account_id: uuid.UUID) -> list[tuple[str, int]]:
    rows = await pool.fetch(
        "SELECT kind, amount_minor FROM ledger WHERE account_id = $1 ORDER BY id", account_id
    )
    return [(r["kind"], r["amount_minor"]) for r in rows]


async def test_charge_prepare_then_commit(payments_db: asyncpg.Pool) -> None:
    account = await open_account(payments_db, 1000)
    b, g = barrier(payments_db, ChargeManager()), gid()

    answer = await b.prepare(g, "payment", charge(account, 250))
    assert answer.vote is Vote.COMMIT
    assert await prepared(payments_db) == [f"dtx:{g}:payment"]
    assert await balance(payments_db, account) == 1000  # invisible until phase two

    await b.commit(g, "payment")
    assert await balance(payments_db, account) == 750
    assert await prepared(payments_db) == []
    assert await ledger_kinds(payments_db, account) == [("open", 1000), ("charge", -250)]
    await b.commit(g, "payment")  # repeated: fine, no second effect
    assert await balance(payments_db, account) == 750
    await assert_money_conserved(payments_db)


async def test_charge_prepare_then_abort(payments_db: asyncpg.Pool) -> None:
    account = await open_account(payments_db, 1000)
    b, g = barrier(payments_db, ChargeManager()), gid()
    assert (await b.prepare(g, "payment", charge(account, 250))).yes
    await b.abort(g, "payment")
    await b.abort(g, "payment")
    assert await prepared(payments_db) == []
    assert await balance(payments_db, account) == 1000
    with pytest.raises(BranchUnknown):
        await b.commit(g, "payment")
    await assert_money_conserved(payments_db)


@pytest.mark.parametrize(
    ("amount", "currency", "known", "reason"),
    [
        (250, "EUR", True, "insufficient funds: account {id} has 100, needs 250"),
        (50, "USD", True, "currency mismatch: account is EUR, charge is USD"),
        (50, "EUR", False, "unknown account {id}"),
    ],
)
async def test_charge_refused_changes_nothing(
    payments_db: asyncpg.Pool, amount: int, currency: str, known: bool, reason: str
) -> None:
    account = await open_account(payments_db, 100)
    target = account if known else uuid.uuid4()
    b, g = barrier(payments_db, ChargeManager()), gid()

    answer = await b.prepare(g, "payment", charge(target, amount, currency))
    assert answer.vote is Vote.ABORT
    assert answer.reason == reason.format(id=target)
    assert await prepared(payments_db) == []
    assert await balance(payments_db, account) == 100
    assert await ledger_kinds(payments_db, account) == [("open", 100)]

    # Repeated, the first answer stands even though the account could pay now.
    await payments_db.execute("UPDATE accounts SET balance_minor = 10000 WHERE id = $1", account)
    await payments_db.execute(
        "UPDATE ledger SET amount_minor = 10000 WHERE account_id = $1 AND kind = 'open'", account
    )
    again = await b.prepare(g, "payment", charge(target, amount, currency))
    assert (again.vote, again.reason) == (Vote.ABORT, answer.reason)
    with pytest.raises(BranchUnknown):
        await b.commit(g, "payment")
    await assert_money_conserved(payments_db)


async def test_repeated_prepare_returns_the_first_answer(payments_db: asyncpg.Pool) -> None:
    account = await open_account(payments_db, 1000)
    b, g = barrier(payments_db, ChargeManager()), gid()
    assert (await b.prepare(g, "payment", charge(account, 250))).yes
    assert (await b.prepare(g, "payment", charge(account, 250))).yes
    assert await prepared(payments_db) == [f"dtx:{g}:payment"]
    await b.commit(g, "payment")
    assert (await b.prepare(g, "payment", charge(account, 250))).yes  # after commit too
    assert await balance(payments_db, account) == 750
    await assert_money_conserved(payments_db)


async def test_abort_before_prepare_refuses_the_late_prepare(payments_db: asyncpg.Pool) -> None:
    account = await open_account(payments_db, 1000)
    b, g = barrier(payments_db, ChargeManager()), gid()
    await b.abort(g, "payment")
    answer = await b.prepare(g, "payment", charge(account, 250))
    assert (answer.vote, answer.reason) == (Vote.ABORT, ABORTED_FIRST)
    assert await prepared(payments_db) == []
    assert await balance(payments_db, account) == 1000
    await assert_money_conserved(payments_db)


async def test_commit_of_an_unknown_branch_raises(payments_db: asyncpg.Pool) -> None:
    with pytest.raises(BranchUnknown):
        await barrier(payments_db, ChargeManager()).commit(gid(), "payment")


async def test_charge_of_another_kind_is_invalid(payments_db: asyncpg.Pool) -> None:
    b = barrier(payments_db, ChargeManager())
    reserve = participant_pb2.BranchOperation(
        reserve=participant_pb2.ReserveOperation(order_id="o")
    )
    with pytest.raises(InvalidOperation, match="payments accepts charge, got reserve"):
        await b.prepare(gid(), "payment", reserve)
    assert await payments_db.fetchval("SELECT count(*) FROM dtx_barrier") == 0


async def test_saga_charge_execute_and_compensate(payments_db: asyncpg.Pool) -> None:
    account = await open_account(payments_db, 1000)
    b, g = barrier(payments_db, ChargeManager()), gid()

    assert (await b.execute(g, "payment", charge(account, 300))).yes
    assert await balance(payments_db, account) == 700
    assert (await b.execute(g, "payment", charge(account, 300))).yes  # repeated
    assert await balance(payments_db, account) == 700

    await b.compensate(g, "payment")
    assert await balance(payments_db, account) == 1000
    await b.compensate(g, "payment")  # repeated: no second refund
    assert await balance(payments_db, account) == 1000
    assert await ledger_kinds(payments_db, account) == [
        ("open", 1000),
        ("charge", -300),
        ("refund", 300),
    ]
    # The action after its compensation keeps its first answer, with no new effect.
    assert (await b.execute(g, "payment", charge(account, 300))).yes
    assert await balance(payments_db, account) == 1000
    await assert_money_conserved(payments_db)


async def test_saga_charge_refused_then_compensated(payments_db: asyncpg.Pool) -> None:
    account = await open_account(payments_db, 100)
    b, g = barrier(payments_db, ChargeManager()), gid()
    answer = await b.execute(g, "payment", charge(account, 300))
    assert (answer.vote, answer.reason) == (
        Vote.ABORT,
        f"insufficient funds: account {account} has 100, needs 300",
    )
    await b.compensate(g, "payment")  # nothing to undo
    assert await balance(payments_db, account) == 100
    assert await ledger_kinds(payments_db, account) == [("open", 100)]
    await assert_money_conserved(payments_db)


async def test_compensate_before_execute_refuses_the_action(payments_db: asyncpg.Pool) -> None:
    account = await open_account(payments_db, 1000)
    b, g = barrier(payments_db, ChargeManager()), gid()
    await b.compensate(g, "payment")
    answer = await b.execute(g, "payment", charge(account, 300))
    assert (answer.vote, answer.reason) == (Vote.ABORT, COMPENSATED_FIRST)
    assert await balance(payments_db, account) == 1000
    assert await ledger_kinds(payments_db, account) == [("open", 1000)]
    await assert_money_conserved(payments_db)


class FinalCharge(ChargeManager):
    """A charge whose undo refunds, then refuses: the barrier must keep neither."""

    async def undo(
        self,
        conn: PoolConnectionProxy,
        gid: str,
        branch: str,
        operation: participant_pb2.BranchOperation,
    ) -> None:
        await super().undo(conn, gid, branch, operation)
        raise Refusal("the charge is final")


async def test_a_refused_compensation_changes_and_records_nothing(
    payments_db: asyncpg.Pool,
) -> None:
    account = await open_account(payments_db, 1000)
    b, g = barrier(payments_db, FinalCharge()), gid()
    assert (await b.execute(g, "payment", charge(account, 300))).yes
    for _ in range(2):  # a repeated Compensate asks again and is refused again
        with pytest.raises(CompensationRefused) as refused:
            await b.compensate(g, "payment")
        assert str(refused.value) == f"branch dtx:{g}:payment cannot be compensated:" + (
            " the charge is final"
        )
    # The refund undo made before refusing was rolled back with the compensate row.
    assert await balance(payments_db, account) == 700
    assert await ledger_kinds(payments_db, account) == [("open", 1000), ("charge", -300)]
    rows = await payments_db.fetch("SELECT op, outcome FROM dtx_barrier WHERE gid = $1", g)
    assert [(r["op"], r["outcome"]) for r in rows] == [("action", "done")]
    await assert_money_conserved(payments_db)


async def test_concurrent_charges_never_overdraw(payments_db: asyncpg.Pool) -> None:
    account = await open_account(payments_db, 1000)
    b = barrier(payments_db, ChargeManager())
    answers = await asyncio.gather(
        *(b.execute(gid(), "payment", charge(account, 150)) for _ in range(10))
    )
    assert sum(a.yes for a in answers) == 6  # 6 * 150 = 900 <= 1000 < 7 * 150
    assert await balance(payments_db, account) == 100
    await assert_money_conserved(payments_db)


# -- inventory ---------------------------------------------------------------


async def add_product(pool: asyncpg.Pool, sku: str, stock: int, price: int = 100) -> None:
    async with pool.acquire() as conn:
        await create_product(conn, NewProduct(sku, sku.title(), price, stock), "EUR")


def reserve(items: list[tuple[str, int]], order_id: str = "o-1") -> participant_pb2.BranchOperation:
    return participant_pb2.BranchOperation(
        reserve=participant_pb2.ReserveOperation(
            order_id=order_id,
            items=[common_pb2.LineItem(sku=s, quantity=q) for s, q in items],
        )
    )


async def stock(pool: asyncpg.Pool) -> dict[str, tuple[int, int]]:
    rows = await pool.fetch("SELECT sku, available, reserved FROM products ORDER BY sku")
    return {r["sku"]: (r["available"], r["reserved"]) for r in rows}


async def reservations(pool: asyncpg.Pool) -> list[tuple[str, str, int, str]]:
    rows = await pool.fetch(
        "SELECT order_id, sku, quantity, status FROM reservations ORDER BY order_id, sku"
    )
    return [(r["order_id"], r["sku"], r["quantity"], r["status"]) for r in rows]


async def assert_stock_conserved(pool: asyncpg.Pool, totals: dict[str, int]) -> None:
    """available + reserved never changes, and reserved equals what held reservations hold."""
    rows = await pool.fetch(
        "SELECT p.sku, p.available, p.reserved,"
        " coalesce(sum(r.quantity) FILTER (WHERE r.status = 'held'), 0) AS held"
        " FROM products p LEFT JOIN reservations r ON r.sku = p.sku GROUP BY p.sku"
    )
    for row in rows:
        assert row["available"] + row["reserved"] == totals[row["sku"]], dict(row)
        assert row["reserved"] == row["held"], dict(row)


async def test_reserve_prepare_then_commit(inventory_db: asyncpg.Pool) -> None:
    await add_product(inventory_db, "APPLE", 10)
    await add_product(inventory_db, "PEAR", 5)
    b, g = barrier(inventory_db, ReserveManager()), gid()

    answer = await b.prepare(g, "stock", reserve([("PEAR", 5), ("APPLE", 3)]))
    assert answer.yes
    assert await stock(inventory_db) == {"APPLE": (10, 0), "PEAR": (5, 0)}
    await b.commit(g, "stock")
    await b.commit(g, "stock")
    assert await stock(inventory_db) == {"APPLE": (7, 3), "PEAR": (0, 5)}
    assert await reservations(inventory_db) == [
        ("o-1", "APPLE", 3, "held"),
        ("o-1", "PEAR", 5, "held"),
    ]
    assert await prepared(inventory_db) == []
    await assert_stock_conserved(inventory_db, {"APPLE": 10, "PEAR": 5})


@pytest.mark.parametrize(
    ("items", "reason"),
    [
        ([("APPLE", 3), ("PEAR", 6)], "out of stock: PEAR has 5 available, needs 6"),
        ([("APPLE", 3), ("KIWI", 1)], "unknown sku KIWI"),
        ([("PEAR", 1), ("APPLE", 11)], "out of stock: APPLE has 10 available, needs 11"),
    ],
)
async def test_reserve_refused_changes_nothing(
    inventory_db: asyncpg.Pool, items: list[tuple[str, int]], reason: str
) -> None:
    await add_product(inventory_db, "APPLE", 10)
    await add_product(inventory_db, "PEAR", 5)
    b, g = barrier(inventory_db, ReserveManager()), gid()

    answer = await b.prepare(g, "stock", reserve(items))
    assert (answer.vote, answer.reason) == (Vote.ABORT, reason)
    again = await b.prepare(g, "stock", reserve(items))
    assert (again.vote, again.reason) == (Vote.ABORT, reason)
    assert await stock(inventory_db) == {"APPLE": (10, 0), "PEAR": (5, 0)}
    assert await reservations(inventory_db) == []
    assert await prepared(inventory_db) == []
    with pytest.raises(BranchUnknown):
        await b.commit(g, "stock")


async def test_reserve_abort_before_prepare(inventory_db: asyncpg.Pool) -> None:
    await add_product(inventory_db, "APPLE", 10)
    b, g = barrier(inventory_db, ReserveManager()), gid()
    await b.abort(g, "stock")
    answer = await b.prepare(g, "stock", reserve([("APPLE", 1)]))
    assert (answer.vote, answer.reason) == (Vote.ABORT, ABORTED_FIRST)
    assert await stock(inventory_db) == {"APPLE": (10, 0)}
    assert await reservations(inventory_db) == []


async def test_reserve_prepare_then_abort(inventory_db: asyncpg.Pool) -> None:
    await add_product(inventory_db, "APPLE", 10)
    b, g = barrier(inventory_db, ReserveManager()), gid()
    assert (await b.prepare(g, "stock", reserve([("APPLE", 4)]))).yes
    await b.abort(g, "stock")
    assert await stock(inventory_db) == {"APPLE": (10, 0)}
    assert await reservations(inventory_db) == []
    assert await prepared(inventory_db) == []


async def test_second_reservation_of_the_same_order_is_refused(inventory_db: asyncpg.Pool) -> None:
    await add_product(inventory_db, "APPLE", 10)
    b = barrier(inventory_db, ReserveManager())
    assert (await b.execute(gid(), "stock", reserve([("APPLE", 1)], "o-9"))).yes
    answer = await b.execute(gid(), "stock", reserve([("APPLE", 2)], "o-9"))
    assert (answer.vote, answer.reason) == (
        Vote.ABORT,
        "order o-9 already holds a reservation of APPLE",
    )
    assert await stock(inventory_db) == {"APPLE": (9, 1)}
    await assert_stock_conserved(inventory_db, {"APPLE": 10})


async def test_saga_reserve_execute_and_compensate(inventory_db: asyncpg.Pool) -> None:
    await add_product(inventory_db, "APPLE", 10)
    await add_product(inventory_db, "PEAR", 5)
    b, g = barrier(inventory_db, ReserveManager()), gid()
    op = reserve([("APPLE", 2), ("PEAR", 1)])

    assert (await b.execute(g, "stock", op)).yes
    assert (await b.execute(g, "stock", op)).yes
    assert await stock(inventory_db) == {"APPLE": (8, 2), "PEAR": (4, 1)}
    await b.compensate(g, "stock")
    await b.compensate(g, "stock")
    assert await stock(inventory_db) == {"APPLE": (10, 0), "PEAR": (5, 0)}
    assert [r[3] for r in await reservations(inventory_db)] == ["released", "released"]
    await assert_stock_conserved(inventory_db, {"APPLE": 10, "PEAR": 5})


async def test_reserve_compensate_before_execute(inventory_db: asyncpg.Pool) -> None:
    await add_product(inventory_db, "APPLE", 10)
    b, g = barrier(inventory_db, ReserveManager()), gid()
    await b.compensate(g, "stock")
    answer = await b.execute(g, "stock", reserve([("APPLE", 2)]))
    assert (answer.vote, answer.reason) == (Vote.ABORT, COMPENSATED_FIRST)
    assert await stock(inventory_db) == {"APPLE": (10, 0)}
    assert await reservations(inventory_db) == []


async def test_concurrent_reservations_in_any_item_order(inventory_db: asyncpg.Pool) -> None:
    """Overlapping SKUs given in random orders: no deadlock, no oversell, stock conserved."""
    skus = ["A", "B", "C", "D"]
    for sku in skus:
        await add_product(inventory_db, sku, 20)
    b = Barrier(inventory_db, ReserveManager(), lock_timeout_ms=5000)
    rnd = random.Random(7)
    ops = []
    for i in range(40):
        items = [(sku, rnd.randint(1, 3)) for sku in rnd.sample(skus, rnd.randint(2, 4))]
        ops.append(b.execute(gid(), "stock", reserve(items, f"o-{i}")))
    answers = await asyncio.gather(*ops)
    assert any(a.yes for a in answers)
    for a in answers:
        assert a.yes or a.reason.startswith("out of stock: "), a.reason
    levels = await stock(inventory_db)
    assert all(available >= 0 for available, _ in levels.values())
    await assert_stock_conserved(inventory_db, dict.fromkeys(skus, 20))


# -- orders ------------------------------------------------------------------


async def place_pending(
    pool: asyncpg.Pool, protocol: Protocol = Protocol.TWO_PHASE_COMMIT
) -> orders_domain.NewOrder:
    request = orders_domain.OrderRequest(
        account_id=uuid.uuid4(),
        items=(orders_domain.Line("APPLE", 2),),
        protocol=protocol,
        idempotency_key=None,
    )
    lines = orders_domain.price_items(request.items, {"APPLE": Price(150, "EUR")}, "EUR")
    order = orders_domain.new_order(request, lines, "EUR")
    async with pool.acquire() as conn:
        row = await orders_storage.insert_order(conn, order)
    assert row is not None
    assert json.loads(row["items"]) == [{"sku": "APPLE", "quantity": 2, "unit_price_minor": 150}]
    assert row["total_minor"] == 300
    return order


def confirm(order_id: uuid.UUID) -> participant_pb2.BranchOperation:
    return participant_pb2.BranchOperation(
        confirm_order=participant_pb2.ConfirmOrderOperation(order_id=str(order_id))
    )


async def status(pool: asyncpg.Pool, order_id: uuid.UUID) -> tuple[str, str]:
    row = await pool.fetchrow("SELECT status, reason FROM orders WHERE id = $1", order_id)
    assert row is not None
    return row["status"], row["reason"]


async def test_confirm_prepare_then_commit(orders_db: asyncpg.Pool) -> None:
    order = await place_pending(orders_db)
    b = barrier(orders_db, ConfirmOrderManager())
    assert (await b.prepare(order.gid, "order", confirm(order.id))).yes
    assert (await status(orders_db, order.id))[0] == "PENDING"

    # While prepared, the row is held: settling it gives up instead of waiting.
    assert (
        await finish_pending_order(orders_db, order.id, Settlement(Status.FAILED, "late")) is None
    )

    await b.commit(order.gid, "order")
    assert (await status(orders_db, order.id))[0] == "CONFIRMED"
    assert await prepared(orders_db) == []
    # Settled already: a late settlement changes nothing.
    assert (
        await finish_pending_order(orders_db, order.id, Settlement(Status.FAILED, "late")) is None
    )
    assert (await status(orders_db, order.id))[0] == "CONFIRMED"


async def test_confirm_refusals(orders_db: asyncpg.Pool) -> None:
    order = await place_pending(orders_db)
    b = barrier(orders_db, ConfirmOrderManager())
    settled = await finish_pending_order(
        orders_db, order.id, Settlement(Status.REJECTED, "no money")
    )
    assert settled is not None
    assert settled["status"] == "REJECTED"

    answer = await b.prepare(order.gid, "order", confirm(order.id))
    assert (answer.vote, answer.reason) == (
        Vote.ABORT,
        f"order {order.id} is REJECTED, not PENDING",
    )
    unknown = uuid.uuid4()
    answer = await b.prepare(gid(), "order", confirm(unknown))
    assert (answer.vote, answer.reason) == (Vote.ABORT, f"unknown order {unknown}")
    other = await place_pending(orders_db)
    stranger = gid()
    answer = await b.prepare(stranger, "order", confirm(other.id))
    assert answer.vote is Vote.ABORT
    assert f"settled by transaction {other.gid}, not {stranger}" in answer.reason
    assert (await status(orders_db, other.id))[0] == "PENDING"
    assert await prepared(orders_db) == []


async def test_confirm_abort_leaves_the_order_pending(orders_db: asyncpg.Pool) -> None:
    order = await place_pending(orders_db)
    b = barrier(orders_db, ConfirmOrderManager())
    assert (await b.prepare(order.gid, "order", confirm(order.id))).yes
    await b.abort(order.gid, "order")
    assert (await status(orders_db, order.id))[0] == "PENDING"
    settled = await finish_pending_order(
        orders_db, order.id, Settlement(Status.FAILED, "coordinator gave up")
    )
    assert settled is not None
    assert (settled["status"], settled["reason"]) == ("FAILED", "coordinator gave up")


async def outbox_types(pool: asyncpg.Pool, order_id: uuid.UUID) -> list[str]:
    rows = await pool.fetch(
        "SELECT type FROM dtx_outbox WHERE key = $1 ORDER BY seq", str(order_id)
    )
    return [r["type"] for r in rows]


async def test_saga_confirm_is_final_its_compensation_is_refused(orders_db: asyncpg.Pool) -> None:
    order = await place_pending(orders_db, Protocol.SAGA)
    b = barrier(orders_db, ConfirmOrderManager())
    assert (await b.execute(order.gid, "order", confirm(order.id))).yes
    assert (await b.execute(order.gid, "order", confirm(order.id))).yes
    assert (await status(orders_db, order.id))[0] == "CONFIRMED"
    for _ in range(2):  # refused every time: a confirmed order is final
        with pytest.raises(CompensationRefused) as refused:
            await b.compensate(order.gid, "order")
        assert str(refused.value) == (
            f"branch dtx:{order.gid}:order cannot be compensated: order {order.id} is CONFIRMED,"
            f" and a confirmed order is final: saga {order.gid} cannot cancel it"
        )
    assert await status(orders_db, order.id) == ("CONFIRMED", "")
    assert await outbox_types(orders_db, order.id) == ["order.placed", "order.confirmed"]
    rows = await orders_db.fetch(
        "SELECT op, outcome FROM dtx_barrier WHERE gid = $1 ORDER BY op", order.gid
    )
    assert [(r["op"], r["outcome"]) for r in rows] == [("action", "done")]


async def test_confirm_compensated_before_execute(orders_db: asyncpg.Pool) -> None:
    order = await place_pending(orders_db, Protocol.SAGA)
    b = barrier(orders_db, ConfirmOrderManager())
    await b.compensate(order.gid, "order")  # a recorded no-op: nothing ran, nothing to refuse
    await b.compensate(order.gid, "order")
    answer = await b.execute(order.gid, "order", confirm(order.id))
    assert (answer.vote, answer.reason) == (Vote.ABORT, COMPENSATED_FIRST)
    assert (await status(orders_db, order.id))[0] == "PENDING"
    assert await outbox_types(orders_db, order.id) == ["order.placed"]


async def test_idempotency_key_is_unique(orders_db: asyncpg.Pool) -> None:
    request = orders_domain.OrderRequest(
        uuid.uuid4(), (orders_domain.Line("APPLE", 1),), Protocol.SAGA, "key-1"
    )
    lines = orders_domain.price_items(request.items, {"APPLE": Price(5, "EUR")}, "EUR")
    first = orders_domain.new_order(request, lines, "EUR")
    second = orders_domain.new_order(request, lines, "EUR")
    async with orders_db.acquire() as conn:
        assert await orders_storage.insert_order(conn, first) is not None
        assert await orders_storage.insert_order(conn, second) is None
        found = await orders_storage.get_by_key(conn, "key-1")
    assert found is not None
    assert found["id"] == first.id


async def test_reconciler_settles_old_pending_orders(orders_db: asyncpg.Pool) -> None:
    orders = [await place_pending(orders_db) for _ in range(5)]
    saga = await place_pending(orders_db, Protocol.SAGA)
    fresh = await place_pending(orders_db)
    await orders_db.execute(
        "UPDATE orders SET created_at = now() - interval '1 hour' WHERE id <> $1", fresh.id
    )
    held = orders[1]
    b = barrier(orders_db, ConfirmOrderManager())
    assert (await b.prepare(held.gid, "order", confirm(held.id))).yes  # holds the row

    answers = {
        orders[0].gid: Settlement(Status.REJECTED, "payment: insufficient funds"),
        held.gid: Settlement(Status.FAILED, "prepare timed out"),
        orders[2].gid: None,  # undecided
        orders[4].gid: Settlement(Status.FAILED, "stock: unavailable"),
        saga.gid: Settlement(Status.CANCELLED, "stock: out of stock"),
        fresh.gid: Settlement(Status.FAILED, "must not be asked"),
    }
    asked: list[str] = []

    async def lookup(protocol: Protocol, g: str) -> Settlement | None:
        asked.append(g)
        if g == orders[3].gid:
            raise RuntimeError("coordinator unreachable")
        assert protocol is (Protocol.SAGA if g == saga.gid else Protocol.TWO_PHASE_COMMIT)
        return answers[g]

    report = await reconcile_once(orders_db, lookup, older_than_s=30, batch=2)
    assert (report.settled, report.waiting, report.failed) == (3, 2, 1)
    assert sorted(asked) == sorted(o.gid for o in [*orders, saga])
    assert await status(orders_db, orders[0].id) == ("REJECTED", "payment: insufficient funds")
    assert (await status(orders_db, held.id))[0] == "PENDING"
    assert (await status(orders_db, orders[2].id))[0] == "PENDING"
    assert (await status(orders_db, orders[3].id))[0] == "PENDING"
    assert await status(orders_db, orders[4].id) == ("FAILED", "stock: unavailable")
    assert await status(orders_db, saga.id) == ("CANCELLED", "stock: out of stock")
    assert (await status(orders_db, fresh.id))[0] == "PENDING"
    await b.abort(held.gid, "order")


async def test_reconciler_pages_past_a_full_batch_of_undecided(orders_db: asyncpg.Pool) -> None:
    orders = [await place_pending(orders_db) for _ in range(7)]
    await orders_db.execute("UPDATE orders SET created_at = now() - interval '1 hour'")
    last = orders[5]  # the only one decided, on whichever page it falls

    async def lookup(protocol: Protocol, g: str) -> Settlement | None:
        return Settlement(Status.FAILED, "x") if g == last.gid else None

    report = await reconcile_once(orders_db, lookup, older_than_s=30, batch=3)
    assert (report.settled, report.waiting, report.failed) == (1, 6, 0)
    assert (await status(orders_db, last.id))[0] == "FAILED"
