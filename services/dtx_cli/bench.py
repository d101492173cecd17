"""``dtx bench``: orders/s and latency of each way to place an order, in one run.

Paths, all through the same orders service on the same machine:

* ``2pc`` — two-phase commit through the coordinator;
* ``saga`` — the saga orchestrator (when it is part of the system);
* ``direct`` — the same three business writes by direct calls, with no
  coordination and no atomicity (the baseline DTM publishes against);
* ``local`` — the same writes in one local transaction in one database (the
  ceiling: no network, no second database).

Each path gets a fresh system of its own (new databases, services and Kafka
topics, the same seeded rows), so no path inherits what an earlier one wrote.
It runs closed-loop at a fixed concurrency for a fixed time (its peak rate),
then — once the overload's after-effects have passed — open-loop at half that
rate to measure latency where the system is not saturated. Every service's
resident memory is sampled during the load.

Last, at the same spacing and with no orders in flight, it times the two
steps every order is made of: an empty gRPC call (the orders service's health
check) and an empty PostgreSQL round trip (``SELECT 1``). An order's latency
cannot go below its sequential count of these (README: Benchmark), so they
say what the machine allows before anything dtx does is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dtx.v1 import (
    common_pb2,
    inventory_pb2,
    inventory_pb2_grpc,
    orders_pb2,
    orders_pb2_grpc,
    payments_pb2,
    payments_pb2_grpc,
)
from dtx_cli.system import LocalSystem
from dtx_runtime.outbox import delete_topics

Call = Callable[[str, dict[str, int]], Awaitable[None]]

PROTOCOLS = {
    "2pc": common_pb2.PROTOCOL_TWO_PHASE_COMMIT,
    "saga": common_pb2.PROTOCOL_SAGA,
    "direct": common_pb2.PROTOCOL_UNCOORDINATED,
}


@dataclass
class PathResult:
    path: str
    peak_orders_per_s: float
    peak_p50_ms: float
    peak_p99_ms: float
    half_rate: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    ratio_to_direct: float | None = None
    rejected: int = 0
    # The outbox at the half rate, the worst over every service (sampled twice a second).
    outbox_max_backlog: int = 0
    outbox_max_oldest_unsent_s: float = 0.0
    # The machine over the half-rate phase (/proc/stat): how busy its CPUs were,
    # and how much of their time the hypervisor gave to other guests (steal).
    # A tail measured while neighbours steal is the neighbours' as much as ours.
    cpu_busy_percent: float = 0.0
    cpu_steal_percent: float = 0.0
    # The empty steps at the half rate's spacing, idle otherwise (0: not measured).
    hop_grpc_p50_ms: float = 0.0
    hop_grpc_p99_ms: float = 0.0
    hop_pg_p50_ms: float = 0.0
    hop_pg_p99_ms: float = 0.0


@dataclass
class BenchReport:
    concurrency: int
    seconds: float
    results: list[PathResult] = field(default_factory=list)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def _pct(samples: list[float], q: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


# Every service that writes domain events; the coordinator and the saga write none.
OUTBOX_SERVICES = ("orders", "payments", "inventory")
OUTBOX_SAMPLE = """
SELECT count(*) AS backlog,
       coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8 AS oldest_s
FROM dtx_outbox WHERE sent_at IS NULL
"""


SETTLE_TIMEOUT_S = 15.0
SETTLE_PAUSE_S = 3.0


class OutboxProbe:
    """One connection per outbox database, shared by the sampler and the settling waits."""

    def __init__(self, conns: list[asyncpg.Connection]) -> None:
        self._conns = conns
        self._lock = asyncio.Lock()  # an asyncpg connection runs one query at a time

    @classmethod
    async def connect(cls, dsns: list[str]) -> OutboxProbe:
        return cls([await asyncpg.connect(dsn) for dsn in dsns])

    async def sample(self) -> list[tuple[int, float]]:
        """(backlog, age of the oldest unsent event in seconds) of each outbox."""
        async with self._lock:
            rows = [await conn.fetchrow(OUTBOX_SAMPLE) for conn in self._conns]
        return [(int(r["backlog"]), float(r["oldest_s"])) for r in rows if r is not None]

    async def drain(self) -> None:
        """Wait (bounded) for every outbox to drain."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            if not any(backlog for backlog, _ in await self.sample()):
                break
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        for conn in self._conns:
            await conn.close()


