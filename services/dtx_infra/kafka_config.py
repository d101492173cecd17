"""Configuration files of the single-node KRaft broker, rendered from a few parameters.

Pure functions, so that unit tests can pin the settings the rest of dtx depends on: the
outbox relies on transactions and idempotent producers (hence the replication factors of 1
for the internal topics on a single node) and on auto-created topics.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from pathlib import Path

from dtx_infra.settings import HOST

NODE_ID = 1


@dataclass(frozen=True)
class KafkaParams:
    port: int
    controller_port: int
    data_dir: Path
    host: str = HOST


def _value(text: str) -> str:
    """Escape a java.util.Properties value (backslash is the only character that matters)."""
    if "\n" in text or "\r" in text:
        raise ValueError(f"property value must be a single line: {text!r}")
    return text.replace("\\", "\\\\")


def render_server_properties(p: KafkaParams) -> str:
    settings: list[tuple[str, str]] = [
        # One JVM is both the KRaft controller and the broker: no ZooKeeper, one process.
        ("process.roles", "broker,controller"),
        ("node.id", str(NODE_ID)),
        ("controller.quorum.voters", f"{NODE_ID}@{p.host}:{p.controller_port}"),
        ("listeners", f"PLAINTEXT://{p.host}:{p.port},CONTROLLER://{p.host}:{p.controller_port}"),
        ("advertised.listeners", f"PLAINTEXT://{p.host}:{p.port}"),
        ("controller.listener.names", "CONTROLLER"),
        ("inter.broker.listener.name", "PLAINTEXT"),
        ("listener.security.protocol.map", "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"),
        ("log.dirs", _value(str(p.data_dir))),
        ("num.partitions", "3"),
        ("default.replication.factor", "1"),
        ("min.insync.replicas", "1"),
        ("auto.create.topics.enable", "true"),
        # Internal topics default to replication factor 3, which a single node cannot host;
        # fewer partitions than the default 50 keep the first consumer group and the first
        # transactional producer fast on a 2-core machine.
        ("offsets.topic.replication.factor", "1"),
        ("offsets.topic.num.partitions", "10"),
        ("transaction.state.log.replication.factor", "1"),
        ("transaction.state.log.min.isr", "1"),
        ("transaction.state.log.num.partitions", "10"),
        # Tests create groups constantly; the default 3 s join delay would slow every one.
        ("group.initial.rebalance.delay.ms", "0"),
        ("num.network.threads", "2"),
        ("num.io.threads", "4"),
        ("log.retention.hours", "24"),
        ("log.segment.bytes", str(64 * 1024 * 1024)),
    ]
    lines = ["# Rendered by dtx_infra.kafka_config on every start; edits are overwritten."]
    lines += [f"{key}={value}" for key, value in settings]
    return "\n".join(lines) + "\n"


def render_log4j_properties() -> str:
    """Log to stdout, which the launcher redirects to ``<state>/kafka/server.log``."""
    return (
        "log4j.rootLogger=INFO, stdout\n"
        "log4j.appender.stdout=org.apache.log4j.ConsoleAppender\n"
        "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\n"
        "log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
        "log4j.logger.kafka.request.logger=WARN\n"
        "log4j.logger.org.apache.kafka.clients=WARN\n"
        "log4j.logger.kafka.log.LogCleaner=WARN\n"
    )


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (22 chars).

    This is what ``kafka-storage.sh random-uuid`` prints, without starting a JVM.
    Like Kafka's own generator it draws again when the id starts with ``-``:
    the storage tool would read such an id as an option.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id
