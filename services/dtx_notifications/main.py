"""Wiring of the notifications service: ``dtx serve notifications`` runs :data:`SERVICE`."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from dtx.v1 import notifications_pb2_grpc
from dtx_notifications.config import NotificationsSettings
from dtx_notifications.consumer import OrderEventsConsumer
from dtx_notifications.handlers import NotificationsServicer
from dtx_notifications.webhook import WebhookDelivery
from dtx_runtime import ServiceContext, ServiceDefinition
from dtx_runtime.errors import ConfigError
from dtx_runtime.inbox import INBOX_MIGRATIONS, ConsumerOptions
from dtx_runtime.outbox.kafka import KafkaProbe

HERE = Path(__file__).parent


async def setup(ctx: ServiceContext[NotificationsSettings]) -> None:
    settings = ctx.settings
    bootstrap = settings.kafka_bootstrap
    if not bootstrap:
        raise ConfigError("DTX_KAFKA_BOOTSTRAP is required by notifications")
    notifications_pb2_grpc.add_NotificationsServicer_to_server(
        NotificationsServicer(ctx.db), ctx.server
    )
    delivery: WebhookDelivery | None = None
    if settings.notifications_webhook_url is not None:
        delivery = WebhookDelivery(
            ctx.db,
            str(settings.notifications_webhook_url),
            timeout_s=settings.notifications_webhook_timeout_seconds,
            max_attempts=settings.notifications_webhook_max_attempts,
            backoff_initial_s=settings.notifications_webhook_backoff_ms / 1000,
            backoff_max_s=settings.notifications_webhook_backoff_max_ms / 1000,
        )
        ctx.run_in_background("webhook-delivery", delivery.run)
    consumer = OrderEventsConsumer(
        ctx.db,
        bootstrap=bootstrap,
        group_id=settings.notifications_group_id,
        options=ConsumerOptions(
            topic_prefix=settings.kafka_topic_prefix,
            retention=timedelta(hours=settings.inbox_retention_hours),
            client_id=f"dtx-{settings.service_name}",
        ),
        on_created=delivery.wake if delivery is not None else None,
    )
    ctx.run_in_background("order-events", consumer.run)
    probe = KafkaProbe(bootstrap)
    ctx.health.add_check("kafka", probe.check)
    ctx.on_shutdown(probe.close)


SERVICE = ServiceDefinition(
    name="notifications",
    settings_type=NotificationsSettings,
    setup=setup,
    grpc_services=["dtx.v1.Notifications"],
    migrations={"inbox": INBOX_MIGRATIONS, "notifications": HERE / "migrations"},
)
