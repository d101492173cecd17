"""The consumer of ``dtx.orders``: terminal order events become notifications.

The runtime's :class:`~dtx_runtime.inbox.KafkaConsumerLoop` does the rest:
dead-lettering what cannot be read, the inbox row in the same transaction,
the offset commit after the database's.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from dtx.v1 import events_pb2
from dtx_notifications import domain, storage
from dtx_notifications.metrics import ALREADY_NOTIFIED, CREATED
from dtx_runtime.inbox import ConsumerOptions, KafkaConsumerLoop, supported_types
from dtx_runtime.outbox import ORDERS_TOPIC

CONSUMER = "notifications"


class OrderEventsConsumer(KafkaConsumerLoop):
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        bootstrap: str,
        group_id: str,
        options: ConsumerOptions,
        on_created: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            pool,
            bootstrap=bootstrap,
            consumer=CONSUMER,
            topics=[ORDERS_TOPIC],
            group_id=group_id,
            supported=supported_types(domain.HANDLED_TYPES),
            options=options,
        )
        self._on_created = on_created

    async def apply(self, conn: PoolConnectionProxy, event: events_pb2.Event) -> None:
        new = domain.notification_for(event)
        if new is None:
            return
        if await storage.insert_notification(conn, new):
            CREATED.labels(event.type).inc()
        else:
            ALREADY_NOTIFIED.inc()

    async def committed(self, event: events_pb2.Event) -> None:
        if self._on_created is not None and event.type in domain.TERMINAL_TYPES:
            self._on_created()
