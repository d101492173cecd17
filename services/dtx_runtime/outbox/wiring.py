"""Wire the outbox into a service: the relay, its readiness check, and the wake-ups.

Environment variables (besides ``DTX_DATABASE_URL`` and ``DTX_KAFKA_BOOTSTRAP``):

``DTX_KAFKA_TOPIC_PREFIX``         put before every topic name (default empty:
                                   ``dtx.orders``); isolates environments sharing a broker.
``DTX_OUTBOX_POLL_INTERVAL_MS``    the fallback poll when no wake-up came (default 500).
``DTX_OUTBOX_BATCH_SIZE``          rows published per round (default 500).
``DTX_OUTBOX_RETENTION_HOURS``     how long published rows are kept (default 24).
``DTX_OUTBOX_KAFKA_READINESS``     add the readiness check ``kafka`` (default true).

Without ``DTX_KAFKA_BOOTSTRAP`` no relay runs: events are still written (the
state change and its event stay one transaction) and wait in the outbox until a
relay with Kafka starts.
"""

from __future__ import annotations

import functools
import logging
from datetime import timedelta
from typing import Any

from pydantic import Field

from dtx_runtime.outbox.kafka import KafkaProbe
from dtx_runtime.outbox.relay import OutboxRelay, RelayOptions
from dtx_runtime.outbox.writer import notify_committed
from dtx_runtime.participant.barrier import Barrier
from dtx_runtime.service import ServiceContext
from dtx_runtime.settings import ServiceSettings, load_settings

log = logging.getLogger(__name__)

TOPIC_PREFIX = r"^[A-Za-z0-9._-]{0,100}$"


class OutboxSettings(ServiceSettings):
    """The outbox relay's settings, read from the environment beside the service's own."""

    kafka_topic_prefix: str = Field(default="", pattern=TOPIC_PREFIX)
    outbox_poll_interval_ms: int = Field(default=500, ge=10, le=60_000)
    # A wake-up per commit costs the service a query pair and a produce request
    # each; lingering this long after one batches the commits of that moment
    # (see docs/architecture.md for what it did and did not show here).
    outbox_linger_ms: int = Field(default=0, ge=0, le=1_000)
    outbox_batch_size: int = Field(default=500, ge=1, le=10_000)
    outbox_retention_hours: int = Field(default=24, ge=1, le=24 * 365)
    # Off by default: the outbox exists so that a Kafka outage does not stop
    # business; a participant reporting unready would stop it all the same.
    # The backlog metrics and alerts say when Kafka is behind.
    outbox_kafka_readiness: bool = False


def wake_after_commits(barrier: Barrier) -> None:
    """Make the barrier's committing calls wake the relay once they return.

    ``commit`` (COMMIT PREPARED, also the reaper's), ``execute`` and
    ``compensate`` commit the transactions in which managers wrote events; the
    prepare itself never commits and must not NOTIFY.
    """
    for name in ("commit", "execute", "compensate"):
        original = getattr(barrier, name)

        @functools.wraps(original)
        async def committed(*args: Any, _call: Any = original, **kwargs: Any) -> Any:
            try:
                return await _call(*args, **kwargs)
            finally:
                notify_committed()

        setattr(barrier, name, committed)


def wire_outbox(
    ctx: ServiceContext[Any],
    barrier: Barrier | None = None,
    *,
    settings: OutboxSettings | None = None,
) -> OutboxRelay | None:
    """Start the relay of this service's database (when Kafka is configured); returns it."""
    if barrier is not None:
        wake_after_commits(barrier)
    service = ctx.settings
    bootstrap = service.kafka_bootstrap
    if not bootstrap:
        log.warning("DTX_KAFKA_BOOTSTRAP is not set: events are kept in the outbox, not published")
        return None
    if not service.database_url:  # pragma: no cover - a service with migrations has one
        raise ValueError("the outbox needs DTX_DATABASE_URL")
    options = settings or load_settings(OutboxSettings)
    relay = OutboxRelay(
        service.database_url,
        bootstrap,
        RelayOptions(
            topic_prefix=options.kafka_topic_prefix,
            batch_size=options.outbox_batch_size,
            poll_interval_s=options.outbox_poll_interval_ms / 1000,
            linger_s=options.outbox_linger_ms / 1000,
            retention=timedelta(hours=options.outbox_retention_hours),
            client_id=f"dtx-outbox-{service.service_name}",
        ),
    )
    ctx.run_in_background("outbox-relay", relay.run)
    if options.outbox_kafka_readiness:
        probe = KafkaProbe(bootstrap)
        ctx.health.add_check("kafka", probe.check)
        ctx.on_shutdown(probe.close)
    return relay
