"""Two coordinator replicas, no leader: one dies mid-load, the other finishes its work."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from dtx.v1 import common_pb2, coordinator_pb2, participant_pb2, transactions_pb2
from tests.support.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@pytest.fixture
async def stack(run_dir: Path, new_database: Callable[[str], str]) -> AsyncIterator[Stack]:
    system = Stack(
        run_dir,
        new_database,
        coordinators=2,
        policy={"recovery": {"intervalMs": 300}, "timeouts": {"transactionMs": 3000}},
    ).build()
    # Replica A decides, then stalls before phase two: a wide window to die in.
    system.procs["coordinator"].env["DTX_FAILPOINTS"] = "coordinator.after_decision=sleep(15000)"
    system.start()
    try:
        yield system
    finally:
        await system.close_channels()
        system.stop()


def transfer(gid: str, account: str, sku: str) -> coordinator_pb2.RunTransactionRequest:
    charge = participant_pb2.ChargeOperation(
        account_id=account, amount_minor=100, currency="EUR", order_id=gid
    )
    reserve = participant_pb2.ReserveOperation(
        order_id=gid, items=[common_pb2.LineItem(sku=sku, quantity=1)]
    )
    return coordinator_pb2.RunTransactionRequest(
        gid=gid,
        branches=[
            transactions_pb2.Branch(
                branch="payment",
                participant="payments",
                operation=participant_pb2.BranchOperation(charge=charge),
            ),
            transactions_pb2.Branch(
                branch="stock",
                participant="inventory",
                operation=participant_pb2.BranchOperation(reserve=reserve),
            ),
        ],
    )


async def test_a_dead_replicas_transactions_are_finished_by_the_other(stack: Stack) -> None:
    # Each transaction its own account and product: a prepared branch holds its
    # rows until phase two, and A stalls before phase two on purpose.
    skus = [f"BOLT-{i}" for i in range(20)]
    accounts = await stack.seed(20, 1_000, {sku: (100, 10) for sku in skus})
    replica_a, replica_b = stack.coordinator("coordinator"), stack.coordinator("coordinator1")
    gids = [f"replica-{i}" for i in range(20)]

    async def run(i: int) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await replica_a.RunTransaction(transfer(gids[i], accounts[i], skus[i]), timeout=30)

    def in_state(state: transactions_pb2.TransactionState.ValueType) -> Callable[[], object]:
        async def check() -> bool:
            for gid in gids:
                try:
                    txn = await replica_b.GetTransaction(
                        transactions_pb2.GetTransactionRequest(gid=gid), timeout=5
                    )
                except grpc.aio.AioRpcError:
                    return False  # not logged yet
                if txn.state != state:
                    return False
            return True

        return check

    calls = [asyncio.create_task(run(i)) for i in range(len(gids))]
    # All decided (commit logged) on A, none through phase two: A dies now.
    await stack.wait_until(
        in_state(transactions_pb2.TRANSACTION_STATE_COMMITTING), timeout=30, what="A's decisions"
    )
    stack.procs["coordinator"].kill()
    await asyncio.gather(*calls)
    await stack.wait_until(
        in_state(transactions_pb2.TRANSACTION_STATE_COMMITTED),
        timeout=60,
        what="replica B to commit A's transactions",
    )
    balances = await stack.fetch("payments", "SELECT balance_minor FROM accounts")
    assert [r["balance_minor"] for r in balances] == [900] * 20
    products = await stack.fetch("inventory", "SELECT available, reserved FROM products")
    assert [(r["available"], r["reserved"]) for r in products] == [(9, 1)] * 20
    assert await stack.prepared() == []
    owners = await stack.fetch(
        "coordinator",
        "SELECT DISTINCT lease_owner FROM global_transactions WHERE gid = ANY($1)",
        gids,
    )
    assert [r["lease_owner"] for r in owners] == [None]  # finished and released
