"""Notifications' rules, free of I/O: which events make a notification, and what it says.

Only the end of an order is worth telling its owner: confirmed, rejected,
failed or cancelled. ``order.placed`` is consumed (it is on the same topic)
but makes nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from dtx.v1 import events_pb2
from dtx_runtime.errors import InvalidArgument
from dtx_runtime.outbox import InvalidEvent

TERMINAL_TYPES = ("order.confirmed", "order.rejected", "order.failed", "order.cancelled")
HANDLED_TYPES = ("order.placed", *TERMINAL_TYPES)
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 500
MAX_MESSAGE_CHARS = 2000
MAX_REASON_CHARS = 300

# ISO 4217 currencies whose minor unit is not a hundredth.
MINOR_DIGITS: Mapping[str, int] = {
    "JPY": 0,
    "KRW": 0,
    "ISK": 0,
    "CLP": 0,
    "VND": 0,
    "BHD": 3,
    "KWD": 3,
    "OMR": 3,
    "JOD": 3,
    "TND": 3,
}


@dataclass(frozen=True)
class NewNotification:
    order_id: uuid.UUID
    account_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    message: str


def format_amount(minor: int, currency: str) -> str:
    """``1250, EUR`` -> ``12.50 EUR``; ``1250, JPY`` -> ``1250 JPY``."""
    digits = MINOR_DIGITS.get(currency, 2)
    sign = "-" if minor < 0 else ""
    units, cents = divmod(abs(minor), 10**digits)
    amount = f"{units}.{cents:0{digits}d}" if digits else str(units)
    return f"{sign}{amount} {currency}".strip()


def _reason(order: events_pb2.OrderEvent) -> str:
    text = " ".join(order.reason.split())
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 1] + "…"
    return text or "no reason was given"


def message_for(event_type: str, order: events_pb2.OrderEvent) -> str:
    """The text of a terminal order's notification."""
    ref = f"Your order {order.order_id}"
    total = format_amount(order.total_minor, order.currency)
    if event_type == "order.confirmed":
        return f"{ref} is confirmed: {total} was charged."
    if event_type == "order.rejected":
        return f"{ref} was rejected ({_reason(order)}). Nothing was charged."
    if event_type == "order.failed":
        return f"{ref} could not be completed ({_reason(order)}). Nothing was charged."
    if event_type == "order.cancelled":
        return f"{ref} was cancelled ({_reason(order)}). Any charge for it is refunded."
    raise InvalidEvent(f"{event_type} is not a terminal order event")


def _uuid(value: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidEvent(f"{field}: {value[:80]!r} is not a UUID") from None


def notification_for(event: events_pb2.Event) -> NewNotification | None:
    """The notification an event makes, or None (order.placed); InvalidEvent if unusable."""
    if event.type not in TERMINAL_TYPES:
        return None
    if event.WhichOneof("payload") != "order":
        raise InvalidEvent(f"{event.type} must carry an order payload")
    order = event.order
    order_id = _uuid(order.order_id, "order.order_id")
    if event.aggregate_id != order.order_id:
        raise InvalidEvent(
            f"aggregate_id {event.aggregate_id[:80]!r} is not the order id {order.order_id}"
        )
    return NewNotification(
        order_id=order_id,
        account_id=_uuid(order.account_id, "order.account_id"),
        event_id=_uuid(event.id, "id"),
        event_type=event.type,
        message=message_for(event.type, order)[:MAX_MESSAGE_CHARS],
    )


def parse_account_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"account_id: {value[:80]!r} is not a UUID") from None


def validate_list_limit(limit: int) -> int:
    if limit == 0:
        return DEFAULT_LIST_LIMIT
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidArgument(f"limit: must be between 1 and {MAX_LIST_LIMIT}, got {limit}")
    return limit


def retry_delay_s(attempts: int, initial_s: float, maximum_s: float) -> float:
    """The pause before attempt ``attempts + 1`` of a webhook delivery (no jitter here)."""
    return float(min(initial_s * 2 ** max(attempts - 1, 0), maximum_s))
