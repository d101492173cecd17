"""Placing an order, start to finish, apart from gRPC.

A module of its own so that one PlaceOrder request reads top to bottom in one
file (the servicer in :mod:`dtx_orders.handlers` only translates to and from
it), and so that the reconciler shares the last step, :func:`finish_pending_order`,
without importing the servicer.

:meth:`Placement.place`: refuse the uncoordinated baseline unless allowed,
answer a taken idempotency key with its order, price the items from
inventory's prices (remembered for a while, see :mod:`dtx_orders.lookups`;
never from the caller), store the order PENDING with its order.placed, and run
its transaction: two-phase commit through the coordinator, a saga through the
orchestrator, or (the benchmark's baseline only) direct calls. The order's own
branch confirms it; a refused or failed transaction is recorded here by
:func:`finish_pending_order`. When the outcome is not known in time the order
is answered PENDING and the reconciler finishes it later, through the same
function, from the coordinator's or the orchestrator's log.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
import grpc

from dtx.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    inventory_pb2,
    inventory_pb2_grpc,
    participant_pb2,
    participant_pb2_grpc,
    payments_pb2,
    payments_pb2_grpc,
    saga_pb2,
    saga_pb2_grpc,
    transactions_pb2,
)
from dtx_orders import domain, storage
from dtx_orders.domain import NewOrder, OrderRequest, Protocol, Settlement, Status
from dtx_orders.lookups import AccountCurrencies, ConfirmedRows, ProductPrices
from dtx_orders.metrics import ORDER_SECONDS, ORDERS
from dtx_runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)
from dtx_runtime.failpoints import failpoint
from dtx_runtime.outbox import notify_committed
from dtx_runtime.participant import Barrier

log = logging.getLogger(__name__)

T = TypeVar("T")

FINISH_LOCK_TIMEOUT_MS = 1000
"""How long finishing a PENDING order waits for a prepared transaction that still holds it."""

_RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
)


@dataclass(frozen=True)
class Remotes:
    """The services orders calls, over channels reused for every call."""

    payments: payments_pb2_grpc.PaymentsAsyncStub
    inventory: inventory_pb2_grpc.InventoryAsyncStub
    coordinator: coordinator_pb2_grpc.CoordinatorAsyncStub
    saga: saga_pb2_grpc.SagaOrchestratorAsyncStub
    participants: dict[str, participant_pb2_grpc.ParticipantAsyncStub]


class Placement:
    """PlaceOrder's flow, over the orders database and the services it calls."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        remotes: Remotes,
        barrier: Barrier,
        *,
        transaction_timeout_ms: int,
        transaction_call_s: float,
        lookup_timeout_s: float,
        price_cache_s: float = 0.0,
        allow_uncoordinated: bool = False,
        confirmed: ConfirmedRows | None = None,
    ) -> None:
        self._pool = pool
        self._remotes = remotes
        self._barrier = barrier
        self._currencies = AccountCurrencies()
        self._prices_seen = ProductPrices(price_cache_s)
        self._confirmed = confirmed if confirmed is not None else ConfirmedRows()
        self._transaction_timeout_ms = transaction_timeout_ms
        self._transaction_call_s = transaction_call_s
        self._lookup_timeout_s = lookup_timeout_s
        self._allow_uncoordinated = allow_uncoordinated

    async def place(self, request: OrderRequest, *, started: float) -> asyncpg.Record:
        """The order as it stands once placed: new and run, or the one its idempotency key took.

        ``started`` is the ``time.perf_counter()`` of the request's arrival:
        ``dtx_order_seconds`` times a new order from validation to answer.
        """
        if request.protocol is Protocol.UNCOORDINATED and not self._allow_uncoordinated:
            raise FailedPrecondition(
                "protocol: uncoordinated orders are only for the benchmark's baseline;"
                " this service runs without DTX_ALLOW_UNCOORDINATED=true"
            )
        key = request.idempotency_key
        if key is not None:
            async with self._pool.acquire() as conn:
                existing = await storage.get_by_key(conn, key)
            if existing is not None:
                return _replay(existing, request)

        currency, prices = await self._prices(request)
        lines = domain.price_items(request.items, prices, currency)
        order = domain.new_order(request, lines, currency)
        async with self._pool.acquire() as conn:
            row = await storage.insert_order(conn, order)
            if row is None:  # another request took the key since the lookup above
                assert key is not None
                existing = await storage.get_by_key(conn, key)
                if existing is None:  # pragma: no cover - orders are never deleted
                    raise Unavailable(f"idempotency_key {key!r}: conflicting order vanished; retry")
                return _replay(existing, request)
        notify_committed()  # order.placed

        row = await self._run(order, row)
        status = Status(row["status"])
        if status is not Status.CONFIRMED:
            # A refusal may come from a price that changed: ask inventory next time.
            self._prices_seen.forget(line.sku for line in order.lines)
        ORDERS.labels(order.protocol.value, status.value).inc()
        ORDER_SECONDS.labels(order.protocol.value).observe(time.perf_counter() - started)
        return row

    # -- pricing -----------------------------------------------------------

    async def _prices(self, request: OrderRequest) -> tuple[str, dict[str, domain.Price]]:
        """The account's currency and the items' prices: remembered, or asked of both at once.

        See :mod:`dtx_orders.lookups` for why remembering them is safe.
        """
        skus = [line.sku for line in request.items]
        currency = self._currencies.get(request.account_id)
        prices = self._prices_seen.get_all(skus)
        if currency is not None and prices is not None:
            return currency, prices
        products_call = (
            self._remotes.inventory.GetProducts(
                inventory_pb2.GetProductsRequest(skus=skus), timeout=self._lookup_timeout_s
            )
            if prices is None
            else None
        )
        account_call = (
            self._remotes.payments.GetAccount(
                payments_pb2.GetAccountRequest(account_id=str(request.account_id)),
                timeout=self._lookup_timeout_s,
            )
            if currency is None
            else None
        )
        account, products = await asyncio.gather(
            _maybe(account_call), _maybe(products_call), return_exceptions=True
        )
        if isinstance(account, grpc.aio.AioRpcError):
            if account.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"account_id {request.account_id} not found")
            if account.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(f"account_id: {account.details()}")
            raise _remote_failure("payments", account)
        if isinstance(account, BaseException):
            raise account
        if isinstance(products, grpc.aio.AioRpcError):
            raise _remote_failure("inventory", products)
        if isinstance(products, BaseException):
            raise products
        if account is not None:
            currency = account.currency
            self._currencies.put(request.account_id, currency)
        if products is not None:
            prices = _price_map(products)
            self._prices_seen.put_all(prices)
        assert currency is not None
        assert prices is not None
        return currency, prices

    # -- the transaction ---------------------------------------------------

    async def _run(self, order: NewOrder, row: asyncpg.Record) -> asyncpg.Record:
        """Run the order's global transaction and return the order as it then stands."""
        if order.protocol is Protocol.TWO_PHASE_COMMIT:
            settlement = await self._run_two_phase(order)
        elif order.protocol is Protocol.UNCOORDINATED:
            settlement = await self._run_uncoordinated(order)
        else:
            settlement = await self._run_saga(order)
        # The row its confirmation wrote, if that ran here (taken whatever the outcome).
        confirmed = self._confirmed.take(order.gid)
        if settlement is None:
            return await self._reread(order.id, row)
        if settlement.status is Status.CONFIRMED:
            if confirmed is not None:  # committed, and CONFIRMED is final: no reread
                return confirmed
            # Confirmed in another replica (a saga's step): committed before the
            # answer came, so one read sees it.
            return await self._reread(order.id, row)
        finished = await finish_pending_order(self._pool, order.id, settlement)
        return finished if finished is not None else await self._reread(order.id, row)

    async def _run_two_phase(self, order: NewOrder) -> Settlement | None:
        """Prepare the order's own branch here, have the coordinator run the rest, apply its word.

        Preparing locally spares the coordinator a Prepare and a Commit to this
        very service. Whatever goes wrong between the two, the branch is never
        left to chance: the coordinator's log has the decision (or presumes an
        abort), and the reaper asks for it about a branch still prepared.
        """
        own = domain.own_branch(order)
        vote = await self._barrier.prepare(order.gid, own.branch, own.operation)
        if not vote.yes:  # nothing is prepared anywhere: no global transaction
            return Settlement(Status.REJECTED, f"{own.branch}: {vote.reason}")
        request = coordinator_pb2.RunTransactionRequest(
            gid=order.gid,
            branches=domain.two_phase_branches(order),
            timeout_ms=self._transaction_timeout_ms,
        )
        try:
            reply = await self._remotes.coordinator.RunTransaction(
                request, timeout=self._transaction_call_s
            )
        except grpc.aio.AioRpcError as exc:
            # Whatever happened, the coordinator's log decides; the reaper and the
            # reconciler read it.
            log.warning(
                "order %s left PENDING: RunTransaction failed with %s: %s",
                order.id,
                exc.code().name,
                exc.details(),
            )
            return None
        await failpoint("orders.before_own_phase_two")
        outcome = reply.transaction.outcome
        try:
            if outcome == transactions_pb2.OUTCOME_COMMITTED:
                await self._barrier.commit(order.gid, own.branch)
            elif outcome == transactions_pb2.OUTCOME_ABORTED:
                await self._barrier.abort(order.gid, own.branch)
        except Exception as exc:  # the database: the reaper applies the decision later
            log.warning("order %s left PENDING: its own branch not settled: %r", order.id, exc)
            return None
        return domain.settle_two_phase(reply.transaction)

    async def _run_uncoordinated(self, order: NewOrder) -> Settlement:
        """The baseline: charge and reserve by direct calls, at once, with no coordination.

        Not atomic: a refusal of one leaves the other's effect in place. It
        exists only so that the benchmark measures what coordination costs.
        """
        calls = [
            self._remotes.participants[b.participant].Execute(
                participant_pb2.ExecuteRequest(
                    gid=order.gid, branch=b.branch, operation=b.operation
                ),
                timeout=self._transaction_call_s,
            )
            for b in domain.uncoordinated_branches(order)
        ]
        replies = await asyncio.gather(*calls)
        refusals = [r.reason for r in replies if not r.succeeded]
        if refusals:
            return Settlement(Status.REJECTED, "; ".join(refusals))
        async with self._pool.acquire() as conn:
            confirmed = await storage.confirm_uncoordinated(conn, order.id)
        notify_committed()  # order.confirmed
        if confirmed is not None:
            self._confirmed.put(order.gid, confirmed)
        return Settlement(Status.CONFIRMED)

    async def _run_saga(self, order: NewOrder) -> Settlement | None:
        request = saga_pb2.RunSagaRequest(
            gid=order.gid,
            steps=domain.saga_steps(order),
            timeout_ms=self._transaction_timeout_ms,
        )
        try:
            reply = await self._remotes.saga.RunSaga(request, timeout=self._transaction_call_s)
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "order %s left PENDING: RunSaga failed with %s: %s",
                order.id,
                exc.code().name,
                exc.details(),
            )
            return None
        return domain.settle_saga(reply.saga)

    async def _reread(self, order_id: uuid.UUID, fallback: asyncpg.Record) -> asyncpg.Record:
        async with self._pool.acquire() as conn:
            row = await storage.get_order(conn, order_id)
        return row if row is not None else fallback


