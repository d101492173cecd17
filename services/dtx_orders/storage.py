"""Orders' SQL: functions over a connection.

Status changes are conditional UPDATEs (``WHERE status = 'PENDING'``): the
database, not a read-then-write in Python, decides which of two concurrent
settlers wins. While a two-phase commit holds the order's row in a prepared
transaction, an update of it would wait until phase two; ``lock_timeout``
bounds that wait and the order is settled later instead.

Every change of status writes its event (``order.placed``, ``order.confirmed``,
``order.rejected``, ``order.failed``, ``order.cancelled``) into the outbox in
the same transaction, after the UPDATE that holds the order's row, so the
event exists exactly when the change does and one order's events are written
in the order of its changes. The caller wakes the relay after its commit
(:func:`dtx_runtime.outbox.notify_committed`); the barrier's commits do that
themselves.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from dtx.v1 import events_pb2
from dtx_orders.domain import PROTOCOL_TO_PROTO, NewOrder, Protocol, Status
from dtx_runtime.outbox import (
    ORDERS_TOPIC,
    OUTBOX_COLUMNS,
    outbox_params,
    outbox_values,
    write_event,
)

Conn = asyncpg.Connection | PoolConnectionProxy

_COLUMNS = (
    "id, account_id, items, total_minor, currency, protocol, status, reason, gid,"
    " idempotency_key, request_hash, created_at, updated_at"
)


STATUS_EVENTS = {
    Status.CONFIRMED: "order.confirmed",
    Status.REJECTED: "order.rejected",
    Status.FAILED: "order.failed",
    Status.CANCELLED: "order.cancelled",
}
"""The event each status change writes (PENDING is order.placed)."""


def order_event(row: asyncpg.Record) -> events_pb2.OrderEvent:
    """The payload of an order event, from the order's row as the change left it."""
    return events_pb2.OrderEvent(
        order_id=str(row["id"]),
        account_id=str(row["account_id"]),
        total_minor=row["total_minor"],
        currency=row["currency"],
        protocol=PROTOCOL_TO_PROTO[Protocol(row["protocol"])],
        reason=row["reason"],
        gid=row["gid"],
    )


async def write_order_event(conn: Conn, event_type: str, row: asyncpg.Record) -> None:
    """The event of a change of ``row``, in the caller's transaction (keyed by the order id)."""
    await write_event(
        conn,
        topic=ORDERS_TOPIC,
        event_type=event_type,
        aggregate_id=str(row["id"]),
        payload=order_event(row),
    )


_INSERT_PLACED = f"""
WITH placed AS (
    INSERT INTO orders (id, account_id, items, total_minor, currency, protocol, gid,
                        idempotency_key, request_hash)
    VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7, $8, $9)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING {_COLUMNS}
), event AS (
    INSERT INTO dtx_outbox ({OUTBOX_COLUMNS}) SELECT {outbox_params(10)} FROM placed
)
SELECT {_COLUMNS} FROM placed
"""


def placed_event(order: NewOrder) -> events_pb2.OrderEvent:
    """The payload of order.placed, known before the row is written."""
    return events_pb2.OrderEvent(
        order_id=str(order.id),
        account_id=str(order.account_id),
        total_minor=order.total_minor,
        currency=order.currency,
        protocol=PROTOCOL_TO_PROTO[order.protocol],
        gid=order.gid,
    )


async def insert_order(conn: Conn, order: NewOrder) -> asyncpg.Record | None:
    """The stored order (and its order.placed), or None when another order holds its key.

    One statement, so one round trip: the event row is inserted from the
    order's ``RETURNING``, and with the order when it is.
    """
    _, event = outbox_values(
        topic=ORDERS_TOPIC,
        event_type="order.placed",
        aggregate_id=str(order.id),
        payload=placed_event(order),
    )
    row: asyncpg.Record | None = await conn.fetchrow(
        _INSERT_PLACED,
        order.id,
        order.account_id,
        json.dumps([line.to_json() for line in order.lines]),
        order.total_minor,
        order.currency,
        order.protocol.value,
        order.gid,
        order.idempotency_key,
        order.request_hash,
        *event,
    )
    return row


