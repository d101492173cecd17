"""``dtx.v1.Orders``: place an order under a global transaction, read orders.

The servicer only translates: a PlaceOrder request is validated into an
:class:`~dtx_orders.domain.OrderRequest` and handed to
:class:`~dtx_orders.placement.Placement`, which prices it, stores it PENDING
and runs its transaction; the order as that leaves it comes back as an
``Order``. GetOrder and ListOrders read the table.
"""

from __future__ import annotations

import json
import time

import asyncpg

from dtx.v1 import orders_pb2, orders_pb2_grpc
from dtx_orders import domain, storage
from dtx_orders.domain import Protocol, Status
from dtx_orders.placement import Placement
from dtx_runtime.errors import NotFound
from dtx_runtime.rpc import Context, rpc


def to_proto(row: asyncpg.Record) -> orders_pb2.Order:
    items = json.loads(row["items"]) if isinstance(row["items"], str) else row["items"]
    order = orders_pb2.Order(
        id=str(row["id"]),
        account_id=str(row["account_id"]),
        items=[
            orders_pb2.OrderItem(
                sku=item["sku"],
                quantity=item["quantity"],
                unit_price_minor=item["unit_price_minor"],
            )
            for item in items
        ],
        total_minor=row["total_minor"],
        currency=row["currency"],
        protocol=domain.PROTOCOL_TO_PROTO[Protocol(row["protocol"])],
        status=domain.STATUS_TO_PROTO[Status(row["status"])],
        reason=row["reason"],
        gid=row["gid"],
        idempotency_key=row["idempotency_key"] or "",
    )
    order.created_at.FromDatetime(row["created_at"])
    order.updated_at.FromDatetime(row["updated_at"])
    return order


class OrdersServicer(orders_pb2_grpc.OrdersServicer):
    def __init__(self, pool: asyncpg.Pool, placement: Placement) -> None:
        self._pool = pool
        self._placement = placement

    @rpc
    async def PlaceOrder(
        self, request: orders_pb2.PlaceOrderRequest, context: Context
    ) -> orders_pb2.Order:
        started = time.perf_counter()
        order_request = domain.validate_place_order(request)
        return to_proto(await self._placement.place(order_request, started=started))

    @rpc
    async def GetOrder(
        self, request: orders_pb2.GetOrderRequest, context: Context
    ) -> orders_pb2.Order:
        order_id = domain.parse_uuid(request.order_id, "order_id")
        async with self._pool.acquire() as conn:
            row = await storage.get_order(conn, order_id)
        if row is None:
            raise NotFound(f"order {order_id} not found")
        return to_proto(row)

    @rpc
    async def ListOrders(
        self, request: orders_pb2.ListOrdersRequest, context: Context
    ) -> orders_pb2.ListOrdersResponse:
        account_id = domain.parse_uuid(request.account_id, "account_id")
        limit = domain.validate_list_limit(request.limit)
        async with self._pool.acquire() as conn:
            rows = await storage.list_orders(conn, account_id, limit)
        return orders_pb2.ListOrdersResponse(orders=[to_proto(r) for r in rows])