async def finish_pending_order(
    pool: asyncpg.Pool, order_id: uuid.UUID, settlement: Settlement
) -> asyncpg.Record | None:
    """Move a PENDING order to the settlement's status, with its event; the order, or None.

    None when the order was no longer PENDING, or is still held: a prepared
    transaction of the order's own branch that was not rolled back yet holds
    the row, the update gives up after :data:`FINISH_LOCK_TIMEOUT_MS` and the
    order stays PENDING for the reconciler. Called by :meth:`Placement.place`
    for an outcome it learned and by the reconciler for one it looked up.
    """
    domain.check_transition(Status.PENDING, settlement.status)
    async with pool.acquire() as conn:
        try:
            row = await storage.finish_pending(
                conn,
                order_id,
                settlement.status,
                settlement.reason,
                lock_timeout_ms=FINISH_LOCK_TIMEOUT_MS,
            )
        except asyncpg.LockNotAvailableError:
            log.info("order %s is still held by its transaction; settling it later", order_id)
            return None
    if row is not None:
        notify_committed()  # order.rejected / order.failed / order.cancelled
    return row


def _replay(existing: asyncpg.Record, request: OrderRequest) -> asyncpg.Record:
    """The order a taken idempotency key answers with: the same request's, or a refusal."""
    if existing["request_hash"] != request.request_hash:
        raise AlreadyExists(
            f"idempotency_key {request.idempotency_key!r} was used for another request"
            f" (order {existing['id']})"
        )
    return existing


def _price_map(products: inventory_pb2.GetProductsResponse) -> dict[str, domain.Price]:
    return {
        p.sku: domain.Price(price_minor=p.price_minor, currency=p.currency)
        for p in products.products
    }


async def _maybe(call: Awaitable[T] | None) -> T | None:
    """The call's answer, or None when there is no call to make."""
    return None if call is None else await call


def _remote_failure(service: str, exc: grpc.aio.AioRpcError) -> ServiceError:
    if exc.code() in _RETRYABLE:
        return Unavailable(
            f"{service} unavailable: {exc.code().name} {exc.details() or ''}".strip()
        )
    return ServiceError(f"{service} answered {exc.code().name}: {exc.details() or ''}".strip())
