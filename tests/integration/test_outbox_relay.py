"""The outbox relay and an inbox consumer against the real PostgreSQL and Kafka.

Each test has a database of its own (outbox + inbox tables) and topics of its
own, created up front and deleted afterwards, so nothing here reads another
test's records. The Kafka outage test stops a broker of its own: the
session's broker is shared with every test running at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from asyncpg.pool import PoolConnectionProxy
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY

from dtx.v1 import events_pb2
from dtx_infra.kafka_broker import KafkaBroker
from dtx_runtime.database import create_pool, migrate
from dtx_runtime.inbox import INBOX_MIGRATIONS, ConsumerOptions, KafkaConsumerLoop, supported_types
from dtx_runtime.outbox import OUTBOX_MIGRATIONS, OutboxRelay, RelayOptions, write_event
from dtx_runtime.outbox.kafka import ensure_topics
from dtx_runtime.outbox.writer import notify_committed
from tests.support.private_servers import private_kafka

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

FAST = RelayOptions(poll_interval_s=0.5, standby_retry_s=0.3, backoff_max_s=1.0, send_timeout_s=15)


@dataclass
class Env:
    dsn: str
    pool: asyncpg.Pool
    bootstrap: str
    topic: str


@pytest.fixture
def bootstrap(infra: Any) -> str:
    return str(infra.kafka.bootstrap)


@pytest.fixture
async def env(new_database: Callable[[str], str], bootstrap: str) -> AsyncIterator[Env]:
    async with make_env(new_database, bootstrap) as made:
        yield made


@pytest.fixture
async def own_broker(
    new_database: Callable[[str], str],
) -> AsyncIterator[tuple[Env, KafkaBroker]]:
    """An Env whose broker is the test's own, free to be stopped."""
    with private_kafka() as broker:
        async with make_env(new_database, broker.bootstrap) as made:
            yield made, broker


@contextlib.asynccontextmanager
async def make_env(new_database: Callable[[str], str], bootstrap: str) -> AsyncIterator[Env]:
    dsn = new_database("outbox")
    pool = await create_pool(dsn, min_size=1, max_size=10, connect_timeout_s=20)
    await migrate(pool, {"outbox": OUTBOX_MIGRATIONS, "inbox": INBOX_MIGRATIONS}, scope="t")
    await pool.execute("CREATE TABLE applied (event_id uuid NOT NULL, seq bigint NOT NULL)")
    topic = f"dtx-test-outbox-{uuid.uuid4().hex[:10]}"
    await ensure_topics(bootstrap, [topic, f"{topic}.dlq"], partitions=3)
    try:
        yield Env(dsn, pool, bootstrap, topic)
    finally:
        await pool.close()
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(admin.start(), 20)
            await asyncio.wait_for(admin.delete_topics([topic, f"{topic}.dlq"]), 20)
        with contextlib.suppress(Exception):
            await admin.close()


def payload(order_id: str, seq: int = 0) -> events_pb2.OrderEvent:
    return events_pb2.OrderEvent(order_id=order_id, total_minor=seq, currency="EUR")


async def write(env: Env, key: str, seq: int = 0, event_type: str = "order.placed") -> str:
    async with env.pool.acquire() as conn, conn.transaction():
        event = await write_event(
            conn,
            topic=env.topic,
            event_type=event_type,
            aggregate_id=key,
            payload=payload(key, seq),
        )
    notify_committed()
    return event.id


