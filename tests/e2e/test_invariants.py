"""Jepsen-style: concurrent 2PC and saga orders while processes are SIGKILLed; nothing is lost or made up.

The stack runs as in production: with Kafka (the session's broker, topics of
this test's own) and the notifications service. A nemesis kills a random
service (coordinator, saga, participants, notifications) every few seconds
and restarts it; clients keep placing orders and tolerate the errors. Once
the nemesis stops and recovery has run, money and stock must be conserved, no
balance or stock negative, every order terminal, and no prepared transaction
left anywhere. And the events too survive the kills: every outbox drained onto
its topic, exactly one notification per terminal order (saying its status),
none for anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from dtx.v1 import common_pb2, orders_pb2
from dtx_runtime.outbox import delete_topics
from tests.support.events import (
    ALL_TOPICS,
    OUTBOX_SERVICES,
    lost_events,
    notification_problems,
    unsent,
)
from tests.support.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

ACCOUNTS, BALANCE = 8, 5_000
PRODUCTS = {"APPLE": (100, 40), "PEAR": (150, 40), "PLUM": (300, 30), "FIG": (250, 25)}
TERMINAL = {
    orders_pb2.ORDER_STATUS_CONFIRMED,
    orders_pb2.ORDER_STATUS_REJECTED,
    orders_pb2.ORDER_STATUS_FAILED,
    orders_pb2.ORDER_STATUS_CANCELLED,
}
STATUS_NAMES = {"PENDING", "CONFIRMED", "REJECTED", "FAILED", "CANCELLED"}


@pytest.fixture
def bootstrap(infra: Any) -> str:
    return str(infra.kafka.bootstrap)


@pytest.fixture
def prefix() -> str:
    """This test's topics on the shared broker (``DTX_KAFKA_TOPIC_PREFIX``)."""
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.fixture
async def stack(
    run_dir: Path, new_database: Callable[[str], str], bootstrap: str, prefix: str
) -> AsyncIterator[Stack]:
    system = Stack(
        run_dir,
        new_database,
        with_saga=True,
        policy={"recovery": {"intervalMs": 300}, "timeouts": {"transactionMs": 4000}},
        kafka_bootstrap=bootstrap,
        extra_services=("notifications",),
        env={
            "DTX_KAFKA_TOPIC_PREFIX": prefix,
            "DTX_NOTIFICATIONS_GROUP_ID": f"{prefix}notifications",
        },
    ).build()
    try:
        async with system.running():
            yield system
    finally:
        await delete_topics(bootstrap, [prefix + t for t in ALL_TOPICS])


async def check_invariants(stack: Stack, accounts: list[str]) -> Counter[str]:
    orders = await stack.fetch("orders", "SELECT id::text, status, total_minor, items FROM orders")
    statuses = Counter(r["status"] for r in orders)
    assert set(statuses) <= STATUS_NAMES - {"PENDING"}, f"orders not terminal: {statuses}"
    confirmed = [r for r in orders if r["status"] == "CONFIRMED"]

    balances = await stack.fetch("payments", "SELECT balance_minor FROM accounts")
    assert all(r["balance_minor"] >= 0 for r in balances)
    charged = sum(r["total_minor"] for r in confirmed)
    assert sum(r["balance_minor"] for r in balances) + charged == ACCOUNTS * BALANCE, (
        "money was created or destroyed"
    )
    ledger = await stack.fetch(
        "payments",
        "SELECT order_id, sum(amount_minor)::bigint AS net FROM ledger"
        " WHERE kind IN ('charge', 'refund') GROUP BY order_id",
    )
    net = {r["order_id"]: -r["net"] for r in ledger if r["net"] != 0}
    assert net == {r["id"]: r["total_minor"] for r in confirmed}, "ledger disagrees with orders"

    wanted: Counter[str] = Counter()
    for row in confirmed:
        for item in json.loads(row["items"]):
            wanted[item["sku"]] += item["quantity"]
    products = await stack.fetch("inventory", "SELECT sku, available, reserved FROM products")
    for row in products:
        assert row["available"] >= 0
        assert row["reserved"] >= 0
        assert row["available"] + row["reserved"] == PRODUCTS[row["sku"]][1], (
            f"{row['sku']} not conserved"
        )
        assert row["reserved"] == wanted[row["sku"]], f"{row['sku']} reserved disagrees with orders"
    assert await stack.prepared() == [], "prepared transactions left behind"
    return statuses


