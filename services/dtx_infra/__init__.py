"""Test and development infrastructure for dtx (local processes, Kubernetes control plane).

``LocalInfra`` runs the project's own PostgreSQL cluster and Apache Kafka broker as local
processes (no containers: the machines have none), keeping their state in ``.dtx/``::

    from dtx_infra import LocalInfra

    eps = LocalInfra().up()          # idempotent
    eps.dsn("payments")              # postgresql://dtx@127.0.0.1:55432/payments
    eps.kafka_bootstrap              # 127.0.0.1:59092

The Kubernetes control plane lives in ``dtx_infra.kube`` and is imported from there.
"""

from dtx_infra.errors import InfraError
from dtx_infra.kafka_broker import KafkaBroker
from dtx_infra.local import ComponentStatus, Endpoints, InfraStatus, LocalInfra
from dtx_infra.pg_config import SERVICE_DATABASES
from dtx_infra.postgres import PostgresServer

__all__ = [
    "SERVICE_DATABASES",
    "ComponentStatus",
    "Endpoints",
    "InfraError",
    "InfraStatus",
    "KafkaBroker",
    "LocalInfra",
    "PostgresServer",
]
