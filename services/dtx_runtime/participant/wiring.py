"""Wire a participant into a service: barrier, servicer, reaper, settings."""

from __future__ import annotations

from datetime import timedelta
from typing import TypeVar

from pydantic import Field

from dtx.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2_grpc, transactions_pb2
from dtx_runtime.channels import Channels
from dtx_runtime.participant.barrier import Barrier
from dtx_runtime.participant.manager import ResourceManager
from dtx_runtime.participant.reaper import run_reaper
from dtx_runtime.participant.servicer import ParticipantServicer
from dtx_runtime.service import ServiceContext
from dtx_runtime.settings import ServiceSettings


class ParticipantSettings(ServiceSettings):
    """What every participant reads besides the common settings."""

    coordinator_endpoint: str = Field(default="127.0.0.1:50060", pattern=r"^[^\s:]+:\d+$")
    reaper_interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    reaper_threshold_seconds: float = Field(default=10.0, ge=0, le=86400)
    barrier_retention_hours: int = Field(default=168, ge=1, le=24 * 365)


P = TypeVar("P", bound=ParticipantSettings)


def wire_participant(ctx: ServiceContext[P], manager: ResourceManager) -> Barrier:
    """Register ``dtx.v1.Participant`` for ``manager`` and start its reaper."""
    settings = ctx.settings
    barrier = Barrier(ctx.db, manager)
    participant_pb2_grpc.add_ParticipantServicer_to_server(ParticipantServicer(barrier), ctx.server)
    channels = Channels()
    coordinator = coordinator_pb2_grpc.CoordinatorStub(channels.get(settings.coordinator_endpoint))

    async def outcome_of(gid: str) -> transactions_pb2.Outcome.ValueType:
        reply = await coordinator.GetOutcome(coordinator_pb2.GetOutcomeRequest(gid=gid), timeout=5)
        return reply.outcome

    pool = ctx.db
    ctx.run_in_background(
        "reaper",
        lambda: run_reaper(
            pool,
            barrier,
            outcome_of,
            interval_s=settings.reaper_interval_seconds,
            older_than=timedelta(seconds=settings.reaper_threshold_seconds),
            retention=timedelta(hours=settings.barrier_retention_hours),
        ),
    )
    ctx.on_shutdown(channels.close)
    return barrier
