"""A Kafka consumer that applies each event exactly once to its database (the inbox).

For each record, in partition order:

* a record that is not an event this consumer handles (malformed, unknown
  type or schema version, wrong payload) is published to the dead-letter
  topic with ``dlq-reason``, ``dlq-source-topic``, ``dlq-partition`` and
  ``dlq-offset`` headers, and consumption goes on;
* otherwise ONE local transaction inserts ``(consumer, event_id)`` into the
  inbox (``ON CONFLICT DO NOTHING``) and, only when that row is new, applies
  the effect; the database commits;
* then the Kafka offset is committed. A crash between the two redelivers the
  record, and the inbox makes the second delivery a no-op.

When the database or Kafka is away, the record is retried with backoff (the
partition waits: skipping would lose the event). A record whose handler keeps
failing for another reason goes to the dead-letter topic after a few attempts
(``handler-error``), so one bug cannot stop a partition forever. Nothing
escapes the loop: a failed session is logged and started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from asyncpg.pool import PoolConnectionProxy
from opentelemetry import propagate, trace
from prometheus_client import Counter, Gauge

from dtx.v1 import events_pb2
from dtx_runtime.failpoints import failpoint
from dtx_runtime.inbox.classify import (
    HANDLER_ERROR,
    INVALID_PAYLOAD,
    REASONS,
    Rejected,
    Supported,
    classify,
    dead_letter_headers,
    is_transient,
)
from dtx_runtime.outbox.envelope import DEADLETTER_TOPIC, InvalidEvent, header_dict, physical_topic
from dtx_runtime.outbox.kafka import Backoff, ensure_topics

log = logging.getLogger(__name__)
tracer = trace.get_tracer("dtx.inbox")

PROCESSED = Counter(
    "dtx_inbox_processed_total", "Events applied for the first time, by type.", ["type"]
)
DUPLICATES = Counter(
    "dtx_inbox_duplicates_total", "Events delivered again and skipped by the inbox."
)
DEADLETTERED = Counter(
    "dtx_deadletter_total", "Records sent to the dead-letter topic, by reason.", ["reason"]
)
# Every reason exported at 0 from the start: rate() over it, and the dashboard panel that
# draws it, have a series before the first dead letter instead of "no data".
for _reason in REASONS:
    DEADLETTERED.labels(_reason)
LAG = Gauge(
    "dtx_consumer_lag",
    "Records behind the partition's high watermark (highwater - position).",
    ["topic", "partition"],
)
CONSUMER_ERRORS = Counter(
    "dtx_consumer_errors_total", "Records or sessions that failed and were retried."
)

_RECORD = (
    "INSERT INTO dtx_inbox (consumer, event_id, event_type) VALUES ($1, $2, $3)"
    " ON CONFLICT DO NOTHING RETURNING true"
)
_TRIM = (
    "DELETE FROM dtx_inbox WHERE ctid = ANY(ARRAY("
    " SELECT ctid FROM dtx_inbox WHERE processed_at < now() - $1::interval LIMIT $2))"
)


class Retry(Exception):
    """The record could not be handled now; rewind to it and back off."""


@dataclass(frozen=True)
class ConsumerOptions:
    topic_prefix: str = ""
    deadletter_topic: str = DEADLETTER_TOPIC
    batch_size: int = 100
    poll_timeout_ms: int = 500
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    request_timeout_ms: int = 15_000
    handler_attempts: int = 3
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    retention: timedelta = timedelta(days=7)
    trim_interval_s: float = 60.0
    create_topics: bool = True
    topic_partitions: int = 3
    client_id: str = "dtx-consumer"


class KafkaConsumerLoop:
    """Subclass and implement :meth:`apply`; run :meth:`run` as a background task."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        bootstrap: str,
        consumer: str,
        topics: Sequence[str],
        group_id: str,
        supported: Supported,
        options: ConsumerOptions | None = None,
    ) -> None:
        self._pool = pool
        self._bootstrap = bootstrap
        self.consumer = consumer
        self.options = options or ConsumerOptions()
        self._topics = [physical_topic(self.options.topic_prefix, t) for t in topics]
        self._deadletter = physical_topic(self.options.topic_prefix, self.options.deadletter_topic)
        self._group_id = group_id
        self._supported = supported
        self._failures: dict[tuple[str, int, int], int] = {}
        self._last_trim = 0.0
        self._backoff = Backoff(self.options.backoff_initial_s, self.options.backoff_max_s)

    # -- what a subclass provides ----------------------------------------------

    async def apply(self, conn: PoolConnectionProxy, event: events_pb2.Event) -> None:
        """Apply the event inside the inbox's transaction; raise InvalidEvent for a bad payload."""
        raise NotImplementedError

    async def committed(self, event: events_pb2.Event) -> None:
        """Called after the transaction that applied ``event`` committed (first time only)."""

    # -- the loop ------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                CONSUMER_ERRORS.inc()
                log.warning(
                    "consumer %s: %s: %s; restarting", self.consumer, type(exc).__name__, exc
                )
                await self._backoff.wait()

    async def _session(self) -> None:
        opts = self.options
        if opts.create_topics:
            await ensure_topics(
                self._bootstrap,
                [*self._topics, self._deadletter],
                partitions=opts.topic_partitions,
            )
        consumer = AIOKafkaConsumer(
            *self._topics,
            bootstrap_servers=self._bootstrap,
            group_id=self._group_id,
            client_id=opts.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=opts.batch_size,
            session_timeout_ms=opts.session_timeout_ms,
            heartbeat_interval_ms=opts.heartbeat_interval_ms,
            request_timeout_ms=opts.request_timeout_ms,
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            enable_idempotence=True,
            acks="all",
            request_timeout_ms=opts.request_timeout_ms,
            client_id=f"{opts.client_id}-deadletter",
        )
        try:
            await asyncio.wait_for(consumer.start(), opts.request_timeout_ms / 1000 + 10)
            await asyncio.wait_for(producer.start(), opts.request_timeout_ms / 1000 + 10)
            log.info("consumer %s reading %s", self.consumer, ", ".join(self._topics))
            while True:
                batches = await consumer.getmany(
                    timeout_ms=opts.poll_timeout_ms, max_records=opts.batch_size
                )
                for tp, records in batches.items():
                    await self._process_partition(consumer, producer, tp, records)
                await self._report_lag(consumer)
                await self._maybe_trim()
        finally:
            for client in (consumer, producer):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.stop(), 10)

    async def _process_partition(
        self, consumer: Any, producer: Any, tp: TopicPartition, records: Sequence[Any]
    ) -> None:
        done: int | None = None
        for record in records:
            try:
                await self._handle(producer, record)
            except Retry as exc:
                CONSUMER_ERRORS.inc()
                log.warning(
                    "consumer %s: %s[%d]@%d not handled (%s); retrying",
                    self.consumer,
                    tp.topic,
                    tp.partition,
                    record.offset,
                    exc,
                )
                if done is not None:
                    await self._commit(consumer, tp, done)
                consumer.seek(tp, record.offset)
                await self._backoff.wait()
                return
            self._backoff.reset()
            done = record.offset + 1
        if done is not None:
            await self._commit(consumer, tp, done)

    async def _handle(self, producer: Any, record: Any) -> None:
        parent = propagate.extract(header_dict(record.headers))
        with tracer.start_as_current_span(
            f"{record.topic} process", context=parent, kind=trace.SpanKind.CONSUMER
        ) as span:
            span.set_attribute("messaging.kafka.partition", record.partition)
            span.set_attribute("messaging.kafka.offset", record.offset)
            outcome = classify(record.value, self._supported)
            if isinstance(outcome, Rejected):
                await self._dead_letter(producer, record, outcome)
                return
            span.set_attribute("dtx.event.type", outcome.type)
            key = (record.topic, record.partition, record.offset)
            try:
                first = await self._apply_once(outcome)
            except InvalidEvent as exc:
                await self._dead_letter(producer, record, Rejected(INVALID_PAYLOAD, str(exc)))
                return
            except Exception as exc:
                if is_transient(exc):
                    raise Retry(f"{type(exc).__name__}: {exc}") from exc
                attempts = self._failures.get(key, 0) + 1
                if attempts < self.options.handler_attempts:
                    self._failures[key] = attempts
                    raise Retry(f"{type(exc).__name__}: {exc} (attempt {attempts})") from exc
                self._failures.pop(key, None)
                log.exception(
                    "consumer %s gives up on %s after %d attempts",
                    self.consumer,
                    outcome.id,
                    attempts,
                )
                await self._dead_letter(
                    producer, record, Rejected(HANDLER_ERROR, f"{type(exc).__name__}: {exc}")
                )
                return
            self._failures.pop(key, None)
            # The database committed, the offset not yet: a crash here redelivers the record.
            await failpoint("inbox.after_apply")
            if first:
                PROCESSED.labels(outcome.type).inc()
                try:
                    await self.committed(outcome)
                except Exception:
                    log.exception("consumer %s: after-commit hook failed", self.consumer)
            else:
                DUPLICATES.inc()

    async def _apply_once(self, event: events_pb2.Event) -> bool:
        """Record the event in the inbox and apply it, in one transaction; False if seen before."""
        async with self._pool.acquire() as conn, conn.transaction():
            first = await conn.fetchval(_RECORD, self.consumer, uuid.UUID(event.id), event.type)
            if not first:
                return False
            await self.apply(conn, event)
        return True

    async def _dead_letter(self, producer: Any, record: Any, rejected: Rejected) -> None:
        headers = dead_letter_headers(
            record.headers,
            reason=rejected.reason,
            detail=rejected.detail,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        try:
            await asyncio.wait_for(
                producer.send_and_wait(
                    self._deadletter, value=record.value, key=record.key, headers=headers
                ),
                self.options.request_timeout_ms / 1000 + 5,
            )
        except Exception as exc:
            raise Retry(f"dead-letter topic unavailable: {type(exc).__name__}: {exc}") from exc
        DEADLETTERED.labels(rejected.reason).inc()
        log.warning(
            "dead-lettered %s[%d]@%d: %s (%s)",
            record.topic,
            record.partition,
            record.offset,
            rejected.reason,
            rejected.detail,
        )

    async def _commit(self, consumer: Any, tp: TopicPartition, offset: int) -> None:
        """Commit after the database did; a failure only means a redelivery the inbox absorbs."""
        try:
            await consumer.commit({tp: offset})
        except Exception as exc:
            log.warning("consumer %s: offset commit of %s failed: %s", self.consumer, tp, exc)

    async def _report_lag(self, consumer: Any) -> None:
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                position = await consumer.position(tp)
            except Exception:
                continue
            LAG.labels(tp.topic, str(tp.partition)).set(max(highwater - position, 0))

    async def _maybe_trim(self) -> None:
        now = time.monotonic()
        if now - self._last_trim < self.options.trim_interval_s:
            return
        self._last_trim = now
        try:
            for _ in range(20):  # bounded: at most 100,000 rows per pass
                deleted = await self._pool.execute(_TRIM, self.options.retention, 5000)
                if int(deleted.split()[-1]) < 5000:
                    break
        except Exception as exc:
            log.warning("inbox trim failed: %s", exc)
