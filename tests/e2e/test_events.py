"""Domain events end to end: real services, real PostgreSQL, real Kafka.

The stack runs with Kafka and the notifications service. Every test uses
topics of its own (``DTX_KAFKA_TOPIC_PREFIX``), so it reads them from the
beginning without meeting another test's records, and deletes them after.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from dtx.v1 import events_pb2, notifications_pb2, notifications_pb2_grpc, orders_pb2
from dtx_runtime.outbox import delete_topics
from tests.support.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TOPICS = ("dtx.orders", "dtx.payments", "dtx.inventory", "dtx.deadletter")


@pytest.fixture
async def stack(
    run_dir: Path, new_database: Callable[[str], str], infra: Any
) -> AsyncIterator[Stack]:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    bootstrap = str(infra.kafka.bootstrap)
    system = Stack(
        run_dir,
        new_database,
        kafka_bootstrap=bootstrap,
        extra_services=("notifications",),
        env={
            "DTX_KAFKA_TOPIC_PREFIX": prefix,
            "DTX_NOTIFICATIONS_GROUP_ID": f"{prefix}notifications",
        },
    ).build()
    system.prefix = prefix  # type: ignore[attr-defined]
    system.bootstrap = bootstrap  # type: ignore[attr-defined]
    system.start()
    try:
        yield system
    finally:
        await system.close_channels()
        system.stop()
        await delete_topics(bootstrap, [prefix + t for t in TOPICS])


def topic(stack: Stack, name: str) -> str:
    return f"{stack.prefix}{name}"  # type: ignore[attr-defined]


async def read_topics(stack: Stack, names: list[str], settle_s: float = 1.5) -> list[Any]:
    """Everything on the topics from the beginning, with a fresh consumer (no group)."""
    consumer = AIOKafkaConsumer(
        *(topic(stack, n) for n in names),
        bootstrap_servers=stack.bootstrap,  # type: ignore[attr-defined]
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await asyncio.wait_for(consumer.start(), 30)
    records: list[Any] = []
    try:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < settle_s:
            batches = await consumer.getmany(timeout_ms=300)
            for batch in batches.values():
                records.extend(batch)
                quiet_since = time.monotonic()
    finally:
        await consumer.stop()
    return records


async def events_of(
    stack: Stack, order_id: str, want: set[str], timeout_s: float = 30
) -> list[Any]:
    """The order's records on the three event topics, once every type in ``want`` was seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = [
            r
            for r in await read_topics(stack, ["dtx.orders", "dtx.payments", "dtx.inventory"])
            if r.key == order_id.encode()
        ]
        seen = {events_pb2.Event.FromString(r.value).type for r in records}
        if want <= seen or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.5)


def notifications(stack: Stack) -> notifications_pb2_grpc.NotificationsAsyncStub:
    return notifications_pb2_grpc.NotificationsStub(stack.channel("notifications"))


async def list_notifications(stack: Stack, account: str) -> list[notifications_pb2.Notification]:
    reply = await notifications(stack).ListNotifications(
        notifications_pb2.ListNotificationsRequest(account_id=account, limit=500), timeout=5
    )
    return list(reply.notifications)


async def wait_notifications(
    stack: Stack, account: str, count: int, timeout_s: float = 60
) -> list[notifications_pb2.Notification]:
    found: list[notifications_pb2.Notification] = []

    async def enough() -> bool:
        nonlocal found
        found = await list_notifications(stack, account)
        return len(found) >= count

    await stack.wait_until(enough, timeout=timeout_s, what=f"{count} notification(s)")
    return found