async def read_topic(bootstrap: str, topic: str, want: int, timeout_s: float = 60) -> list[Any]:
    """Every record of the topic from the beginning, once ``want`` came or the time is up."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await asyncio.wait_for(consumer.start(), 30)
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < want and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                records.extend(batch)
        # a short grace period shows what came beyond ``want``
        for batch in (await consumer.getmany(timeout_ms=700)).values():
            records.extend(batch)
    finally:
        await consumer.stop()
    return records


def event_of(record: Any) -> events_pb2.Event:
    return events_pb2.Event.FromString(record.value)


async def unsent(env: Env) -> int:
    value: int = await env.pool.fetchval("SELECT count(*) FROM dtx_outbox WHERE sent_at IS NULL")
    return value


async def eventually(
    condition: Callable[[], Awaitable[bool]], timeout_s: float = 60, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(relay: OutboxRelay) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(relay.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Applier(KafkaConsumerLoop):
    async def apply(self, conn: PoolConnectionProxy, event: events_pb2.Event) -> None:
        await conn.execute(
            "INSERT INTO applied (event_id, seq) VALUES ($1, $2)",
            uuid.UUID(event.id),
            event.order.total_minor,
        )


# -- tests ---------------------------------------------------------------------


async def test_only_committed_events_are_published_once_with_key_and_trace(env: Env) -> None:
    relay = OutboxRelay(env.dsn, env.bootstrap, FAST)
    tracer = TracerProvider().get_tracer("test")
    async with running(relay):
        warm_up = await write(env, "warm-up")  # the producer starts, the topic's metadata comes
        await eventually(lambda: _zero(unsent(env)), 30, "the warm-up event")
        async with env.pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            await write_event(
                conn,
                topic=env.topic,
                event_type="order.placed",
                aggregate_id="rolled-back",
                payload=payload("rolled-back"),
            )
            await transaction.rollback()
        notify_committed()  # a wake-up for nothing: the rolled-back row does not exist
        with tracer.start_as_current_span("place order") as span:
            trace_id = format(span.get_span_context().trace_id, "032x")
            async with env.pool.acquire() as conn, conn.transaction():
                kept = await write_event(
                    conn,
                    topic=env.topic,
                    event_type="order.confirmed",
                    aggregate_id="order-1",
                    payload=payload("order-1", 7),
                )
        committed_at = time.time()
        notify_committed()
        await eventually(lambda: _zero(unsent(env)), 30, "the event to be published")
        latency = time.time() - committed_at

    records = await read_topic(env.bootstrap, env.topic, 2)
    assert sorted(event_of(r).id for r in records) == sorted([warm_up, kept.id])
    [record] = [r for r in records if r.key != b"warm-up"]
    assert record.key == b"order-1"
    headers = dict(record.headers)
    assert headers["event-type"] == b"order.confirmed"
    assert headers["traceparent"].decode().split("-")[1] == trace_id
    assert [k for k, _ in record.headers].count("traceparent") == 1
    assert event_of(record) == kept
    assert relay.published == 2
    # With the aiokafka instrumentation installed (tracing on), the producer injects the
    # context itself: still exactly one traceparent, of the same trace.
    from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor

    instrumentor = AIOKafkaInstrumentor()
    already = instrumentor.is_instrumented_by_opentelemetry
    if not already:
        instrumentor.instrument()
    try:
        async with running(OutboxRelay(env.dsn, env.bootstrap, FAST)):
            with tracer.start_as_current_span("instrumented") as span:
                second_trace = format(span.get_span_context().trace_id, "032x")
                await write(env, "order-2")
            await eventually(lambda: _zero(unsent(env)), 30, "the instrumented publish")
    finally:
        if not already:
            instrumentor.uninstrument()
    [again] = [r for r in await read_topic(env.bootstrap, env.topic, 3) if r.key == b"order-2"]
    parents = [v.decode() for k, v in again.headers if k == "traceparent"]
    assert [p.split("-")[1] for p in parents] == [second_trace]
    print(f"\ncommit -> published and marked sent: {latency * 1000:.1f} ms")
    assert latency < 0.45, "the wake-up, not the 500 ms poll, should have published it"


async def _zero(count: Awaitable[int]) -> bool:
    return await count == 0


async def test_a_relay_killed_before_marking_republishes_and_the_inbox_applies_once(
    env: Env,
) -> None:
    ids = [await write(env, "order-9", seq) for seq in range(5)]
    stuck = asyncio.Event()

    async def die_here() -> None:
        stuck.set()
        await asyncio.Event().wait()  # never marks: cancelled here, like a crash

    first = OutboxRelay(env.dsn, env.bootstrap, FAST, after_send=die_here)
    async with running(first):
        await asyncio.wait_for(stuck.wait(), 30)
        assert len(await read_topic(env.bootstrap, env.topic, 5)) == 5
    assert await unsent(env) == 5  # sent, never marked

    second = OutboxRelay(env.dsn, env.bootstrap, FAST)
    async with running(second):
        await eventually(lambda: _zero(unsent(env)), 30, "the republish")
    records = await read_topic(env.bootstrap, env.topic, 10)
    assert len(records) == 10
    assert sorted(event_of(r).id for r in records) == sorted(ids * 2)

    consumer = Applier(
        env.pool,
        bootstrap=env.bootstrap,
        consumer="test",
        topics=[env.topic],
        group_id=f"dtx-test-{uuid.uuid4().hex[:8]}",
        supported=supported_types(["order.placed"]),
        options=ConsumerOptions(deadletter_topic=f"{env.topic}.dlq", create_topics=False),
    )
    task = asyncio.create_task(consumer.run())
    try:

        async def all_consumed() -> bool:
            try:
                committed = await _committed_offsets(env, consumer)
            except KafkaError as exc:  # the group's coordinator still loading, say
                if not exc.retriable:
                    raise
                return False
            return committed == 10

        await eventually(all_consumed, 60, "the consumer to commit all 10 offsets")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    rows = await env.pool.fetch("SELECT event_id::text AS id, seq FROM applied ORDER BY seq")
    assert [r["id"] for r in rows] == ids
    assert [r["seq"] for r in rows] == [0, 1, 2, 3, 4]
    assert await env.pool.fetchval("SELECT count(*) FROM dtx_inbox") == 5


async def _committed_offsets(env: Env, consumer: Applier) -> int:
    """The sum of the consumer group's committed offsets on the test topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=env.bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(consumer._group_id)
    finally:
        await admin.close()
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == env.topic)


