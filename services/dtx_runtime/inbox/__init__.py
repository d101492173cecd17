"""The inbox: consume events from Kafka and apply each exactly once to a database.

A consumer subclasses :class:`KafkaConsumerLoop` and implements ``apply``
(run inside the transaction that records the event id in ``dtx_inbox``). The
table lives once in the runtime: ``migrations={"inbox": INBOX_MIGRATIONS, ...}``.
"""

from pathlib import Path

from dtx_runtime.inbox.classify import Rejected, Supported, classify, supported_types
from dtx_runtime.inbox.consumer import ConsumerOptions, KafkaConsumerLoop

INBOX_MIGRATIONS = Path(__file__).parent / "migrations"

__all__ = [
    "INBOX_MIGRATIONS",
    "ConsumerOptions",
    "KafkaConsumerLoop",
    "Rejected",
    "Supported",
    "classify",
    "supported_types",
]