def samples(stack: Stack, service: str, name: str) -> dict[str, float]:
    """The metric's samples on the service's /metrics: labels text -> value."""
    with urllib.request.urlopen(f"{stack.procs[service].http}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{.*\}})? (\S+)$", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


def metric(stack: Stack, service: str, name: str) -> float:
    return sum(samples(stack, service, name).values())


# -- tests ---------------------------------------------------------------------


async def test_a_confirmed_order_notifies_once_and_each_event_reaches_kafka_once(
    stack: Stack,
) -> None:
    [account] = await stack.seed(1, 10_000, {"WIDGET": (250, 10)})
    order = await stack.place(account, {"WIDGET": 2})
    assert order.status == orders_pb2.ORDER_STATUS_CONFIRMED, order.reason

    [note] = await wait_notifications(stack, account, 1)
    assert (note.order_id, note.event_type) == (order.id, "order.confirmed")
    assert note.message == f"Your order {order.id} is confirmed: 5.00 EUR was charged."

    want = {"order.placed", "order.confirmed", "payment.charged", "stock.reserved"}
    records = await events_of(stack, order.id, want)
    events = [events_pb2.Event.FromString(r.value) for r in records]
    by_type = Counter(e.type for e in events)
    assert by_type == dict.fromkeys(want, 1), by_type
    assert len({e.id for e in events}) == len(events)  # each event id published once
    for record, event in zip(records, events, strict=True):
        assert dict(record.headers)["event-type"] == event.type.encode()
        assert event.aggregate_id == order.id
        assert event.schema_version == 1
    charged = next(e for e in events if e.type == "payment.charged").payment
    assert (charged.amount_minor, charged.currency, charged.account_id) == (500, "EUR", account)
    reserved = next(e for e in events if e.type == "stock.reserved").stock
    assert [(i.sku, i.quantity) for i in reserved.items] == [("WIDGET", 2)]
    placed = next(e for e in events if e.type == "order.placed").order
    assert (placed.order_id, placed.account_id, placed.total_minor, placed.currency) == (
        order.id,
        account,
        500,
        "EUR",
    )
    assert placed.gid == order.gid

    await asyncio.sleep(1)  # nothing more comes
    assert len(await list_notifications(stack, account)) == 1
    published = samples(stack, "orders", "dtx_outbox_published_total")
    assert published == {'{topic="dtx.orders"}': 2.0}
    assert metric(stack, "payments", "dtx_outbox_published_total") == 1
    assert metric(stack, "notifications", "dtx_inbox_processed_total") == 2
    assert metric(stack, "notifications", "dtx_inbox_duplicates_total") == 0
    for service in ("orders", "payments", "inventory"):
        backlog = await stack.fetch(
            service, "SELECT count(*) AS n FROM dtx_outbox WHERE sent_at IS NULL"
        )
        assert backlog[0]["n"] == 0, service


async def test_a_rejected_order_notifies_once_and_publishes_no_charge(stack: Stack) -> None:
    [account] = await stack.seed(1, 100, {"WIDGET": (250, 10)})
    order = await stack.place(account, {"WIDGET": 2})
    assert order.status == orders_pb2.ORDER_STATUS_REJECTED
    [note] = await wait_notifications(stack, account, 1)
    assert note.event_type == "order.rejected"
    assert "insufficient funds" in note.message

    records = await events_of(stack, order.id, {"order.placed", "order.rejected"})
    types = sorted(events_pb2.Event.FromString(r.value).type for r in records)
    # The stock was reserved in a prepared transaction that was rolled back: no event.
    assert types == ["order.placed", "order.rejected"]
    rejected = next(
        events_pb2.Event.FromString(r.value)
        for r in records
        if events_pb2.Event.FromString(r.value).type == "order.rejected"
    )
    assert "insufficient funds" in rejected.order.reason


async def test_poison_records_are_dead_lettered_and_later_events_still_processed(
    stack: Stack,
) -> None:
    [account] = await stack.seed(1, 10_000, {"WIDGET": (250, 10)})
    first = await stack.place(account, {"WIDGET": 1})
    await wait_notifications(stack, account, 1)

    unknown = events_pb2.Event(
        id=str(uuid.uuid4()), type="order.teleported", aggregate_id=first.id, schema_version=1
    )
    future = events_pb2.Event(
        id=str(uuid.uuid4()), type="order.confirmed", aggregate_id=first.id, schema_version=9
    )
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all")  # type: ignore[attr-defined]
    await asyncio.wait_for(producer.start(), 20)
    try:
        for key, value in (
            (b"poison-1", b"\x00\xffnot an event at all"),
            (first.id.encode(), unknown.SerializeToString()),
            (first.id.encode(), future.SerializeToString()),
        ):
            await producer.send_and_wait(topic(stack, "dtx.orders"), value=value, key=key)
    finally:
        await producer.stop()

    second = await stack.place(account, {"WIDGET": 1})
    found = await wait_notifications(stack, account, 2)
    assert {n.order_id for n in found} == {first.id, second.id}

    async def dead_lettered() -> list[Any]:
        return await read_topics(stack, ["dtx.deadletter"])

    letters: list[Any] = []

    async def three() -> bool:
        nonlocal letters
        letters = await dead_lettered()
        return len(letters) >= 3

    await stack.wait_until(three, timeout=30, what="three dead letters")
    reasons = {}
    for letter in letters:
        headers = dict(letter.headers)
        assert headers["dlq-source-topic"] == topic(stack, "dtx.orders").encode()
        assert int(headers["dlq-partition"]) >= 0
        assert int(headers["dlq-offset"]) >= 0
        reasons[letter.value] = headers["dlq-reason"].decode()
    assert reasons == {
        b"\x00\xffnot an event at all": "malformed",
        unknown.SerializeToString(): "unknown-type",
        future.SerializeToString(): "unsupported-schema-version",
    }
    # Every reason is exported from the start; the three poison records count once each.
    assert samples(stack, "notifications", "dtx_deadletter_total") == {
        '{reason="malformed"}': 1.0,
        '{reason="unknown-type"}': 1.0,
        '{reason="unsupported-schema-version"}': 1.0,
        '{reason="invalid-payload"}': 0.0,
        '{reason="handler-error"}': 0.0,
    }

    async def caught_up() -> bool:
        lag = samples(stack, "notifications", "dtx_consumer_lag")
        return bool(lag) and sum(lag.values()) == 0

    await stack.wait_until(caught_up, timeout=30, what="consumer lag 0 on every partition")
    lag = samples(stack, "notifications", "dtx_consumer_lag")
    assert all(f'topic="{topic(stack, "dtx.orders")}"' in labels for labels in lag)
    # the unsupported "confirmed" did not make a second notification for the first order
    assert len(await list_notifications(stack, account)) == 2


async def test_notifications_killed_mid_batch_makes_no_duplicate(stack: Stack) -> None:
    count = 15
    accounts = await stack.seed(3, 100_000, {"WIDGET": (100, 1000)})
    proc = stack.procs["notifications"]
    proc.kill()  # the events pile up while it is down
    orders = [await stack.place(accounts[i % 3], {"WIDGET": 1}) for i in range(count)]
    assert all(o.status == orders_pb2.ORDER_STATUS_CONFIRMED for o in orders)

    # SIGKILL after the first record's database commit, before its offset commit.
    proc.env["DTX_FAILPOINTS"] = "inbox.after_apply=kill"
    proc.start(wait=False)
    assert proc.process is not None
    returncode = await asyncio.to_thread(proc.process.wait, 90)
    assert returncode == -signal.SIGKILL
    applied = await stack.fetch("notifications", "SELECT count(*) AS n FROM dtx_inbox")
    assert applied[0]["n"] >= 1

    del proc.env["DTX_FAILPOINTS"]
    proc.start(wait=True, timeout=60)
    found: list[notifications_pb2.Notification] = []
    for account in accounts:
        found += await wait_notifications(stack, account, count // 3, timeout_s=90)
    assert sorted(n.order_id for n in found) == sorted(o.id for o in orders)
    rows = await stack.fetch(
        "notifications", "SELECT order_id, count(*) AS n FROM notifications GROUP BY order_id"
    )
    assert len(rows) == count
    assert all(r["n"] == 1 for r in rows)
    inbox = await stack.fetch("notifications", "SELECT count(*) AS n FROM dtx_inbox")
    assert inbox[0]["n"] == 2 * count  # order.placed + order.confirmed, each once
    # The record applied before the kill came again and the inbox skipped it.
    assert metric(stack, "notifications", "dtx_inbox_duplicates_total") >= 1


async def test_list_notifications_validates(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await notifications(stack).ListNotifications(
            notifications_pb2.ListNotificationsRequest(account_id="nope"), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "account_id" in (caught.value.details() or "")
