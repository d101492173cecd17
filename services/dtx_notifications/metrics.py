"""Notifications' Prometheus metrics (served on the side port's ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter

CREATED = Counter(
    "dtx_notifications_created_total",
    "Notifications written, by the terminal event that caused them.",
    ["type"],
)
ALREADY_NOTIFIED = Counter(
    "dtx_notifications_already_notified_total",
    "Terminal events of orders that already had their notification (none was added).",
)
WEBHOOK = Counter(
    "dtx_notifications_webhook_total",
    "Webhook delivery attempts by result: delivered, failed (retried later), gave_up.",
    ["result"],
)
