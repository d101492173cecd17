"""``dtx.v1.Payments``: open and read accounts."""

from __future__ import annotations

import uuid

import asyncpg

from dtx.v1 import payments_pb2, payments_pb2_grpc
from dtx_payments import domain, storage
from dtx_runtime.errors import NotFound
from dtx_runtime.rpc import Context, rpc


def to_proto(row: asyncpg.Record) -> payments_pb2.Account:
    account = payments_pb2.Account(
        id=str(row["id"]),
        owner=row["owner"],
        currency=row["currency"],
        balance_minor=row["balance_minor"],
    )
    account.created_at.FromDatetime(row["created_at"])
    return account


class PaymentsServicer(payments_pb2_grpc.PaymentsServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @rpc
    async def CreateAccount(
        self, request: payments_pb2.CreateAccountRequest, context: Context
    ) -> payments_pb2.Account:
        new = domain.validate_new_account(request)
        async with self._pool.acquire() as conn:
            row = await storage.create_account(conn, uuid.uuid4(), new)
        return to_proto(row)

    @rpc
    async def GetAccount(
        self, request: payments_pb2.GetAccountRequest, context: Context
    ) -> payments_pb2.Account:
        account_id = domain.parse_uuid(request.account_id, "account_id")
        async with self._pool.acquire() as conn:
            row = await storage.get_account(conn, account_id)
        if row is None:
            raise NotFound(f"account {account_id} not found")
        return to_proto(row)