async def _settle(probe: OutboxProbe, dsns: list[str], pause_s: float) -> None:
    """Bring the system to the same quiet state before a phase is measured.

    The outboxes drained, then what pgbench does before it measures — VACUUM
    every database — and a CHECKPOINT, so that neither autovacuum of the rows
    the last phase wrote nor a checkpoint it made due lands in the next
    phase's latencies; then a short pause.
    """
    await probe.drain()
    for dsn in dsns:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("VACUUM (ANALYZE)")
        finally:
            await conn.close()
    conn = await asyncpg.connect(dsns[0])
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    await asyncio.sleep(pause_s)


@dataclass(frozen=True)
class CpuTimes:
    """The machine's CPU time so far (all CPUs, clock ticks), split as the report needs."""

    busy: int
    steal: int
    total: int

    @classmethod
    def now(cls) -> CpuTimes | None:
        """From /proc/stat's first line; None where there is none (not Linux)."""
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal [guest guest_nice: inside user]
        idle, steal = fields[3] + fields[4], fields[7] if len(fields) > 7 else 0
        total = sum(fields[:8])
        return cls(busy=total - idle - steal, steal=steal, total=total)

    def percent_since(self, earlier: CpuTimes | None) -> tuple[float, float]:
        """(busy, steal) as percentages of the time elapsed since ``earlier``."""
        elapsed = self.total - earlier.total if earlier else 0
        if earlier is None or elapsed <= 0:
            return 0.0, 0.0
        return (
            round(100 * (self.busy - earlier.busy) / elapsed, 1),
            round(100 * (self.steal - earlier.steal) / elapsed, 1),
        )


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# Enough rows that two concurrent orders rarely want the same one: the benchmark
# measures what coordination costs, not queueing on a hot row (a 2PC branch holds
# its rows from prepare to commit; a saga step only for its own transaction).
ACCOUNTS = 256
PRODUCTS = 1000


class NotConfirmed(Exception):
    """An order that did not confirm counts as an error of the run."""


class Workload:
    """Random small orders over many accounts and products, so rows rarely collide."""

    def __init__(self, accounts: list[str], skus: list[str], seed: int = 7) -> None:
        self.accounts, self.skus = accounts, skus
        self.rng = random.Random(seed)

    def next(self) -> tuple[str, dict[str, int]]:
        count = self.rng.choice((1, 2))
        return self.rng.choice(self.accounts), {s: 1 for s in self.rng.sample(self.skus, count)}


