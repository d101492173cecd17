"""Wiring of the coordinator: pools, policy, engine, recovery, gRPC."""

from __future__ import annotations

from pathlib import Path

from dtx.v1 import coordinator_pb2_grpc
from dtx_coordinator.config import CoordinatorSettings
from dtx_coordinator.engine import PROTOCOL, Engine
from dtx_coordinator.handlers import CoordinatorServicer
from dtx_coordinator.storage import TransactionLog
from dtx_runtime import ServiceContext, ServiceDefinition
from dtx_runtime.coordination.records import lease_owner
from dtx_runtime.coordination.recovery import run_recovery
from dtx_runtime.database import create_pool
from dtx_runtime.policy import PolicyHolder


async def setup(ctx: ServiceContext[CoordinatorSettings]) -> None:
    settings = ctx.settings
    assert settings.database_url is not None
    lazy = await create_pool(
        settings.database_url,
        min_size=1,
        max_size=settings.lazy_pool_max,
        connect_timeout_s=settings.db_connect_timeout_seconds,
        server_settings={"synchronous_commit": "off"},
    )
    policy = PolicyHolder(settings.policy_file)

    def endpoint(name: str) -> str | None:
        return policy.current.endpoint_of(name) or settings.participants.get(name)

    def known() -> set[str]:
        return {p.name for p in policy.current.participants} | set(settings.participants)

    replica_prefix, owner = lease_owner(settings.replica_id)
    engine = Engine(TransactionLog(ctx.db, lazy), policy, endpoint, known, owner=owner)
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(engine), ctx.server)
    ctx.side_port.add_json_route("/status", lambda: _status(policy))
    ctx.run_in_background(
        "recovery",
        lambda: run_recovery(engine, protocol=PROTOCOL, replica_prefix=replica_prefix),
    )
    ctx.run_in_background("policy-watch", policy.watch)

    async def close() -> None:
        await engine.close()
        await lazy.close()

    ctx.on_shutdown(close)


async def _status(policy: PolicyHolder) -> dict[str, object]:
    return {"policyHash": policy.hash}


SERVICE = ServiceDefinition(
    name="coordinator",
    settings_type=CoordinatorSettings,
    setup=setup,
    grpc_services=["dtx.v1.Coordinator"],
    migrations={"coordinator": Path(__file__).parent / "migrations"},
)
