"""Notifications settings.

Environment variables (besides the common ones, e.g. ``DTX_DATABASE_URL``):

``DTX_KAFKA_BOOTSTRAP``                        required: where ``dtx.orders`` is read.
``DTX_KAFKA_TOPIC_PREFIX``                     before every topic name (default empty).
``DTX_NOTIFICATIONS_GROUP_ID``                 the Kafka consumer group (default
                                               ``dtx-notifications``).
``DTX_NOTIFICATIONS_WEBHOOK_URL``              POST each notification there (default: none).
``DTX_NOTIFICATIONS_WEBHOOK_TIMEOUT_SECONDS``  one POST's deadline (default 5).
``DTX_NOTIFICATIONS_WEBHOOK_MAX_ATTEMPTS``     then it is given up (default 8).
``DTX_NOTIFICATIONS_WEBHOOK_BACKOFF_MS``       first retry delay, doubled each time (default
                                               500), up to
``DTX_NOTIFICATIONS_WEBHOOK_BACKOFF_MAX_MS``   (default 60000).
``DTX_INBOX_RETENTION_HOURS``                  how long consumed event ids are kept (default
                                               168; must exceed Kafka's retention).
``DTX_SERVICE_NAME`` / ``DTX_GRPC_PORT`` / ``DTX_HTTP_PORT`` default to notifications / 50062 / 9476.
"""

from __future__ import annotations

from pydantic import AnyHttpUrl, Field

from dtx_runtime.outbox.wiring import TOPIC_PREFIX
from dtx_runtime.settings import Port, ServiceSettings


class NotificationsSettings(ServiceSettings):
    service_name: str = Field(default="notifications", min_length=1, max_length=63)
    grpc_port: Port = 50062
    http_port: Port = 9476
    kafka_topic_prefix: str = Field(default="", pattern=TOPIC_PREFIX)
    notifications_group_id: str = Field(
        default="dtx-notifications", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$"
    )
    notifications_webhook_url: AnyHttpUrl | None = None
    notifications_webhook_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    notifications_webhook_max_attempts: int = Field(default=8, ge=1, le=100)
    notifications_webhook_backoff_ms: int = Field(default=500, ge=1, le=3_600_000)
    notifications_webhook_backoff_max_ms: int = Field(default=60_000, ge=1, le=86_400_000)
    inbox_retention_hours: int = Field(default=168, ge=1, le=24 * 365)