async def check_events(stack: Stack, bootstrap: str, prefix: str) -> None:
    """Every outbox drained, every event on its topic, one notification per terminal order."""

    async def delivered() -> bool:
        return not any((await unsent(stack)).values()) and not await notification_problems(stack)

    # On a timeout, the assertions below say what is missing.
    with contextlib.suppress(AssertionError):
        await stack.wait_until(delivered, timeout=90, what="every event published and notified")
    assert await unsent(stack) == dict.fromkeys(OUTBOX_SERVICES, 0), "outbox rows left unsent"
    problems = await notification_problems(stack)
    assert problems == [], f"{len(problems)} notification problem(s): {problems[:10]}"
    lost, again = await lost_events(stack, bootstrap, prefix)
    assert lost == [], f"{len(lost)} event(s) marked sent but not on Kafka: {lost[:10]}"
    print(f"events published more than once (at least once): {again}")


async def test_money_and_stock_are_conserved_while_processes_die(
    stack: Stack, bootstrap: str, prefix: str
) -> None:
    accounts = await stack.seed(ACCOUNTS, BALANCE, PRODUCTS)
    rng = random.Random(20261121)
    stop = asyncio.Event()
    placed = 0
    client_errors = 0

    async def client(worker: int) -> None:
        nonlocal placed, client_errors
        while not stop.is_set() and placed < 400:
            skus = rng.sample(sorted(PRODUCTS), rng.choice((1, 2)))
            try:
                await stack.place(
                    rng.choice(accounts),
                    {s: rng.randint(1, 3) for s in skus},
                    protocol=rng.choice(
                        (common_pb2.PROTOCOL_TWO_PHASE_COMMIT, common_pb2.PROTOCOL_SAGA)
                    ),
                    key=f"w{worker}-{placed}",
                    timeout=10,
                )
            except grpc.aio.AioRpcError:
                client_errors += 1
                await asyncio.sleep(0.2)
            placed += 1

    kills: list[str] = []

    async def nemesis() -> None:
        # Every service dies twice, in a random order.
        services = ["coordinator", "saga", "payments", "inventory", "orders", "notifications"]
        victims = rng.sample(services, len(services)) * 2
        for victim in victims:
            await asyncio.sleep(rng.uniform(1.5, 3.0))
            kills.append(victim)
            proc = stack.procs[victim]
            proc.kill()
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            await asyncio.to_thread(proc.start)
        stop.set()

    await asyncio.gather(nemesis(), *(client(i) for i in range(4)))
    assert len(kills) == 12

    async def settled() -> bool:
        pending = await stack.fetch(
            "orders", "SELECT count(*) AS n FROM orders WHERE status = 'PENDING'"
        )
        return pending[0]["n"] == 0 and not await stack.prepared()

    await stack.wait_until(
        settled, timeout=90, what="every order terminal and no prepared transaction"
    )
    statuses = await check_invariants(stack, accounts)
    parked = await stack.fetch(
        "coordinator",
        "SELECT gid, reason FROM global_transactions WHERE state <> 'COMMITTED' AND state <> 'ABORTED'",
    )
    assert parked == [], f"transactions not finished: {parked}"
    unfinished = await stack.fetch(
        "saga",
        "SELECT gid, state, reason FROM sagas WHERE state NOT IN ('COMPLETED', 'COMPENSATED')",
    )
    assert unfinished == [], f"sagas not finished: {unfinished}"
    protocols = await stack.fetch("orders", "SELECT protocol, count(*) AS n FROM orders GROUP BY 1")
    assert {r["protocol"] for r in protocols} == {"2pc", "saga"}
    await check_events(stack, bootstrap, prefix)
    print(f"orders {dict(statuses)}, client errors {client_errors}, kills {kills}")
    assert statuses["CONFIRMED"] > 0
