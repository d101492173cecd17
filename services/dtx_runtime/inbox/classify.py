"""What a consumer makes of a Kafka record, free of I/O.

A record is either an event this consumer applies, or something for the
dead-letter topic with a reason: bytes that are not an ``Event``, an event
without a usable id, a type or schema version the consumer does not know, or
a payload that does not match its type. Dead-lettering instead of failing
keeps the partition moving: one bad record never blocks the ones behind it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import asyncpg

from dtx.v1 import events_pb2
from dtx_runtime.outbox.envelope import EVENT_TYPES

MALFORMED = "malformed"
UNKNOWN_TYPE = "unknown-type"
UNSUPPORTED_VERSION = "unsupported-schema-version"
INVALID_PAYLOAD = "invalid-payload"
HANDLER_ERROR = "handler-error"
REASONS = (MALFORMED, UNKNOWN_TYPE, UNSUPPORTED_VERSION, INVALID_PAYLOAD, HANDLER_ERROR)

DLQ_REASON = "dlq-reason"
DLQ_SOURCE_TOPIC = "dlq-source-topic"
DLQ_PARTITION = "dlq-partition"
DLQ_OFFSET = "dlq-offset"
DLQ_DETAIL = "dlq-detail"
_DLQ_HEADERS = (DLQ_REASON, DLQ_SOURCE_TOPIC, DLQ_PARTITION, DLQ_OFFSET, DLQ_DETAIL)
MAX_DETAIL_CHARS = 500

Supported = Mapping[str, frozenset[int]]
"""Event type -> the schema versions the consumer can apply."""


@dataclass(frozen=True)
class Rejected:
    """A record for the dead-letter topic: the reason (a metric label) and a detail."""

    reason: str
    detail: str


def supported_types(types: Iterable[str], versions: Iterable[int] = (1,)) -> Supported:
    wanted = frozenset(versions)
    return {t: wanted for t in types}


def classify(value: bytes | None, supported: Supported) -> events_pb2.Event | Rejected:
    """The event to apply, or why the record goes to the dead-letter topic."""
    if not value:
        return Rejected(MALFORMED, "the record has no value")
    try:
        event = events_pb2.Event.FromString(value)
    except Exception as exc:  # DecodeError, or anything protobuf raises on garbage
        return Rejected(MALFORMED, f"not a dtx.v1.Event: {exc}")
    try:
        uuid.UUID(event.id)
    except ValueError:
        return Rejected(MALFORMED, f"event id {event.id[:80]!r} is not a UUID")
    if not event.type:
        return Rejected(MALFORMED, "the event has no type")
    versions = supported.get(event.type)
    if versions is None:
        return Rejected(UNKNOWN_TYPE, f"event type {event.type[:80]!r} is not handled here")
    if event.schema_version not in versions:
        return Rejected(
            UNSUPPORTED_VERSION,
            f"{event.type} schema_version {event.schema_version} is not one of {sorted(versions)}",
        )
    kind = EVENT_TYPES.get(event.type)
    carried = event.WhichOneof("payload")
    if kind is not None and carried != kind.payload:
        return Rejected(
            INVALID_PAYLOAD, f"{event.type} must carry a {kind.payload} payload, got {carried}"
        )
    return event


def dead_letter_headers(
    original: Iterable[tuple[str, bytes]] | None,
    *,
    reason: str,
    detail: str,
    topic: str,
    partition: int,
    offset: int,
) -> list[tuple[str, bytes]]:
    """The original headers (minus earlier dlq-* ones) plus where the record came from and why."""
    kept = [(k, v) for k, v in original or () if k not in _DLQ_HEADERS]
    return [
        *kept,
        (DLQ_REASON, reason.encode()),
        (DLQ_SOURCE_TOPIC, topic.encode()),
        (DLQ_PARTITION, str(partition).encode()),
        (DLQ_OFFSET, str(offset).encode()),
        (DLQ_DETAIL, detail[:MAX_DETAIL_CHARS].encode()),
    ]


_TRANSIENT_POSTGRES = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.OperatorInterventionError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.LockNotAvailableError,
)


def is_transient(exc: BaseException) -> bool:
    """An error that retrying the same record can outlive: the database or Kafka was away."""
    if isinstance(exc, (OSError, TimeoutError, *_TRANSIENT_POSTGRES)):
        return True
    from aiokafka.errors import KafkaError

    return isinstance(exc, KafkaError)
