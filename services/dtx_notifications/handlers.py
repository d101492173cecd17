"""``dtx.v1.Notifications``: an account's notifications, newest first."""

from __future__ import annotations

import asyncpg

from dtx.v1 import notifications_pb2, notifications_pb2_grpc
from dtx_notifications import domain, storage
from dtx_runtime.rpc import Context, rpc


def to_proto(row: asyncpg.Record) -> notifications_pb2.Notification:
    notification = notifications_pb2.Notification(
        id=str(row["id"]),
        account_id=str(row["account_id"]),
        order_id=str(row["order_id"]),
        event_type=row["event_type"],
        message=row["message"],
    )
    notification.created_at.FromDatetime(row["created_at"])
    if row["delivered_at"] is not None:
        notification.delivered_at.FromDatetime(row["delivered_at"])
    return notification


class NotificationsServicer(notifications_pb2_grpc.NotificationsServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @rpc
    async def ListNotifications(
        self, request: notifications_pb2.ListNotificationsRequest, context: Context
    ) -> notifications_pb2.ListNotificationsResponse:
        account_id = domain.parse_account_id(request.account_id)
        limit = domain.validate_list_limit(request.limit)
        async with self._pool.acquire() as conn:
            rows = await storage.list_for_account(conn, account_id, limit)
        return notifications_pb2.ListNotificationsResponse(
            notifications=[to_proto(r) for r in rows]
        )
