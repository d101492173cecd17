"""A confirmed order is final: the order saga's last step, confirm_order, is its pivot.

The saga reserves stock, charges, then confirms the order (PENDING → CONFIRMED,
with its ``order.confirmed`` event). When the orchestrator cannot learn the
outcome of the confirmation — the orders participant answers later than the
step timeout, or the orchestrator dies after sending it — and the saga's
deadline then passes, the saga must still go forward: a customer told
"confirmed" (and notified once) must never find the order cancelled.

The orders participant is slowed by a failpoint (``participant.after_execute``:
the confirmation is committed, its answer held back beyond the step timeout),
in real processes with their own databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from dtx.v1 import common_pb2, orders_pb2, saga_pb2_grpc, transactions_pb2
from tests.support.saga_log import LOSE_SAVES
from tests.support.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

T = transactions_pb2
SLOW_CONFIRM = "participant.after_execute=sleep(1500)"
POLICY = {
    # The orders service gives each saga 3 s (DTX_TRANSACTION_TIMEOUT_MS in Stack).
    "timeouts": {"stepMs": 500},
    "retries": {"maxAttempts": 2, "backoffInitialMs": 20, "backoffMaxMs": 100},
    # Abort: before the pivot, exhausted rounds would turn the saga back.
    "recovery": {"intervalMs": 200, "maxAttempts": 100, "onExhausted": "Abort"},
}


@pytest.fixture
async def stack(run_dir: Path, new_database: Callable[[str], str]) -> AsyncIterator[Stack]:
    """The system with the saga orchestrator; every Execute answer of orders comes 1.5 s late."""
    system = Stack(run_dir, new_database, with_saga=True, policy=POLICY).build()
    system.procs["orders"].env["DTX_FAILPOINTS"] = SLOW_CONFIRM
    async with system.running():
        yield system


def saga_stub(stack: Stack) -> saga_pb2_grpc.SagaOrchestratorAsyncStub:
    return saga_pb2_grpc.SagaOrchestratorStub(stack.channel("saga"))


@dataclass(frozen=True)
class Placed:
    id: str
    gid: str
    total_minor: int


async def place_saga_order(stack: Stack, account: str) -> Placed:
    """PlaceOrder by saga; the order as stored (its reply may be PENDING, or an error, under load)."""
    key = uuid.uuid4().hex
    with contextlib.suppress(grpc.aio.AioRpcError):
        await stack.place(
            account, {"APPLE": 1}, protocol=common_pb2.PROTOCOL_SAGA, key=key, timeout=30
        )
    [row] = await stack.fetch(
        "orders", "SELECT id::text, gid, total_minor FROM orders WHERE idempotency_key = $1", key
    )
    return Placed(row["id"], row["gid"], row["total_minor"])


async def wait_confirmed(stack: Stack, *orders: Placed) -> None:
    """The saga's last step committed the orders' confirmation (its answer may still be late)."""
    ids = [o.id for o in orders]
    await stack.wait_until(
        lambda: stack.fetch(
            "orders",
            "SELECT 1 FROM orders WHERE id::text = ANY($1::text[]) AND status = 'CONFIRMED'"
            " HAVING count(*) = $2",
            ids,
            len(ids),
        ),
        timeout=30,
        what=f"orders {ids} confirmed by their saga's last step",
    )


async def wait_saga(stack: Stack, gid: str, states: set[int]) -> T.Transaction:
    last: T.Transaction | None = None

    async def reached() -> bool:
        nonlocal last
        try:
            last = await saga_stub(stack).GetSaga(T.GetTransactionRequest(gid=gid), timeout=5)
        except grpc.aio.AioRpcError:
            return False
        return last.state in states

    await stack.wait_until(reached, timeout=60, what=f"saga {gid} in {states} (last: {last})")
    assert last is not None
    return last


async def event_types(stack: Stack, service: str, order_id: str) -> list[str]:
    rows = await stack.fetch(
        service, "SELECT type FROM dtx_outbox WHERE key = $1 ORDER BY seq", order_id
    )
    return [r["type"] for r in rows]


async def assert_confirmed_once(stack: Stack, order: Placed) -> None:
    """CONFIRMED, one order.confirmed and no order.cancelled; charged and reserved, kept."""
    [row] = await stack.fetch("orders", "SELECT status FROM orders WHERE id = $1::uuid", order.id)
    assert row["status"] == "CONFIRMED"
    got = await stack.orders().GetOrder(orders_pb2.GetOrderRequest(order_id=order.id), timeout=10)
    assert got.status == orders_pb2.ORDER_STATUS_CONFIRMED
    assert await event_types(stack, "orders", order.id) == ["order.placed", "order.confirmed"]
    assert await event_types(stack, "payments", order.id) == ["payment.charged"]
    assert await event_types(stack, "inventory", order.id) == ["stock.reserved"]
    ledger = await stack.fetch(
        "payments", "SELECT kind, amount_minor FROM ledger WHERE order_id = $1", order.id
    )
    assert [(r["kind"], r["amount_minor"]) for r in ledger] == [("charge", -order.total_minor)]


async def steps_of(stack: Stack, gid: str) -> tuple[str, str, dict[str, str]]:
    [row] = await stack.fetch(
        "saga",
        "SELECT state, direction, jsonb_object_agg(s->>'step', s->>'state') AS steps"
        " FROM sagas, jsonb_array_elements(steps) s WHERE gid = $1 GROUP BY state, direction",
        gid,
    )
    return row["state"], row["direction"], json.loads(row["steps"])


async def test_a_late_confirmation_past_the_deadline_completes_even_when_aborted(
    stack: Stack,
) -> None:
    accounts = await stack.seed(2, 10_000, {"APPLE": (100, 50)})
    x, y = await asyncio.gather(
        place_saga_order(stack, accounts[0]), place_saga_order(stack, accounts[1])
    )
    # The confirmation commits at once; only its answer is late.
    await wait_confirmed(stack, x, y)

    # Well past both deadlines, every Execute of the pivot still times out: the
    # sagas keep going forward (the old rule compensated here and cancelled the orders).
    await stack.wait_until(
        lambda: stack.fetch(
            "saga",
            "SELECT 1 FROM sagas WHERE deadline < now() - interval '1 second'"
            " HAVING count(*) = 2 AND bool_and(attempts >= 2)",
        ),
        timeout=30,
        what="both sagas past their deadline after failed rounds",
    )
    for order in (x, y):
        assert await steps_of(stack, order.gid) == (
            "RUNNING",
            "forward",
            {"stock": "done", "payment": "done", "order": "failed"},
        )

    # A person turns y back: the orders participant refuses to compensate a
    # confirmed order (its effect is final), so nothing can be undone and the
    # saga completes instead, the order still confirmed.
    aborted = await saga_stub(stack).AbortSaga(
        T.InterveneRequest(gid=y.gid, actor="ops", reason="customer asked"), timeout=10
    )
    assert aborted.state == T.TRANSACTION_STATE_COMPENSATING
    stood = await wait_saga(
        stack,
        y.gid,
        {T.TRANSACTION_STATE_COMPLETED, T.TRANSACTION_STATE_NEEDS_INTERVENTION},
    )
    assert stood.state == T.TRANSACTION_STATE_COMPLETED, stood
    assert stood.reason.startswith("order: its effect is final"), stood.reason
    assert f"order {y.id} is CONFIRMED, and a confirmed order is final" in stood.reason
    assert "it had turned back: aborted by ops: customer asked" in stood.reason
    assert await steps_of(stack, y.gid) == (
        "COMPLETED",
        "forward",
        {"stock": "done", "payment": "done", "order": "done"},
    )

    # The participant answers in time again: x's next round completes it.
    orders = stack.procs["orders"]
    del orders.env["DTX_FAILPOINTS"]
    assert orders.terminate() == 0
    orders.start()
    done = await wait_saga(
        stack, x.gid, {T.TRANSACTION_STATE_COMPLETED, T.TRANSACTION_STATE_COMPENSATED}
    )
    assert done.state == T.TRANSACTION_STATE_COMPLETED, done
    assert await steps_of(stack, x.gid) == (
        "COMPLETED",
        "forward",
        {"stock": "done", "payment": "done", "order": "done"},
    )
    still = await saga_stub(stack).GetSaga(T.GetTransactionRequest(gid=y.gid), timeout=5)
    assert still.state == T.TRANSACTION_STATE_COMPLETED
    for order in (x, y):
        await assert_confirmed_once(stack, order)
    [apple] = await stack.fetch("inventory", "SELECT available, reserved FROM products")
    assert (apple["available"], apple["reserved"]) == (48, 2)


async def test_orchestrator_killed_after_sending_confirm_completes_past_the_deadline(
    stack: Stack,
) -> None:
    [account] = await stack.seed(1, 10_000, {"APPLE": (100, 50)})
    placing = asyncio.create_task(place_saga_order(stack, account))
    # The confirmation is committed; its answer is held back: kill the orchestrator now.
    await stack.wait_until(
        lambda: stack.fetch("orders", "SELECT 1 FROM orders WHERE status = 'CONFIRMED'"),
        timeout=30,
        what="the order confirmed by its saga's last step",
    )
    stack.procs["saga"].kill()
    order = await placing

    # Nobody drives the saga while its deadline passes; orders answers in time again.
    await stack.wait_until(
        lambda: stack.fetch("saga", "SELECT 1 FROM sagas WHERE deadline < now()"),
        timeout=30,
        what="the saga's deadline to pass",
    )
    state, direction, steps = await steps_of(stack, order.gid)
    assert (state, direction) == ("RUNNING", "forward")
    assert steps["order"] in ("pending", "failed")  # its outcome unknown to the log
    orders = stack.procs["orders"]
    del orders.env["DTX_FAILPOINTS"]
    assert orders.terminate() == 0
    orders.start()

    # Recovery finds the cursor at the pivot past the deadline: it executes it
    # again (the barrier answers "done") instead of compensating.
    stack.procs["saga"].start()
    saga = await wait_saga(
        stack, order.gid, {T.TRANSACTION_STATE_COMPLETED, T.TRANSACTION_STATE_COMPENSATED}
    )
    assert saga.state == T.TRANSACTION_STATE_COMPLETED, saga
    await assert_confirmed_once(stack, order)


@pytest.fixture
async def prompt_stack(run_dir: Path, new_database: Callable[[str], str]) -> AsyncIterator[Stack]:
    """The system with the saga orchestrator, every participant answering in time."""
    system = Stack(run_dir, new_database, with_saga=True, policy=POLICY).build()
    async with system.running():
        yield system


async def test_a_lagging_log_that_hides_the_confirmation_completes_instead_of_cancelling(
    prompt_stack: Stack,
) -> None:
    stack = prompt_stack
    [account] = await stack.seed(1, 10_000, {"APPLE": (100, 50)})
    order = await place_saga_order(stack, account)
    await wait_saga(stack, order.gid, {T.TRANSACTION_STATE_COMPLETED})
    await assert_confirmed_once(stack, order)

    # The log read back shows only the stock reserved: the cursor before the pivot,
    # past the deadline, so recovery turns the saga back. The confirmation it hid
    # is asked first; orders refuses to undo it (final), so nothing is undone and
    # the saga completes again.
    assert await stack.fetch("saga", LOSE_SAVES, order.gid, 1)
    # (The rewrite made it RUNNING: COMPLETED again only once recovery drove it.)
    saga = await wait_saga(
        stack,
        order.gid,
        {
            T.TRANSACTION_STATE_COMPLETED,
            T.TRANSACTION_STATE_COMPENSATED,
            T.TRANSACTION_STATE_NEEDS_INTERVENTION,
        },
    )
    assert saga.state == T.TRANSACTION_STATE_COMPLETED, saga
    assert saga.reason.startswith("order: its effect is final"), saga.reason
    assert f"order {order.id} is CONFIRMED, and a confirmed order is final" in saga.reason
    assert await steps_of(stack, order.gid) == (
        "COMPLETED",
        "forward",
        {"stock": "done", "payment": "done", "order": "done"},
    )
    # Still charged and reserved once: the confirmed order is whole.
    await assert_confirmed_once(stack, order)
    [apple] = await stack.fetch("inventory", "SELECT available, reserved FROM products")
    assert (apple["available"], apple["reserved"]) == (49, 1)
