"""``LocalInfra``: the PostgreSQL cluster and Kafka broker that dtx starts for itself.

Tests, the CLI and developers all go through this one object so that there is exactly one
definition of "the local infrastructure" (ports, state dir, settings). ``up`` is idempotent
and cheap when everything already runs, so every test session can simply call it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dtx_infra.errors import InfraError
from dtx_infra.kafka_broker import KafkaBroker
from dtx_infra.locking import file_lock
from dtx_infra.pg_config import PG_USER, SERVICE_DATABASES
from dtx_infra.ports import ensure_port_free
from dtx_infra.postgres import PostgresServer
from dtx_infra.settings import HOST, InfraSettings


@dataclass(frozen=True)
class Endpoints:
    """Where the running servers listen; what services and tests need to connect."""

    postgres_host: str
    postgres_port: int
    postgres_user: str
    kafka_bootstrap: str

    def dsn(self, database: str) -> str:
        return f"postgresql://{self.postgres_user}@{self.postgres_host}:{self.postgres_port}/{database}"

    def service_dsns(self) -> dict[str, str]:
        """One DSN per service database that ``up`` creates."""
        return {name: self.dsn(name) for name in SERVICE_DATABASES}


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    running: bool
    pid: int | None
    port: int


@dataclass(frozen=True)
class InfraStatus:
    postgres: ComponentStatus
    kafka: ComponentStatus
    state_dir: Path

    @property
    def components(self) -> tuple[ComponentStatus, ...]:
        return (self.postgres, self.kafka)

    @property
    def all_running(self) -> bool:
        return all(c.running for c in self.components)


class LocalInfra:
    """Start, stop and inspect the local PostgreSQL and Kafka kept in one state dir.

    ``state_dir`` defaults to ``$DTX_STATE_DIR`` or ``<repo>/.dtx``; ports default to
    ``$DTX_PG_PORT`` (55432), ``$DTX_KAFKA_PORT`` (59092) and ``$DTX_KAFKA_CONTROLLER_PORT``
    (Kafka port + 1). The keyword arguments override the environment, which is what tests
    use to run a private instance beside a developer's.
    """

    def __init__(
        self,
        state_dir: Path | None = None,
        *,
        pg_port: int | None = None,
        kafka_port: int | None = None,
        kafka_controller_port: int | None = None,
    ) -> None:
        self.settings = InfraSettings.resolve(
            state_dir,
            pg_port=pg_port,
            kafka_port=kafka_port,
            kafka_controller_port=kafka_controller_port,
        )
        self.state_dir = self.settings.state_dir
        self.postgres = PostgresServer(self.state_dir, self.settings.pg_port)
        self.kafka = KafkaBroker(
            self.state_dir,
            self.settings.cache_dir,
            self.settings.kafka_port,
            self.settings.kafka_controller_port,
        )
        self._lock_path = self.state_dir / "infra.lock"

    def _ensure_state_dir(self) -> None:
        """Create the state dir, traversable by the postgres user and ignored by git."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(self.state_dir.stat().st_mode | 0o711)
        ignore = self.state_dir / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# Local servers' state (dtx_infra); never commit it.\n*\n")

    def endpoints(self) -> Endpoints:
        """The endpoints of the running (or, when stopped, the configured) servers."""
        pg = self.postgres.running()
        return Endpoints(
            postgres_host=HOST,
            postgres_port=pg.port if pg else self.settings.pg_port,
            postgres_user=PG_USER,
            kafka_bootstrap=self.kafka.bootstrap,
        )

    def up(self, timeout_s: float = 120) -> Endpoints:
        """Start whatever is not running yet and return the endpoints.

        A second call while everything runs touches no server and returns at once.
        ``timeout_s`` bounds the servers' readiness; one-time provisioning (apt-get install
        postgresql, the Maven download of Kafka's jars) has its own, larger bounds.
        """
        if self.postgres.is_running() and self.kafka.is_running():
            self._check_ports()
            return self.endpoints()
        self._ensure_state_dir()
        deadline = time.monotonic() + timeout_s
        with file_lock(self._lock_path, timeout_s, "dtx infra up"):
            # Check ports and Java before starting anything, so that a taken Kafka port
            # does not leave a freshly started PostgreSQL behind.
            if not self.postgres.is_running():
                ensure_port_free(self.settings.pg_port, "DTX_PG_PORT")
            if not self.kafka.is_running():
                self.kafka.preflight()
            self.postgres.start(timeout_s=_remaining(deadline, "PostgreSQL"))
            self.kafka.start(timeout_s=_remaining(deadline, "Kafka"))
        return self.endpoints()

    def _check_ports(self) -> None:
        """Fail loudly when the running instance is not the one this object describes."""
        self.postgres.start()  # both are no-ops that only compare ports when running
        self.kafka.start()

    def down(self, timeout_s: float = 30) -> None:
        """Stop everything this state dir started; raise if any process survives.

        Both components are always attempted, so that a failure stopping Kafka does not
        leave PostgreSQL running (and vice versa).
        """
        if not self.state_dir.exists():
            return
        errors: list[InfraError] = []
        with file_lock(self._lock_path, timeout_s + 60, "dtx infra down"):
            for stop in (self.kafka.stop, self.postgres.stop):
                try:
                    stop(timeout_s)
                except InfraError as exc:
                    errors.append(exc)
        if errors:
            details = "\n".join(e.details for e in errors if e.details) or None
            raise InfraError("; ".join(e.summary for e in errors), details)

    def status(self) -> InfraStatus:
        pg = self.postgres.running()
        kafka = self.kafka.running()
        return InfraStatus(
            postgres=ComponentStatus(
                "postgres",
                pg is not None,
                pg.pid if pg else None,
                pg.port if pg else self.settings.pg_port,
            ),
            kafka=ComponentStatus(
                "kafka",
                kafka is not None,
                kafka.pid if kafka else None,
                kafka.port if kafka else self.settings.kafka_port,
            ),
            state_dir=self.state_dir,
        )


def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise InfraError(f"no time left to start {what}; raise the up() timeout")
    return left
