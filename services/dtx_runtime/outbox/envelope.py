"""The event envelope and its Kafka form, free of I/O.

Every event is a ``dtx.v1.Event``: a UUID, its type, the aggregate it is about
(the Kafka key), when it happened, the schema version and one payload. The
catalogue below is the one place that says which types exist, on which topic
each is published and which payload it carries (``protos/dtx/v1/EVENTS.md``
documents the same).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from opentelemetry import propagate

from dtx.v1 import events_pb2

SCHEMA_VERSION = 1

ORDERS_TOPIC = "dtx.orders"
PAYMENTS_TOPIC = "dtx.payments"
INVENTORY_TOPIC = "dtx.inventory"
DEADLETTER_TOPIC = "dtx.deadletter"

EVENT_TYPE_HEADER = "event-type"
TRACE_HEADERS = ("traceparent", "tracestate")
MAX_AGGREGATE_ID_CHARS = 200

Payload = events_pb2.OrderEvent | events_pb2.PaymentEvent | events_pb2.StockEvent


@dataclass(frozen=True)
class EventKind:
    """What an event type is: its topic and the payload field (``Event.payload`` oneof)."""

    topic: str
    payload: str


EVENT_TYPES: Mapping[str, EventKind] = {
    "order.placed": EventKind(ORDERS_TOPIC, "order"),
    "order.confirmed": EventKind(ORDERS_TOPIC, "order"),
    "order.rejected": EventKind(ORDERS_TOPIC, "order"),
    "order.failed": EventKind(ORDERS_TOPIC, "order"),
    "order.cancelled": EventKind(ORDERS_TOPIC, "order"),
    "payment.charged": EventKind(PAYMENTS_TOPIC, "payment"),
    "payment.refunded": EventKind(PAYMENTS_TOPIC, "payment"),
    "stock.reserved": EventKind(INVENTORY_TOPIC, "stock"),
    "stock.released": EventKind(INVENTORY_TOPIC, "stock"),
}

_PAYLOAD_FIELD: Mapping[type, str] = {
    events_pb2.OrderEvent: "order",
    events_pb2.PaymentEvent: "payment",
    events_pb2.StockEvent: "stock",
}


class InvalidEvent(ValueError):
    """An event that cannot be written: unknown type, wrong payload, bad aggregate id."""


def build_event(
    event_type: str,
    aggregate_id: str,
    payload: Payload,
    *,
    event_id: uuid.UUID | None = None,
    occurred_at: datetime | None = None,
) -> events_pb2.Event:
    """The envelope of one event: a fresh UUID, now, schema version 1."""
    kind = EVENT_TYPES.get(event_type)
    if kind is None:
        raise InvalidEvent(f"event type {event_type!r} is not one of {', '.join(EVENT_TYPES)}")
    field = _PAYLOAD_FIELD.get(type(payload))
    if field != kind.payload:
        raise InvalidEvent(
            f"{event_type} carries a {kind.payload} payload, got {type(payload).__name__}"
        )
    if not aggregate_id or len(aggregate_id) > MAX_AGGREGATE_ID_CHARS:
        raise InvalidEvent(
            f"aggregate_id must be 1-{MAX_AGGREGATE_ID_CHARS} characters, got {len(aggregate_id)}"
        )
    event = events_pb2.Event(
        id=str(event_id or uuid.uuid4()),
        type=event_type,
        aggregate_id=aggregate_id,
        schema_version=SCHEMA_VERSION,
    )
    event.occurred_at.FromDatetime(occurred_at or datetime.now(UTC))
    getattr(event, field).CopyFrom(payload)
    return event


def capture_trace_context() -> dict[str, str]:
    """The current W3C trace context (``traceparent``/``tracestate``), empty without a span."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {k: v for k, v in carrier.items() if k in TRACE_HEADERS}


def kafka_headers(
    event_type: str, stored: Mapping[str, str], *, with_trace: bool = True
) -> list[tuple[str, bytes]]:
    """The record headers: ``event-type`` and, unless the producer injects it, the trace context."""
    headers = [(EVENT_TYPE_HEADER, event_type.encode())]
    if with_trace:
        headers += [(k, stored[k].encode()) for k in TRACE_HEADERS if k in stored]
    return headers


def header_dict(headers: Iterable[tuple[str, bytes]] | None) -> dict[str, str]:
    """Kafka headers as text (the last value of a repeated key wins), for trace extraction."""
    found: dict[str, str] = {}
    for key, value in headers or ():
        found[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return found


def physical_topic(prefix: str, topic: str) -> str:
    """The topic on the broker: ``DTX_KAFKA_TOPIC_PREFIX`` + the logical name (``dtx.orders``)."""
    return f"{prefix}{topic}"
