"""Notifications' SQL: functions over a connection."""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from dtx_notifications.domain import NewNotification

Conn = asyncpg.Connection | PoolConnectionProxy

_COLUMNS = (
    "id, order_id, account_id, event_id, event_type, message, created_at, delivered_at, attempts"
)


async def insert_notification(conn: Conn, new: NewNotification) -> bool:
    """Store it unless the order already has one; True when this call stored it."""
    stored = await conn.fetchval(
        "INSERT INTO notifications (id, order_id, account_id, event_id, event_type, message)"
        " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id) DO NOTHING RETURNING true",
        uuid.uuid4(),
        new.order_id,
        new.account_id,
        new.event_id,
        new.event_type,
        new.message,
    )
    return bool(stored)


async def list_for_account(conn: Conn, account_id: uuid.UUID, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {_COLUMNS} FROM notifications WHERE account_id = $1"
        " ORDER BY created_at DESC, id DESC LIMIT $2",
        account_id,
        limit,
    )


async def claim_due(conn: Conn, limit: int, lease: timedelta) -> list[asyncpg.Record]:
    """Undelivered notifications due now, leased for ``lease`` so another replica skips them."""
    return await conn.fetch(
        "UPDATE notifications SET next_attempt_at = now() + $2::interval"
        " WHERE id IN (SELECT id FROM notifications"
        "  WHERE delivered_at IS NULL AND next_attempt_at <= now()"
        "  ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
        f" RETURNING {_COLUMNS}",
        limit,
        lease,
    )


async def mark_delivered(conn: Conn, notification_id: uuid.UUID) -> None:
    await conn.execute(
        "UPDATE notifications SET delivered_at = now(), attempts = attempts + 1,"
        " next_attempt_at = NULL, last_error = NULL WHERE id = $1",
        notification_id,
    )


async def mark_failed(
    conn: Conn, notification_id: uuid.UUID, error: str, retry_in: timedelta | None
) -> None:
    """Count a failed attempt; retry after ``retry_in``, or never (None: given up)."""
    await conn.execute(
        "UPDATE notifications SET attempts = attempts + 1, last_error = $2,"
        " next_attempt_at = CASE WHEN $3::interval IS NULL THEN NULL ELSE now() + $3::interval END"
        " WHERE id = $1 AND delivered_at IS NULL",
        notification_id,
        error[:1000],
        retry_in,
    )
