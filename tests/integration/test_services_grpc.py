"""Payments, inventory and orders as real processes: their gRPC APIs, errors, participants."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import grpc
import pytest

from dtx.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    inventory_pb2,
    inventory_pb2_grpc,
    orders_pb2,
    orders_pb2_grpc,
    participant_pb2,
    participant_pb2_grpc,
    payments_pb2,
    payments_pb2_grpc,
    saga_pb2,
    saga_pb2_grpc,
    transactions_pb2,
)
from dtx_runtime.participant.barrier import COMPENSATED_FIRST
from tests.support.processes import ServiceProcess, free_port

pytestmark = pytest.mark.integration


def start(name: str, dsn: str, run_dir: Path, **env: str) -> ServiceProcess:
    return ServiceProcess(
        name,
        {
            "DTX_DATABASE_URL": dsn,
            # Nothing listens there: the reaper only asks about old prepared transactions.
            "DTX_COORDINATOR_ENDPOINT": f"127.0.0.1:{free_port()}",
            "DTX_DB_POOL_MIN": "1",
            "DTX_DB_POOL_MAX": "4",
            **env,
        },
        run_dir,
    ).start(timeout=60)


@pytest.fixture
def payments_dsn(new_database: Callable[[str], str]) -> str:
    return new_database("gpay")


@pytest.fixture
def inventory_dsn(new_database: Callable[[str], str]) -> str:
    return new_database("ginv")


@pytest.fixture
def payments_process(payments_dsn: str, run_dir: Path) -> Iterator[ServiceProcess]:
    process = start("payments", payments_dsn, run_dir)
    yield process
    assert process.terminate() == 0, process.tail()


@pytest.fixture
def inventory_process(inventory_dsn: str, run_dir: Path) -> Iterator[ServiceProcess]:
    process = start("inventory", inventory_dsn, run_dir, DTX_CURRENCY="USD")
    yield process
    assert process.terminate() == 0, process.tail()


@pytest.fixture
async def channel_to() -> AsyncIterator[Callable[[ServiceProcess], grpc.aio.Channel]]:
    channels: list[grpc.aio.Channel] = []

    def make(process: ServiceProcess) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(process.endpoint)
        channels.append(channel)
        return channel

    yield make
    for channel in channels:
        await channel.close(None)


async def count(dsn: str, table: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        value: int = await conn.fetchval(f"SELECT count(*) FROM {table}")
        return value
    finally:
        await conn.close()


async def expect(code: grpc.StatusCode, call: object, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    details = caught.value.details() or ""
    for fragment in fragments:
        assert fragment in details, details
    return details


# -- payments ----------------------------------------------------------------


async def test_payments_create_and_get(
    payments_process: ServiceProcess,
    payments_dsn: str,
    channel_to: Callable[[ServiceProcess], grpc.aio.Channel],
) -> None:
    stub = payments_pb2_grpc.PaymentsStub(channel_to(payments_process))
    created = await stub.CreateAccount(
        payments_pb2.CreateAccountRequest(owner="Ada", currency="EUR", balance_minor=12_345),
        timeout=10,
    )
    assert uuid.UUID(created.id)
    assert (created.owner, created.currency, created.balance_minor) == ("Ada", "EUR", 12_345)
    assert created.created_at.seconds > 0
    fetched = await stub.GetAccount(
        payments_pb2.GetAccountRequest(account_id=created.id), timeout=10
    )
    assert fetched == created
    assert await count(payments_dsn, "ledger") == 1  # the opening row


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"owner": "", "currency": "EUR"}, "owner"),
        ({"owner": "x" * 201, "currency": "EUR"}, "owner"),
        ({"owner": "Ada", "currency": "eur"}, "currency"),
        ({"owner": "Ada", "currency": "EUR", "balance_minor": -1}, "balance_minor"),
        ({"owner": "Ada", "currency": "EUR", "balance_minor": 10**15 + 1}, "balance_minor"),
    ],
)
async def test_payments_bad_input_writes_nothing(
    payments_process: ServiceProcess,
    payments_dsn: str,
    channel_to: Callable[[ServiceProcess], grpc.aio.Channel],
    fields: dict[str, object],
    field: str,
) -> None:
    stub = payments_pb2_grpc.PaymentsStub(channel_to(payments_process))
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.CreateAccount(payments_pb2.CreateAccountRequest(**fields), timeout=10),  # type: ignore[arg-type]
        f"{field}:",
    )
    assert await count(payments_dsn, "accounts") == 0
    assert await count(payments_dsn, "ledger") == 0


async def test_payments_get_errors_and_participant(
    payments_process: ServiceProcess,
    payments_dsn: str,
    channel_to: Callable[[ServiceProcess], grpc.aio.Channel],
) -> None:
    channel = channel_to(payments_process)
    stub = payments_pb2_grpc.PaymentsStub(channel)
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.GetAccount(payments_pb2.GetAccountRequest(account_id="nope"), timeout=10),
        "account_id:",
    )
    missing = str(uuid.uuid4())
    await expect(
        grpc.StatusCode.NOT_FOUND,
        stub.GetAccount(payments_pb2.GetAccountRequest(account_id=missing), timeout=10),
        missing,
    )

    # The participant is wired to the charge manager: a charge prepares and commits.
    account = await stub.CreateAccount(
        payments_pb2.CreateAccountRequest(owner="Ada", currency="EUR", balance_minor=1000),
        timeout=10,
    )
    participant = participant_pb2_grpc.ParticipantStub(channel)
    gid = uuid.uuid4().hex
    op = participant_pb2.BranchOperation(
        charge=participant_pb2.ChargeOperation(
            account_id=account.id, amount_minor=400, currency="EUR", order_id="o-1"
        )
    )
    vote = await participant.Prepare(
        participant_pb2.PrepareRequest(gid=gid, branch="payment", operation=op), timeout=10
    )
    assert vote.vote == participant_pb2.VOTE_COMMIT
    await participant.Commit(participant_pb2.CommitRequest(gid=gid, branch="payment"), timeout=10)
    after = await stub.GetAccount(payments_pb2.GetAccountRequest(account_id=account.id), timeout=10)
    assert after.balance_minor == 600

    poor = await participant.Prepare(
        participant_pb2.PrepareRequest(
            gid=uuid.uuid4().hex,
            branch="payment",
            operation=participant_pb2.BranchOperation(
                charge=participant_pb2.ChargeOperation(
                    account_id=account.id, amount_minor=601, currency="EUR"
                )
            ),
        ),
        timeout=10,
    )
    assert poor.vote == participant_pb2.VOTE_ABORT
    assert poor.reason == f"insufficient funds: account {account.id} has 600, needs 601"

    reserve = participant_pb2.BranchOperation(
        reserve=participant_pb2.ReserveOperation(order_id="o")
    )
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        participant.Prepare(
            participant_pb2.PrepareRequest(gid=uuid.uuid4().hex, branch="p", operation=reserve),
            timeout=10,
        ),
        "payments accepts charge, got reserve",
    )
    await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        participant.Commit(
            participant_pb2.CommitRequest(gid=uuid.uuid4().hex, branch="payment"), timeout=10
        ),
    )


# -- inventory ---------------------------------------------------------------


async def test_inventory_create_get_restock(
    inventory_process: ServiceProcess,
    inventory_dsn: str,
    channel_to: Callable[[ServiceProcess], grpc.aio.Channel],
) -> None:
    stub = inventory_pb2_grpc.InventoryStub(channel_to(inventory_process))
    created = await stub.CreateProduct(
        inventory_pb2.CreateProductRequest(sku="APPLE-1", name="Apple", price_minor=99, stock=5),
        timeout=10,
    )
    assert (created.sku, created.price_minor, created.currency) == ("APPLE-1", 99, "USD")
    assert (created.available, created.reserved) == (5, 0)
    fetched = await stub.GetProduct(inventory_pb2.GetProductRequest(sku="APPLE-1"), timeout=10)
    assert fetched == created

    await stub.CreateProduct(
        inventory_pb2.CreateProductRequest(sku="PEAR", name="Pear", price_minor=50, stock=0),
        timeout=10,
    )
    batch = await stub.GetProducts(
        inventory_pb2.GetProductsRequest(skus=["PEAR", "NOPE", "APPLE-1", "PEAR"]), timeout=10
    )
    assert sorted(p.sku for p in batch.products) == ["APPLE-1", "PEAR"]
    empty = await stub.GetProducts(inventory_pb2.GetProductsRequest(), timeout=10)
    assert list(empty.products) == []

    restocked = await stub.Restock(inventory_pb2.RestockRequest(sku="PEAR", quantity=7), timeout=10)
    assert restocked.available == 7

    await expect(
        grpc.StatusCode.ALREADY_EXISTS,
        stub.CreateProduct(
            inventory_pb2.CreateProductRequest(sku="PEAR", name="Other", price_minor=1, stock=1),
            timeout=10,
        ),
        "PEAR",
    )
    pear = await stub.GetProduct(inventory_pb2.GetProductRequest(sku="PEAR"), timeout=10)
    assert (pear.name, pear.price_minor, pear.available) == ("Pear", 50, 7)
    await expect(
        grpc.StatusCode.NOT_FOUND,
        stub.GetProduct(inventory_pb2.GetProductRequest(sku="NOPE"), timeout=10),
        "NOPE",
    )
    await expect(
        grpc.StatusCode.NOT_FOUND,
        stub.Restock(inventory_pb2.RestockRequest(sku="NOPE", quantity=1), timeout=10),
        "NOPE",
    )
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.Restock(inventory_pb2.RestockRequest(sku="PEAR", quantity=0), timeout=10),
        "quantity:",
    )
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.GetProducts(
            inventory_pb2.GetProductsRequest(skus=[f"S{i}" for i in range(101)]), timeout=10
        ),
        "skus:",
    )
    assert await count(inventory_dsn, "products") == 2


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"sku": "apple", "name": "A", "price_minor": 1}, "sku"),
        ({"sku": "", "name": "A", "price_minor": 1}, "sku"),
        ({"sku": "A", "name": "", "price_minor": 1}, "name"),
        ({"sku": "A", "name": "A", "price_minor": 0}, "price_minor"),
        ({"sku": "A", "name": "A", "price_minor": 10**12 + 1}, "price_minor"),
        ({"sku": "A", "name": "A", "price_minor": 1, "stock": -1}, "stock"),
    ],
)
async def test_inventory_bad_input_writes_nothing(
    inventory_process: ServiceProcess,
    inventory_dsn: str,
    channel_to: Callable[[ServiceProcess], grpc.aio.Channel],
    fields: dict[str, object],
    field: str,
) -> None:
    stub = inventory_pb2_grpc.InventoryStub(channel_to(inventory_process))
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.CreateProduct(inventory_pb2.CreateProductRequest(**fields), timeout=10),  # type: ignore[arg-type]
        f"{field}:",
    )
    assert await count(inventory_dsn, "products") == 0


async def test_inventory_participant_reserves(
    inventory_process: ServiceProcess,
    channel_to: Callable[[ServiceProcess], grpc.aio.Channel],
) -> None:
    channel = channel_to(inventory_process)
    stub = inventory_pb2_grpc.InventoryStub(channel)
    await stub.CreateProduct(
        inventory_pb2.CreateProductRequest(sku="APPLE", name="Apple", price_minor=10, stock=3),
        timeout=10,
    )
    participant = participant_pb2_grpc.ParticipantStub(channel)

    def op(quantity: int, order: str) -> participant_pb2.BranchOperation:
        return participant_pb2.BranchOperation(
            reserve=participant_pb2.ReserveOperation(
                order_id=order, items=[common_pb2.LineItem(sku="APPLE", quantity=quantity)]
            )
        )

    gid = uuid.uuid4().hex
    done = await participant.Execute(
        participant_pb2.ExecuteRequest(gid=gid, branch="stock", operation=op(2, "o-1")), timeout=10
    )
    assert done.succeeded
    refused = await participant.Execute(
        participant_pb2.ExecuteRequest(
            gid=uuid.uuid4().hex, branch="stock", operation=op(2, "o-2")
        ),
        timeout=10,
    )
    assert (refused.succeeded, refused.reason) == (
        False,
        "out of stock: APPLE has 1 available, needs 2",
    )
    await participant.Compensate(
        participant_pb2.CompensateRequest(gid=gid, branch="stock"), timeout=10
    )
    apple = await stub.GetProduct(inventory_pb2.GetProductRequest(sku="APPLE"), timeout=10)
    assert (apple.available, apple.reserved) == (3, 0)


# -- orders, with payments and inventory, under a stand-in coordinator ----------
#
# The real coordinator and saga orchestrator are other services; here a small
# synchronous stand-in drives the real participants (prepare all, then commit
# or abort; or execute in order and compensate in reverse), so PlaceOrder's
# whole flow runs against real processes and databases.


class StandIn(coordinator_pb2_grpc.CoordinatorServicer, saga_pb2_grpc.SagaOrchestratorServicer):
    def __init__(self, endpoints: dict[str, str]) -> None:
        self.endpoints = endpoints
        self.unavailable = False
        self.log: dict[str, transactions_pb2.Transaction] = {}  # by gid, as a coordinator logs
        self._channels = {name: grpc.insecure_channel(ep) for name, ep in endpoints.items()}

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def _participant(self, name: str) -> participant_pb2_grpc.ParticipantStub:
        return participant_pb2_grpc.ParticipantStub(self._channels[name])

    def RunTransaction(
        self, request: coordinator_pb2.RunTransactionRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RunTransactionResponse:
        if self.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "stand-in is down")
        statuses, reason = [], ""
        for branch in request.branches:
            vote = self._participant(branch.participant).Prepare(
                participant_pb2.PrepareRequest(
                    gid=request.gid, branch=branch.branch, operation=branch.operation
                ),
                timeout=10,
            )
            yes = vote.vote == participant_pb2.VOTE_COMMIT
            if not yes and not reason:
                reason = f"{branch.branch}: {vote.reason}"
            statuses.append(
                transactions_pb2.BranchStatus(
                    branch=branch.branch,
                    participant=branch.participant,
                    state="prepared" if yes else "no",
                    reason="" if yes else vote.reason,
                )
            )
        commit = not reason
        for branch, status in zip(request.branches, statuses, strict=True):
            if commit:
                self._participant(branch.participant).Commit(
                    participant_pb2.CommitRequest(gid=request.gid, branch=branch.branch), timeout=10
                )
                status.state = "committed"
            elif status.state != "no":
                self._participant(branch.participant).Abort(
                    participant_pb2.AbortRequest(gid=request.gid, branch=branch.branch), timeout=10
                )
                status.state = "aborted"
        self.log[request.gid] = transactions_pb2.Transaction(
            gid=request.gid,
            protocol=common_pb2.PROTOCOL_TWO_PHASE_COMMIT,
            state=transactions_pb2.TRANSACTION_STATE_COMMITTED
            if commit
            else transactions_pb2.TRANSACTION_STATE_ABORTED,
            outcome=transactions_pb2.OUTCOME_COMMITTED
            if commit
            else transactions_pb2.OUTCOME_ABORTED,
            reason=reason,
            branches=statuses,
        )
        return coordinator_pb2.RunTransactionResponse(transaction=self.log[request.gid])

    def RunSaga(
        self, request: saga_pb2.RunSagaRequest, context: grpc.ServicerContext
    ) -> saga_pb2.RunSagaResponse:
        if self.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "stand-in is down")
        done: list[transactions_pb2.Branch] = []
        reason = ""
        for step in request.steps:
            answer = self._participant(step.participant).Execute(
                participant_pb2.ExecuteRequest(
                    gid=request.gid, branch=step.branch, operation=step.operation
                ),
                timeout=10,
            )
            if not answer.succeeded:
                reason = f"{step.branch}: {answer.reason}"
                break
            done.append(step)
        for step in reversed(done if reason else []):
            self._participant(step.participant).Compensate(
                participant_pb2.CompensateRequest(gid=request.gid, branch=step.branch), timeout=10
            )
        self.log[request.gid] = transactions_pb2.Transaction(
            gid=request.gid,
            protocol=common_pb2.PROTOCOL_SAGA,
            state=transactions_pb2.TRANSACTION_STATE_COMPENSATED
            if reason
            else transactions_pb2.TRANSACTION_STATE_COMPLETED,
            reason=reason,
        )
        return saga_pb2.RunSagaResponse(saga=self.log[request.gid])

    def GetOutcome(
        self, request: coordinator_pb2.GetOutcomeRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.GetOutcomeResponse:
        # Presumed abort, recorded: a gid never seen is aborted from now on.
        known = self.log.setdefault(
            request.gid,
            transactions_pb2.Transaction(
                gid=request.gid,
                state=transactions_pb2.TRANSACTION_STATE_ABORTED,
                outcome=transactions_pb2.OUTCOME_ABORTED,
                reason="unknown transaction: presumed aborted",
            ),
        )
        return coordinator_pb2.GetOutcomeResponse(outcome=known.outcome)

    def GetTransaction(
        self, request: transactions_pb2.GetTransactionRequest, context: grpc.ServicerContext
    ) -> transactions_pb2.Transaction:
        if request.gid not in self.log:
            context.abort(grpc.StatusCode.NOT_FOUND, f"transaction {request.gid} not found")
        return self.log[request.gid]

    def GetSaga(
        self, request: transactions_pb2.GetTransactionRequest, context: grpc.ServicerContext
    ) -> transactions_pb2.Transaction:
        return self.GetTransaction(request, context)

    def _unused(self, context: grpc.ServicerContext) -> NoReturn:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the stand-in")
        raise AssertionError("unreachable")

    def ListTransactions(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unused(context)

    def RetryTransaction(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unused(context)

    def AbortTransaction(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unused(context)

    def ListSagas(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unused(context)

    def RetrySaga(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unused(context)

    def AbortSaga(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unused(context)


@dataclass
class Stack:
    payments: payments_pb2_grpc.PaymentsStub
    inventory: inventory_pb2_grpc.InventoryStub
    orders: orders_pb2_grpc.OrdersStub
    stand_in: StandIn
    orders_dsn: str
    orders_participant: participant_pb2_grpc.ParticipantStub


@pytest.fixture(scope="module")
def stack(infra: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """payments, inventory and orders as processes, and the stand-in; one set per module."""
    postgres = infra.postgres
    names = {s: f"gord_{s}_{uuid.uuid4().hex[:8]}" for s in ("payments", "inventory", "orders")}
    for name in names.values():
        postgres.create_database(name)
    logs = tmp_path_factory.mktemp("orders-stack")
    processes: list[ServiceProcess] = []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    port = server.add_insecure_port("127.0.0.1:0")
    channels: list[grpc.Channel] = []
    stand_in: StandIn | None = None
    try:
        payments = start("payments", postgres.dsn(names["payments"]), logs)
        processes.append(payments)
        inventory = start("inventory", postgres.dsn(names["inventory"]), logs)
        processes.append(inventory)
        orders = ServiceProcess(
            "orders",
            {
                "DTX_DATABASE_URL": postgres.dsn(names["orders"]),
                "DTX_COORDINATOR_ENDPOINT": f"127.0.0.1:{port}",
                "DTX_SAGA_ENDPOINT": f"127.0.0.1:{port}",
                "DTX_PAYMENTS_ENDPOINT": payments.endpoint,
                "DTX_INVENTORY_ENDPOINT": inventory.endpoint,
                "DTX_DB_POOL_MIN": "1",
                "DTX_DB_POOL_MAX": "6",
                # Short, so the reconciler's end-to-end test does not wait 30 s.
                "DTX_TRANSACTION_TIMEOUT_MS": "2000",
                "DTX_TRANSACTION_CALL_MARGIN_SECONDS": "1",
                "DTX_ORDER_RECONCILE_AFTER_SECONDS": "3.5",
                "DTX_ORDER_RECONCILE_INTERVAL_SECONDS": "0.5",
            },
            logs,
        )
        stand_in = StandIn(
            {
                "payments": payments.endpoint,
                "inventory": inventory.endpoint,
                "orders": orders.endpoint,
            }
        )
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(stand_in, server)
        saga_pb2_grpc.add_SagaOrchestratorServicer_to_server(stand_in, server)
        server.start()
        processes.append(orders.start(timeout=60))
        channels = [grpc.insecure_channel(p.endpoint) for p in (payments, inventory, orders)]
        yield Stack(
            payments_pb2_grpc.PaymentsStub(channels[0]),
            inventory_pb2_grpc.InventoryStub(channels[1]),
            orders_pb2_grpc.OrdersStub(channels[2]),
            stand_in,
            postgres.dsn(names["orders"]),
            participant_pb2_grpc.ParticipantStub(channels[2]),
        )
    finally:
        for channel in channels:
            channel.close()
        server.stop(None)
        if stand_in is not None:
            stand_in.close()
        codes = {p.name: p.terminate() for p in reversed(processes)}
        for name in names.values():
            postgres.drop_database(name)
        assert all(code == 0 for code in codes.values()), codes


def sync_expect(code: grpc.StatusCode, call: Callable[[], object], *fragments: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value  # a grpc.Call as well; the stubs cannot express both
    assert error.code() == code, error.details()
    for fragment in fragments:
        assert fragment in (error.details() or ""), error.details()


@pytest.fixture
def shop(stack: Stack) -> tuple[str, str, str]:
    """A funded EUR account and two fresh products: (account id, sku priced 150, sku priced 40)."""
    account = stack.payments.CreateAccount(
        payments_pb2.CreateAccountRequest(owner="Ada", currency="EUR", balance_minor=1000),
        timeout=10,
    )
    tag = uuid.uuid4().hex[:8].upper()
    apple, pear = f"APPLE-{tag}", f"PEAR-{tag}"
    for sku, price, stock in ((apple, 150, 10), (pear, 40, 3)):
        stack.inventory.CreateProduct(
            inventory_pb2.CreateProductRequest(sku=sku, name=sku, price_minor=price, stock=stock),
            timeout=10,
        )
    return account.id, apple, pear


def levels(stack: Stack, account_id: str, *skus: str) -> tuple[int, list[tuple[int, int]]]:
    balance = stack.payments.GetAccount(
        payments_pb2.GetAccountRequest(account_id=account_id), timeout=10
    ).balance_minor
    products = [
        stack.inventory.GetProduct(inventory_pb2.GetProductRequest(sku=sku), timeout=10)
        for sku in skus
    ]
    return balance, [(p.available, p.reserved) for p in products]


def order_request(
    account_id: str, items: list[tuple[str, int]], protocol: int = 0, key: str = ""
) -> orders_pb2.PlaceOrderRequest:
    return orders_pb2.PlaceOrderRequest(
        account_id=account_id,
        items=[common_pb2.LineItem(sku=s, quantity=q) for s, q in items],
        protocol=protocol,  # type: ignore[arg-type]
        idempotency_key=key,
    )


@pytest.mark.parametrize(
    "protocol", [common_pb2.PROTOCOL_TWO_PHASE_COMMIT, common_pb2.PROTOCOL_SAGA]
)
def test_order_confirmed(stack: Stack, shop: tuple[str, str, str], protocol: int) -> None:
    account_id, apple, pear = shop
    order = stack.orders.PlaceOrder(
        order_request(account_id, [(apple, 2), (pear, 3)], protocol), timeout=30
    )
    assert order.status == orders_pb2.ORDER_STATUS_CONFIRMED, order.reason
    assert order.total_minor == 2 * 150 + 3 * 40
    assert order.currency == "EUR"
    assert order.protocol == protocol
    assert order.gid == uuid.UUID(order.id).hex
    assert [(i.sku, i.quantity, i.unit_price_minor) for i in order.items] == [
        (apple, 2, 150),
        (pear, 3, 40),
    ]
    assert levels(stack, account_id, apple, pear) == (1000 - 420, [(8, 2), (0, 3)])
    assert stack.orders.GetOrder(orders_pb2.GetOrderRequest(order_id=order.id), timeout=10) == order


@pytest.mark.parametrize(
    ("protocol", "status"),
    [
        (common_pb2.PROTOCOL_TWO_PHASE_COMMIT, orders_pb2.ORDER_STATUS_REJECTED),
        (common_pb2.PROTOCOL_SAGA, orders_pb2.ORDER_STATUS_CANCELLED),
    ],
)
def test_order_refused_moves_nothing(
    stack: Stack, shop: tuple[str, str, str], protocol: int, status: int
) -> None:
    account_id, apple, pear = shop
    poor = stack.orders.PlaceOrder(order_request(account_id, [(apple, 7)], protocol), timeout=30)
    assert poor.status == status
    assert poor.reason == f"payment: insufficient funds: account {account_id} has 1000, needs 1050"
    short = stack.orders.PlaceOrder(order_request(account_id, [(pear, 4)], protocol), timeout=30)
    assert short.status == status
    assert short.reason == f"stock: out of stock: {pear} has 3 available, needs 4"
    assert levels(stack, account_id, apple, pear) == (1000, [(10, 0), (3, 0)])


def test_a_confirmed_saga_order_refuses_its_compensation(
    stack: Stack, shop: tuple[str, str, str]
) -> None:
    """confirm_order is the saga's pivot: its Compensate is FAILED_PRECONDITION, every time."""
    account_id, apple, _ = shop
    order = stack.orders.PlaceOrder(
        order_request(account_id, [(apple, 1)], common_pb2.PROTOCOL_SAGA), timeout=30
    )
    assert order.status == orders_pb2.ORDER_STATUS_CONFIRMED, order.reason
    for _ in range(2):
        sync_expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            lambda: stack.orders_participant.Compensate(
                participant_pb2.CompensateRequest(gid=order.gid, branch="order"), timeout=10
            ),
            f"order {order.id} is CONFIRMED, and a confirmed order is final",
        )
    again = stack.orders.GetOrder(orders_pb2.GetOrderRequest(order_id=order.id), timeout=10)
    assert again.status == orders_pb2.ORDER_STATUS_CONFIRMED
    # A compensation that overtakes its action is still a recorded no-op that refuses it.
    late = uuid.uuid4().hex
    stack.orders_participant.Compensate(
        participant_pb2.CompensateRequest(gid=late, branch="order"), timeout=10
    )
    answer = stack.orders_participant.Execute(
        participant_pb2.ExecuteRequest(
            gid=late,
            branch="order",
            operation=participant_pb2.BranchOperation(
                confirm_order=participant_pb2.ConfirmOrderOperation(order_id=order.id)
            ),
        ),
        timeout=10,
    )
    assert (answer.succeeded, answer.reason) == (False, COMPENSATED_FIRST)


