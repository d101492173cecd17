"""Accounts (payments) and their notifications."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from dtx.v1 import notifications_pb2, payments_pb2
from dtx_gateway import convert, schemas
from dtx_gateway.backends import call
from dtx_gateway.deps import Admin, Caller, Remote, check_account_access
from dtx_gateway.errors import AUTHENTICATED, responses

router = APIRouter(prefix="/v1/accounts", tags=["accounts"])


@router.post(
    "",
    status_code=201,
    summary="Open an account (admin)",
    responses=responses(*AUTHENTICATED, 409, 413),
)
async def create_account(
    body: schemas.NewAccount, caller: Admin, remote: Remote
) -> schemas.Account:
    account = await call(
        "payments",
        remote.payments.CreateAccount(
            payments_pb2.CreateAccountRequest(
                owner=body.owner, currency=body.currency, balance_minor=body.balance_minor
            ),
            timeout=remote.call_timeout_s,
        ),
    )
    return convert.account(account)


@router.get(
    "/{account_id}",
    summary="An account (admin, or the customer who owns it)",
    responses=responses(*AUTHENTICATED, 404),
)
async def get_account(account_id: uuid.UUID, caller: Caller, remote: Remote) -> schemas.Account:
    check_account_access(caller, str(account_id))
    account = await call(
        "payments",
        remote.payments.GetAccount(
            payments_pb2.GetAccountRequest(account_id=str(account_id)),
            timeout=remote.call_timeout_s,
        ),
    )
    return convert.account(account)


@router.get(
    "/{account_id}/notifications",
    summary="The account's notifications (admin, or the customer who owns it)",
    responses=responses(*AUTHENTICATED, 404),
)
async def list_notifications(
    account_id: uuid.UUID,
    caller: Caller,
    remote: Remote,
    limit: Annotated[int, Query(ge=1, le=500, description="At most this many, newest first.")] = 50,
) -> schemas.NotificationList:
    check_account_access(caller, str(account_id))
    found = await call(
        "notifications",
        remote.notifications.ListNotifications(
            notifications_pb2.ListNotificationsRequest(account_id=str(account_id), limit=limit),
            timeout=remote.call_timeout_s,
        ),
    )
    return schemas.NotificationList(
        notifications=[convert.notification(n) for n in found.notifications]
    )
