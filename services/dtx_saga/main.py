"""Wiring of the saga orchestrator: ``dtx serve saga`` runs :data:`SERVICE`."""

from __future__ import annotations

from pathlib import Path

from dtx.v1 import saga_pb2_grpc
from dtx_runtime import ServiceContext, ServiceDefinition
from dtx_runtime.coordination.wiring import run_engine, wire_coordination
from dtx_runtime.policy import PolicyHolder
from dtx_saga.config import SagaSettings
from dtx_saga.engine import Engine
from dtx_saga.handlers import SagaOrchestratorServicer
from dtx_saga.metrics import PROTOCOL
from dtx_saga.storage import SagaLog


async def setup(ctx: ServiceContext[SagaSettings]) -> None:
    coordination = await wire_coordination(ctx)
    engine = Engine(
        SagaLog(ctx.db, coordination.lazy),
        coordination.policy,
        coordination.endpoint,
        coordination.known,
        owner=coordination.owner,
    )
    saga_pb2_grpc.add_SagaOrchestratorServicer_to_server(
        SagaOrchestratorServicer(engine), ctx.server
    )
    ctx.side_port.add_json_route("/status", lambda: _status(coordination.policy, engine))
    run_engine(ctx, coordination, engine, protocol=PROTOCOL)


async def _status(policy: PolicyHolder, engine: Engine) -> dict[str, object]:
    return {
        "policyHash": policy.hash,
        "owner": engine.owner,
        "inFlight": len(engine.local),
        "participants": engine.participants(),
    }


SERVICE = ServiceDefinition(
    name="saga",
    settings_type=SagaSettings,
    setup=setup,
    grpc_services=["dtx.v1.SagaOrchestrator"],
    migrations={"saga": Path(__file__).parent / "migrations"},
)