def test_order_idempotency(stack: Stack, shop: tuple[str, str, str]) -> None:
    account_id, apple, pear = shop
    key = f"key-{uuid.uuid4()}"
    first = stack.orders.PlaceOrder(
        order_request(account_id, [(apple, 1), (pear, 1)], key=key), timeout=30
    )
    assert first.status == orders_pb2.ORDER_STATUS_CONFIRMED
    again = stack.orders.PlaceOrder(
        order_request(account_id, [(pear, 1), (apple, 1)], key=key), timeout=30
    )
    assert again == first
    sync_expect(
        grpc.StatusCode.ALREADY_EXISTS,
        lambda: stack.orders.PlaceOrder(
            order_request(account_id, [(apple, 2)], key=key), timeout=30
        ),
        "idempotency_key",
        "another request",
    )
    assert levels(stack, account_id, apple, pear) == (1000 - 190, [(9, 1), (2, 1)])


def test_order_left_pending_then_reconciled(stack: Stack, shop: tuple[str, str, str]) -> None:
    """Coordinator down: PENDING; later the reconciler's GetOutcome (presumed abort) fails it."""
    account_id, apple, _ = shop
    stack.stand_in.unavailable = True
    try:
        order = stack.orders.PlaceOrder(order_request(account_id, [(apple, 1)]), timeout=30)
        saga = stack.orders.PlaceOrder(
            order_request(account_id, [(apple, 2)], common_pb2.PROTOCOL_SAGA), timeout=30
        )
    finally:
        stack.stand_in.unavailable = False
    assert order.status == saga.status == orders_pb2.ORDER_STATUS_PENDING
    assert levels(stack, account_id, apple) == (1000, [(10, 0)])
    listed = stack.orders.ListOrders(
        orders_pb2.ListOrdersRequest(account_id=account_id), timeout=10
    )
    assert [o.id for o in listed.orders] == [saga.id, order.id]  # newest first

    deadline = time.monotonic() + 20
    while True:
        now = stack.orders.GetOrder(orders_pb2.GetOrderRequest(order_id=order.id), timeout=10)
        if now.status != orders_pb2.ORDER_STATUS_PENDING or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert now.status == orders_pb2.ORDER_STATUS_FAILED
    assert now.reason == "unknown transaction: presumed aborted"
    # A saga the orchestrator never saw has no presumed outcome: it waits.
    still = stack.orders.GetOrder(orders_pb2.GetOrderRequest(order_id=saga.id), timeout=10)
    assert still.status == orders_pb2.ORDER_STATUS_PENDING
    assert levels(stack, account_id, apple) == (1000, [(10, 0)])


