"""The whole system as local processes: who talks to whom, set through each one's settings.

``dtx up``, ``dtx bench`` and the end-to-end tests all start services through
this one place, so the wiring a developer runs is the wiring that is tested.
Endpoints are chosen before anything starts (free loopback ports), exactly as
a cluster's Services are known before its pods start.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtx_cli.processes import ServiceProcess

PARTICIPANTS = ("orders", "payments", "inventory")
WITH_DATABASE = ("coordinator", "saga", "payments", "inventory", "orders", "notifications")


@dataclass
class LocalSystem:
    """A set of service processes wired to each other and to one PostgreSQL and Kafka."""

    log_dir: Path
    dsn: Callable[[str], str]
    services: Iterable[str] = ("coordinator", *PARTICIPANTS)
    replicas: dict[str, int] = field(default_factory=dict)
    policy: dict[str, Any] | None = None
    kafka_bootstrap: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, ServiceProcess] = field(default_factory=dict)

    def build(self) -> LocalSystem:
        """Choose ports, create databases (through ``dsn``), write the policy file, set env."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.policy_file = self.log_dir / "policy.json"
        self.policy_file.write_text(json.dumps(self.policy or {}))
        dsns: dict[str, str] = {}
        for name in self.services:
            if name in WITH_DATABASE:
                dsns[name] = self.dsn(name)
            for i in range(self.replicas.get(name, 1)):
                key = name if i == 0 else f"{name}{i}"
                self.procs[key] = ServiceProcess(name, {}, self.log_dir / key)
        endpoint = {k: p.endpoint for k, p in self.procs.items()}
        participants = ",".join(f"{n}={endpoint[n]}" for n in PARTICIPANTS if n in endpoint)
        for key, proc in self.procs.items():
            proc.env = {
                "DTX_DATABASE_URL": dsns.get(proc.name, ""),
                "DTX_COORDINATOR_ENDPOINT": endpoint.get("coordinator", "127.0.0.1:1"),
                "DTX_SAGA_ENDPOINT": endpoint.get("saga", "127.0.0.1:1"),
                "DTX_PAYMENTS_ENDPOINT": endpoint.get("payments", "127.0.0.1:1"),
                "DTX_INVENTORY_ENDPOINT": endpoint.get("inventory", "127.0.0.1:1"),
                "DTX_ORDERS_ENDPOINT": endpoint.get("orders", "127.0.0.1:1"),
                "DTX_NOTIFICATIONS_ENDPOINT": endpoint.get("notifications", "127.0.0.1:1"),
                "DTX_PARTICIPANTS": participants,
                "DTX_POLICY_FILE": str(self.policy_file),
                "DTX_REPLICA_ID": key,
                **({"DTX_KAFKA_BOOTSTRAP": self.kafka_bootstrap} if self.kafka_bootstrap else {}),
                **self.env,
            }
            if not proc.env["DTX_DATABASE_URL"]:
                del proc.env["DTX_DATABASE_URL"]
        self.dsns = dsns
        return self

    def start(self, timeout: float = 60) -> LocalSystem:
        self.spawn()
        self.wait_ready(timeout)
        return self

    def spawn(self) -> None:
        """Start every process without waiting for it: quick, so never worth abandoning half-way."""
        for proc in self.procs.values():
            proc.start(wait=False)

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until every process is ready; raise if one exits or is not ready in ``timeout``."""
        for proc in self.procs.values():
            proc.wait_ready(timeout)

    def stop(self) -> None:
        """SIGTERM everything (graceful), SIGKILL what does not stop in time."""
        for proc in self.procs.values():
            try:
                proc.terminate(15)
            except Exception:
                proc.kill()
