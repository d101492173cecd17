"""The outbox relay: publish committed outbox rows to Kafka, at least once, in order.

One relay per database publishes at a time: it holds a PostgreSQL advisory
lock on a connection of its own (other replicas' relays stand by and retry
the lock), so one aggregate's events leave in the order they were written
even with several replicas. Its loop:

1. read a batch of unsent rows in ``seq`` order (only the lock holder reads,
   so a plain ordered read is enough);
2. send them all with an idempotent producer (``acks=all``) and await every
   delivery;
3. mark the delivered ones sent, on the same connection that holds the lock.

A crash between 2 and 3 publishes the batch again on the next turn, which is
why consumers deduplicate by event id (their inbox). A failed batch is retried
with capped exponential backoff, never dropped, never spun on; the producer is
recreated after a failure so that a broker restart cannot leave it stuck.

Order: one producer, one request in flight per broker and idempotence keep
a key's records in their ``seq`` order on its partition. Only a batch that
Kafka acknowledges in part (its retries exhausted for some records) can put a
redelivered record after a later one of the same key; consumers that care
compare ``occurred_at`` or their own state.

It wakes when this process commits events (:func:`notify_committed`), when a
standby replica forwards such a wake-up through ``pg_notify`` (a plain
statement on the standby's own connection, never inside a transaction that may
be prepared), and otherwise every ``poll_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from opentelemetry import context as otel_context
from opentelemetry import propagate
from prometheus_client import Counter, Gauge, Histogram

from dtx_runtime.failpoints import failpoint
from dtx_runtime.outbox.envelope import kafka_headers, physical_topic
from dtx_runtime.outbox.kafka import Backoff
from dtx_runtime.outbox.writer import add_waker

log = logging.getLogger(__name__)

CHANNEL = "dtx_outbox"
"""The PostgreSQL notification channel the active relay listens on."""

BACKLOG = Gauge("dtx_outbox_backlog", "Outbox rows not yet published.")
OLDEST_UNSENT = Gauge(
    "dtx_outbox_oldest_unsent_age_seconds", "Age of the oldest unpublished outbox row (0: none)."
)
PUBLISHED = Counter(
    "dtx_outbox_published_total", "Outbox events published to Kafka, by topic.", ["topic"]
)
PUBLISH_ERRORS = Counter(
    "dtx_outbox_publish_errors_total", "Outbox batches (or producer starts) that failed."
)
DELAY = Histogram(
    "dtx_outbox_delay_seconds",
    "From an event's insert to its delivery to Kafka.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LEADER = Gauge("dtx_outbox_relay_active", "1 while this process's relay holds the outbox lock.")


def relay_lock_key(scope: str = "outbox") -> int:
    """The advisory lock of the active relay: one per database."""
    digest = hashlib.blake2b(f"dtx-outbox-relay:{scope}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_CLAIM = (
    "SELECT id, topic, key, type, payload, headers, created_at FROM dtx_outbox"
    " WHERE sent_at IS NULL ORDER BY seq LIMIT $1"
)
_MARK = "UPDATE dtx_outbox SET sent_at = now() WHERE id = ANY($1::uuid[]) AND sent_at IS NULL"
_BACKLOG = (
    "SELECT count(*) AS n, coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)"
    " AS age FROM dtx_outbox WHERE sent_at IS NULL"
)
_TRIM = (
    "DELETE FROM dtx_outbox WHERE ctid = ANY(ARRAY("
    " SELECT ctid FROM dtx_outbox WHERE sent_at < now() - $1::interval LIMIT $2))"
)


TRIM_BATCH = 5000
TRIM_BATCHES = 20


class PublishFailed(Exception):
    """Some records of a batch were not acknowledged by Kafka; they stay unsent."""


@dataclass(frozen=True)
class RelayOptions:
    topic_prefix: str = ""
    batch_size: int = 500
    poll_interval_s: float = 0.5
    # After a wake-up, wait this long before reading: the commits of that moment
    # leave in one batch (one query pair, one produce request) instead of one each.
    linger_s: float = 0.0
    standby_retry_s: float = 1.0
    send_timeout_s: float = 30.0
    request_timeout_ms: int = 10_000
    linger_ms: int = 2
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    retention: timedelta = timedelta(hours=24)
    trim_interval_s: float = 60.0
    gauges_interval_s: float = 1.0
    client_id: str = "dtx-outbox"


ProducerFactory = Callable[[], Any]
Connect = Callable[[], Awaitable[asyncpg.Connection]]


def _send_is_traced() -> bool:
    """Whether the aiokafka instrumentation injects the trace context into ``send`` itself."""
    try:
        from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor
    except ImportError:  # pragma: no cover - the instrumentation is a dependency
        return False
    return bool(AIOKafkaInstrumentor().is_instrumented_by_opentelemetry)


class OutboxRelay:
    """Publishes one database's outbox; run :meth:`run` as a background task."""

    def __init__(
        self,
        dsn: str,
        bootstrap: str,
        options: RelayOptions | None = None,
        *,
        lock_key: int | None = None,
        producer_factory: ProducerFactory | None = None,
        connect: Connect | None = None,
        after_send: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._dsn = dsn
        self._bootstrap = bootstrap
        self.options = options or RelayOptions()
        self._lock_key = relay_lock_key() if lock_key is None else lock_key
        self._producer_factory = producer_factory or self._default_producer
        self._connect = connect or (lambda: asyncpg.connect(self._dsn, timeout=10))
        self._after_send = after_send
        self._wake = asyncio.Event()
        self._producer: Any = None
        self._last_gauges = 0.0
        self._last_trim = 0.0
        self.is_active = False
        self.published = 0
        self.last_error: str | None = None

    # -- public ------------------------------------------------------------

    def wake(self) -> None:
        """New rows were committed: publish now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Relay until cancelled; every failure is logged, backed off and retried."""
        remove = add_waker(self.wake)
        backoff = Backoff(self.options.backoff_initial_s, self.options.backoff_max_s)
        try:
            while True:
                try:
                    await self._session(backoff)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("outbox relay: %s; retrying", self.last_error, exc_info=True)
                    await backoff.wait()
        finally:
            remove()
            self._set_active(False)
            await self._drop_producer()

    # -- one connection's lifetime ------------------------------------------

    async def _session(self, backoff: Backoff) -> None:
        conn = await self._connect()
        try:
            await self._become_active(conn)
            await conn.add_listener(CHANNEL, self._on_notification)
            log.info("outbox relay active")
            while True:
                self._wake.clear()
                await self._refresh_gauges(conn)
                try:
                    sent = await self._publish_batch(conn)
                except (asyncpg.PostgresError, asyncpg.InterfaceError):
                    raise  # the database: end the session (and the lock) and reconnect
                except Exception as exc:
                    # Kafka (or the producer): keep the lock, back off, retry the same rows.
                    PUBLISH_ERRORS.inc()
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("outbox publish failed (%s); backing off", self.last_error)
                    await self._drop_producer()
                    await self._refresh_gauges(conn, force=True)
                    await backoff.wait()
                    continue
                backoff.reset()
                self.last_error = None
                if sent >= self.options.batch_size:
                    continue  # more is waiting
                await self._maybe_trim(conn)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.options.poll_interval_s)
                    if self.options.linger_s > 0:
                        await asyncio.sleep(self.options.linger_s)
        finally:
            self._set_active(False)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)
            if not conn.is_closed():
                conn.terminate()

    async def _become_active(self, conn: asyncpg.Connection) -> None:
        """Take the lock, or stand by: forward local wake-ups and retry the lock."""
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._lock_key):
            await self._refresh_gauges(conn)
            deadline = time.monotonic() + self.options.standby_retry_s
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
                self._wake.clear()
                # The active relay may be in another process: tell it through PostgreSQL.
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
        self._set_active(True)

    def _on_notification(self, *_: object) -> None:
        self._wake.set()

    # -- publishing ------------------------------------------------------------

    async def _publish_batch(self, conn: asyncpg.Connection) -> int:
        rows = await conn.fetch(_CLAIM, self.options.batch_size)
        if not rows:
            return 0
        producer = await self._ensure_producer()
        traced = _send_is_traced()
        futures: list[Any] = []
        try:
            for row in rows:
                stored = _headers(row["headers"])
                # Send inside the writer's trace, so an instrumented producer continues it.
                token = otel_context.attach(propagate.extract(stored))
                try:
                    futures.append(
                        await producer.send(
                            physical_topic(self.options.topic_prefix, row["topic"]),
                            value=row["payload"],
                            key=row["key"].encode(),
                            headers=kafka_headers(row["type"], stored, with_trace=not traced),
                        )
                    )
                finally:
                    otel_context.detach(token)
        except BaseException:
            for future in futures:
                future.cancel()  # nothing is marked: the whole batch is sent again
            raise
        results = await self._settle(conn, futures)
        if self._after_send is not None:
            await self._after_send()
        await failpoint("outbox.after_send")
        delivered = [row for row, r in zip(rows, results, strict=True) if not _failed(r)]
        if delivered:
            await conn.execute(_MARK, [row["id"] for row in delivered])
            now = time.time()
            for row in delivered:
                PUBLISHED.labels(row["topic"]).inc()
                DELAY.observe(max(now - row["created_at"].timestamp(), 0.0))
            self.published += len(delivered)
        failures = [r for r in results if _failed(r)]
        if failures:
            raise PublishFailed(
                f"{len(failures)} of {len(rows)} records not acknowledged: {failures[0]!r}"
            )
        return len(rows)

    def _default_producer(self) -> Any:
        return AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            enable_idempotence=True,
            acks="all",
            linger_ms=self.options.linger_ms,
            request_timeout_ms=self.options.request_timeout_ms,
            client_id=self.options.client_id,
        )

    async def _ensure_producer(self) -> Any:
        if self._producer is None:
            producer = self._producer_factory()
            try:
                await asyncio.wait_for(producer.start(), self.options.request_timeout_ms / 1000 + 5)
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), 5)
                raise
            self._producer = producer
        return self._producer

    async def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 10)

    async def _settle(
        self, conn: asyncpg.Connection, futures: list[Any]
    ) -> list[BaseException | None]:
        """Wait for every delivery up to the send timeout, keeping the gauges fresh meanwhile.

        (When Kafka is away this wait is what a failing round spends its time in.)
        """
        timeout_s = self.options.send_timeout_s
        deadline = time.monotonic() + timeout_s
        pending = set(futures)
        while pending and (remaining := deadline - time.monotonic()) > 0:
            _, pending = await asyncio.wait(
                pending, timeout=min(remaining, self.options.gauges_interval_s)
            )
            if pending:
                await self._refresh_gauges(conn)
        for future in pending:
            future.cancel()
        return _outcomes(futures, timeout_s)

    # -- housekeeping ------------------------------------------------------

    async def _refresh_gauges(self, conn: asyncpg.Connection, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_gauges < self.options.gauges_interval_s:
            return
        self._last_gauges = now
        row = await conn.fetchrow(_BACKLOG)
        assert row is not None
        BACKLOG.set(row["n"])
        OLDEST_UNSENT.set(float(row["age"]))

    async def _maybe_trim(self, conn: asyncpg.Connection) -> None:
        now = time.monotonic()
        if now - self._last_trim < self.options.trim_interval_s:
            return
        self._last_trim = now
        for _ in range(TRIM_BATCHES):  # bounded: at most this much work per pass
            deleted = await conn.execute(_TRIM, self.options.retention, TRIM_BATCH)
            if int(deleted.split()[-1]) < TRIM_BATCH:
                break

    def _set_active(self, active: bool) -> None:
        if active != self.is_active:
            self.is_active = active
            LEADER.set(1 if active else 0)


def _outcomes(futures: list[Any], timeout_s: float) -> list[BaseException | None]:
    """None for a delivered record, else its error (a cancelled one timed out)."""
    results: list[BaseException | None] = []
    for future in futures:
        if future.cancelled():
            results.append(TimeoutError(f"not acknowledged within {timeout_s:g} s"))
        else:
            results.append(future.exception())
    return results


def _failed(result: object) -> bool:
    return isinstance(result, BaseException)


def _headers(value: object) -> dict[str, str]:
    """The stored trace headers (asyncpg returns jsonb as text unless a codec is set)."""
    loaded = json.loads(value) if isinstance(value, str) else value
    if not isinstance(loaded, dict):
        return {}
    return {str(k): str(v) for k, v in loaded.items()}
