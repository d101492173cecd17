"""Wiring of the coordinator: pools, policy, engine, recovery, gRPC."""

from __future__ import annotations

from pathlib import Path

from dtx.v1 import coordinator_pb2_grpc
from dtx_coordinator.config import CoordinatorSettings
from dtx_coordinator.engine import PROTOCOL, Engine
from dtx_coordinator.handlers import CoordinatorServicer
from dtx_coordinator.storage import TransactionLog
from dtx_runtime import ServiceContext, ServiceDefinition
from dtx_runtime.coordination.wiring import run_engine, wire_coordination
from dtx_runtime.policy import PolicyHolder


async def setup(ctx: ServiceContext[CoordinatorSettings]) -> None:
    coordination = await wire_coordination(ctx)
    engine = Engine(
        TransactionLog(ctx.db, coordination.lazy),
        coordination.policy,
        coordination.endpoint,
        coordination.known,
        owner=coordination.owner,
    )
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(engine), ctx.server)
    ctx.side_port.add_json_route("/status", lambda: _status(coordination.policy))
    run_engine(ctx, coordination, engine, protocol=PROTOCOL)


async def _status(policy: PolicyHolder) -> dict[str, object]:
    return {"policyHash": policy.hash}


SERVICE = ServiceDefinition(
    name="coordinator",
    settings_type=CoordinatorSettings,
    setup=setup,
    grpc_services=["dtx.v1.Coordinator"],
    migrations={"coordinator": Path(__file__).parent / "migrations"},
)
