"""The outbox envelope: types, payloads, trace headers and the Kafka form."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from dtx.v1 import events_pb2
from dtx_runtime.outbox import EVENT_TYPES, SCHEMA_VERSION, InvalidEvent, build_event
from dtx_runtime.outbox.envelope import (
    ORDERS_TOPIC,
    capture_trace_context,
    header_dict,
    kafka_headers,
    physical_topic,
)
from dtx_runtime.outbox.kafka import Backoff

pytestmark = pytest.mark.unit


def order_payload(order_id: str = "") -> events_pb2.OrderEvent:
    return events_pb2.OrderEvent(
        order_id=order_id or str(uuid.uuid4()), account_id=str(uuid.uuid4()), total_minor=500
    )


def test_build_event_fills_the_envelope() -> None:
    payload = order_payload()
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    event = build_event("order.confirmed", payload.order_id, payload, occurred_at=at)
    assert uuid.UUID(event.id).version == 4
    assert event.type == "order.confirmed"
    assert event.aggregate_id == payload.order_id
    assert event.schema_version == SCHEMA_VERSION == 1
    assert event.occurred_at.ToDatetime(tzinfo=UTC) == at
    assert event.WhichOneof("payload") == "order"
    assert event.order == payload
    again = events_pb2.Event.FromString(event.SerializeToString())
    assert again == event


def test_each_event_gets_its_own_id() -> None:
    payload = order_payload()
    ids = {build_event("order.placed", "a", payload).id for _ in range(100)}
    assert len(ids) == 100


@pytest.mark.parametrize(
    ("event_type", "payload"),
    [
        ("payment.charged", events_pb2.PaymentEvent(amount_minor=1)),
        ("payment.refunded", events_pb2.PaymentEvent(amount_minor=1)),
        ("stock.reserved", events_pb2.StockEvent(order_id="o")),
        ("stock.released", events_pb2.StockEvent(order_id="o")),
        ("order.failed", events_pb2.OrderEvent(order_id="o")),
    ],
)
def test_every_type_takes_its_payload(event_type: str, payload: events_pb2.PaymentEvent) -> None:
    event = build_event(event_type, "agg", payload)
    assert event.WhichOneof("payload") == EVENT_TYPES[event_type].payload


def test_catalogue_topics() -> None:
    assert {t: k.topic for t, k in EVENT_TYPES.items()} == {
        "order.placed": "dtx.orders",
        "order.confirmed": "dtx.orders",
        "order.rejected": "dtx.orders",
        "order.failed": "dtx.orders",
        "order.cancelled": "dtx.orders",
        "payment.charged": "dtx.payments",
        "payment.refunded": "dtx.payments",
        "stock.reserved": "dtx.inventory",
        "stock.released": "dtx.inventory",
    }


def test_refuses_unknown_types_wrong_payloads_and_bad_keys() -> None:
    with pytest.raises(InvalidEvent, match=r"order\.shipped"):
        build_event("order.shipped", "a", order_payload())
    with pytest.raises(InvalidEvent, match="carries a payment payload, got OrderEvent"):
        build_event("payment.charged", "a", order_payload())
    with pytest.raises(InvalidEvent, match="aggregate_id"):
        build_event("order.placed", "", order_payload())
    with pytest.raises(InvalidEvent, match="aggregate_id"):
        build_event("order.placed", "x" * 201, order_payload())


def test_trace_context_is_captured_only_inside_a_span() -> None:
    assert capture_trace_context() == {}
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        captured = capture_trace_context()
        trace_id = format(span.get_span_context().trace_id, "032x")
    assert set(captured) == {"traceparent"}
    assert captured["traceparent"].split("-")[1] == trace_id
    assert trace.get_current_span().get_span_context().is_valid is False


def test_kafka_headers() -> None:
    stored = {"traceparent": "00-abc-def-01", "tracestate": "k=v", "other": "x"}
    assert kafka_headers("order.placed", stored) == [
        ("event-type", b"order.placed"),
        ("traceparent", b"00-abc-def-01"),
        ("tracestate", b"k=v"),
    ]
    assert kafka_headers("order.placed", stored, with_trace=False) == [
        ("event-type", b"order.placed")
    ]
    assert header_dict([("a", b"1"), ("a", b"2"), ("b", b"\xff")]) == {"a": "2", "b": "\ufffd"}
    assert header_dict(None) == {}


def test_topic_prefix() -> None:
    assert physical_topic("", ORDERS_TOPIC) == "dtx.orders"
    assert physical_topic("staging.", ORDERS_TOPIC) == "staging.dtx.orders"


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    backoff = Backoff(0.1, 1.0)
    delays = [backoff.next_delay() for _ in range(6)]
    for delay, nominal in zip(delays, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0], strict=True):
        assert nominal * 0.8 <= delay <= nominal * 1.2
    backoff.reset()
    assert backoff.next_delay() <= 0.12