async def get_order(conn: Conn, order_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_COLUMNS} FROM orders WHERE id = $1", order_id)


async def get_by_key(conn: Conn, key: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_COLUMNS} FROM orders WHERE idempotency_key = $1", key)


async def list_orders(conn: Conn, account_id: uuid.UUID, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {_COLUMNS} FROM orders WHERE account_id = $1"
        " ORDER BY created_at DESC, id DESC LIMIT $2",
        account_id,
        limit,
    )


async def finish_pending(
    conn: Conn, order_id: uuid.UUID, status: Status, reason: str, *, lock_timeout_ms: int
) -> asyncpg.Record | None:
    """PENDING → ``status``; the updated order, or None when it was no longer PENDING.

    Raises :class:`asyncpg.LockNotAvailableError` when a prepared transaction
    still holds the row after ``lock_timeout_ms``.
    """
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
        row = await conn.fetchrow(
            "UPDATE orders SET status = $2, reason = $3, updated_at = now()"
            f" WHERE id = $1 AND status = 'PENDING' RETURNING {_COLUMNS}",
            order_id,
            status.value,
            reason,
        )
        if row is not None:
            await write_order_event(conn, STATUS_EVENTS[status], row)
        return row


async def confirm(conn: Conn, order_id: uuid.UUID, gid: str) -> asyncpg.Record | None:
    """PENDING → CONFIRMED by the order's own transaction, in the caller's (barrier) transaction.

    The confirmed row, or None when the order was not PENDING under ``gid``.
    For a two-phase commit that transaction is then prepared: order.confirmed
    is published only if the branch commits.
    """
    row: asyncpg.Record | None = await conn.fetchrow(
        "UPDATE orders SET status = 'CONFIRMED', updated_at = now()"
        f" WHERE id = $1 AND gid = $2 AND status = 'PENDING' RETURNING {_COLUMNS}",
        order_id,
        gid,
    )
    if row is not None:
        await write_order_event(conn, "order.confirmed", row)
    return row


async def confirm_uncoordinated(conn: Conn, order_id: uuid.UUID) -> asyncpg.Record | None:
    """PENDING → CONFIRMED for the benchmark's uncoordinated baseline, with its order.confirmed."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "UPDATE orders SET status = 'CONFIRMED', updated_at = now()"
            f" WHERE id = $1 AND status = 'PENDING' RETURNING {_COLUMNS}",
            order_id,
        )
        if row is not None:
            await write_order_event(conn, "order.confirmed", row)
        return row


async def status_of(conn: Conn, order_id: uuid.UUID) -> tuple[Status, str] | None:
    """The order's status and gid."""
    row = await conn.fetchrow("SELECT status, gid FROM orders WHERE id = $1", order_id)
    return None if row is None else (Status(row["status"]), row["gid"])


async def pending_older_than(
    conn: Conn,
    age_s: float,
    *,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """A page of PENDING orders created over ``age_s`` ago, oldest first, after a cursor."""
    if after is None:
        return await conn.fetch(
            "SELECT id, gid, protocol, created_at FROM orders"
            " WHERE status = 'PENDING' AND created_at < now() - make_interval(secs => $1)"
            " ORDER BY created_at, id LIMIT $2",
            age_s,
            limit,
        )
    return await conn.fetch(
        "SELECT id, gid, protocol, created_at FROM orders"
        " WHERE status = 'PENDING' AND created_at < now() - make_interval(secs => $1)"
        " AND (created_at, id) > ($2, $3)"
        " ORDER BY created_at, id LIMIT $4",
        age_s,
        after[0],
        after[1],
        limit,
    )