async def test_two_relays_on_one_database_one_publishes_in_order_per_key(env: Env) -> None:
    a = OutboxRelay(env.dsn, env.bootstrap, FAST)
    b = OutboxRelay(env.dsn, env.bootstrap, FAST)
    keys = [f"order-{i}" for i in range(5)]
    per_key = 40
    async with running(a), running(b):
        await eventually(lambda: _true(a.is_active or b.is_active), 10, "a relay to take the lock")

        async def writer(key: str) -> None:
            for seq in range(per_key):
                await write(env, key, seq)

        await asyncio.gather(*(writer(k) for k in keys))
        await eventually(lambda: _zero(unsent(env)), 60, "all events to be published")
        assert a.is_active != b.is_active
    assert sorted([a.published, b.published]) == [0, len(keys) * per_key]

    records = await read_topic(env.bootstrap, env.topic, len(keys) * per_key)
    assert len(records) == len(keys) * per_key
    assert len({event_of(r).id for r in records}) == len(records)
    by_key: dict[bytes, list[int]] = {}
    partitions: dict[bytes, set[int]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        by_key.setdefault(record.key, []).append(event_of(record).order.total_minor)
        partitions.setdefault(record.key, set()).add(record.partition)
    assert by_key == {k.encode(): list(range(per_key)) for k in keys}
    assert all(len(p) == 1 for p in partitions.values())


async def _true(value: bool) -> bool:
    return value


async def test_events_written_while_kafka_is_down_are_all_delivered_after(
    own_broker: tuple[Env, KafkaBroker],
) -> None:
    env, broker = own_broker
    relay = OutboxRelay(
        env.dsn,
        env.bootstrap,
        RelayOptions(backoff_max_s=2.0, request_timeout_ms=5000, send_timeout_s=10),
    )
    before = [await write(env, f"order-{i % 3}", i) for i in range(10)]
    async with running(relay):
        await eventually(lambda: _zero(unsent(env)), 30, "the first events")
        during: list[str] = []
        try:
            await asyncio.wait_for(asyncio.to_thread(broker.stop, 30), 60)
            during = [await write(env, f"order-{i % 3}", 10 + i) for i in range(30)]
            # the relay tries, fails, backs off: nothing is lost, nothing marked
            await eventually(lambda: _true(relay.last_error is not None), 30, "a failed publish")
            assert await unsent(env) == 30
            await eventually(
                lambda: _true(REGISTRY.get_sample_value("dtx_outbox_backlog") == 30),
                10,
                "the backlog gauge",
            )
            assert (REGISTRY.get_sample_value("dtx_outbox_oldest_unsent_age_seconds") or 0) > 0
            assert (REGISTRY.get_sample_value("dtx_outbox_publish_errors_total") or 0) >= 1
        finally:
            await asyncio.wait_for(asyncio.to_thread(broker.start, 120), 180)
        await eventually(lambda: _zero(unsent(env)), 120, "the backlog after Kafka came back")
    records = await read_topic(env.bootstrap, env.topic, 40, timeout_s=90)
    published = {event_of(r).id for r in records}
    assert published == set(before + during), "an event was lost"
    by_key: dict[bytes, list[int]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        seqs = by_key.setdefault(record.key, [])
        seq = event_of(record).order.total_minor
        if seq not in seqs:  # a redelivery of a batch may repeat records
            seqs.append(seq)
    assert all(seqs == sorted(seqs) for seqs in by_key.values())


async def test_burst_of_a_thousand_events(env: Env) -> None:
    """Not a benchmark: bounds that catch a relay that polls instead of waking, or stalls."""
    relay = OutboxRelay(env.dsn, env.bootstrap, FAST)
    async with running(relay):
        await eventually(lambda: _true(relay.is_active), 10, "the relay to take the lock")
        await write(env, "warm-up")
        await eventually(lambda: _zero(unsent(env)), 30, "the warm-up")
        # one at a time: commit -> published, as the database's clock sees it
        for i in range(50):
            await write(env, "single", i)
            await eventually(lambda: _zero(unsent(env)), 10, "a single event")
        singles = await env.pool.fetch(
            "SELECT extract(epoch FROM sent_at - created_at) AS d FROM dtx_outbox"
            " WHERE key = 'single' ORDER BY d"
        )
        one = [float(r["d"]) for r in singles]
        peak = 0
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, await unsent(env))
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        start = time.monotonic()

        async def writer(w: int) -> None:
            for i in range(50):  # 20 writers x 50 transactions x 1 event
                await write(env, f"order-{w}", i)

        await asyncio.gather(*(writer(w) for w in range(20)))
        written = time.monotonic() - start
        await eventually(lambda: _zero(unsent(env)), 60, "the burst")
        drained = time.monotonic() - start
        sampling = False
        await sampler
        delays = await env.pool.fetch(
            "SELECT extract(epoch FROM sent_at - created_at) AS d FROM dtx_outbox"
            " WHERE key NOT IN ('warm-up', 'single') ORDER BY d"
        )
    values = [float(r["d"]) for r in delays]
    p50, p99 = values[len(values) // 2], values[int(len(values) * 0.99)]
    print(
        f"\nsingle events: insert->sent p50 {one[25] * 1000:.1f} ms,"
        f" p95 {one[47] * 1000:.1f} ms, max {one[-1] * 1000:.1f} ms"
    )
    print(
        f"burst: 1000 events written in {written:.2f} s, all published after {drained:.2f} s;"
        f" peak backlog {peak}; insert->sent p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms,"
        f" max {values[-1] * 1000:.0f} ms"
    )
    assert len(values) == 1000
    assert drained < 30


async def test_published_rows_are_trimmed_after_their_retention(env: Env) -> None:
    relay = OutboxRelay(
        env.dsn, env.bootstrap, RelayOptions(retention=timedelta(0), trim_interval_s=0)
    )
    for seq in range(3):
        await write(env, "order-t", seq)
    async with running(relay):

        async def empty() -> bool:
            return bool(await env.pool.fetchval("SELECT count(*) FROM dtx_outbox") == 0)

        await eventually(empty, 30, "published rows to be trimmed")
    assert len(await read_topic(env.bootstrap, env.topic, 3)) == 3


async def test_a_lingering_relay_sends_the_commits_of_a_moment_in_one_batch(env: Env) -> None:
    batches = 0

    async def counted() -> None:
        nonlocal batches
        batches += 1

    relay = OutboxRelay(
        env.dsn, env.bootstrap, dataclasses.replace(FAST, linger_s=0.3), after_send=counted
    )
    async with running(relay):
        await eventually(lambda: _true(relay.is_active), 10, "the relay to take the lock")
        await write(env, "warm-up")
        await eventually(lambda: _zero(unsent(env)), 30, "the warm-up")
        await asyncio.sleep(0.5)  # the relay waits for the next wake-up
        before = batches
        for i in range(5):  # five commits, each waking the relay, within a few milliseconds
            await write(env, "lingered", i)
        await eventually(lambda: _zero(unsent(env)), 30, "the five events")
        assert batches - before == 1, f"{batches - before} batches for five quick commits"
