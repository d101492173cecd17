"""The inbox's decisions without servers: dead-letter classification and apply-once.

A fake pool keeps the inbox in a set, so the consumer loop's per-record logic
(first delivery applies, a redelivery does not, a bad record goes to the
dead-letter topic, an outage is retried) runs without PostgreSQL or Kafka.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from dtx.v1 import events_pb2
from dtx_runtime.inbox import KafkaConsumerLoop, Rejected, classify, supported_types
from dtx_runtime.inbox.classify import dead_letter_headers, is_transient
from dtx_runtime.inbox.consumer import Retry
from dtx_runtime.outbox import InvalidEvent, build_event

pytestmark = pytest.mark.unit

SUPPORTED = supported_types(["order.placed", "order.confirmed"])


def event(event_type: str = "order.confirmed", **changes: Any) -> events_pb2.Event:
    built = build_event(event_type, "o-1", events_pb2.OrderEvent(order_id="o-1"))
    for name, value in changes.items():
        setattr(built, name, value)
    return built


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "malformed"),
        (b"", "malformed"),
        (b"\xff\xff\xff not protobuf", "malformed"),
        (event(id="not-a-uuid").SerializeToString(), "malformed"),
        (event(type="").SerializeToString(), "malformed"),
        (event(type="order.shipped").SerializeToString(), "unknown-type"),
        (
            build_event("payment.charged", "o", events_pb2.PaymentEvent()).SerializeToString(),
            "unknown-type",
        ),
        (event(schema_version=2).SerializeToString(), "unsupported-schema-version"),
        (event(schema_version=0).SerializeToString(), "unsupported-schema-version"),
    ],
    # Stable ids: the values hold random event ids, and parallel workers must agree on ids.
    ids=[
        "none",
        "empty",
        "not-protobuf",
        "bad-id",
        "no-type",
        "unknown-type",
        "not-an-order-event",
        "schema-2",
        "schema-0",
    ],
)
def test_bad_records_are_classified_for_the_dead_letter_topic(
    value: bytes | None, reason: str
) -> None:
    outcome = classify(value, SUPPORTED)
    assert isinstance(outcome, Rejected)
    assert outcome.reason == reason
    assert outcome.detail


def test_a_payload_that_does_not_match_the_type_is_invalid() -> None:
    wrong = event()
    wrong.payment.amount_minor = 5  # switches the oneof away from "order"
    outcome = classify(wrong.SerializeToString(), SUPPORTED)
    assert outcome == Rejected(
        "invalid-payload", "order.confirmed must carry a order payload, got payment"
    )


def test_a_good_record_is_the_event() -> None:
    good = event()
    assert classify(good.SerializeToString(), SUPPORTED) == good
    newer = event(schema_version=2)
    later = supported_types(["order.confirmed"], versions=(1, 2))
    assert classify(newer.SerializeToString(), later) == newer


def test_dead_letter_headers_keep_the_original_ones_and_say_where_from() -> None:
    headers = dead_letter_headers(
        [("traceparent", b"00-a-b-01"), ("dlq-reason", b"old")],
        reason="malformed",
        detail="x" * 600,
        topic="dtx.orders",
        partition=2,
        offset=41,
    )
    as_dict = dict(headers)
    assert as_dict["traceparent"] == b"00-a-b-01"
    assert as_dict["dlq-reason"] == b"malformed"
    assert as_dict["dlq-source-topic"] == b"dtx.orders"
    assert as_dict["dlq-partition"] == b"2"
    assert as_dict["dlq-offset"] == b"41"
    assert len(as_dict["dlq-detail"]) == 500
    assert [k for k, _ in headers].count("dlq-reason") == 1


def test_transient_errors() -> None:
    from aiokafka.errors import KafkaConnectionError

    assert is_transient(ConnectionRefusedError())
    assert is_transient(TimeoutError())
    assert is_transient(asyncpg.CannotConnectNowError("starting"))
    assert is_transient(asyncpg.SerializationError("retry"))
    assert is_transient(KafkaConnectionError())
    assert not is_transient(ValueError("bug"))
    assert not is_transient(asyncpg.UniqueViolationError("dup"))


# -- the per-record logic, over fakes ------------------------------------------


@dataclass
class FakeConn:
    db: FakeDb

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        staged = set(self.db.inbox)
        applied = list(self.db.applied)
        try:
            yield
        except BaseException:
            self.db.inbox, self.db.applied = staged, applied  # rolled back
            raise

    async def fetchval(self, query: str, consumer: str, event_id: uuid.UUID, _: str) -> bool | None:
        assert "INSERT INTO dtx_inbox" in query
        if self.db.down:
            raise ConnectionRefusedError("database down")
        if (consumer, event_id) in self.db.inbox:
            return None
        self.db.inbox.add((consumer, event_id))
        return True


@dataclass
class FakeDb:
    inbox: set[tuple[str, uuid.UUID]] = field(default_factory=set)
    applied: list[str] = field(default_factory=list)
    down: bool = False

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[FakeConn]:
        yield FakeConn(self)


@dataclass
class FakeProducer:
    sent: list[tuple[str, bytes | None, list[tuple[str, bytes]]]] = field(default_factory=list)
    down: bool = False

    async def send_and_wait(
        self,
        topic: str,
        *,
        value: bytes | None,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> None:
        if self.down:
            raise ConnectionRefusedError("kafka down")
        self.sent.append((topic, value, headers))


@dataclass
class Record:
    value: bytes | None
    offset: int = 0
    topic: str = "dtx.orders"
    partition: int = 0
    key: bytes | None = b"o-1"
    headers: tuple[tuple[str, bytes], ...] = ()


class Recorder(KafkaConsumerLoop):
    failures_left = 0

    async def apply(self, conn: Any, event: events_pb2.Event) -> None:
        if event.order.reason == "invalid":
            raise InvalidEvent("order.account_id: 'x' is not a UUID")
        if self.failures_left:
            self.failures_left -= 1
            raise ValueError("a bug")
        conn.db.applied.append(event.id)


def recorder(db: FakeDb) -> Recorder:
    return Recorder(
        db,  # type: ignore[arg-type]
        bootstrap="unused:9092",
        consumer="test",
        topics=["dtx.orders"],
        group_id="g",
        supported=SUPPORTED,
    )


async def test_a_redelivered_event_is_applied_once() -> None:
    db, producer = FakeDb(), FakeProducer()
    loop = recorder(db)
    record = Record(event().SerializeToString())
    await loop._handle(producer, record)
    await loop._handle(producer, record)
    await loop._handle(producer, Record(record.value, offset=7))
    assert len(db.applied) == 1
    assert producer.sent == []


async def test_poison_goes_to_the_dead_letter_topic_and_is_not_applied() -> None:
    db, producer = FakeDb(), FakeProducer()
    loop = recorder(db)
    await loop._handle(producer, Record(b"garbage", offset=3))
    [(topic, value, headers)] = producer.sent
    assert (topic, value) == ("dtx.deadletter", b"garbage")
    assert dict(headers)["dlq-reason"] == b"malformed"
    assert dict(headers)["dlq-offset"] == b"3"
    assert db.applied == []
    assert db.inbox == set()


async def test_an_invalid_payload_is_dead_lettered_and_its_inbox_row_rolled_back() -> None:
    db, producer = FakeDb(), FakeProducer()
    bad = event()
    bad.order.reason = "invalid"
    await recorder(db)._handle(producer, Record(bad.SerializeToString()))
    assert dict(producer.sent[0][2])["dlq-reason"] == b"invalid-payload"
    assert db.inbox == set()


async def test_outages_are_retried_not_dead_lettered() -> None:
    db, producer = FakeDb(down=True), FakeProducer()
    loop = recorder(db)
    with pytest.raises(Retry, match="database down"):
        await loop._handle(producer, Record(event().SerializeToString()))
    producer.down = True
    with pytest.raises(Retry, match="dead-letter topic unavailable"):
        await loop._handle(producer, Record(b"garbage"))
    assert producer.sent == []


async def test_a_failing_handler_is_retried_then_dead_lettered() -> None:
    db, producer = FakeDb(), FakeProducer()
    loop = recorder(db)
    loop.failures_left = 5
    record = Record(event().SerializeToString(), offset=9)
    for _ in range(loop.options.handler_attempts - 1):
        with pytest.raises(Retry, match="a bug"):
            await loop._handle(producer, record)
    await loop._handle(producer, record)
    assert dict(producer.sent[0][2])["dlq-reason"] == b"handler-error"
    assert db.applied == []


def test_every_dead_letter_reason_is_exported_at_zero_before_the_first() -> None:
    """The inbox dashboard's dead-letter panel has a series from the start."""
    from prometheus_client import REGISTRY, generate_latest

    from dtx_runtime.inbox import consumer  # noqa: F401  (defines and initialises the counter)
    from dtx_runtime.inbox.classify import REASONS

    text = generate_latest(REGISTRY).decode()
    for reason in REASONS:
        assert f'dtx_deadletter_total{{reason="{reason}"}}' in text, reason
