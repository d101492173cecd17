"""The system as real processes on loopback: coordinator, payments, inventory, orders (and saga).

Each service gets a fresh database on the session's PostgreSQL and ports of
its own; endpoints are known before anything starts, so the services find
each other exactly as they would from their settings in a cluster.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
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
from tests.support.processes import ServiceProcess

PARTICIPANTS = ("orders", "payments", "inventory")


@dataclass
class Stack:
    run_dir: Path
    new_database: Callable[[str], str]
    with_saga: bool = False
    coordinators: int = 1
    policy: dict[str, Any] | None = None
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    dsns: dict[str, str] = field(default_factory=dict)
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    def build(self) -> Stack:
        names = ["coordinator", *PARTICIPANTS] + (["saga"] if self.with_saga else [])
        for name in names:
            self.dsns[name] = self.new_database(name)
        policy_file = self.run_dir / "policy.json"
        policy_file.write_text(json.dumps(self.policy or {}))
        self.policy_file = policy_file
        self.procs = {
            name: ServiceProcess(name, {}, self.run_dir) for name in (*PARTICIPANTS, "saga")
        }
        for i in range(self.coordinators):
            key = "coordinator" if i == 0 else f"coordinator{i}"
            self.procs[key] = ServiceProcess("coordinator", {}, self.run_dir)
            self.procs[key].log_dir = self.run_dir / key
        participants = ",".join(f"{n}={self.procs[n].endpoint}" for n in PARTICIPANTS)
        for key, proc in self.procs.items():
            base = {
                "DTX_DATABASE_URL": self.dsns.get(proc.name, ""),
                "DTX_COORDINATOR_ENDPOINT": self.procs["coordinator"].endpoint,
                "DTX_SAGA_ENDPOINT": self.procs["saga"].endpoint,
                "DTX_PAYMENTS_ENDPOINT": self.procs["payments"].endpoint,
                "DTX_INVENTORY_ENDPOINT": self.procs["inventory"].endpoint,
                "DTX_PARTICIPANTS": participants,
                "DTX_POLICY_FILE": str(policy_file),
                "DTX_REPLICA_ID": key,
                "DTX_REAPER_INTERVAL_SECONDS": "1",
                "DTX_REAPER_THRESHOLD_SECONDS": "2",
                "DTX_ORDER_RECONCILE_AFTER_SECONDS": "3",
                "DTX_LOG_LEVEL": "INFO",
            }
            proc.env = {**base, **self.env}
        return self

    def start(self) -> Stack:
        for key, proc in self.procs.items():
            if key == "saga" and not self.with_saga:
                continue
            proc.start(wait=False)
        for key, proc in self.procs.items():
            if key == "saga" and not self.with_saga:
                continue
            proc.wait_ready(60)
        return self

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.process is not None:
                try:
                    proc.terminate(15)
                except Exception:
                    proc.kill()

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
