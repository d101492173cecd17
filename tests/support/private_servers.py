"""A PostgreSQL or Kafka of a test's own, for tests that stop or restart their server.

The session's servers are shared by every test (and, under pytest-xdist, by
every worker at once), so a test that takes its server down must never use
them: it gets one of these instead — same binaries, same cached jars, a state
directory in /tmp and free ports — and it is always stopped and removed.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dtx_infra.kafka_broker import KafkaBroker
from dtx_infra.ports import free_ports
from dtx_infra.postgres import PostgresServer
from dtx_infra.settings import InfraSettings


@contextmanager
def _state_dir(prefix: str) -> Iterator[Path]:
    # /tmp rather than pytest's tmp_path: pytest's base dir is mode 0700, which the
    # postgres system user (PostgreSQL runs as it when we are root) cannot traverse.
    state = Path(tempfile.mkdtemp(prefix=prefix))
    state.chmod(0o755)
    try:
        yield state
    finally:
        shutil.rmtree(state, ignore_errors=True)


@contextmanager
def private_postgres(timeout_s: float = 120) -> Iterator[PostgresServer]:
    """A running PostgreSQL cluster of the caller's own; stopped and deleted afterwards."""
    with _state_dir("dtx-private-pg-") as state:
        (port,) = free_ports(1)
        server = PostgresServer(state, port)
        server.start(timeout_s=timeout_s)
        try:
            yield server
        finally:
            server.stop()


@contextmanager
def private_kafka(timeout_s: float = 180) -> Iterator[KafkaBroker]:
    """A running single-node KRaft broker of the caller's own; stopped and deleted afterwards."""
    with _state_dir("dtx-private-kafka-") as state:
        port, controller = free_ports(2)
        broker = KafkaBroker(state, InfraSettings.resolve(state).cache_dir, port, controller)
        broker.start(timeout_s=timeout_s)
        try:
            yield broker
        finally:
            broker.stop()
