"""What the end-to-end tests check of the event pipeline: outboxes, topics and notifications.

An event is never lost when every outbox row was marked sent and its id is on
its topic (at least once: a relay that dies between the send and the mark
publishes again). A notification is never lost nor duplicated when each
terminal order has exactly one, saying the order's status, and nothing else
has one.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer

from dtx.v1 import events_pb2
from dtx_runtime.outbox import (
    DEADLETTER_TOPIC,
    INVENTORY_TOPIC,
    ORDERS_TOPIC,
    PAYMENTS_TOPIC,
    physical_topic,
)
from tests.support.stack import Stack

OUTBOX_SERVICES = ("orders", "payments", "inventory")
"""The services that write events (each has a ``dtx_outbox`` table and a relay)."""

EVENT_TOPICS = (ORDERS_TOPIC, PAYMENTS_TOPIC, INVENTORY_TOPIC)
ALL_TOPICS = (*EVENT_TOPICS, DEADLETTER_TOPIC)


async def unsent(stack: Stack) -> dict[str, int]:
    """Outbox rows not yet marked published, per service."""
    found: dict[str, int] = {}
    for service in OUTBOX_SERVICES:
        rows = await stack.fetch(
            service, "SELECT count(*) AS n FROM dtx_outbox WHERE sent_at IS NULL"
        )
        found[service] = int(rows[0]["n"])
    return found


async def outbox_events(stack: Stack) -> dict[str, str]:
    """Every event the services wrote: event id -> its (logical) topic."""
    events: dict[str, str] = {}
    for service in OUTBOX_SERVICES:
        rows = await stack.fetch(service, "SELECT id::text AS id, topic FROM dtx_outbox")
        events.update((r["id"], r["topic"]) for r in rows)
    return events


async def events_on_kafka(
    bootstrap: str, topics: Iterable[str], want: Iterable[str], timeout_s: float = 60
) -> dict[str, Counter[str]]:
    """Event id -> how many times it is on each topic, read from the beginning.

    Reads with a fresh consumer (no group) until every id of ``want`` was seen
    or ``timeout_s`` is over, whichever comes first.
    """
    missing = set(want)
    seen: dict[str, Counter[str]] = {}
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await asyncio.wait_for(consumer.start(), 30)
    try:
        deadline = time.monotonic() + timeout_s
        while missing and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                for record in batch:
                    event_id = events_pb2.Event.FromString(record.value).id
                    seen.setdefault(event_id, Counter())[record.topic] += 1
                    missing.discard(event_id)
    finally:
        await asyncio.wait_for(consumer.stop(), 30)
    return seen


async def lost_events(
    stack: Stack, bootstrap: str, prefix: str = "", timeout_s: float = 60
) -> tuple[list[str], int]:
    """The outbox events missing from their topic (empty: none lost); how many came twice (at least)."""
    events = await outbox_events(stack)
    seen = await events_on_kafka(
        bootstrap, [physical_topic(prefix, t) for t in EVENT_TOPICS], events, timeout_s
    )
    lost = sorted(
        f"{event_id} not on {physical_topic(prefix, topic)}"
        for event_id, topic in events.items()
        if not seen.get(event_id, Counter())[physical_topic(prefix, topic)]
    )
    again = sum(1 for counts in seen.values() if counts.total() > 1)
    return lost, again


async def notification_problems(stack: Stack) -> list[str]:
    """What is wrong with the notifications, compared with the orders (empty: nothing)."""
    orders = {
        r["id"]: r
        for r in await stack.fetch(
            "orders", "SELECT id::text AS id, account_id::text AS account, status FROM orders"
        )
    }
    notes = await stack.fetch(
        "notifications",
        "SELECT order_id::text AS order_id, account_id::text AS account, event_type"
        " FROM notifications",
    )
    problems: list[str] = []
    per_order = Counter(n["order_id"] for n in notes)
    problems += [f"{n} notifications for order {o}" for o, n in per_order.items() if n > 1]
    for note in notes:
        order = orders.get(note["order_id"])
        if order is None:
            problems.append(f"a notification for order {note['order_id']}, which does not exist")
        elif order["status"] == "PENDING":
            problems.append(f"a notification for order {order['id']}, which is still PENDING")
        elif note["event_type"] != f"order.{order['status'].lower()}":
            problems.append(
                f"order {order['id']} is {order['status']} but its notification"
                f" says {note['event_type']}"
            )
        elif note["account"] != order["account"]:
            problems.append(f"order {order['id']}'s notification went to another account")
    problems += [
        f"no notification for {order['status']} order {order_id}"
        for order_id, order in orders.items()
        if order["status"] != "PENDING" and order_id not in per_order
    ]
    return sorted(problems)
