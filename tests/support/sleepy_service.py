"""A test-only service on the real runtime: ``dtx.v1.Payments`` whose ``GetAccount`` sleeps.

``GetAccount(account_id="2")`` sleeps two seconds and then records the call in the
database, so a test can keep a call in flight while it stops the process. An
``account_id`` that is not a number is INVALID_ARGUMENT. ``CreateAccount``
answers at once with an account whose ``balance_minor`` is the number of calls recorded.

Run it as a real process with ``python tests/support/run_service.py tests.support.sleepy_service``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path

import asyncpg

from dtx.v1 import payments_pb2, payments_pb2_grpc
from dtx_runtime import ServiceContext, ServiceDefinition, ServiceSettings
from dtx_runtime.errors import InvalidArgument
from dtx_runtime.rpc import Context, rpc

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "sleepy_migrations"
MAX_SLEEP_SECONDS = 30.0


class SleepyPayments(payments_pb2_grpc.PaymentsServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @rpc
    async def GetAccount(
        self, request: payments_pb2.GetAccountRequest, context: Context
    ) -> payments_pb2.Account:
        try:
            seconds = float(request.account_id or "0")
        except ValueError:
            raise InvalidArgument(
                f"account_id {request.account_id!r} must be a number of seconds"
            ) from None
        if not math.isfinite(seconds) or not 0 <= seconds <= MAX_SLEEP_SECONDS:
            raise InvalidArgument(f"account_id must be 0..{MAX_SLEEP_SECONDS:g} seconds")
        # Tests wait for this line to know a call is in flight before they stop the process.
        log.info("sleeping", extra={"account_id": request.account_id})
        await asyncio.sleep(seconds)
        async with self._pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO sleepy_calls (account_id) VALUES ($1)", request.account_id
            )
        return payments_pb2.Account(id=request.account_id, owner="sleepy", currency="EUR")

    @rpc
    async def CreateAccount(
        self, request: payments_pb2.CreateAccountRequest, context: Context
    ) -> payments_pb2.Account:
        async with self._pool.acquire() as conn:
            calls = await conn.fetchval("SELECT count(*) FROM sleepy_calls")
        return payments_pb2.Account(
            id="count", owner=request.owner, currency=request.currency, balance_minor=calls
        )


async def setup(ctx: ServiceContext[ServiceSettings]) -> None:
    payments_pb2_grpc.add_PaymentsServicer_to_server(SleepyPayments(ctx.db), ctx.server)


SERVICE = ServiceDefinition(
    name="sleepy",
    settings_type=ServiceSettings,
    setup=setup,
    grpc_services=["dtx.v1.Payments"],
    migrations={"sleepy": MIGRATIONS},
)
