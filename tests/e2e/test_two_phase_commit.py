"""Two-phase commit across real processes and databases, including crashes at the worst moments."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from dtx.v1 import (
    coordinator_pb2,
    orders_pb2,
    participant_pb2,
    participant_pb2_grpc,
    transactions_pb2,
)
from tests.support.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

FAST_RECOVERY = {"recovery": {"intervalMs": 300}, "timeouts": {"transactionMs": 4000}}


@pytest.fixture
async def stack(run_dir: Path, new_database: Callable[[str], str]) -> AsyncIterator[Stack]:
    system = Stack(run_dir, new_database, policy=FAST_RECOVERY).build().start()
    try:
        yield system
    finally:
        await system.close_channels()
        system.stop()


async def balances(stack: Stack) -> dict[str, int]:
    rows = await stack.fetch("payments", "SELECT id::text, balance_minor FROM accounts")
    return {r["id"]: r["balance_minor"] for r in rows}


async def stock(stack: Stack) -> dict[str, tuple[int, int]]:
    rows = await stack.fetch("inventory", "SELECT sku, available, reserved FROM products")
    return {r["sku"]: (r["available"], r["reserved"]) for r in rows}


async def order_status(stack: Stack, order_id: str) -> orders_pb2.Order:
    return await stack.orders().GetOrder(orders_pb2.GetOrderRequest(order_id=order_id), timeout=5)


async def test_commit_reaches_all_three_databases(stack: Stack) -> None:
    [account] = await stack.seed(1, 10_000, {"WIDGET": (250, 10)})
    order = await stack.place(account, {"WIDGET": 2}, key="k-commit")
    assert order.status == orders_pb2.ORDER_STATUS_CONFIRMED, order.reason
    assert order.total_minor == 500
    # The answer is the stored order (built from the confirmation's row, not reread).
    assert order == await order_status(stack, order.id)
    assert await balances(stack) == {account: 9_500}
    assert await stock(stack) == {"WIDGET": (8, 2)}
    charges = await stack.fetch("payments", "SELECT amount_minor FROM ledger WHERE kind = 'charge'")
    assert [r["amount_minor"] for r in charges] == [-500]
    assert await stack.prepared() == []
    txn = await stack.coordinator().GetTransaction(
        transactions_pb2.GetTransactionRequest(gid=order.gid), timeout=5
    )
    assert txn.state == transactions_pb2.TRANSACTION_STATE_COMMITTED
    # Orders prepared its own branch and committed it from the answer.
    assert {b.branch: b.state for b in txn.branches} == {
        "order": "delegated",
        "payment": "committed",
        "stock": "committed",
    }
    prepares = await stack.fetch(
        "orders", "SELECT outcome FROM dtx_barrier WHERE gid = $1 AND op = 'prepare'", order.gid
    )
    assert [r["outcome"] for r in prepares] == ["prepared"]


async def test_a_no_vote_rolls_everything_back(stack: Stack) -> None:
    [account] = await stack.seed(1, 100, {"WIDGET": (250, 10)})
    order = await stack.place(account, {"WIDGET": 2})
    assert order.status == orders_pb2.ORDER_STATUS_REJECTED
    assert "insufficient funds" in order.reason
    assert await balances(stack) == {account: 100}
    assert await stock(stack) == {"WIDGET": (10, 0)}
    assert await stack.prepared() == []


async def test_a_price_changed_since_it_was_remembered_rejects_then_reprices(
    stack: Stack,
) -> None:
    """Orders prices from what it remembers; inventory refuses a price that has changed."""
    [account] = await stack.seed(1, 10_000, {"WIDGET": (250, 10)})
    first = await stack.place(account, {"WIDGET": 1})
    assert first.status == orders_pb2.ORDER_STATUS_CONFIRMED, first.reason
    # A price change behind the orders service's back (inventory has no call for it yet).
    await stack.fetch("inventory", "UPDATE products SET price_minor = 300 WHERE sku = 'WIDGET'")
    stale = await stack.place(account, {"WIDGET": 1})
    assert stale.status == orders_pb2.ORDER_STATUS_REJECTED
    assert "price changed: WIDGET costs 300 now, the order was priced at 250" in stale.reason
    assert stale.total_minor == 250
    repriced = await stack.place(account, {"WIDGET": 1})
    assert repriced.status == orders_pb2.ORDER_STATUS_CONFIRMED, repriced.reason
    assert repriced.total_minor == 300
    assert await balances(stack) == {account: 10_000 - 250 - 300}
    assert await stock(stack) == {"WIDGET": (8, 2)}
    assert await stack.prepared() == []


async def test_out_of_stock_is_a_rejection_with_the_sku(stack: Stack) -> None:
    [account] = await stack.seed(1, 10_000, {"WIDGET": (250, 1)})
    order = await stack.place(account, {"WIDGET": 3})
    assert order.status == orders_pb2.ORDER_STATUS_REJECTED
    assert "WIDGET" in order.reason
    assert await balances(stack) == {account: 10_000}


async def test_idempotency_key_returns_the_same_order(stack: Stack) -> None:
    [account] = await stack.seed(1, 10_000, {"WIDGET": (250, 10)})
    first = await stack.place(account, {"WIDGET": 1}, key="same")
    again = await stack.place(account, {"WIDGET": 1}, key="same")
    assert again.id == first.id
    assert await balances(stack) == {account: 9_750}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.place(account, {"WIDGET": 2}, key="same")
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_participant_calls_repeated_and_out_of_order(stack: Stack) -> None:
    [account] = await stack.seed(1, 1_000, {})
    payments = participant_pb2_grpc.ParticipantStub(stack.channel("payments"))
    charge = participant_pb2.BranchOperation(
        charge=participant_pb2.ChargeOperation(
            account_id=account, amount_minor=300, currency="EUR", order_id="o1"
        )
    )
    # Repeated prepare: the first answer, and the money moved once.
    for _ in range(3):
        vote = await payments.Prepare(
            participant_pb2.PrepareRequest(gid="g1", branch="payment", operation=charge), timeout=10
        )
        assert vote.vote == participant_pb2.VOTE_COMMIT
    for _ in range(2):
        await payments.Commit(participant_pb2.CommitRequest(gid="g1", branch="payment"), timeout=5)
    assert await balances(stack) == {account: 700}
    # Abort before prepare: the late prepare votes no and changes nothing.
    await payments.Abort(participant_pb2.AbortRequest(gid="g2", branch="payment"), timeout=5)
    late = await payments.Prepare(
        participant_pb2.PrepareRequest(gid="g2", branch="payment", operation=charge), timeout=10
    )
    assert late.vote == participant_pb2.VOTE_ABORT
    assert await balances(stack) == {account: 700}
    # Commit of a branch nobody prepared is an error, never a silent success.
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await payments.Commit(participant_pb2.CommitRequest(gid="g3", branch="payment"), timeout=5)
    assert unknown.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Commit after abort is refused too.
    with pytest.raises(grpc.aio.AioRpcError) as aborted:
        await payments.Commit(participant_pb2.CommitRequest(gid="g2", branch="payment"), timeout=5)
    assert aborted.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await stack.prepared() == []


async def test_bad_input_is_refused_and_writes_nothing(stack: Stack) -> None:
    [account] = await stack.seed(1, 1_000, {"WIDGET": (250, 10)})
    cases = [
        ({"WIDGET": 0}, account, grpc.StatusCode.INVALID_ARGUMENT, "quantity"),
        ({"NOPE": 1}, account, grpc.StatusCode.NOT_FOUND, "NOPE"),
        ({}, account, grpc.StatusCode.INVALID_ARGUMENT, "items"),
        (
            {"WIDGET": 1},
            "00000000-0000-0000-0000-000000000000",
            grpc.StatusCode.NOT_FOUND,
            "account",
        ),
        ({"WIDGET": 1}, "not-a-uuid", grpc.StatusCode.INVALID_ARGUMENT, "account_id"),
    ]
    for items, who, code, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.place(who, items)
        assert refused.value.code() == code, (items, who, refused.value.details())
        assert field in (refused.value.details() or ""), refused.value.details()
    assert await stack.fetch("orders", "SELECT id FROM orders") == []
    with pytest.raises(grpc.aio.AioRpcError) as bad_gid:
        await stack.coordinator().GetOutcome(
            coordinator_pb2.GetOutcomeRequest(gid="bad gid!"), timeout=5
        )
    assert bad_gid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "gid" in (bad_gid.value.details() or "")


async def _crash_and_recover(stack: Stack, failpoint: str, victim: str) -> orders_pb2.Order:
    """Place an order while ``victim`` is armed to SIGKILL itself at ``failpoint``; restart it."""
    [account] = await stack.seed(1, 10_000, {"WIDGET": (250, 10)})
    proc = stack.procs[victim]
    proc.kill()
    proc.env = {**proc.env, "DTX_FAILPOINTS": f"{failpoint}=kill"}
    proc.start()
    # Orders answers PENDING when the coordinator vanishes mid-call (its
    # reconciler settles the order later), FAILED when the coordinator saw a
    # participant die; what counts is the state after recovery.
    with contextlib.suppress(grpc.aio.AioRpcError):
        await stack.place(account, {"WIDGET": 2}, key="crash", timeout=15)
    assert proc.process is not None
    assert proc.process.wait(10) == -9, "the failpoint should have SIGKILLed the process"
    proc.env = {k: v for k, v in proc.env.items() if k != "DTX_FAILPOINTS"}
    proc.start()
    [row] = await stack.fetch("orders", "SELECT id::text FROM orders")

    async def settled() -> bool:
        order = await order_status(stack, row["id"])
        return order.status != orders_pb2.ORDER_STATUS_PENDING and not await stack.prepared()

    await stack.wait_until(settled, timeout=60, what="the order to settle after the crash")
    return await order_status(stack, row["id"])


async def test_coordinator_killed_after_decision_commits_everything(stack: Stack) -> None:
    order = await _crash_and_recover(stack, "coordinator.after_decision", "coordinator")
    assert order.status == orders_pb2.ORDER_STATUS_CONFIRMED
    assert list((await balances(stack)).values()) == [9_500]
    assert await stock(stack) == {"WIDGET": (8, 2)}


async def test_coordinator_killed_before_decision_aborts_everything(stack: Stack) -> None:
    order = await _crash_and_recover(stack, "coordinator.before_decision", "coordinator")
    assert order.status == orders_pb2.ORDER_STATUS_FAILED
    assert list((await balances(stack)).values()) == [10_000]
    assert await stock(stack) == {"WIDGET": (10, 0)}


async def test_participant_killed_after_prepare_recovers_consistent(stack: Stack) -> None:
    order = await _crash_and_recover(stack, "participant.after_prepare", "payments")
    # The coordinator never heard the vote: it aborts; the restarted payments
    # participant finds its prepared transaction and rolls it back.
    assert order.status in (orders_pb2.ORDER_STATUS_FAILED, orders_pb2.ORDER_STATUS_REJECTED)
    assert list((await balances(stack)).values()) == [10_000]
    assert await stock(stack) == {"WIDGET": (10, 0)}


async def test_orders_killed_after_its_own_prepare_aborts_everything(stack: Stack) -> None:
    order = await _crash_and_recover(stack, "participant.after_prepare", "orders")
    # Orders died before it asked the coordinator: its reaper finds the order's
    # branch prepared, GetOutcome presumes (and records) an abort, the
    # reconciler settles the order; payments and inventory never heard of it.
    assert order.status == orders_pb2.ORDER_STATUS_FAILED
    assert list((await balances(stack)).values()) == [10_000]
    assert await stock(stack) == {"WIDGET": (10, 0)}


async def test_orders_killed_before_applying_a_commit_confirms_on_restart(stack: Stack) -> None:
    order = await _crash_and_recover(stack, "orders.before_own_phase_two", "orders")
    # The coordinator committed and answered; orders died before committing its
    # own branch. The restarted reaper asks GetOutcome and commits it.
    assert order.status == orders_pb2.ORDER_STATUS_CONFIRMED
    assert list((await balances(stack)).values()) == [9_500]
    assert await stock(stack) == {"WIDGET": (8, 2)}
