"""The system as real processes on loopback: coordinator, payments, inventory, orders (and saga).

Each service gets a fresh database on the session's PostgreSQL and ports of
its own; endpoints are known before anything starts, so the services find
each other exactly as they would from their settings in a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from dtx.v1 import (
    common_pb2,
    coordinator_pb2_grpc,
    inventory_pb2,
    inventory_pb2_grpc,
    orders_pb2,
    orders_pb2_grpc,
    payments_pb2,
    payments_pb2_grpc,
)
from dtx_cli.system import PARTICIPANTS, LocalSystem


@dataclass
class Stack:
    """A :class:`LocalSystem` for one test, with clients and data helpers."""

    run_dir: Path
    new_database: Callable[[str], str]
    with_saga: bool = False
    coordinators: int = 1
    policy: dict[str, Any] | None = None
    env: dict[str, str] = field(default_factory=dict)
    kafka_bootstrap: str | None = None
    extra_services: tuple[str, ...] = ()
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    def build(self) -> Stack:
        services = ["coordinator", *PARTICIPANTS, *(["saga"] if self.with_saga else [])]
        self.system = LocalSystem(
            self.run_dir,
            self.new_database,
            services=[*services, *self.extra_services],
            replicas={"coordinator": self.coordinators},
            policy=self.policy,
            kafka_bootstrap=self.kafka_bootstrap,
            env={
                "DTX_REAPER_INTERVAL_SECONDS": "1",
                "DTX_REAPER_THRESHOLD_SECONDS": "2",
                "DTX_ORDER_RECONCILE_AFTER_SECONDS": "5",
                "DTX_ORDER_RECONCILE_INTERVAL_SECONDS": "1",
                "DTX_TRANSACTION_TIMEOUT_MS": "3000",
                "DTX_TRANSACTION_CALL_MARGIN_SECONDS": "1",
                **self.env,
            },
        ).build()
        self.procs = self.system.procs
        self.dsns = self.system.dsns
        self.policy_file = self.system.policy_file
        return self

    def start(self) -> Stack:
        self.system.start()
        return self

    def stop(self) -> None:
        self.system.stop()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Stack]:
        """Started for the block; its channels closed and every process stopped after it."""
        try:
            self.start()
            yield self
        finally:
            await self.close_channels()
            self.stop()

    # -- clients -------------------------------------------------------------

    def channel(self, key: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self.procs[key].endpoint)
        self._channels.append(channel)
        return channel

    async def close_channels(self) -> None:
        for channel in self._channels:
            await channel.close(grace=None)
        self._channels.clear()

    def payments(self) -> payments_pb2_grpc.PaymentsAsyncStub:
        return payments_pb2_grpc.PaymentsStub(self.channel("payments"))

    def inventory(self) -> inventory_pb2_grpc.InventoryAsyncStub:
        return inventory_pb2_grpc.InventoryStub(self.channel("inventory"))

    def orders(self) -> orders_pb2_grpc.OrdersAsyncStub:
        return orders_pb2_grpc.OrdersStub(self.channel("orders"))

    def coordinator(self, key: str = "coordinator") -> coordinator_pb2_grpc.CoordinatorAsyncStub:
        return coordinator_pb2_grpc.CoordinatorStub(self.channel(key))

    # -- data ----------------------------------------------------------------

    async def seed(
        self, accounts: int, balance: int, products: dict[str, tuple[int, int]]
    ) -> list[str]:
        """Create accounts (EUR, ``balance`` each) and products {sku: (price, stock)}."""
        payments, inventory = self.payments(), self.inventory()
        ids = []
        for i in range(accounts):
            account = await payments.CreateAccount(
                payments_pb2.CreateAccountRequest(
                    owner=f"owner-{i}", currency="EUR", balance_minor=balance
                ),
                timeout=10,
            )
            ids.append(account.id)
        for sku, (price, stock) in products.items():
            await inventory.CreateProduct(
                inventory_pb2.CreateProductRequest(
                    sku=sku, name=sku, price_minor=price, stock=stock
                ),
                timeout=10,
            )
        return ids

    async def place(
        self,
        account: str,
        items: dict[str, int],
        *,
        protocol: common_pb2.Protocol.ValueType = common_pb2.PROTOCOL_TWO_PHASE_COMMIT,
        key: str = "",
        timeout: float = 20,
    ) -> orders_pb2.Order:
        return await self.orders().PlaceOrder(
            orders_pb2.PlaceOrderRequest(
                account_id=account,
                items=[common_pb2.LineItem(sku=s, quantity=q) for s, q in items.items()],
                protocol=protocol,
                idempotency_key=key,
            ),
            timeout=timeout,
        )

    async def fetch(self, service: str, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsns[service], timeout=10)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    async def prepared(self) -> list[str]:
        """Every dtx prepared transaction left in any of the stack's databases."""
        found: list[str] = []
        for service in PARTICIPANTS:
            rows = await self.fetch(
                service,
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()",
            )
            found += [r["gid"] for r in rows]
        return found

    async def wait_until(
        self, condition: Callable[[], Any], *, timeout: float = 30, what: str = "condition"
    ) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            await asyncio.sleep(0.2)
