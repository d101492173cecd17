"""The real Apache Kafka broker (KRaft, one node) as a local child process.

The broker is a JVM started detached (own session, output in ``<state>/kafka/server.log``,
PID in ``<state>/kafka/kafka.pid``), so it outlives the ``dtx infra up`` that started it and
is found again by later commands through the pidfile. A PID is only trusted when that
process's command line still names our ``server.properties``: PIDs get reused.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from dtx_infra.asyncrun import run_coroutine
from dtx_infra.errors import InfraError
from dtx_infra.java import require_java
from dtx_infra.kafka_config import (
    KafkaParams,
    new_cluster_id,
    render_log4j_properties,
    render_server_properties,
)
from dtx_infra.kafka_jars import KAFKA_VERSION, RESOLVE_TIMEOUT_S, ensure_kafka_jars
from dtx_infra.ports import can_connect, ensure_port_free, wait_port_free
from dtx_infra.procs import (
    cmdline,
    exit_code,
    find_pids,
    pid_alive,
    read_pidfile,
    rotate_log,
    run,
    spawn_detached,
    tail_file,
    terminate,
    write_pidfile,
)
from dtx_infra.settings import HOST

MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
JVM_OPTS = (
    "-Xmx512m",
    "-Xms128m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-Djava.awt.headless=true",
)


@dataclass(frozen=True)
class RunningKafka:
    pid: int
    port: int
    controller_port: int


class KafkaBroker:
    """One KRaft broker+controller whose files all live in ``<state_dir>/kafka``."""

    def __init__(self, state_dir: Path, cache_dir: Path, port: int, controller_port: int) -> None:
        self.home = state_dir / "kafka"
        self.cache_dir = cache_dir
        self.port = port
        self.controller_port = controller_port
        self.data_dir = self.home / "data"
        self.config_path = self.home / "server.properties"
        self.log4j_path = self.home / "log4j.properties"
        self.log_path = self.home / "server.log"
        self.pid_path = self.home / "kafka.pid"
        self.instance_path = self.home / "instance.json"
        self.cluster_id_path = self.home / "cluster.id"

    @property
    def bootstrap(self) -> str:
        """``host:port`` of the running broker (or of the configured one when stopped)."""
        running = self.running()
        return f"{HOST}:{running.port if running else self.port}"

    # -- inspection -------------------------------------------------------------------------

    def _is_ours(self, pid: int) -> bool:
        args = cmdline(pid)
        return MAIN_CLASS in args and str(self.config_path) in args

    def running(self) -> RunningKafka | None:
        """The live broker started from this state dir, if any (pidfile + alive + ours)."""
        pid = read_pidfile(self.pid_path)
        if pid is None or not pid_alive(pid) or not self._is_ours(pid):
            return None
        try:
            info = json.loads(self.instance_path.read_text())
            return RunningKafka(pid, int(info["port"]), int(info["controller_port"]))
        except (OSError, ValueError, KeyError, TypeError):
            return RunningKafka(pid, self.port, self.controller_port)

    def is_running(self) -> bool:
        return self.running() is not None

    def pid(self) -> int | None:
        running = self.running()
        return running.pid if running else None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout_s: float = 120, resolve_timeout_s: float = RESOLVE_TIMEOUT_S) -> None:
        """Start the broker unless ours already runs; return once it answers metadata.

        ``resolve_timeout_s`` bounds the one-time jar download separately: it happens once
        per machine and must not eat into the readiness budget.
        """
        running = self.running()
        if running is not None:
            self._check_same_ports(running)
            return
        java = self.preflight()
        libs = ensure_kafka_jars(self.cache_dir, resolve_timeout_s)
        classpath = f"{libs}/*"
        self._write_config()
        self._format_storage(java, classpath)
        rotate_log(self.log_path)
        with self.log_path.open("a") as log:
            log.write(f"\n=== dtx_infra: starting Kafka {KAFKA_VERSION} at {time.ctime()} ===\n")
        cmd = [
            str(java),
            *JVM_OPTS,
            f"-Dlog4j.configuration={self.log4j_path.as_uri()}",
            f"-Dkafka.logs.dir={self.home / 'logs'}",
            "-cp",
            classpath,
            MAIN_CLASS,
            str(self.config_path),
        ]
        pid = spawn_detached(cmd, log=self.log_path, cwd=self.home)
        write_pidfile(self.pid_path, pid)
        self.instance_path.write_text(
            json.dumps({"pid": pid, "port": self.port, "controller_port": self.controller_port})
        )
        try:
            self._wait_ready(pid, timeout_s)
        except BaseException:
            self._kill(pid)
            raise

    def preflight(self) -> Path:
        """Cheap checks that must pass before anything starts; returns the java binary."""
        java = require_java()
        ensure_port_free(self.port, "DTX_KAFKA_PORT")
        ensure_port_free(self.controller_port, "DTX_KAFKA_CONTROLLER_PORT")
        return java

    def _check_same_ports(self, running: RunningKafka) -> None:
        if (running.port, running.controller_port) != (self.port, self.controller_port):
            raise InfraError(
                f"Kafka from {self.home} already runs on port {running.port} (controller "
                f"{running.controller_port}) but port {self.port} (controller "
                f"{self.controller_port}) was asked for; run `dtx infra down` first"
            )

    def _write_config(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        (self.home / "logs").mkdir(exist_ok=True)
        params = KafkaParams(self.port, self.controller_port, self.data_dir)
        self.config_path.write_text(render_server_properties(params))
        self.log4j_path.write_text(render_log4j_properties())

    def _format_storage(self, java: Path, classpath: str) -> None:
        """Format the KRaft log dir once; ``meta.properties`` marks a formatted dir."""
        if (self.data_dir / "meta.properties").is_file():
            return
        if not self.cluster_id_path.is_file():
            self.cluster_id_path.write_text(new_cluster_id() + "\n")
        cluster_id = self.cluster_id_path.read_text().strip()
        run(
            [
                str(java),
                "-Xmx256m",
                f"-Dlog4j.configuration={self.log4j_path.as_uri()}",
                "-cp",
                classpath,
                STORAGE_TOOL,
                "format",
                "--cluster-id",
                cluster_id,
                "--config",
                str(self.config_path),
                "--ignore-formatted",
            ],
            what="formatting Kafka storage (kafka.tools.StorageTool format)",
            timeout_s=120,
            cwd=self.home,
        )

    def _wait_ready(self, pid: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if not pid_alive(pid):
                code = exit_code(pid)
                how = f" with exit code {code}" if code is not None else ""
                raise InfraError(
                    f"Kafka exited during startup{how}; see {self.log_path}",
                    tail_file(self.log_path),
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InfraError(
                    f"Kafka did not answer metadata on {HOST}:{self.port} within "
                    f"{timeout_s:.0f}s; see {self.log_path}",
                    tail_file(self.log_path),
                )
            if can_connect(self.port) and _answers_metadata(
                f"{HOST}:{self.port}", min(5.0, max(remaining, 0.5))
            ):
                return
            time.sleep(0.25)

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM (controlled shutdown), SIGKILL after ``timeout_s``; verify nothing is left.

        Besides the pidfile's PID, any JVM whose command line names our server.properties is
        stopped too, so that a lost pidfile cannot leave an orphaned broker behind.
        """
        pids = set(find_pids(self._is_ours))
        pid = read_pidfile(self.pid_path)
        if pid is not None and pid_alive(pid) and self._is_ours(pid):
            pids.add(pid)
        if pids:
            terminate(sorted(pids), timeout_s, "stopping Kafka")
        for path in (self.pid_path, self.instance_path):
            path.unlink(missing_ok=True)
        if pids and not wait_port_free(self.port, 10):
            raise InfraError(f"Kafka stopped but port {self.port} is still not free")

    def _kill(self, pid: int) -> None:
        """Tear down a broker that failed to become ready; never raise over the real error."""
        with contextlib.suppress(InfraError):
            terminate([pid], 10, "stopping a Kafka that failed to start")
        for path in (self.pid_path, self.instance_path):
            path.unlink(missing_ok=True)


def _answers_metadata(bootstrap: str, timeout_s: float) -> bool:
    """True when the broker answers a Metadata request listing at least one broker."""

    async def probe() -> bool:
        from aiokafka.client import AIOKafkaClient

        client = AIOKafkaClient(
            bootstrap_servers=bootstrap,
            request_timeout_ms=int(timeout_s * 1000),
            client_id="dtx-infra-probe",
        )
        try:
            await client.bootstrap()
            return len(client.cluster.brokers()) > 0
        finally:
            await client.close()

    try:
        return run_coroutine(probe, timeout_s, "Kafka metadata probe")
    except Exception:
        return False
