"""Wiring of the payments service: ``dtx serve payments`` runs :data:`SERVICE`."""

from __future__ import annotations

from pathlib import Path

from dtx.v1 import payments_pb2_grpc
from dtx_payments.config import PaymentsSettings
from dtx_payments.handlers import PaymentsServicer
from dtx_payments.participant import ChargeManager
from dtx_runtime import ServiceContext, ServiceDefinition
from dtx_runtime.outbox import OUTBOX_MIGRATIONS, wire_outbox
from dtx_runtime.participant import BARRIER_MIGRATIONS
from dtx_runtime.participant.wiring import wire_participant

HERE = Path(__file__).parent


async def setup(ctx: ServiceContext[PaymentsSettings]) -> None:
    payments_pb2_grpc.add_PaymentsServicer_to_server(PaymentsServicer(ctx.db), ctx.server)
    barrier = wire_participant(ctx, ChargeManager())
    wire_outbox(ctx, barrier)


SERVICE = ServiceDefinition(
    name="payments",
    settings_type=PaymentsSettings,
    setup=setup,
    grpc_services=["dtx.v1.Payments", "dtx.v1.Participant"],
    migrations={
        "barrier": BARRIER_MIGRATIONS,
        "outbox": OUTBOX_MIGRATIONS,
        "payments": HERE / "migrations",
    },
)
