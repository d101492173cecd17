"""Orders: placing one runs a global transaction (2PC or saga) behind the orders service."""

from __future__ import annotations

import hashlib
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query

from dtx.v1 import common_pb2, orders_pb2
from dtx_gateway import convert, schemas
from dtx_gateway.auth import Principal
from dtx_gateway.backends import call
from dtx_gateway.deps import Caller, Remote, check_account_access
from dtx_gateway.errors import AUTHENTICATED, ApiError, not_found, responses

router = APIRouter(prefix="/v1/orders", tags=["orders"])

MAX_KEY_CHARS = 200

IdempotencyKey = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_KEY_CHARS,
        description="Chosen by the client, 1-200 characters. The same key with the same body"
        " returns the same order; with another body it is refused with 409. Keys are the"
        " caller's own: they are scoped to the token's subject.",
    ),
]


def scoped_key(caller: Principal, key: str) -> str:
    """The key the orders service stores: the client's key within the caller's own namespace,
    so two callers never collide and a conflict never reveals someone else's order."""
    digest = hashlib.sha256(f"{caller.role.value}\0{caller.sub}\0{key}".encode()).hexdigest()
    return f"gw1-{digest}"


@router.post(
    "",
    status_code=201,
    summary="Place an order (admin, or the customer for their own account)",
    description="Runs the order's global transaction and answers when it is decided: `status`"
    " is `confirmed`, `rejected` (with the `reason`: insufficient funds, out of stock),"
    " `failed`, or `pending` when the outcome is not known in time (it is settled later)."
    " A replay of the same Idempotency-Key and body answers the same order.",
    responses=responses(*AUTHENTICATED, 404, 409, 413),
)
async def place_order(
    body: schemas.NewOrder,
    idempotency_key: IdempotencyKey,
    caller: Caller,
    remote: Remote,
) -> schemas.Order:
    check_account_access(caller, str(body.account_id))
    try:
        order = await call(
            "orders",
            remote.orders.PlaceOrder(
                orders_pb2.PlaceOrderRequest(
                    account_id=str(body.account_id),
                    items=[common_pb2.LineItem(sku=i.sku, quantity=i.quantity) for i in body.items],
                    protocol=convert.PROTOCOL_TO_PROTO[body.protocol],
                    idempotency_key=scoped_key(caller, idempotency_key),
                ),
                timeout=remote.order_timeout_s,
            ),
        )
    except ApiError as exc:
        if exc.status == 409 and exc.code == "already_exists":
            raise ApiError(
                409,
                "idempotency_conflict",
                "Idempotency-Key: already used for a different request; use a new key",
            ) from None
        if exc.status == 503:
            # The order may or may not have been placed: the key makes a retry safe.
            exc.message += "; retrying with the same Idempotency-Key is safe"
        raise
    return convert.order(order)


@router.get(
    "/{order_id}",
    summary="An order with its status and reason (admin, or the owner)",
    responses=responses(*AUTHENTICATED, 404),
)
async def get_order(order_id: uuid.UUID, caller: Caller, remote: Remote) -> schemas.Order:
    order = await call(
        "orders",
        remote.orders.GetOrder(
            orders_pb2.GetOrderRequest(order_id=str(order_id)), timeout=remote.call_timeout_s
        ),
    )
    if not caller.is_admin and not caller.owns(order.account_id):
        raise not_found(f"order {order_id} not found")
    return convert.order(order)


@router.get(
    "",
    summary="An account's orders, newest first (admin, or the owner)",
    responses=responses(*AUTHENTICATED, 404),
)
async def list_orders(
    account_id: Annotated[uuid.UUID, Query(description="Whose orders.")],
    caller: Caller,
    remote: Remote,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> schemas.OrderList:
    check_account_access(caller, str(account_id))
    found = await call(
        "orders",
        remote.orders.ListOrders(
            orders_pb2.ListOrdersRequest(account_id=str(account_id), limit=limit),
            timeout=remote.call_timeout_s,
        ),
    )
    return schemas.OrderList(orders=[convert.order(o) for o in found.orders])
