"""Which order events make a notification, and what it says."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from dtx.v1 import events_pb2
from dtx_notifications import domain
from dtx_notifications.config import NotificationsSettings
from dtx_runtime.errors import InvalidArgument
from dtx_runtime.outbox import InvalidEvent, build_event

pytestmark = pytest.mark.unit

# Fixed, not random: they are part of test ids, which parallel workers must agree on.
ORDER = "6f1c2d1e-8a4b-4f0e-9c3a-2b7d5e8f9a10"
ACCOUNT = "0b9e7c4d-3f2a-4c1b-8e6d-5a4f3b2c1d0e"


def order_event(event_type: str, reason: str = "", **payload: Any) -> events_pb2.Event:
    fields: dict[str, object] = {
        "order_id": ORDER,
        "account_id": ACCOUNT,
        "total_minor": 1250,
        "currency": "EUR",
        "reason": reason,
    }
    fields.update(payload)
    return build_event(event_type, str(fields["order_id"]), events_pb2.OrderEvent(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("event_type", "reason", "text"),
    [
        ("order.confirmed", "", f"Your order {ORDER} is confirmed: 12.50 EUR was charged."),
        (
            "order.rejected",
            "insufficient funds: account has 100, needs 1250",
            f"Your order {ORDER} was rejected (insufficient funds: account has 100, needs 1250)."
            " Nothing was charged.",
        ),
        (
            "order.failed",
            "prepare timed out",
            f"Your order {ORDER} could not be completed (prepare timed out). Nothing was charged.",
        ),
        (
            "order.cancelled",
            "",
            f"Your order {ORDER} was cancelled (no reason was given). Any charge for it is refunded.",
        ),
    ],
)
def test_each_terminal_event_makes_one_notification(
    event_type: str, reason: str, text: str
) -> None:
    event = order_event(event_type, reason)
    made = domain.notification_for(event)
    assert made == domain.NewNotification(
        order_id=uuid.UUID(ORDER),
        account_id=uuid.UUID(ACCOUNT),
        event_id=uuid.UUID(event.id),
        event_type=event_type,
        message=text,
    )


def test_placed_makes_none() -> None:
    assert domain.notification_for(order_event("order.placed")) is None
    assert set(domain.HANDLED_TYPES) == {"order.placed", *domain.TERMINAL_TYPES}


def test_long_or_multiline_reasons_are_tidied() -> None:
    made = domain.notification_for(order_event("order.failed", "a\n  b" + "x" * 1000))
    assert made is not None
    assert "(a b" in made.message
    assert "\n" not in made.message
    assert len(made.message) < 450


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"order_id": "o-1"}, "order.order_id: 'o-1' is not a UUID"),
        ({"account_id": "nobody"}, "order.account_id: 'nobody' is not a UUID"),
    ],
)
def test_unusable_payloads_are_invalid(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidEvent, match=match):
        domain.notification_for(order_event("order.confirmed", **changes))


def test_the_key_must_be_the_order() -> None:
    event = order_event("order.confirmed")
    event.aggregate_id = str(uuid.uuid4())
    with pytest.raises(InvalidEvent, match="is not the order id"):
        domain.notification_for(event)


@pytest.mark.parametrize(
    ("minor", "currency", "text"),
    [
        (1250, "EUR", "12.50 EUR"),
        (5, "USD", "0.05 USD"),
        (0, "EUR", "0.00 EUR"),
        (1250, "JPY", "1250 JPY"),
        (1250, "KWD", "1.250 KWD"),
        (-300, "EUR", "-3.00 EUR"),
    ],
)
def test_amounts(minor: int, currency: str, text: str) -> None:
    assert domain.format_amount(minor, currency) == text


def test_list_validation() -> None:
    assert domain.validate_list_limit(0) == 50
    assert domain.validate_list_limit(500) == 500
    with pytest.raises(InvalidArgument, match="limit: must be between 1 and 500, got 501"):
        domain.validate_list_limit(501)
    with pytest.raises(InvalidArgument, match="account_id: 'x' is not a UUID"):
        domain.parse_account_id("x")


def test_webhook_retry_delays_double_up_to_the_cap() -> None:
    delays = [domain.retry_delay_s(n, 0.5, 4.0) for n in range(1, 7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTX_NOTIFICATIONS_WEBHOOK_URL", "http://hooks.example:8080/notify")
    monkeypatch.setenv("DTX_KAFKA_TOPIC_PREFIX", "t1.")
    settings = NotificationsSettings()
    assert str(settings.notifications_webhook_url) == "http://hooks.example:8080/notify"
    assert (settings.service_name, settings.grpc_port, settings.http_port) == (
        "notifications",
        50062,
        9476,
    )
    assert settings.kafka_topic_prefix == "t1."
