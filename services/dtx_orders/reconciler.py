"""The reconciler: settle PENDING orders whose PlaceOrder did not learn the outcome.

An order stays PENDING when the coordinator or the orchestrator was
unreachable, timed out, or the orders service stopped mid-call. After
``DTX_ORDER_RECONCILE_AFTER_SECONDS`` the reconciler asks:

* 2PC: ``GetOutcome(gid)``. ABORTED (which the coordinator also answers, and
  records, for a gid it never saw, so a late RunTransaction can never commit)
  → ``GetTransaction`` for the reason → REJECTED when a branch said no, else
  FAILED. COMMITTED or PENDING → nothing: phase two or the participant's
  reaper confirms the order through its own branch.
* saga: ``GetSaga(gid)``. COMPENSATED → CANCELLED; anything else waits. An unknown
  saga is aborted (``AbortSaga`` records a tombstone), so its order is CANCELLED.

Each settlement writes its event (``order.rejected``, ``order.failed``,
``order.cancelled``) with the status change, through
:func:`~dtx_orders.placement.finish_pending_order`, as PlaceOrder's own does.

Orders are read in pages after a cursor, so a pass reaches every old
PENDING order even when the oldest ones stay undecided. Every call has a
deadline; a failure is logged and counted and the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import grpc

from dtx.v1 import coordinator_pb2, coordinator_pb2_grpc, saga_pb2_grpc, transactions_pb2
from dtx_orders import domain, storage
from dtx_orders.domain import Protocol, Settlement, Status
from dtx_orders.metrics import RECONCILE_ERRORS, RECONCILE_WAITING, RECONCILED
from dtx_orders.placement import finish_pending_order

log = logging.getLogger(__name__)

Lookup = Callable[[Protocol, str], Awaitable[Settlement | None]]
"""What the global transaction ``gid`` (of that protocol) means for its order; None = wait."""

CONCURRENCY = 8


@dataclass(frozen=True)
class ReconcileReport:
    settled: int = 0
    waiting: int = 0
    failed: int = 0


class RemoteLookup:
    """:data:`Lookup` over the coordinator and the saga orchestrator."""

    def __init__(
        self,
        coordinator: coordinator_pb2_grpc.CoordinatorAsyncStub,
        saga: saga_pb2_grpc.SagaOrchestratorAsyncStub,
        timeout_s: float,
    ) -> None:
        self._coordinator = coordinator
        self._saga = saga
        self._timeout_s = timeout_s

    async def __call__(self, protocol: Protocol, gid: str) -> Settlement | None:
        if protocol is Protocol.TWO_PHASE_COMMIT:
            return await self._two_phase(gid)
        return await self._saga_settlement(gid)

    async def _two_phase(self, gid: str) -> Settlement | None:
        reply = await self._coordinator.GetOutcome(
            coordinator_pb2.GetOutcomeRequest(gid=gid), timeout=self._timeout_s
        )
        if reply.outcome != transactions_pb2.OUTCOME_ABORTED:
            return None  # committed: the order's branch confirms it; pending: wait
        try:
            transaction = await self._coordinator.GetTransaction(
                transactions_pb2.GetTransactionRequest(gid=gid), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return Settlement(Status.FAILED, domain.NEVER_STARTED)
            raise
        settlement = domain.settle_two_phase(transaction)
        if settlement is None or settlement.status is Status.CONFIRMED:
            # The outcome said aborted; a view that disagrees is not a reason to confirm.
            return Settlement(Status.FAILED, transaction.reason or "the transaction aborted")
        return settlement

    async def _saga_settlement(self, gid: str) -> Settlement | None:
        try:
            saga = await self._saga.GetSaga(
                transactions_pb2.GetTransactionRequest(gid=gid), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            # The saga never reached the orchestrator (orders died before, or the
            # call was lost). AbortSaga of an unknown gid records a compensated
            # tombstone, so a late RunSaga of it can no longer run anything.
            saga = await self._saga.AbortSaga(
                transactions_pb2.InterveneRequest(
                    gid=gid,
                    actor="orders-reconciler",
                    reason="the order's saga was unknown to the orchestrator",
                ),
                timeout=self._timeout_s,
            )
        settlement = domain.settle_saga(saga)
        if settlement is None or settlement.status is not Status.CANCELLED:
            return None  # a completed saga's confirm step already confirmed the order
        return settlement


async def reconcile_once(
    pool: asyncpg.Pool,
    lookup: Lookup,
    *,
    older_than_s: float,
    batch: int,
) -> ReconcileReport:
    """One pass over every PENDING order older than ``older_than_s``, ``batch`` at a time."""
    settled = waiting = failed = 0
    cursor: tuple[datetime, uuid.UUID] | None = None
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(row: asyncpg.Record) -> str:
        protocol = Protocol(row["protocol"])
        async with limit:
            try:
                settlement = await lookup(protocol, row["gid"])
                if settlement is None:
                    return "waiting"
                if await finish_pending_order(pool, row["id"], settlement) is None:
                    return "waiting"  # settled meanwhile, or still held by its transaction
                RECONCILED.labels(protocol.value, settlement.status.value).inc()
                log.info(
                    "reconciled order %s: %s",
                    row["id"],
                    settlement.status.value,
                    extra={"gid": row["gid"], "reason": settlement.reason},
                )
                return "settled"
            except Exception as exc:
                RECONCILE_ERRORS.inc()
                log.warning("could not reconcile order %s (gid %s): %s", row["id"], row["gid"], exc)
                return "failed"

    while True:
        async with pool.acquire() as conn:
            rows = await storage.pending_older_than(conn, older_than_s, after=cursor, limit=batch)
        if not rows:
            break
        results = await asyncio.gather(*(one(row) for row in rows))
        settled += results.count("settled")
        waiting += results.count("waiting")
        failed += results.count("failed")
        if len(rows) < batch:
            break
        cursor = (rows[-1]["created_at"], rows[-1]["id"])
    RECONCILE_WAITING.set(waiting + failed)
    return ReconcileReport(settled, waiting, failed)


async def run_reconciler(
    pool: asyncpg.Pool,
    lookup: Lookup,
    *,
    older_than_s: float,
    interval_s: float,
    batch: int,
) -> None:
    """Reconcile forever, ``interval_s`` between passes; a failed pass is logged, never fatal."""
    while True:
        try:
            report = await reconcile_once(pool, lookup, older_than_s=older_than_s, batch=batch)
            if report.settled or report.failed:
                log.info("reconciler pass", extra=report.__dict__)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            RECONCILE_ERRORS.inc()
            log.warning("reconciler pass failed: %s", exc)
        await asyncio.sleep(interval_s)