async def _closed_loop(
    call: Call, workload: Workload, concurrency: int, seconds: float
) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.monotonic() < stop_at:
            account, items = workload.next()
            start = time.perf_counter()
            try:
                await call(account, items)
                latencies.append(time.perf_counter() - start)
            except (grpc.aio.AioRpcError, asyncpg.PostgresError, NotConfirmed):
                errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def _open_loop(
    call: Call, workload: Workload, rate: float, seconds: float
) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(account: str, items: dict[str, int]) -> None:
        nonlocal errors
        start = time.perf_counter()
        try:
            await call(account, items)
            latencies.append(time.perf_counter() - start)
        except (grpc.aio.AioRpcError, asyncpg.PostgresError, NotConfirmed):
            errors += 1

    begin = time.perf_counter()
    total = int(rate * seconds)
    for i in range(total):
        delay = begin + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(*workload.next()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    return latencies, errors


LOCAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (id int PRIMARY KEY, balance_minor bigint NOT NULL CHECK (balance_minor >= 0));
CREATE TABLE IF NOT EXISTS products (sku text PRIMARY KEY, price_minor bigint NOT NULL,
    available bigint NOT NULL CHECK (available >= 0), reserved bigint NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS orders (id uuid PRIMARY KEY, account_id int NOT NULL, items jsonb NOT NULL,
    total_minor bigint NOT NULL, status text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
"""


@dataclass
class _Fresh:
    """One path's own system: new databases, services, topics and seeded rows."""

    call: Call
    workload: Workload
    probe: OutboxProbe
    every_db: list[str]
    pids: dict[str, int]
    # An empty gRPC call to the orders service (None for the local path).
    empty_grpc: Call | None = None


@contextlib.asynccontextmanager
async def _fresh_system(
    infra: object, log_dir: Path, path: str, concurrency: int
) -> AsyncIterator[_Fresh]:
    """A system of its own for one path, torn down (databases, topics) after it.

    Each path starts from the same state — empty tables, a new broker topic
    set, no history of the paths before it — so the order in which paths run
    changes nothing.
    """
    postgres = infra.postgres  # type: ignore[attr-defined]
    bootstrap: str = infra.kafka.bootstrap  # type: ignore[attr-defined]
    topic_prefix = f"bench-{uuid.uuid4().hex[:6]}."
    created: list[str] = []

    def new_db(service: str) -> str:
        name = f"bench_{service}_{uuid.uuid4().hex[:6]}"
        postgres.create_database(name)
        created.append(name)
        dsn: str = postgres.dsn(name)
        return dsn

    accounts_n = max(ACCOUNTS, concurrency * 4)
    skus = [f"SKU-{i:04d}" for i in range(PRODUCTS)]
    system: LocalSystem | None = None
    channels: list[grpc.aio.Channel] = []
    probe: OutboxProbe | None = None
    local_pool: asyncpg.Pool | None = None
    try:
        if path == "local":
            local_dsn = new_db("local")
            local_pool = await _local_pool(local_dsn, accounts_n, skus)
            probe = OutboxProbe([])
            yield _Fresh(
                _local_call(local_pool),
                Workload([str(i) for i in range(accounts_n)], skus),
                probe,
                [local_dsn],
                {},
            )
            return
        services = ["coordinator", "orders", "payments", "inventory"]
        services += ["saga"] if path == "saga" else []
        system = LocalSystem(
            log_dir / path,
            new_db,
            services=services,
            # With Kafka, so every order pays for its events: the outbox relays run.
            kafka_bootstrap=bootstrap,
            env={
                "DTX_KAFKA_TOPIC_PREFIX": topic_prefix,
                "DTX_ALLOW_UNCOORDINATED": "true",
                "DTX_LOG_LEVEL": "WARNING",
                "DTX_DB_POOL_MAX": "20",
            },
        ).build()
        system.start()
        by_service = {k: grpc.aio.insecure_channel(p.endpoint) for k, p in system.procs.items()}
        channels = list(by_service.values())
        payments = payments_pb2_grpc.PaymentsStub(by_service["payments"])
        inventory = inventory_pb2_grpc.InventoryStub(by_service["inventory"])
        orders = orders_pb2_grpc.OrdersStub(by_service["orders"])
        accounts = [
            (
                await payments.CreateAccount(
                    payments_pb2.CreateAccountRequest(
                        owner=f"bench-{i}", currency="EUR", balance_minor=10**12
                    ),
                    timeout=10,
                )
            ).id
            for i in range(accounts_n)
        ]
        for sku in skus:
            await inventory.CreateProduct(
                inventory_pb2.CreateProductRequest(sku=sku, name=sku, price_minor=199, stock=10**9),
                timeout=10,
            )
        # The outbox is read from the databases, not from each service's /metrics:
        # rendering a metrics page blocks a service's event loop for milliseconds,
        # and scraping five services twice a second would show up in the very
        # latencies being measured (Prometheus scrapes every 15 s).
        probe = await OutboxProbe.connect(
            [dsn for key, dsn in system.dsns.items() if key in OUTBOX_SERVICES]
        )
        yield _Fresh(
            _order_call(orders, PROTOCOLS[path]),
            Workload(accounts, skus),
            probe,
            list(system.dsns.values()),
            {k: p.pid for k, p in system.procs.items() if p.pid is not None},
            _health_call(health_pb2_grpc.HealthStub(by_service["orders"])),
        )
    finally:
        if probe is not None:
            await probe.close()
        if local_pool is not None:
            await local_pool.close()
        for channel in channels:
            await channel.close(grace=None)
        if system is not None:
            system.stop()
        for name in created:
            with contextlib.suppress(Exception):
                postgres.drop_database(name)
        # A run's topics would otherwise stay in the broker and slow every later one.
        await delete_topics(bootstrap, prefix=topic_prefix)


async def run_bench(
    infra: object,
    log_dir: Path,
    *,
    concurrency: int = 16,
    seconds: float = 20.0,
    paths: tuple[str, ...] = ("direct", "2pc", "saga", "local"),
    progress: Callable[[str], object] = print,
    settle_pause_s: float = SETTLE_PAUSE_S,
) -> BenchReport:
    """Load each path on a fresh system on ``infra``'s PostgreSQL and Kafka, one after another."""
    report = BenchReport(concurrency, seconds)
    say = progress
    rss: dict[str, float] = {}
    for path in paths:
        say(f"{path}: starting a fresh system")
        async with _fresh_system(infra, log_dir, path, concurrency) as fresh:
            outbox = {"backlog": 0.0, "oldest": 0.0}

            async def sample(fresh: _Fresh = fresh, outbox: dict[str, float] = outbox) -> None:
                while True:
                    for key, pid in fresh.pids.items():
                        rss[key] = max(rss.get(key, 0.0), _rss_mb(pid))
                    for backlog, oldest_s in await fresh.probe.sample():
                        outbox["backlog"] = max(outbox["backlog"], float(backlog))
                        outbox["oldest"] = max(outbox["oldest"], oldest_s)
                    await asyncio.sleep(0.5)

            sampler = asyncio.create_task(sample())
            try:
                await _settle(fresh.probe, fresh.every_db, settle_pause_s)  # the same quiet start
                say(f"{path}: warming up")
                await _closed_loop(fresh.call, fresh.workload, concurrency, min(2.0, seconds / 2))
                say(f"{path}: peak, concurrency {concurrency} for {seconds:g} s")
                latencies, errors = await _closed_loop(
                    fresh.call, fresh.workload, concurrency, seconds
                )
                peak = len(latencies) / seconds
                result = PathResult(
                    path,
                    round(peak, 1),
                    *_p50_p99(latencies),
                    errors=errors,
                )
                half = max(1.0, peak / 2)
                # The overload just ended: let its after-effects (the relays' backlog,
                # autovacuum of what it wrote) pass, so they are not measured as latency.
                await _settle(fresh.probe, fresh.every_db, settle_pause_s)
                say(f"{path}: half rate, {half:.0f} orders/s for {seconds:g} s")
                outbox.update(backlog=0.0, oldest=0.0)  # reported for the half rate
                cpu_before = CpuTimes.now()
                latencies, errors = await _open_loop(fresh.call, fresh.workload, half, seconds)
                cpu_after = CpuTimes.now()
                if cpu_after is not None:
                    busy, steal = cpu_after.percent_since(cpu_before)
                    result.cpu_busy_percent, result.cpu_steal_percent = busy, steal
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            result.half_rate = round(half, 1)
            result.p50_ms = round(_pct(latencies, 0.5), 2)
            result.p95_ms = round(_pct(latencies, 0.95), 2)
            result.p99_ms = round(_pct(latencies, 0.99), 2)
            result.errors += errors
            result.outbox_max_backlog = int(outbox["backlog"])
            result.outbox_max_oldest_unsent_s = round(outbox["oldest"], 3)
            say(f"{path}: empty gRPC call and PostgreSQL round trip, {half:.0f}/s")
            await _measure_hops(fresh, result, half, min(HOP_SECONDS, seconds / 4))
            report.results.append(result)
    report.peak_rss_mb = {k: round(v, 1) for k, v in rss.items()}
    direct = next((r for r in report.results if r.path == "direct"), None)
    for result in report.results:
        if direct and direct.peak_orders_per_s:
            result.ratio_to_direct = round(result.peak_orders_per_s / direct.peak_orders_per_s, 2)
    return report


HOP_SECONDS = 3.0


async def _measure_hops(fresh: _Fresh, result: PathResult, rate: float, seconds: float) -> None:
    """The empty steps' p50 and p99 at ``rate``, one kind after the other."""
    workload = fresh.workload
    if fresh.empty_grpc is not None:
        latencies, _ = await _open_loop(fresh.empty_grpc, workload, rate, seconds)
        result.hop_grpc_p50_ms, result.hop_grpc_p99_ms = _p50_p99(latencies)
    conn = await asyncpg.connect(fresh.every_db[0])
    try:
        lock = asyncio.Lock()  # the rate may outrun a slow answer: one query at a time

        async def select_one(account: str, items: dict[str, int]) -> None:
            async with lock:
                await conn.fetchval("SELECT 1")

        latencies, _ = await _open_loop(select_one, workload, rate, seconds)
    finally:
        await conn.close()
    result.hop_pg_p50_ms, result.hop_pg_p99_ms = _p50_p99(latencies)


def _p50_p99(samples: list[float]) -> tuple[float, float]:
    return round(_pct(samples, 0.5), 2), round(_pct(samples, 0.99), 2)


def _health_call(health: health_pb2_grpc.HealthStub) -> Call:
    request = health_pb2.HealthCheckRequest()

    async def call(account: str, items: dict[str, int]) -> None:
        await health.Check(request, timeout=5)

    return call


def _order_call(
    orders: orders_pb2_grpc.OrdersAsyncStub, protocol: common_pb2.Protocol.ValueType
) -> Call:
    async def call(account: str, items: dict[str, int]) -> None:
        order = await orders.PlaceOrder(
            orders_pb2.PlaceOrderRequest(
                account_id=account,
                items=[common_pb2.LineItem(sku=s, quantity=q) for s, q in items.items()],
                protocol=protocol,
            ),
            timeout=10,
        )
        if order.status != orders_pb2.ORDER_STATUS_CONFIRMED:
            raise NotConfirmed(f"order {order.id} ended {order.status}: {order.reason}")

    return call


async def _local_pool(dsn: str, accounts: int, skus: list[str]) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=20)
    assert pool is not None
    async with pool.acquire() as conn:
        await conn.execute(LOCAL_SCHEMA)
        await conn.executemany(
            "INSERT INTO accounts VALUES ($1, $2)", [(i, 10**12) for i in range(accounts)]
        )
        await conn.executemany(
            "INSERT INTO products VALUES ($1, 199, $2)", [(s, 10**9) for s in skus]
        )
    return pool


def _local_call(pool: asyncpg.Pool) -> Call:
    async def call(account: str, items: dict[str, int]) -> None:
        async with pool.acquire() as conn, conn.transaction():
            total = 0
            for sku, quantity in sorted(items.items()):
                price = await conn.fetchval(
                    "UPDATE products SET available = available - $2, reserved = reserved + $2"
                    " WHERE sku = $1 AND available >= $2 RETURNING price_minor",
                    sku,
                    quantity,
                )
                total += price * quantity
            await conn.execute(
                "UPDATE accounts SET balance_minor = balance_minor - $2 WHERE id = $1",
                int(account),
                total,
            )
            await conn.execute(
                "INSERT INTO orders (id, account_id, items, total_minor, status) VALUES ($1, $2, $3, $4, 'CONFIRMED')",
                uuid.uuid4(),
                int(account),
                json.dumps(items),
                total,
            )

    return call


def summary_rows(report: BenchReport) -> list[list[str]]:
    return [
        [
            r.path,
            f"{r.peak_orders_per_s:.0f}",
            f"{r.ratio_to_direct if r.ratio_to_direct is not None else '-'}",
            f"{r.half_rate:.0f}",
            f"{r.p50_ms:.1f}",
            f"{r.p95_ms:.1f}",
            f"{r.p99_ms:.1f}",
            str(r.errors),
            f"{r.outbox_max_backlog} / {r.outbox_max_oldest_unsent_s * 1000:.0f} ms",
            f"{r.cpu_busy_percent:.0f} / {r.cpu_steal_percent:.0f}",
            _hop(r.hop_grpc_p50_ms, r.hop_grpc_p99_ms),
            _hop(r.hop_pg_p50_ms, r.hop_pg_p99_ms),
        ]
        for r in report.results
    ]


def _hop(p50_ms: float, p99_ms: float) -> str:
    return f"{p50_ms:.2f} / {p99_ms:.2f}" if p50_ms else "-"