def test_order_bad_requests(stack: Stack, shop: tuple[str, str, str]) -> None:
    account_id, apple, _ = shop
    before = asyncio.run(count(stack.orders_dsn, "orders"))
    place = stack.orders.PlaceOrder
    cases: list[tuple[grpc.StatusCode, orders_pb2.PlaceOrderRequest, tuple[str, ...]]] = [
        (grpc.StatusCode.INVALID_ARGUMENT, order_request("x", [(apple, 1)]), ("account_id:",)),
        (grpc.StatusCode.INVALID_ARGUMENT, order_request(account_id, []), ("items:",)),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            order_request(account_id, [(apple, 1), ("B", 1), ("C", 0)]),
            ("items[2].quantity:",),
        ),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            order_request(account_id, [(apple, 1), (apple, 1)]),
            ("items[1].sku:",),
        ),
        (
            grpc.StatusCode.NOT_FOUND,
            order_request(account_id, [(apple, 1), ("NOPE-X", 1)]),
            ("items[1].sku: unknown sku NOPE-X",),
        ),
        (
            grpc.StatusCode.NOT_FOUND,
            order_request(str(uuid.UUID(int=7)), [(apple, 1)]),
            ("account_id", "not found"),
        ),
    ]
    for code, request, fragments in cases:
        sync_expect(code, lambda r=request: place(r, timeout=30), *fragments)  # type: ignore[misc]
    dollars = stack.payments.CreateAccount(
        payments_pb2.CreateAccountRequest(owner="Bob", currency="USD", balance_minor=1000),
        timeout=10,
    )
    sync_expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: place(order_request(dollars.id, [(apple, 1)]), timeout=30),
        "EUR",
        "USD",
    )
    sync_expect(
        grpc.StatusCode.NOT_FOUND,
        lambda: stack.orders.GetOrder(
            orders_pb2.GetOrderRequest(order_id=str(uuid.uuid4())), timeout=10
        ),
    )
    sync_expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stack.orders.ListOrders(
            orders_pb2.ListOrdersRequest(account_id=account_id, limit=501), timeout=10
        ),
        "limit:",
    )
    assert asyncio.run(count(stack.orders_dsn, "orders")) == before
