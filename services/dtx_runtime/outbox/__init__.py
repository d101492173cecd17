"""The transactional outbox: events written with the state change, published by a relay.

A service writes an event with :func:`write_event` inside the local
transaction of the state change it reports (for a participant, inside the
barrier's transaction, prepared or not), calls :func:`notify_committed` after
its own commits, and runs :func:`wire_outbox` in its ``setup``. The table
lives once in the runtime: ``migrations={"outbox": OUTBOX_MIGRATIONS, ...}``.
"""

from pathlib import Path

from dtx_runtime.outbox.envelope import (
    DEADLETTER_TOPIC,
    EVENT_TYPES,
    INVENTORY_TOPIC,
    ORDERS_TOPIC,
    PAYMENTS_TOPIC,
    SCHEMA_VERSION,
    InvalidEvent,
    build_event,
    physical_topic,
)
from dtx_runtime.outbox.kafka import delete_topics
from dtx_runtime.outbox.relay import OutboxRelay, RelayOptions
from dtx_runtime.outbox.wiring import OutboxSettings, wire_outbox
from dtx_runtime.outbox.writer import (
    OUTBOX_COLUMNS,
    notify_committed,
    outbox_params,
    outbox_values,
    write_event,
)

OUTBOX_MIGRATIONS = Path(__file__).parent / "migrations"

__all__ = [
    "DEADLETTER_TOPIC",
    "EVENT_TYPES",
    "INVENTORY_TOPIC",
    "ORDERS_TOPIC",
    "OUTBOX_COLUMNS",
    "OUTBOX_MIGRATIONS",
    "PAYMENTS_TOPIC",
    "SCHEMA_VERSION",
    "InvalidEvent",
    "OutboxRelay",
    "OutboxSettings",
    "RelayOptions",
    "build_event",
    "delete_topics",
    "notify_committed",
    "outbox_params",
    "outbox_values",
    "physical_topic",
    "wire_outbox",
    "write_event",
]
